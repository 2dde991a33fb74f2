"""Compare two ``sdjax eval`` report folders value for value (timings, file lists and the version aside)
and their recipe files byte for byte. Used to show a refactor left every metric and recipe unchanged:

    python experiments/compare_reports.py eval-old eval-new

Exit status 0 when equal, 1 otherwise (the differences printed)."""
from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import sys

IGNORED = {"files", "sdjax_version"}


def differences(a, b, path=""):
    """[(path, a, b)] where the JSON values differ; NaN equals NaN; keys naming seconds are skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in IGNORED or "seconds" in k:
                continue
            if k not in a or k not in b:
                out.append((f"{path}/{k}", a.get(k, "<missing>"), b.get(k, "<missing>")))
            else:
                out += differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(path, f"{len(a)} items", f"{len(b)} items")]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b and type(a) is type(b) else [(path, a, b)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    args = ap.parse_args(argv)
    with open(os.path.join(args.old, "report.json")) as f:
        a = json.load(f)
    with open(os.path.join(args.new, "report.json")) as f:
        b = json.load(f)
    diffs = differences(a, b)
    print(f"report.json: {len(diffs)} differences")
    for d in diffs[:50]:
        print("  ", *d)
    ra, rb = (sorted(os.listdir(os.path.join(x, "recipes"))) for x in (args.old, args.new))
    bad = sorted(set(ra) ^ set(rb)) + [n for n in ra if n in rb and not filecmp.cmp(
        os.path.join(args.old, "recipes", n), os.path.join(args.new, "recipes", n), shallow=False)]
    print(f"recipes/: {len(ra)} and {len(rb)} files, {len(bad)} differ" + (f": {bad}" if bad else ""))
    return 1 if diffs or bad else 0


if __name__ == "__main__":
    sys.exit(main())
