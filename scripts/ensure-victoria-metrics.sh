#!/usr/bin/env bash
# Makes sure the VictoriaMetrics single-node server (Debian package `victoria-metrics`) is
# installed, installing it with apt-get when it is missing, and prints the binary's path.
# The sink-influx tests use it as a real server for InfluxDB's /api/v2/write.
set -euo pipefail

find_bin() {
  if [ -n "${VICTORIA_METRICS_BIN:-}" ] && [ -x "$VICTORIA_METRICS_BIN" ]; then
    echo "$VICTORIA_METRICS_BIN"
  elif [ -x /usr/bin/victoria-metrics ]; then
    echo /usr/bin/victoria-metrics
  else
    command -v victoria-metrics || true
  fi
}

bin="$(find_bin)"
if [ -z "$bin" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "victoria-metrics is not installed; run as root, or: apt-get install victoria-metrics" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  log="$(mktemp)"
  # The package's service cannot start without systemd; the tests start their own instances.
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends victoria-metrics; } \
    >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "installing victoria-metrics with apt-get failed" >&2
    exit 1
  fi
  rm -f "$log"
  bin="$(find_bin)"
  if [ -z "$bin" ]; then
    echo "victoria-metrics was installed but its binary was not found" >&2
    exit 1
  fi
fi
echo "$bin"
