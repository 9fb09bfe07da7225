#!/bin/sh
# Start Nginx in the foreground as PID 1 (SIGQUIT: graceful stop). The only writable place is
# /tmp (a tmpfs when the root filesystem is read-only); nginx.conf reads its TLS pair from
# /tmp/nginx/tls. A pair mounted at /etc/nginx/tls/tls.crt and tls.key is linked there; without
# one a self-signed pair for localhost is made, fine for a laptop and wrong for anything else.
set -eu
mkdir -p /tmp/nginx/tls
if [ -s /etc/nginx/tls/tls.crt ] && [ -s /etc/nginx/tls/tls.key ]; then
    ln -sf /etc/nginx/tls/tls.crt /etc/nginx/tls/tls.key /tmp/nginx/tls/
else
    echo "nginx-entrypoint: no certificate mounted at /etc/nginx/tls; using a self-signed one for localhost" >&2
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -keyout /tmp/nginx/tls/tls.key -out /tmp/nginx/tls/tls.crt 2>/dev/null
fi
exec nginx -e stderr -g 'daemon off;' "$@"
