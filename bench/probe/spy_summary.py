"""Summarise a py-spy raw (collapsed) profile: per process, where the samples under generate_step go."""
import collections
import re
import sys

lines = open(sys.argv[1]).read().splitlines()
procs = collections.defaultdict(list)
for ln in lines:
    stack, _, n = ln.rpartition(" ")
    frames = stack.split(";")
    procs[frames[0][:80]].append((frames[1:], int(n)))
for proc, rows in procs.items():
    total = sum(n for _, n in rows)
    gen = [(f, n) for f, n in rows if any("generate_step" in x for x in f)]
    print(f"\n### {proc}: {total} samples, {sum(n for _, n in gen)} under generate_step")
    incl, leaf = collections.Counter(), collections.Counter()
    for f, n in gen:
        names = [re.sub(r":\d+\)", ")", x) for x in f]
        for x in set(names):
            incl[x] += n
        leaf[names[-1]] += n
    print("inclusive:")
    for x, n in incl.most_common(45):
        print(f"  {n:6d} {x[:150]}")
    print("leaf:")
    for x, n in leaf.most_common(25):
        print(f"  {n:6d} {x[:150]}")
    run = [(f, n) for f, n in rows if any(x.startswith("run (worker/generation/solo.py") for x in f)]
    if run:
        print(f"worker generate.run: {sum(n for _, n in run)} samples; children of run:")
        kids = collections.Counter()
        for f, n in run:
            i = next(i for i, x in enumerate(f) if x.startswith("run (worker/generation/solo.py"))
            kids[re.sub(r":\d+\)", ")", f[i + 1]) if i + 1 < len(f) else "<self>"] += n
        for x, n in kids.most_common(20):
            print(f"  {n:6d} {x[:150]}")
