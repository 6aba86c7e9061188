#!/usr/bin/env bash
# Fuzzes every decoder of untrusted bytes for a fixed time each (fuzz/, cargo-fuzz + libFuzzer).
#
#   scripts/fuzz.sh [seconds-per-target] [target ...]     default: 20 s, every target
#
# Installs what it needs (a C++ compiler for libFuzzer, as root with apt-get; cargo-fuzz with
# cargo install), builds all targets, then runs each for the budget, its corpus seeded from
# fuzz/seeds/<target>/ (valid messages, so fuzzing starts past the outer layers) and kept in
# $FUZZ_TARGET_DIR/corpus/<target>/ between runs. Fails if any target crashes (a panic, a
# timeout of one input, or running out of memory), after printing the crashing input's path and
# the command that reproduces it.
#
# The build is `cargo fuzz build --dev` with the profile in fuzz/Cargo.toml: the code under test
# optimised, the rest (runtime, HTTP, SQL, TLS) not, debug assertions and overflow checks on
# everywhere. A cold build takes about 5 minutes of CPU (less than half of cargo-fuzz's default
# release build), and fuzzing speed is the same where it matters.
#
# Environment: FUZZ_SANITIZER (default `none`; `address` works too, the ASan runtime ships with
# the stable toolchain, at about half the speed: the code is `forbid(unsafe_code)`, so panics,
# hangs and memory exhaustion are what is looked for), FUZZ_TARGET_DIR (default target/fuzz),
# FUZZ_TIMEOUT (seconds one input may take, default 10), FUZZ_RSS_MB (default 2048),
# FUZZ_MAX_CORPUS (a kept corpus above this many files is minimised first, default 4000).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-20}"
[ $# -gt 0 ] && shift
sanitizer="${FUZZ_SANITIZER:-none}"
target_dir="${FUZZ_TARGET_DIR:-$PWD/target/fuzz}"
timeout="${FUZZ_TIMEOUT:-10}"
rss_mb="${FUZZ_RSS_MB:-2048}"
max_corpus="${FUZZ_MAX_CORPUS:-4000}"
case "$secs" in '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [seconds-per-target] [target ...]" >&2; exit 2 ;; esac

# cargo-fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov-module, ...); the stable
# toolchain accepts them with RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1

if ! command -v c++ >/dev/null; then
  # libfuzzer-sys compiles libFuzzer (C++).
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++
  else
    echo "fuzz: no C++ compiler (libFuzzer needs one): run as root or install g++" >&2
    exit 1
  fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi

# The fuzz crate is a workspace of its own: give it the main workspace's locked versions (cargo
# adds only libfuzzer-sys and what it needs), again whenever the workspace's change.
if [ ! -f fuzz/Cargo.lock ] || [ Cargo.lock -nt fuzz/Cargo.lock ]; then
  cp Cargo.lock fuzz/Cargo.lock
fi

common=(--dev --fuzz-dir fuzz --sanitizer "$sanitizer" --target-dir "$target_dir")

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
  [ ${#targets[@]} -gt 0 ] || { echo "fuzz: cargo fuzz list found no targets" >&2; exit 1; }
fi
echo "fuzz: building ${#targets[@]} targets (sanitizer: $sanitizer)"
start=$SECONDS
cargo fuzz build "${common[@]}"
echo "fuzz: built in $((SECONDS - start)) s; ${secs} s per target"
bin_dir="$target_dir/$(rustc -vV | sed -n 's/^host: //p')/debug"

failed=()
for t in "${targets[@]}"; do
  corpus="$target_dir/corpus/$t"
  artifacts="$PWD/fuzz/artifacts/$t"
  seeds="fuzz/seeds/$t"
  [ -d "$seeds" ] || { echo "fuzz: no seeds for $t ($seeds)" >&2; exit 1; }
  mkdir -p "$corpus" "$artifacts"
  log="$target_dir/$t.log"
  if [ "$(find "$corpus" -type f | wc -l)" -gt "$max_corpus" ]; then
    # Keep only inputs that add coverage, so loading the corpus stays a small part of the budget.
    rm -rf "$corpus.min" && mkdir -p "$corpus.min"
    if "$bin_dir/$t" -merge=1 -timeout="$timeout" "$corpus.min" "$corpus" >"$log" 2>&1; then
      rm -rf "$corpus" && mv "$corpus.min" "$corpus"
    fi
  fi
  printf 'fuzz: %-18s ' "$t"
  # The first directory receives the inputs that find new coverage; the seeds are only read.
  if "$bin_dir/$t" -artifact_prefix="$artifacts/" -max_total_time="$secs" -timeout="$timeout" \
      -rss_limit_mb="$rss_mb" -print_final_stats=1 "$corpus" "$seeds" >"$log" 2>&1; then
    runs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || true)
    echo "ok: ${runs:-?} inputs, coverage ${cov:-?}, corpus $(find "$corpus" -type f | wc -l) files"
  else
    echo "FAILED"
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|deadly signal|timeout|out-of-memory' "$log" \
      | head -5 | sed 's/^/    /' || true
    crash=$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -1 | sed 's/Test unit written to //' || true)
    if [ -n "$crash" ]; then
      echo "    crashing input: $crash"
      echo "    reproduce: $bin_dir/$t $crash"
      echo "           or: RUSTC_BOOTSTRAP=1 cargo fuzz run ${common[*]} $t $crash"
    fi
    echo "    full log: $log"
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${secs} s without a crash ($((SECONDS - start)) s in all)"
