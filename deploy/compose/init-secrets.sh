#!/bin/sh
# Creates the secrets compose.yaml mounts, once: random passwords and tokens in ./secrets
# (directory 0700; files 0644 so the containers' users can read them through their bind
# mounts), and a self-signed certificate for the `tls` profile (replace it with a real one:
# secrets/mqtt-tls.crt, the chain, and secrets/mqtt-tls.key). Existing files are kept.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
chmod 0700 secrets

random() {
    # 32 random bytes, hex.
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
}

create_secret() {
    if [ ! -e "secrets/$1" ]; then
        printf '%s' "$2" > "secrets/$1"
        chmod 0644 "secrets/$1"
        echo "created secrets/$1"
    fi
}

create_secret influxdb-admin-password "$(random)"
create_secret influxdb-admin-token "$(random)"
create_secret grafana-admin-password "$(random)"
# Grafana starts with the admin token; replace it with a read-only one (deploy/README.md).
create_secret grafana-influx-token "$(cat secrets/influxdb-admin-token)"
create_secret mqtt-service-password "$(random)"

if [ ! -e secrets/mqtt-tls.crt ] || [ ! -e secrets/mqtt-tls.key ]; then
    if command -v openssl >/dev/null 2>&1; then
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
            -subj "/CN=${TINYFLEET_MQTT_HOST:-localhost}" \
            -keyout secrets/mqtt-tls.key -out secrets/mqtt-tls.crt 2>/dev/null
        chmod 0644 secrets/mqtt-tls.crt secrets/mqtt-tls.key
        echo "created a self-signed certificate in secrets/mqtt-tls.crt (replace it)"
    else
        : > secrets/mqtt-tls.crt
        : > secrets/mqtt-tls.key
        chmod 0644 secrets/mqtt-tls.crt secrets/mqtt-tls.key
        echo "openssl is missing: put a certificate chain and key in secrets/mqtt-tls.crt and .key"
    fi
fi
