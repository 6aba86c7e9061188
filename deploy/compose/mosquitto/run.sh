#!/bin/sh
# Mosquitto's command in compose.yaml (profile `mosquitto`): waits for the password file that
# tinyfleet writes into the shared volume, runs Mosquitto, and sends it SIGHUP (reload the
# password and ACL files) whenever tinyfleet replaces the file: devices provisioned or revoked
# through tinyfleet can connect, or not, within seconds. Runs as root in the container (the
# image's entrypoint); Mosquitto itself drops to the user mosquitto.
set -eu

PASSWD=/tinyfleet-auth/tinyfleet.passwd
CONF=/mosquitto/config/mosquitto.conf

until [ -s "$PASSWD" ]; do
    echo "run.sh: waiting for $PASSWD (written by tinyfleet on start)"
    sleep 2
done

/usr/sbin/mosquitto -c "$CONF" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"; exit 0' TERM INT

seen=$(stat -c '%i %Y %s' "$PASSWD" 2>/dev/null || echo none)
while kill -0 "$pid" 2>/dev/null; do
    sleep 2 &
    wait $! || true
    now=$(stat -c '%i %Y %s' "$PASSWD" 2>/dev/null || echo none)
    if [ "$now" != "$seen" ] && [ "$now" != none ]; then
        seen=$now
        kill -HUP "$pid" 2>/dev/null || true
    fi
done
wait "$pid"
