#!/usr/bin/env bash
# Patch sizes of tinyfleet's TFP1 deltas beside bsdiff+heatshrink and bsdiff+lzma (the detools
# Python package, used only here) on synthetic int8 model changes. Prints a Markdown table.
# Usage: scripts/patch-bench.sh   (installs python3-venv and detools into target/ if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/patch-bench
mkdir -p "$out"
if ! python3 -m venv --help >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq python3-venv
fi
if [ ! -x "$out/venv/bin/python" ]; then
  python3 -m venv "$out/venv"
fi
"$out/venv/bin/python" -c "import detools" 2>/dev/null || "$out/venv/bin/pip" install -q detools
cargo run --release -q -p tinyfleet-ota-service --example patch_sizes -- "$out" > "$out/tfp1.tsv"
"$out/venv/bin/python" - "$out" <<'PY'
import io, sys, detools
d = sys.argv[1]
lines = [l.rstrip("\n").split("\t") for l in open(f"{d}/tfp1.tsv")]
ram = [l[0] for l in lines if l[0].startswith("#")]
print(f"detools {detools.__version__}; {'; '.join(r[2:] for r in ram)}\n")
print("| change | image | TFP1 (tinyfleet, 1 KB blocks) | bsdiff+heatshrink | bsdiff+lzma | LZ4 of the image | TFP1, 512 B blocks (default) | TFP1, 256 B blocks |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
pct = lambda n, of: f"{n:,} ({100 * n / of:.1f}%)"
for row in lines:
    if row[0].startswith("#") or row[0] == "scenario":
        continue
    name, image, tfp1, lz4, tfp1_512, tfp1_256 = row[0], *map(int, row[1:6])
    base = open(f"{d}/{name}.base", "rb").read()
    new = open(f"{d}/{name}.new", "rb").read()
    sizes = []
    for comp in ["heatshrink", "lzma"]:
        p = io.BytesIO()
        detools.create_patch(io.BytesIO(base), io.BytesIO(new), p, compression=comp)
        sizes.append(len(p.getvalue()))
    print(f"| {name} | {image:,} | {pct(tfp1, image)} | {pct(sizes[0], image)} | {pct(sizes[1], image)} | {pct(lz4, image)} | {pct(tfp1_512, image)} | {pct(tfp1_256, image)} |")
PY
