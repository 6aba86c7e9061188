#!/usr/bin/env bash
# Size probe: cross-compiles tinyfleet-device (device-client/size-probe) for a Cortex-M4F and
# prints, as markdown, for the monitoring side alone (`size-probe`) and for the whole client with
# the OTA installer (`size-probe-ota`): flash and static RAM use, the sizes of the state a device
# keeps, the biggest symbols, and whether the budgets hold; for the whole client also the deepest
# stack path (from the disassembly, when llvm-objdump and python3 are there).
#
#   scripts/size-probe.sh            # report; exit 0 unless the build/measurement fails
#   scripts/size-probe.sh --enforce  # also exit 1 when a budget is exceeded (for CI)
#
# If the target is not installed and cannot be installed, prints `size-probe: SKIPPED (...)` and
# exits 0. Builds only the standalone probe crate, in its own target dir
# (target/size-probe), never the main workspace. Extra RUSTFLAGS from the environment are
# honoured (e.g. RUSTFLAGS='--cfg sha2_backend_soft="compact"' to try sha2's compact backend).
set -euo pipefail

TARGET=thumbv7em-none-eabihf
FLASH_BUDGET=12288 # bytes: .vector_table + .text + .rodata + .data (+ any other loaded section)
RAM_BUDGET=2048    # bytes: monitoring state a device keeps: .data + .bss + size_of(ReferenceMonitor)
# The whole client (monitoring + OTA installer, signature check included), issue 5's goal.
OTA_FLASH_BUDGET=49152 # bytes, as FLASH_BUDGET
OTA_RAM_BUDGET=8192    # bytes: peak RAM, static RAM + state + stack (see below)
TOP=15

enforce=0
case "${1:-}" in
"") ;;
--enforce) enforce=1 ;;
*)
  echo "usage: $0 [--enforce]" >&2
  exit 2
  ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
probe="$repo/device-client/size-probe"
target_dir="$repo/target/size-probe"
elf="$target_dir/$TARGET/release/size-probe"
ota_elf="$target_dir/$TARGET/release/size-probe-ota"

skip() {
  echo "size-probe: SKIPPED ($1)"
  exit 0
}
fail() {
  echo "size-probe: FAILED ($1)" >&2
  exit 1
}

# Run from the probe so that rustup resolves the same toolchain as the build below.
cd "$probe"

# --- 1. The target ------------------------------------------------------------------------
if command -v rustup >/dev/null 2>&1; then
  installed="$(rustup target list --installed 2>/dev/null || true)"
  if ! grep -qx "$TARGET" <<<"$installed"; then
    echo "size-probe: $TARGET not installed, trying: rustup target add $TARGET" >&2
    if ! rustup target add "$TARGET" >&2; then
      skip "rustup target add $TARGET failed"
    fi
  fi
else
  # No rustup: usable only if the toolchain already ships the target's core library.
  sysroot="$(rustc --print sysroot 2>/dev/null)" || skip "neither rustup nor rustc found"
  [[ -d "$sysroot/lib/rustlib/$TARGET/lib" ]] ||
    skip "$TARGET not in $sysroot and no rustup to install it"
fi

# --- 2. Tools -----------------------------------------------------------------------------
pick() {
  local t
  for t in "$@"; do
    if command -v "$t" >/dev/null 2>&1; then
      echo "$t"
      return 0
    fi
  done
  return 1
}
READELF="$(pick readelf llvm-readelf)" || fail "need readelf or llvm-readelf"
NM="$(pick nm llvm-nm)" || fail "need nm or llvm-nm"

# --- 3. Build (a failure here is a real failure: set -e, non-zero exit) -------------------
echo "size-probe: building $probe for $TARGET (target dir $target_dir)" >&2
cargo build --release --target "$TARGET" --target-dir "$target_dir" \
  --manifest-path "$probe/Cargo.toml" >&2 || fail "cargo build of the probe failed"
[[ -f "$elf" ]] || fail "no ELF at $elf"
[[ -f "$ota_elf" ]] || fail "no ELF at $ota_elf"

