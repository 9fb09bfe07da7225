# Nginx in front of the service, with the configuration rendered from nginx/ (one source: the
# same template and renderer `make stack` and the tests use). Build from the repository root:
#   docker build -f deploy/nginx.Dockerfile -t tornado-nginx:0.1.0 .
# Settings of the renderer are build arguments (UPSTREAM: the service's address in the
# container network). Runs as www-data (uid 33), listens on 8080 (HTTP), 8443 (TLS, HTTP/2)
# and 127.0.0.1:8081 (stub_status, for an exporter sharing the network namespace). Mount a
# certificate at /etc/nginx/tls/tls.crt and tls.key (else a self-signed one is made at start).
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${PYTHON_IMAGE} AS render
ARG UPSTREAM=service:8888
ARG CLIENT_MAX_BODY_SIZE=1048576
ARG WORKER_CONNECTIONS=10000
ARG WORKER_RLIMIT_NOFILE=20000
WORKDIR /src
COPY nginx ./nginx
RUN python3 -m nginx.render --out /out/nginx.conf \
        --set UPSTREAM="${UPSTREAM}" \
        --set CLIENT_MAX_BODY_SIZE="${CLIENT_MAX_BODY_SIZE}" \
        --set WORKER_CONNECTIONS="${WORKER_CONNECTIONS}" \
        --set WORKER_RLIMIT_NOFILE="${WORKER_RLIMIT_NOFILE}" \
        --set RUN_DIR=/tmp/nginx \
        --set TLS_CERT=/tmp/nginx/tls/tls.crt \
        --set TLS_KEY=/tmp/nginx/tls/tls.key

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://example.invalid/tornado-prefork-service
LABEL org.opencontainers.image.title="tornado-prefork-nginx" \
      org.opencontainers.image.description="Nginx configured for the pre-fork Tornado service" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
# Debian's nginx (http2, ssl, stub_status built in); openssl makes a self-signed pair when no
# certificate is mounted.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx openssl \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log /etc/nginx/sites-enabled /etc/nginx/conf.d /var/log/nginx/* \
    && install -d -m 0755 /etc/nginx/tls
COPY --from=render /out/nginx.conf /etc/nginx/nginx.conf
COPY deploy/nginx-entrypoint.sh /usr/local/bin/nginx-entrypoint
USER 33:33
EXPOSE 8080 8443
STOPSIGNAL SIGQUIT
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8081 && printf 'GET /stub_status HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q 'Active connections' <&3"]
ENTRYPOINT ["nginx-entrypoint"]
