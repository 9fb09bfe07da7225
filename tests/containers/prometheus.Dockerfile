# Test stand-in for docker.io/prom/prometheus (no registry is reachable on the build machines):
# Debian's prometheus on the stand-in base, laid out like the official image (entrypoint
# /bin/prometheus, data in /prometheus, user nobody, busybox-style wget for the health check).
ARG BASE_IMAGE=localhost/standin-bookworm:1
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && install -d -o nobody -g nogroup /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