# --- 4. Section sizes ---------------------------------------------------------------------
# `readelf -S -W` rows: [Nr] Name Type Addr Off Size ES Flg Lk Inf Al (Size in hex). Strip the
# "[ n]" prefix, whose inner space would shift the fields. Every allocated section counts:
# NOBITS ones (.bss) take RAM only, RAM-addressed PROGBITS ones (.data) take RAM and flash
# (their initial values), the rest flash only. Sets vt text rodata data bss flash ram and
# other_flash other_ram other_names for the ELF given.
sections() {
declare -gA sec=()
other_flash=0
other_ram=0
other_names=""
while read -r name type addr _off size _es flg _rest; do
  [[ "$flg" == *A* ]] || continue
  bytes=$((16#$size))
  sec[$name]=$((${sec[$name]:-0} + bytes))
  case "$name" in
  .vector_table | .text | .rodata | .data | .bss) ;;
  *)
    ((bytes > 0)) || continue
    other_names+=" $name($bytes)"
    if [[ "$type" == NOBITS ]]; then
      other_ram=$((other_ram + bytes))
    elif ((16#$addr >= 0x20000000 && 16#$addr < 0x40000000)); then
      other_ram=$((other_ram + bytes))
      other_flash=$((other_flash + bytes))
    else
      other_flash=$((other_flash + bytes))
    fi
    ;;
  esac
done < <("$READELF" -S -W "$1" | sed -n 's/^ *\[ *[0-9]*\] *//p' | grep -v '^NULL')

vt=${sec[.vector_table]:-0}
text=${sec[.text]:-0}
rodata=${sec[.rodata]:-0}
data=${sec[.data]:-0}
bss=${sec[.bss]:-0}
flash=$((vt + text + rodata + data + other_flash))
ram=$((data + bss + other_ram))
flash_detail=".vector_table $vt + .text $text + .rodata $rodata + .data $data"
ram_detail=".data $data + .bss $bss"
if [[ -n "$other_names" ]]; then
  flash_detail+=" + other:$other_names"
  ram_detail+=" (other: $other_ram)"
fi
}
sections "$elf"

# --- 5. Sizes of types, published by the probe as symbol sizes (section .probe_info) ------
symsize() { # symbol [elf]
  local s
  s="$("$NM" -S "${2:-$elf}" | awk -v n="$1" '$NF == n { print $2; exit }')"
  [[ -n "$s" ]] || fail "symbol $1 not found in ${2:-$elf}"
  echo $((16#$s))
}
monitor_size="$(symsize PROBE_SIZE_OF_REFERENCE_MONITOR)"
monitor_align="$(symsize PROBE_ALIGN_OF_REFERENCE_MONITOR)"
edges_size="$(symsize PROBE_SIZE_OF_PROFILE_EDGES)"

# --- 6. Report ----------------------------------------------------------------------------
verdict() { # measured budget
  if (($1 < $2)); then echo "PASS"; else echo "FAIL ($(($1 - $2)) bytes over)"; fi
}
flash_verdict="$(verdict "$flash" "$FLASH_BUDGET")"
# A device keeps one monitor for its whole life (in a static on real firmware; on the probe's
# stack here), so the RAM goal counts it on top of the static sections.
state_ram=$((ram + monitor_size))
ram_verdict="$(verdict "$state_ram" "$RAM_BUDGET")"

rustc_v="$(rustc --version)"
echo "## tinyfleet-device size probe"
echo
echo "Target \`$TARGET\`, $rustc_v, release profile: opt-level = \"z\", lto = true," \
  "codegen-units = 1, panic = \"abort\"; linked by rust-lld with \`device-client/size-probe/link.x\`."
if [[ -n "${RUSTFLAGS:-}" ]]; then
  echo "RUSTFLAGS from the environment: \`$RUSTFLAGS\`."
fi
echo
echo "| Measure | Bytes | Made of |"
echo "|---|---:|---|"
echo "| Flash | $flash | $flash_detail |"
echo "| Static RAM | $ram | $ram_detail |"
echo "| \`size_of::<ReferenceMonitor>()\` | $monitor_size | align $monitor_align; the state a device keeps between windows (a static on real firmware, a local in the probe) |"
echo "| Profile edges borrowed by it | $edges_size | \`[Edges<16>; 8]\` + \`Edges<8>\`; also on the stack in the probe |"
echo
echo "| Goal | Budget | Measured | Result |"
echo "|---|---:|---:|---|"
echo "| Flash < 12 KB | $FLASH_BUDGET | $flash | $flash_verdict |"
echo "| Monitoring RAM < 2 KB (static RAM + monitor) | $RAM_BUDGET | $state_ram | $ram_verdict |"
echo

# The largest symbols and the flash by crate of an ELF whose flash is $2.
symbol_tables() { # elf flash
# Symbols in allocated sections only (t/T text, r/R rodata, d/D data, b/B bss), as
# "bytes<TAB>kind<TAB>demangled name", sizes in decimal.
local syms
syms="$("$NM" -S -t d --size-sort -C --defined-only "$1" |
  awk 'NF >= 4 && $3 ~ /^[tTrRdDbB]$/ { size = $2 + 0; kind = $3; $1 = $2 = $3 = ""; sub(/^ +/, ""); print size "\t" kind "\t" $0 }')"

echo "### Largest $TOP symbols"
echo
echo "| Bytes | Section | Symbol |"
echo "|---:|---|---|"
sort -t$'\t' -k1,1 -n -r <<<"$syms" | awk -v n="$TOP" 'NR <= n' |
  while IFS=$'\t' read -r size kind name; do
    case "$kind" in
    t | T) kind=.text ;; r | R) kind=.rodata ;; d | D) kind=.data ;; b | B) kind=.bss ;;
    esac
    printf '| %d | %s | `%s` |\n' "$size" "$kind" "${name//|/\\|}"
  done
