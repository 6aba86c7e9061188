#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine (run as root): installs what it needs, then
# formatting, lints, the bare-metal build of the device client, every test, and the size probe.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
need_apt=()
command -v readelf >/dev/null || need_apt+=(binutils)
command -v cc >/dev/null || need_apt+=(gcc)
# The size probe's stack analysis (the device's RAM goal counts the stack) reads the disassembly.
command -v llvm-objdump >/dev/null || need_apt+=(llvm)
# Browser tests (tests/ui.rs) drive Debian's headless Chromium through chromedriver.
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
# The external-broker tests (tests/mosquitto.rs) start Debian's Mosquitto as a process.
[ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
    # The package starts a system Mosquitto on port 1883, where `tinyfleet demo` listens.
    if [[ " ${need_apt[*]} " == *" mosquitto "* ]]; then
      systemctl disable --now mosquitto >/dev/null 2>&1 || true
    fi
  else
    echo "missing ${need_apt[*]}: run as root or install them" >&2
    exit 1
  fi
fi
# The browser tests fail instead of skipping when Chromium is missing.
export TF_REQUIRE_BROWSER=1
export TF_REQUIRE_MOSQUITTO=1
# Real servers the tests start: VictoriaMetrics speaks InfluxDB's /api/v2/write.
scripts/ensure-victoria-metrics.sh
# PostgreSQL for the store's second backend: a throwaway cluster on 127.0.0.1 (reused if running),
# also serving TLS; the script prints TF_POSTGRES_URL and TF_POSTGRES_CA (its CA, for the TLS
# tests), and the store's tests fail instead of skipping their PostgreSQL half when either is
# missing. (Assigned first, so a failure of the script stops this one: `eval "$(...)"` alone
# would not.)
postgres_env="$(scripts/ensure-postgres.sh)"
eval "$postgres_env"
export TF_REQUIRE_POSTGRES=1
rustup component add rustfmt clippy >/dev/null 2>&1 || true
if ! rustup target list --installed | grep -qx thumbv7em-none-eabihf; then
  rustup target add thumbv7em-none-eabihf || echo "thumbv7em-none-eabihf cannot be installed here"
fi
cargo --version

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "optional features build: the broker's TLS listener"
cargo clippy -p tinyfleet-broker --features tls --all-targets --locked -- -D warnings

step "device client on bare metal (thumbv7em-none-eabihf), each feature set"
if rustup target list --installed | grep -qx thumbv7em-none-eabihf; then
  for features in "" "log" "defmt"; do
    echo "features: [${features}]"
    cargo build -p tinyfleet-device --locked --target thumbv7em-none-eabihf --no-default-features \
      ${features:+--features "$features"}
  done
  cargo clippy -p tinyfleet-device --locked --target thumbv7em-none-eabihf --no-default-features -- -D warnings
else
  echo "SKIPPED: rustup could not install thumbv7em-none-eabihf on this machine"
fi

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi

step "fuzz (fixed budget)"
# Every decoder of untrusted bytes (fuzz/, docs/security.md): each target for a few seconds from
# its seeds; a crash fails the step and names the input. The corpora grow in target/fuzz/.
scripts/fuzz.sh 6

step "benchmarks compile"
cargo bench --workspace --locked --no-run

step "size probe"
scripts/size-probe.sh --enforce

step "all checks passed"
