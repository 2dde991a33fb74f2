"""Quality vs bits on the embedded reference model (or --model): the ``sdjax eval`` sweep, and the two
comparisons the report's targets make, printed side by side:

1. sdjax's mixed-bit allocator (``mixed-sdjax-B``) vs Apple's mixed-bit palettization as Apple runs it
   (``apple-mbp-B``: Apple's reading, candidates, clustering, int8 baseline and thresholds
   ``linspace(original - 1, linear_8bit + 5, 7)``) at the same stored bytes, on every reading: Apple's,
   sdjax's one-step, final latents, images, SSIM;
2. the smallest sdjax recipe that keeps uniform 6-bit palettization's one-step PSNR, and its bits
   (the report's target lines, also with every metric of the final images).

Every figure is measured on the quantized model end to end, against the float model. Resumable: the same
--out continues a killed run.

Mixed-bit recipes are chosen on selection pairs (the calibration prompts with other x_T), never on
the evaluation pairs measured here (``sdjax.evaluation.sweep``'s docstring says why). Measured (embedded model,
defaults: 24 prompts x 2 seeds, 25 steps DPM++ 2M, guidance 7.5; 2-core CPU; the same run as README's
``sdjax eval -o eval-out``, 13 min 52 s; this script on the finished folder: seconds), each cell Apple / sdjax
in dB (SSIM as is):

    Apple bits  stored      Apple's reading         sdjax 1-step        final latents               images                 SSIM
          6.83    7.05      72.22/73.66          39.53/48.76          45.22/49.33          49.42/53.52         0.9990/0.9995
          8.04    8.25      77.41/80.26          44.05/54.86          51.29/55.10          54.57/58.82         0.9996/0.9999
         10.35   10.51      81.33/86.57          49.82/59.81          55.84/63.42          59.32/68.01         0.9998/1.0000
         11.79   11.93      87.59/92.44          51.11/66.07          61.22/67.81          65.22/70.99         1.0000/1.0000
         13.64   13.75      91.51/97.08          56.70/70.61          65.54/73.50          69.37/76.61         1.0000/1.0000
         14.51   14.58      96.72/98.77          57.67/74.33          68.81/76.69          72.06/81.42         1.0000/1.0000
         15.27   15.33     101.21/102.91         66.23/76.81          74.34/79.36          78.66/85.22         1.0000/1.0000

    all five "sdjax allocator vs Apple's pre-analysis" targets PASS (+1.44 to +5.56 dB on Apple's reading,
    +9.23 to +16.67 on sdjax's, +3.81 to +7.96 final latents, +4.10 to +9.36 images, +3.49 to +9.40 SSIM).
    uniform 6-bit (38.95 dB) at <= 4.5 bits: PASS, mixed-gptq-u6-4.42, 40.00 dB on the evaluation pairs;
    with the final latents', images' PSNR and SSIM too: FAIL by 0.01 bits (the smallest keeping all four is
    mixed-gptq-u6img-4.51). k-means alone: mixed-sdjax-u6-5.19 chosen, 37.15 dB on the evaluation pairs.
    Fisher estimate vs measured per-layer sensitivity: Spearman 0.49-0.65; 28 s vs 83 s.

    python experiments/quality_vs_bits.py                                   # runs/quality_vs_bits
    python experiments/quality_vs_bits.py --n-prompts 48 --seeds 0,1,2 --out runs/qvb_large
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


READINGS = {"apple_latent_psnr_db": "Apple's reading", "latent_psnr_1step_db": "sdjax 1-step",
            "final_latent_psnr_db": "final latents", "image_psnr_db": "images", "ssim": "SSIM"}


def comparison(results):
    """[(apple recipe, ours)] for each of Apple's recipes with a mixed-sdjax recipe of its tag: Apple's own
    pre-analysis (apple-mbp) when it ran, else Apple's rule on sdjax's readings (apple-rule)."""
    from sdjax.evaluation.targets import vs_apple
    which, rows = vs_apple(results)
    by = {r["name"]: r for r in results["recipes"]}
    return which, [(by[f"{which}-{tag}"], by[f"mixed-sdjax-{tag}"], m) for tag, m in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="float model (default: the embedded reference model)")
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "quality_vs_bits"))
    ap.add_argument("--recipes", default=None, help="comma list (default: sdjax eval's default set)")
    ap.add_argument("--n-prompts", type=int, default=None)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    from sdjax import cli
    cli_args = ["eval", "-o", args.out, "--seeds", args.seeds, "--steps", str(args.steps)]
    for flag, v in (("--model", args.model), ("--recipes", args.recipes), ("--n-prompts", args.n_prompts)):
        if v is not None:
            cli_args += [flag, str(v)]
    if args.quiet:
        cli_args.append("-q")
    rc = cli.main(cli_args)
    if rc:
        return rc
    import json
    with open(os.path.join(args.out, "report.json")) as f:
        results = json.load(f)
    which, rows = comparison(results)
    if rows:
        print(f"\nsdjax allocator (mixed-sdjax) vs {which} at the same stored bytes; Apple's bits name the recipe, "
              "stored bits count LUTs over every conv/linear weight; each cell Apple / sdjax (dB; SSIM as is):")
        print(f"{'Apple bits':>10} {'stored':>7}  " + "  ".join(f"{v:>19}" for v in READINGS.values()))
        for a, o, _ in rows:
            cells = []
            for k in READINGS:
                pa, po = a["metrics"].get(k), o["metrics"].get(k)
                fmt = "{:.4f}" if k == "ssim" else "{:.2f}"
                cells.append(f"{fmt.format(pa):>9}/{fmt.format(po):<9}" if pa is not None and po is not None else f"{'-':>19}")
            print(f"{a['apple_bits']:10.2f} {a['avg_bits']:7.2f}  " + "  ".join(cells))
    for t in results.get("targets") or []:
        print(f"\ntarget {'PASS' if t['pass'] else 'FAIL'}: {t['name']}\n  want: {t['want']}\n  got:  {t['got']}")
    sens = results.get("sensitivity")
    if sens and sens.get("spearman"):
        s = sens["seconds"]
        print("\nFisher estimate vs measured per-layer sensitivity, Spearman by bits: "
              + ", ".join(f"{b}: {v:.2f}" for b, v in sens["spearman"].items())
              + f"; {s['fisher']:.0f} s vs {s['measured']:.0f} s measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