echo

# Attribution by crate: the first `crate::` path in each demangled name (`<T as digest::Mac>`
# counts to digest). Approximate: after LTO, inlined code counts to the function it was inlined
# into (much of the monitor, serde_cbor and hmac code sits inside the probe's `Reset`).
echo "### Flash by crate (approximate: inlined code counts to its caller)"
echo
echo "| Bytes | Crate |"
echo "|---:|---|"
awk -F'\t' -v total="$2" '
  $2 ~ /^[tTrRdD]$/ {
    size = $1 + 0; name = $3
    if (name ~ /^size_probe_ota::/) crate = "probe steps (`power_on`, `ota_step`) + what LTO inlined into them (installer, offer verification)"
    else if (match(name, /[A-Za-z_][A-Za-z0-9_]*::/)) crate = substr(name, RSTART, RLENGTH - 2)
    else if (name == "Reset") crate = "probe entry `Reset` + what LTO inlined into it (monitor, serialization glue)"
    else if (name ~ /^OUTLINED_FUNCTION_/) crate = "LLVM machine outliner (`OUTLINED_FUNCTION_*`)"
    else if (name ~ /^__/ || name ~ /^(mem(cpy|move|set|cmp)|fmaxf?|fminf?)$/) crate = "compiler_builtins"
    else crate = "(other: `" name "`)"
    by[crate] += size; sum += size
  }
  END {
    for (c in by) printf "%d\t%s\n", by[c], c
    printf "%d\t%s\n", total - sum, "(not in any symbol: vector table, padding, unnamed constants)"
  }' <<<"$syms" | sort -t$'\t' -k1,1 -n -r |
  while IFS=$'\t' read -r size crate; do
    printf '| %d | %s |\n' "$size" "$crate"
  done
}
symbol_tables "$elf" "$flash"

# --- 7. The whole client: monitoring + OTA installer ---------------------------------------
sections "$ota_elf"
installer_size="$(symsize PROBE_SIZE_OF_INSTALLER "$ota_elf")"
patcher_size="$(symsize PROBE_SIZE_OF_PATCHER "$ota_elf")"
io_size="$(symsize PROBE_SIZE_OF_IO_BUFFER "$ota_elf")"
# Every piece of state the probe keeps for the device's life (statics on firmware, locals of
# `Reset` here): the monitor and the profile edges it borrows, the installer, its patcher, and
# the one message buffer (received offers and blocks, and the messages the device seals).
ota_state_ram=$((ram + monitor_size + edges_size + installer_size + patcher_size + io_size))
ota_flash_verdict="$(verdict "$flash" "$OTA_FLASH_BUDGET")"

