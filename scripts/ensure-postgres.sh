#!/usr/bin/env bash
# Makes sure a throwaway PostgreSQL server runs for the store's tests and prints, on stdout, the
# lines that export its URL and the CA of its TLS certificate:
#   export TF_POSTGRES_URL='postgres://postgres@127.0.0.1:<port>/postgres'
#   export TF_POSTGRES_CA='/tmp/tinyfleet-postgres/tls/ca.pem'
# Use it as `eval "$(scripts/ensure-postgres.sh)"`. Diagnostics go to stderr.
#
# - Installs the Debian `postgresql` package with apt-get when no server binaries are found
#   (as root; the package's own cluster is left alone).
# - The cluster lives in $TF_POSTGRES_DIR (default /tmp/tinyfleet-postgres), owned by the
#   `postgres` user when run as root (initdb refuses root), listens on 127.0.0.1 only, on a free
#   port, with `trust` authentication on loopback (a test server: never expose it).
# - TLS: the server also accepts TLS (plain connections keep working), with a certificate for
#   127.0.0.1 and localhost signed by a private CA, both made with openssl into $base/tls
#   (ca.pem is what TF_POSTGRES_CA names; the CA's key is not kept). A cluster made before this
#   gets them and `ssl = on` on its next run, by a reload.
# - Idempotent: a cluster already running there is reused; a stopped one is started again.
#   Stop it with: pg_ctl -D "$TF_POSTGRES_DIR/data" stop (as its owner).
set -euo pipefail

base="${TF_POSTGRES_DIR:-/tmp/tinyfleet-postgres}"
case "$base" in
  /*) ;;
  *) base="$PWD/$base" ;; # postgresql.conf names the certificate files by absolute path
esac
data="$base/data"
tls="$base/tls"

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
  echo "export TF_POSTGRES_CA='$tls/ca.pem'"
}

# The private CA and the server's certificate (127.0.0.1 and localhost), made once (again when
# a file is missing or the certificate expires within a week). Prints "new" when it made them.
make_certificates() {
  if [ -s "$tls/ca.pem" ] && [ -s "$tls/server.crt" ] && [ -s "$tls/server.key" ] &&
    openssl x509 -in "$tls/server.crt" -noout -checkend 604800 >/dev/null 2>&1; then
    return
  fi
  command -v openssl >/dev/null 2>&1 || {
    log "openssl is needed for the test server's TLS certificate: apt-get install openssl"
    return 1
  }
  local tmp
  tmp="$(mktemp -d "$base/tls.new.XXXXXX")" || return 1
  if ! {
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 \
      -days 3650 -subj "/CN=tinyfleet test CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout "$tmp/ca.key" -out "$tmp/ca.pem" &&
      openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 \
        -subj "/CN=localhost" -keyout "$tmp/server.key" -out "$tmp/server.csr" &&
      printf '%s\n' "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
        "subjectAltName=IP:127.0.0.1,DNS:localhost" >"$tmp/server.ext" &&
      openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 3650 -sha256 \
        -extfile "$tmp/server.ext" -out "$tmp/server.crt"
  } >"$tmp/openssl.log" 2>&1; then
    cat "$tmp/openssl.log" >&2
    rm -rf "$tmp"
    log "making the TLS certificates failed"
    return 1
  fi
  # The server refuses a key others can read; the CA's key is not needed any more.
  if ! {
    mkdir -p "$tls" &&
      chmod 0755 "$tls" &&
      chmod 0644 "$tmp/ca.pem" "$tmp/server.crt" &&
      chmod 0600 "$tmp/server.key" &&
      if [ "$(id -u)" = 0 ]; then
        chown "$owner" "$tls" "$tmp/server.key" "$tmp/server.crt" "$tmp/ca.pem"
      fi &&
      mv -f "$tmp/server.key" "$tls/server.key" &&
      mv -f "$tmp/server.crt" "$tls/server.crt" &&
      mv -f "$tmp/ca.pem" "$tls/ca.pem"
  }; then
    rm -rf "$tmp"
    log "installing the TLS certificates into $tls failed"
    return 1
  fi
  rm -rf "$tmp"
  log "made a TLS certificate for 127.0.0.1 and localhost in $tls (CA: $tls/ca.pem)"
  echo new
}

# `ssl = on` and the certificate files in postgresql.conf (once; later lines win). Prints
# "new" when it added them.
configure_tls() {
  local conf="$data/postgresql.conf"
  if grep -q '^# tinyfleet: TLS' "$conf"; then
    return
  fi
  as_owner tee -a "$conf" >/dev/null <<CONF || return 1

# tinyfleet: TLS for the store's tests (scripts/ensure-postgres.sh); plain text keeps working.
ssl = on
ssl_cert_file = '$tls/server.crt'
ssl_key_file = '$tls/server.key'
CONF
  echo new
}

# Both, under a lock (several test runs may start at once).
setup_tls() {
  (
    flock 9 || exit 1
    make_certificates || exit 1
    configure_tls || exit 1
  ) 9>"$base/tls.lock"
}

psql_at() {
  local port="$1"
  shift
  "$bindir/psql" -X -q -At -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"
}

# Fails unless a TLS connection that verifies the certificate against the CA works.
check_tls() {
  local got
  got="$(PGSSLMODE=verify-full PGSSLROOTCERT="$tls/ca.pem" PGCONNECT_TIMEOUT=10 \
    psql_at "$1" -c "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()" 2>&1)" || true
  if [ "$got" != t ]; then
    log "TLS to 127.0.0.1:$1 does not work ($got); see $base/server.log"
    tail -n 5 "$base/server.log" >&2 || true
    return 1
  fi
}

mkdir -p "$base"
chmod 0755 "$base"
if [ "$(id -u)" = 0 ]; then
  chown "$owner" "$base"
fi

# Reuse a cluster that is already running (made by an older version of this script: TLS is
# added with a reload, which leaves connections and data alone).
if [ -f "$base/port" ]; then
  port="$(cat "$base/port")"
  if accepts "$port"; then
    changed="$(setup_tls)" || exit 1
    if [ -n "$changed" ] || [ "$(psql_at "$port" -c 'SHOW ssl' 2>/dev/null)" != on ]; then
      log "reloading the cluster in $data for its TLS settings"
      as_owner "$bindir/pg_ctl" -D "$data" reload >/dev/null
      for _ in $(seq 1 50); do
        [ "$(psql_at "$port" -c 'SHOW ssl' 2>/dev/null)" = on ] && break
        sleep 0.1
      done
    fi
    check_tls "$port"
    log "reusing the cluster in $data on 127.0.0.1:$port"
    emit "$port"
    exit 0
  fi
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

setup_tls >/dev/null || exit 1

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
check_tls "$started"
echo "$started" >"$base/port"
log "started PostgreSQL in $data on 127.0.0.1:$started (plain text and TLS)"
emit "$started"
