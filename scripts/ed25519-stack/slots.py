#!/usr/bin/env python3
"""slots.py ELF FUNC: the stack slots (DW_OP_breg13 SP+N, i.e. fixed offsets) of variables in
FUNC's DWARF tree (including inlined callees), with the size of each variable's type."""
import re, subprocess, sys
elf, func = sys.argv[1], sys.argv[2]
out = subprocess.run(["llvm-dwarfdump", "--show-children", "--name=" + func, elf],
                     capture_output=True, text=True).stdout
# sizes of types: need the whole .debug_info for abstract origins -> type -> byte_size
full = subprocess.run(["llvm-dwarfdump", "--debug-info", elf], capture_output=True, text=True).stdout
dies = {}
cur = None
for line in full.splitlines():
    m = re.match(r"^(0x[0-9a-f]+):\s+(DW_TAG_\w+)", line)
    if m:
        cur = int(m.group(1), 16); dies[cur] = {"tag": m.group(2)}; continue
    m = re.match(r"^\s+(DW_AT_\w+)\s+\((.*)\)\s*$", line)
    if m and cur is not None:
        dies[cur][m.group(1)] = m.group(2)
def ref(v):
    m = re.match(r"0x([0-9a-f]+)", v); return int(m.group(1), 16) if m else None
def tsize(t, depth=0):
    d = dies.get(t)
    if d is None or depth > 20: return None
    if "DW_AT_byte_size" in d: return int(d["DW_AT_byte_size"], 0)
    if d["tag"] == "DW_TAG_array_type":
        # subrange child: find next die with count
        keys = sorted(k for k in dies if k > t)[:3]
        el = tsize(ref(d.get("DW_AT_type", "")), depth + 1)
        for k in keys:
            c = dies[k]
            if c["tag"] == "DW_TAG_subrange_type" and "DW_AT_count" in c and el:
                return el * int(c["DW_AT_count"], 0)
        return None
    if "DW_AT_type" in d: return tsize(ref(d["DW_AT_type"]), depth + 1)
    return None
rows = []
cur = None
for line in out.splitlines():
    m = re.match(r"^(0x[0-9a-f]+):\s+(DW_TAG_\w+)", line)
    if m:
        cur = int(m.group(1), 16); continue
    if cur is None: continue
    d = dies.get(cur, {})
    loc = d.get("DW_AT_location", "")
    m = re.search(r"DW_OP_breg13 SP\+(\d+)\)?$", loc) or re.search(r"DW_OP_breg13 SP\+(\d+)$", loc)
    if not m or "stack_value" in loc: continue
    origin = ref(d.get("DW_AT_abstract_origin", "")) if "DW_AT_abstract_origin" in d else cur
    od = dies.get(origin, d)
    name = od.get("DW_AT_name", "?").strip('"')
    sz = tsize(ref(od.get("DW_AT_type", ""))) if "DW_AT_type" in od else None
    rows.append((int(m.group(1)), sz, name, cur))
seen = set()
for off, sz, name, c in sorted(rows):
    if (off, name) in seen: continue
    seen.add((off, name))
    print(f"SP+{off:5d}  {str(sz):>5}  {name}")
