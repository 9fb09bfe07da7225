# Test stand-in for docker.io/nginx/nginx-prometheus-exporter: Debian's exporter on the stand-in
# base, with the official image's entrypoint path and user.
ARG BASE_IMAGE=localhost/standin-bookworm:1
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus-nginx-exporter \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && ln -s /usr/bin/prometheus-nginx-exporter /usr/bin/nginx-prometheus-exporter
USER 1001:1001
EXPOSE 9113
ENTRYPOINT ["/usr/bin/nginx-prometheus-exporter"]
