#!/usr/bin/env python3
"""Worst-case stack depth of a Thumb-2 ELF, from its disassembly (llvm-objdump -d output on
stdin), for scripts/size-probe.sh.

A function's frame is what its prologue takes: the registers it pushes (push, push.w: 4 bytes
each; vpush: 8 per d register, 4 per s register) plus its largest `sub sp` adjustment. Calls are
`bl`/`blx` to a named function, and `b`/`b.w` to the start of another function (a tail call,
counted as nested: an over-estimate of at most the caller's frame). The depth of a function is its
frame plus the deepest of its callees. Recursion (a cycle) is cut and reported; indirect calls
(`blx rN`) follow a register loaded from the literal pool (`ldr rN, [pc, ...]`, possibly copied
with `mov`); others are counted and reported, as their targets are unknown.

Usage: stack.py ROOT [N]  -- prints, as markdown table rows, the deepest path below ROOT (its
callees, not ROOT itself) and the N largest frames; the first line is "TOTAL <bytes>", the
second "ROOT <bytes>", ROOT's own frame.
"""

import re
import subprocess
import sys

FN = re.compile(r"^([0-9a-f]+) <(.+)>:$")
REGS = re.compile(r"\{([^}]*)\}")
SUB_SP = re.compile(r"\bsub(?:\.w|w)?\s+sp,\s*(?:sp,\s*)?#(0x[0-9a-f]+|\d+)")
CALL = re.compile(r"\b(bl|blx|b|b\.w)\s+0x([0-9a-f]+)\s+<([^>+]+)>")
INDIRECT = re.compile(r"\bblx\s+(r\d+)")
LITERAL = re.compile(r"\bldr(?:\.w)?\s+(r\d+),\s*\[pc.*@\s*0x([0-9a-f]+)")
MOVE = re.compile(r"\bmov(?:\.w)?\s+(r\d+),\s*(r\d+)\s*$")
WORD = re.compile(r"^\s*([0-9a-f]+):.*\.word\s+0x([0-9a-f]+)")


def reg_bytes(regs: str, vector: bool) -> int:
    n = 0
    for r in regs.split(","):
        r = r.strip()
        if "-" in r:
            a, b = r.split("-")
            count = int(b[1:]) - int(a[1:]) + 1
        else:
            count = 1
        n += count * (8 if vector and r.startswith("d") else 4)
    return n


def parse(lines):
    frames, calls, starts, indirect = {}, {}, {}, {}
    # Literal-pool words: at opt-level "z" many calls are `ldr rN, [pc, ...]` + `blx rN`.
    words = {}
    for line in lines:
        m = WORD.match(line)
        if m:
            words[int(m.group(1), 16)] = int(m.group(2), 16) & ~1
    for line in lines:
        m = FN.match(line.strip())
        if m and not m.group(2).startswith("$"):
            starts[int(m.group(1), 16)] = m.group(2)
    fn = None
    loaded = {}
    for line in lines:
        m = FN.match(line.strip())
        if m and m.group(2).startswith("$"):
            continue  # a mapping symbol ($t code, $d data) inside the current function
        if m:
            fn = m.group(2)
            loaded = {}
            frames.setdefault(fn, [0, 0])
            calls.setdefault(fn, set())
            continue
        if fn is None or ":" not in line:
            continue
        ins = line.split(":", 1)[1]
        op = ins.split()
        if not op:
            continue
        if op[0] in ("push", "push.w", "vpush"):
            m = REGS.search(ins)
            if m:
                frames[fn][0] += reg_bytes(m.group(1), op[0] == "vpush")
        m = SUB_SP.search(ins)
        if m:
            frames[fn][1] = max(frames[fn][1], int(m.group(1), 0))
        m = CALL.search(ins)
        if m:
            kind, addr, target = m.group(1), int(m.group(2), 16), m.group(3)
            if kind in ("bl", "blx") or (addr in starts and target != fn):
                calls[fn].add(target)
        m = LITERAL.search(ins)
        if m:
            loaded[m.group(1)] = words.get(int(m.group(2), 16))
            continue
        m = MOVE.search(ins)
        if m:
            # A call target copied to another register (or that register overwritten).
            if m.group(2) in loaded:
                loaded[m.group(1)] = loaded[m.group(2)]
            else:
                loaded.pop(m.group(1), None)
            continue
        m = INDIRECT.search(ins)
        if m:
            target = starts.get(loaded.get(m.group(1)) or -1)
            if target:
                calls[fn].add(target)
            else:
                indirect[fn] = indirect.get(fn, 0) + 1
    return {f: a + b for f, (a, b) in frames.items()}, calls, indirect


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        return out.stdout.split("\n")
    except OSError:
        return names


def main():
    root = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    frames, calls, indirect = parse(sys.stdin.read().splitlines())
    if root not in frames:
        sys.exit(f"stack.py: no function {root}")
    memo, cycles = {}, set()

    def depth(f, active):
        if f in memo:
            return memo[f]
        if f in active:
            cycles.add(f)
            return (0, [])
        active.add(f)
        best = (0, [])
        for c in calls.get(f, ()):
            if c in frames:
                d = depth(c, active)
                if d[0] > best[0]:
                    best = d
        active.discard(f)
        memo[f] = (frames[f] + best[0], [f] + best[1])
        return memo[f]

    below = max((depth(c, {root}) for c in calls[root] if c in frames), default=(0, []))
    print(f"TOTAL {below[0]}")
    print(f"ROOT {frames[root]}")
    names = demangle(below[1])
    for f, name in zip(below[1], names):
        short = re.sub(r"::h[0-9a-f]{16}$", "", name).replace("|", "\\|")
        print(f"| {frames[f]} | `{short[:110]}` |")
    notes = []
    if cycles:
        notes.append(f"recursion cut at {len(cycles)} function(s): "
                     + ", ".join(re.sub(r"::h[0-9a-f]{16}$", "", n)[:60] for n in demangle(sorted(cycles))))
    n_ind = sum(indirect.values())
    if n_ind:
        notes.append(f"{n_ind} indirect call(s) not followed")
    print("NOTES " + ("; ".join(notes) if notes else "none"))


if __name__ == "__main__":
    main()
