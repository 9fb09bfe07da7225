# Test stand-in for docker.io/library/redis (no registry is reachable on the build machines):
# Debian's redis-server on the stand-in base, with the official image's user (999) and data
# directory; the compose file passes `redis-server ...` as the command, as it does to the real one.
ARG BASE_IMAGE=localhost/standin-bookworm:1
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && groupmod -g 999 redis && usermod -u 999 -g 999 redis \
    && install -d -o 999 -g 999 /data
USER 999:999
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
