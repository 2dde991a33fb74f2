"""The README's quality-vs-bits figures from a finished ``sdjax eval`` folder: a Markdown table of every
recipe (bits both ways, every reading, the detector's "all five" adherence), the quality-vs-bits plot,
and an image grid of chosen recipes on one seed (the float model first).

    sdjax eval -o eval-out
    python experiments/readme_eval_figures.py eval-out \\
        --rows palette-6bit,palette-4bit,palette-2bit --grid docs/eval_grid.png --plot docs/eval_quality_vs_bits.png

Nothing is recomputed: the numbers are ``report.json``'s, the images those the run kept in ``state/``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

from sdjax.evaluation import figures
from sdjax.evaluation.results import _num
from sdjax.evaluation.state import _safe

COLUMNS = [("apple_latent_psnr_db", "Apple's reading", "{:.1f}"), ("latent_psnr_1step_db", "1-step latent PSNR", "{:.1f}"),
           ("final_latent_psnr_db", "final latent PSNR", "{:.1f}"),
           ("image_psnr_db", "image PSNR", "{:.1f}"), ("ssim", "SSIM", "{:.3f}"), ("adherence", "all five", "{:.3f}")]


def table(report) -> str:
    """Every recipe's row (and the float model's adherence) as Markdown."""
    keys = [c for c in COLUMNS if any(c[0] in r["metrics"] for r in report["recipes"])]
    apple = any(r.get("apple_bits") is not None for r in report["recipes"])
    head = ["recipe", "bits/weight (all / candidates" + (" / Apple's)" if apple else ")")] + [c[1] for c in keys]
    rows = [head, ["---"] * len(head)]
    fm = (report.get("float") or {}).get("metrics") or {}

    def cells(metrics, only=None):   # a metric absent (or not in ``only``) is an empty cell
        vals = [_num(metrics.get(k)) if only is None or k in only else None for k, _, _ in keys]
        return ["" if v is None else f.format(v) for v, (_, _, f) in zip(vals, keys)]
    rows.append(["float model", "32"] + cells(fm, only={"adherence"}))
    for r in report["recipes"]:
        ab = f" / {r['apple_bits']:.2f}" if r.get("apple_bits") is not None else ""
        rows.append([r["name"], f"{r['avg_bits']:.2f} / {r['avg_bits_candidates']:.2f}{ab}"] + cells(r["metrics"]))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def grid(eval_dir, report, names, path, seed=None):
    """The float model and ``names`` on the pairs of one seed (the first by default)."""
    settings = report["settings"]
    pairs = [(p, s) for p in settings["prompts"] for s in settings["seeds"]]
    seed = settings["seeds"][0] if seed is None else seed
    cols = [i for i, (_, s) in enumerate(pairs) if s == seed]
    state = os.path.join(eval_dir, "state")
    rows = [("float", np.load(os.path.join(state, "float.npz"))["images"][cols])]
    known = {r["name"] for r in report["recipes"]}
    for name in names:
        if name not in known:
            raise SystemExit(f"{eval_dir}: no recipe {name!r} in report.json; it has {sorted(known)}")
        bits = next(r["avg_bits_candidates"] for r in report["recipes"] if r["name"] == name)
        imgs = np.load(os.path.join(state, "recipes", _safe(name) + ".npz"))["images"][cols]
        rows.append((f"{name} ({bits:.2f} b)", imgs))
    figures.image_grid(rows, path, captions=[pairs[i][0].removeprefix("a ") for i in cols])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("eval_dir", help="a finished `sdjax eval` output folder")
    ap.add_argument("--rows", default="", help="comma-separated recipe names for the grid (after the float model)")
    ap.add_argument("--grid", default=None, help="write the grid here (.png)")
    ap.add_argument("--plot", default=None, help="copy the report's quality_vs_bits.png here")
    args = ap.parse_args(argv)
    path = os.path.join(args.eval_dir, "report.json")
    if not os.path.exists(path):
        ap.error(f"{path}: not found; expected a finished `sdjax eval` folder")
    report = json.load(open(path))
    print(table(report))
    if args.grid:
        grid(args.eval_dir, report, [n for n in args.rows.split(",") if n], args.grid)
        print(f"wrote {args.grid}")
    if args.plot:
        shutil.copyfile(os.path.join(args.eval_dir, "quality_vs_bits.png"), args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
