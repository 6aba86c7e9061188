#!/usr/bin/env python3
"""depth.py PATTERN... < disassembly: stack depth (frame + deepest callee path) of every function
whose demangled name contains a PATTERN, using device-client/size-probe/stack.py's parser."""
import os, re, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../device-client/size-probe"))
import stack
frames, calls, indirect = stack.parse(sys.stdin.read().splitlines())
names = list(frames)
dem = dict(zip(names, stack.demangle(names)))
memo = {}
def depth(f, active):
    if f in memo: return memo[f]
    if f in active: return (0, [])
    active.add(f)
    best = (0, [])
    for c in calls.get(f, ()):
        if c in frames:
            d = depth(c, active)
            if d[0] > best[0]: best = d
    active.discard(f)
    memo[f] = (frames[f] + best[0], [f] + best[1])
    return memo[f]
for pat in sys.argv[1:]:
    for f in names:
        if pat in dem[f]:
            d, path = depth(f, set())
            short = lambda n: re.sub(r"::h[0-9a-f]{16}$", "", dem[n])[:100]
            print(f"## {short(f)}: depth {d}")
            for p in path:
                print(f"   {frames[p]:6d}  {short(p)}")
