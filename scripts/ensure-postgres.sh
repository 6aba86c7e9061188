#!/usr/bin/env bash
# Makes sure a throwaway PostgreSQL server runs for the store's tests and prints, on stdout, the
# line that exports its URL:
#   export TF_POSTGRES_URL='postgres://postgres@127.0.0.1:<port>/postgres'
# Use it as `eval "$(scripts/ensure-postgres.sh)"`. Diagnostics go to stderr.
#
# - Installs the Debian `postgresql` package with apt-get when no server binaries are found
#   (as root; the package's own cluster is left alone).
# - The cluster lives in $TF_POSTGRES_DIR (default /tmp/tinyfleet-postgres), owned by the
#   `postgres` user when run as root (initdb refuses root), listens on 127.0.0.1 only, on a free
#   port, with `trust` authentication on loopback (a test server: never expose it).
# - Idempotent: a cluster already running there is reused; a stopped one is started again.
#   Stop it with: pg_ctl -D "$TF_POSTGRES_DIR/data" stop (as its owner).
set -euo pipefail

base="${TF_POSTGRES_DIR:-/tmp/tinyfleet-postgres}"
data="$base/data"

log() { echo "ensure-postgres: $*" >&2; }

find_bindir() {
  local d
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
      echo "$d"
      return
    fi
  fi
  # Debian keeps the server binaries per major version, outside PATH.
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
      echo "$d"
      return
    fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v pg_ctl)"
  fi
}

bindir="$(find_bindir)"
if [ -z "$bindir" ]; then
  if [ "$(id -u)" != 0 ]; then
    log "PostgreSQL is not installed; run as root, or: apt-get install postgresql"
    exit 1
  fi
  log "installing postgresql with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  aptlog="$(mktemp)"
  if ! { apt-get update -qq && apt-get install -y -qq postgresql; } >"$aptlog" 2>&1; then
    cat "$aptlog" >&2
    rm -f "$aptlog"
    log "installing postgresql with apt-get failed"
    exit 1
  fi
  rm -f "$aptlog"
  bindir="$(find_bindir)"
  if [ -z "$bindir" ]; then
    log "postgresql was installed but initdb/pg_ctl were not found"
    exit 1
  fi
fi

# Runs a command as the cluster's owner: `postgres` when we are root, else ourselves.
if [ "$(id -u)" = 0 ]; then
  if ! id postgres >/dev/null 2>&1; then
    log "running as root needs the 'postgres' user (created by the postgresql package)"
    exit 1
  fi
  as_owner() { runuser -u postgres -- "$@"; }
  owner=postgres
else
  as_owner() { "$@"; }
  owner="$(id -un)"
fi

url_of() { echo "postgres://postgres@127.0.0.1:$1/postgres"; }

accepts() {
  "$bindir/pg_isready" -q -h 127.0.0.1 -p "$1" -U postgres -d postgres >/dev/null 2>&1
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

emit() {
  echo "export TF_POSTGRES_URL='$(url_of "$1")'"
}

# Reuse a cluster that is already running.
if [ -f "$base/port" ]; then
  port="$(cat "$base/port")"
  if accepts "$port"; then
    log "reusing the cluster in $data on 127.0.0.1:$port"
    emit "$port"
    exit 0
  fi
fi

mkdir -p "$base"
chmod 0755 "$base"
if [ "$(id -u)" = 0 ]; then
  chown "$owner" "$base"
fi

if [ ! -f "$data/PG_VERSION" ]; then
  rm -rf "$data"
  log "initdb $data ($("$bindir/initdb" --version))"
  as_owner "$bindir/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 \
    --no-locale >"$base/initdb.log" 2>&1 || {
    cat "$base/initdb.log" >&2
    log "initdb failed"
    exit 1
  }
fi

# A stopped cluster (reboot, killed): clear a stale pid file so pg_ctl can start it.
if [ -f "$data/postmaster.pid" ] && ! as_owner "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
  rm -f "$data/postmaster.pid"
fi

started=""
for attempt in $(seq 1 20); do
  port=$(( 20000 + (RANDOM % 20000) ))
  port_free "$port" || continue
  # Loopback only, sockets in the cluster's own directory, enough connections for parallel
  # tests (each test database holds a few).
  opts="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$base"
  opts="$opts -c max_connections=300 -c shared_buffers=64MB"
  if as_owner "$bindir/pg_ctl" -D "$data" -l "$base/server.log" -w -t 60 -o "$opts" start \
    >/dev/null 2>&1; then
    started="$port"
    break
  fi
  log "starting on port $port failed (attempt $attempt); trying another port"
  tail -n 5 "$base/server.log" >&2 || true
done
if [ -z "$started" ]; then
  log "could not start PostgreSQL; see $base/server.log"
  exit 1
fi

for _ in $(seq 1 100); do
  accepts "$started" && break
  sleep 0.1
done
if ! accepts "$started"; then
  log "PostgreSQL started but does not accept connections on 127.0.0.1:$started"
  exit 1
fi
echo "$started" >"$base/port"
log "started PostgreSQL in $data on 127.0.0.1:$started"
emit "$started"
