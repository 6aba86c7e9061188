#!/usr/bin/env bash
# measure.sh "FEATURES" BIN... : builds vprobe for thumbv7em-none-eabihf with FEATURES and prints,
# per BIN, flash (vector_table+text+rodata+data), static RAM (.data+.bss), and the deepest stack
# path below Reset (device-client/size-probe/stack.py, same as scripts/size-probe.sh).
set -euo pipefail
R="$(cd "$(dirname "$0")" && pwd)"
export CARGO_TARGET_DIR="$R/../../target/ed25519-stack"
feat="$1"; shift
cd $R
cargo build -q --release --target thumbv7em-none-eabihf -p vprobe --features "$feat" --bins >&2
for b in "$@"; do
  elf=$CARGO_TARGET_DIR/thumbv7em-none-eabihf/release/$b
  read -r flash ram < <(readelf -S -W "$elf" | sed -n 's/^ *\[ *[0-9]*\] *//p' | python3 -c '
import sys
f = r = 0
for l in sys.stdin:
    x = l.split()
    if len(x) < 7 or "A" not in x[6]: continue
    s = int(x[4], 16)
    if x[0] == ".bss": r += s
    elif x[0] == ".data": f += s; r += s
    else: f += s
print(f, r)')
  llvm-objdump -d --no-show-raw-insn "$elf" > "$CARGO_TARGET_DIR/$b.dis"
  st="$(python3 "$R/../../device-client/size-probe/stack.py" Reset 8 < "$CARGO_TARGET_DIR/$b.dis")"
  echo "=== $b [$feat]: flash $flash, static RAM $ram, stack $(sed -n 's/^TOTAL //p' <<<"$st")"
  grep '^|' <<<"$st"; grep '^NOTES' <<<"$st"
done