# The RAM goal counts the peak: static RAM + `Reset`'s frame (the state above plus the entry
# function's own temporaries) + the deepest call path below it, from the disassembly.
OBJDUMP="$(pick llvm-objdump || true)"
stack=""
if [[ -n "$OBJDUMP" ]] && command -v python3 >/dev/null 2>&1; then
  stack="$("$OBJDUMP" -d --no-show-raw-insn "$ota_elf" | python3 "$probe/stack.py" Reset)" ||
    fail "stack analysis failed"
  stack_total="$(sed -n 's/^TOTAL //p' <<<"$stack")"
  reset_frame="$(sed -n 's/^ROOT //p' <<<"$stack")"
  ((reset_frame >= ota_state_ram - ram)) ||
    fail "Reset's frame ($reset_frame) is smaller than the state it should hold ($((ota_state_ram - ram)))"
  ota_peak=$((ram + reset_frame + stack_total))
  # At most the budget (`verdict` passes strictly below it).
  if ((ota_peak <= OTA_RAM_BUDGET)); then
    ota_ram_verdict="PASS"
  else
    ota_ram_verdict="FAIL ($((ota_peak - OTA_RAM_BUDGET)) bytes over)"
  fi
else
  ((enforce == 0)) || fail "the RAM goal needs llvm-objdump and python3 (apt-get install llvm python3)"
  ota_peak="not measured"
  ota_ram_verdict="NOT MEASURED (needs llvm-objdump and python3)"
fi

echo
echo "## Monitoring + OTA installer (\`size-probe-ota\`)"
echo
echo "The same device with the installer: offer verification (Ed25519 with \`verify_strict\`'s rules, SHA-512," \
  "manifest decoding), MQTT block decoding, the \`TFP1\` patcher with LZ4 (\`safe-decode\`)," \
  "SHA-256 of objects and slots, the progress and boot-state logs, the bootloader's slot" \
  "decision, progress reports and block requests. The flash driver is a stand-in."
echo
echo "| Measure | Bytes | Made of |"
echo "|---|---:|---|"
echo "| Flash | $flash | $flash_detail |"
echo "| Static RAM | $ram | $ram_detail |"
echo "| \`size_of::<Installer>()\` | $installer_size | the installer's state (job, offsets, object hash, boot state) |"
echo "| \`size_of::<Patcher<512>>()\` | $patcher_size | the patcher the installer borrows (512-byte patch blocks, the service's default \`[ota] block_size\`) |"
echo "| Message buffer | $io_size | received offers (verified in place) and blocks, and every sealed message (summaries, progress, block requests) |"
echo "| State the probe keeps | $ota_state_ram | static RAM + monitor $monitor_size + edges $edges_size + installer + patcher + message buffer |"
if [[ -n "$stack" ]]; then
  echo "| \`Reset\`'s frame | $reset_frame | the state above (locals of \`Reset\` here, statics on firmware) + $((reset_frame - ota_state_ram + ram)) of the entry function's own |"
  echo "| Deepest stack below \`Reset\` | $stack_total | the path below |"
  echo "| Peak RAM | $ota_peak | static RAM + \`Reset\`'s frame + deepest stack |"
fi
echo
echo "| Goal | Budget | Measured | Result |"
echo "|---|---:|---:|---|"
echo "| Whole client flash < 48 KB | $OTA_FLASH_BUDGET | $flash | $ota_flash_verdict |"
echo "| Whole client RAM <= 8 KB (peak: state and stack) | $OTA_RAM_BUDGET | $ota_peak | $ota_ram_verdict |"
echo

if [[ -n "$stack" ]]; then
  echo "### Stack: deepest path below \`Reset\`, $stack_total bytes"
  echo
  echo "Frames from the disassembly (pushed registers + \`sub sp\`), callers first. Not counted:"
  echo "interrupt handlers and the radio/MQTT stack of a real firmware. Notes:"
  echo "$(sed -n 's/^NOTES //p' <<<"$stack")."
  echo
  echo "| Frame bytes | Function |"
  echo "|---:|---|"
  grep '^|' <<<"$stack"
  echo
fi
symbol_tables "$ota_elf" "$flash"

if ((enforce)) && [[ "$flash_verdict" != PASS || "$ram_verdict" != PASS ||
  "$ota_flash_verdict" != PASS || "$ota_ram_verdict" != PASS ]]; then
  echo "size-probe: budget exceeded (--enforce)" >&2
  exit 1
fi
