"""What a LoRA does to quantization: merge it and palettize, or palettize the base and run it beside.

    python experiments/lora_quantization.py [--lora experiments/loras/azure.safetensors] [--no-gptq]
        [--json runs/lora_quantization.json]

On the embedded reference model with the LoRA ``experiments/train_lora.py`` trains (the new colour word
"azure", drawn blue), at 6 and 4 bits (``palette-6bit``, ``palette-4bit``, and their GPTQ variants):

- (a) **merge, then palettize**: the LoRA merged into the float weights (``sdjax.load(loras=...)``), the
  merged UNet palettized by the recipe: one model, the LoRA's update quantized with the base;
- (b) **palettized base + float LoRA branch**: the base UNet palettized by the same recipe, the LoRA kept
  in float16 beside each layer it updates (``quant.lora_branch.apply``: ``base(x) + scale * up(down(x))``;
  a layer the recipe leaves float, 2048 weights or fewer, gets the update merged, which costs no byte);
- references: the float model with the LoRA merged (what every row is compared with) and the float base.

GPTQ needs each layer's input statistics: they are collected once on the float merged model (the
activations the LoRA'd model shows each layer) over calibration prompts that hold the new word (32
training scenes with "azure") and 32 ordinary captions, none an evaluation prompt, and (a) and (b) use the
same ones, so the rows differ only in merge vs branch. (b, base-calibrated) is the ship-the-base-once
case: statistics from the float base on the 64 ordinary calibration captions alone, as a base quantized
before the LoRA existed would have them.

Readings (``sdjax.evaluation.evaluator``; 25 steps DPM++ 2M, guidance 7.5, x_T from the pair's seed):
on the held-out "azure" prompts (the 30 scenes ``train_lora.py`` never trained on, seeds 0 and 1: 60
pairs) the image PSNR, SSIM and final-latent PSNR against the float merged model from the same x_T, and
the detector's colour and all-five accuracy (``sdjax.shapes.score``, "azure" read as blue); on 30 ordinary
captions (no new word, 60 pairs) the image PSNR against the float merged model and the all-five
accuracy, to show what the LoRA and each quantization do to what the model already drew. Bytes: the
UNet as shipped, float weights in float16, palettized weights as stored (LUTs, packed indices), and the
branch's float16 factors.

Measured with ``python experiments/lora_quantization.py --json runs/lora_quantization.json`` and the committed
``experiments/loras/azure.safetensors`` (2 CPU cores shared with other jobs, 75% of them for this run, no GPU:
28.8 min wall, max RSS 2.6 GiB by ``/usr/bin/time -v``; the README's "What a LoRA does to quantization" reads it):

| UNet | bytes (LoRA) | "azure": image PSNR / SSIM / final-latent PSNR | colour / all five | ordinary: image PSNR | all five |
| --- | --- | --- | --- | --- | --- |
| float, LoRA merged (reference) | 2.978 MB | ref | 1.000 / 0.833 | ref | 0.900 |
| float base, no LoRA | 2.978 MB | 12.18 / 0.5558 / 10.85 | 0.000 / 0.000 | 29.81 | 0.900 |
| (a) merge, then palette-6bit | 1.200 MB | 41.86 / 0.9851 / 39.20 | 1.000 / 0.800 | 43.10 | 0.917 |
| (b) palette-6bit base + float16 LoRA branch | 1.233 MB (33.3 KB) | 44.03 / 0.9929 / 40.95 | 1.000 / 0.800 | 43.86 | 0.867 |
| (a) merge, then palette-6bit-gptq | 1.200 MB | 47.54 / 0.9906 / 44.73 | 1.000 / 0.850 | 45.99 | 0.883 |
| (b) palette-6bit-gptq base + float16 LoRA branch | 1.233 MB (33.3 KB) | 48.85 / 0.9932 / 45.75 | 1.000 / 0.833 | 47.46 | 0.900 |
| (b) palette-6bit-gptq base calibrated without the LoRA + branch | 1.233 MB (33.3 KB) | 46.57 / 0.9949 / 44.14 | 1.000 / 0.800 | 46.95 | 0.867 |
| (a) merge, then palette-4bit | 0.832 MB | 27.55 / 0.8768 / 25.62 | 1.000 / 0.750 | 29.68 | 0.817 |
| (b) palette-4bit base + float16 LoRA branch | 0.866 MB (33.3 KB) | 26.45 / 0.8742 / 24.61 | 1.000 / 0.733 | 26.05 | 0.750 |
| (a) merge, then palette-4bit-gptq | 0.832 MB | 33.42 / 0.9313 / 31.35 | 1.000 / 0.750 | 36.08 | 0.883 |
| (b) palette-4bit-gptq base + float16 LoRA branch | 0.866 MB (33.3 KB) | 34.36 / 0.9412 / 31.69 | 1.000 / 0.783 | 35.23 | 0.900 |
| (b) palette-4bit-gptq base calibrated without the LoRA + branch | 0.866 MB (33.3 KB) | 32.45 / 0.9337 / 30.04 | 1.000 / 0.767 | 35.16 | 0.867 |

    palette-6bit: over the 32 palettized layers the LoRA updates, median ||dW|| / ||W|| = 0.117; rounding error / ||dW||: (a) 0.20, (b) 0.20
    palette-6bit-gptq: ... (a) 0.29, (b) 0.29
    palette-4bit: ... (a) 0.84, (b) 0.83
    palette-4bit-gptq: ... (a) 1.21, (b) 1.17
    palette-6bit, new prompts: image PSNR (b) - (a) = +2.17 dB (paired s.e. 1.10, (b) higher on 70% of 60 pairs)
    palette-6bit, ordinary prompts: image PSNR (b) - (a) = +0.76 dB (paired s.e. 0.49, (b) higher on 53% of 60 pairs)
    palette-6bit-gptq, new prompts: image PSNR (b) - (a) = +1.31 dB (paired s.e. 0.72, (b) higher on 63% of 60 pairs)
    palette-6bit-gptq, ordinary prompts: image PSNR (b) - (a) = +1.47 dB (paired s.e. 0.43, (b) higher on 75% of 60 pairs)
    palette-4bit, new prompts: image PSNR (b) - (a) = -1.10 dB (paired s.e. 1.08, (b) higher on 45% of 60 pairs)
    palette-4bit, ordinary prompts: image PSNR (b) - (a) = -3.63 dB (paired s.e. 1.01, (b) higher on 32% of 60 pairs)
    palette-4bit-gptq, new prompts: image PSNR (b) - (a) = +0.93 dB (paired s.e. 0.83, (b) higher on 52% of 60 pairs)
    palette-4bit-gptq, ordinary prompts: image PSNR (b) - (a) = -0.85 dB (paired s.e. 0.36, (b) higher on 32% of 60 pairs)

Reading: on quality neither way wins here; (b) - (a) changes sign between bit widths and prompt sets (-3.6 to
+2.2 dB, mostly within two paired standard errors, which are optimistic: the 60 pairs share two x_T), the
detector reads colour 1.000 in every quantized row, and the palette's rounding error is the same with the
update inside the weight or beside it. On bytes the merge wins by the LoRA's 33.3 KB (2.8% of the 6-bit
UNet, 4.0% of the 4-bit one). GPTQ calibrated without the LoRA's prompts costs the "azure" prompts 1.9-2.3 dB.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import quant  # noqa: E402
import sdjax  # noqa: E402
from quant import calibrate, gptq, lora_branch  # noqa: E402
from quant import metrics  # noqa: E402
from sdjax import nn, shapes  # noqa: E402
from sdjax.evaluation.calibration import Calibration, hessian_run  # noqa: E402
from sdjax.evaluation.evaluator import Evaluator, Settings  # noqa: E402
from sdjax.files import atomic_write_json  # noqa: E402

DEFAULT_LORA = os.path.join(REPO, "experiments", "loras", "azure.safetensors")
CALIBRATION_SEED = 777


def shipped_bytes(w):
    """Bytes of a weight (or a params tree) as shipped: float arrays in float16, quantized weights as
    stored, a branch's base so and its factors as stored (float16)."""
    if isinstance(w, dict):
        return sum(shipped_bytes(v) for v in jax.tree.leaves(w, is_leaf=nn.is_quantized))
    if isinstance(w, lora_branch.LoraBranchWeight):
        return shipped_bytes(w.base) + w.nbytes - int(w.base.nbytes)
    if nn.is_quantized(w):
        return int(w.nbytes)
    return int(np.size(w)) * 2


def load_log(lora_path):
    path = os.path.splitext(lora_path)[0] + ".json"
    with open(path) as f:
        log = json.load(f)
    for key in ("word", "means", "held_out_prompts", "ordinary_prompts", "train_captions", "eval_seeds"):
        if key not in log:
            raise SystemExit(f"{path}: no {key!r} (written by experiments/train_lora.py)")
    return log


def hessians(pipe, prompts, steps, progress):
    """{layer: X^T X} of every UNet conv/linear layer over the guided generation of ``prompts`` and
    their images noised at 8 stratified timesteps (``hessian_run``), on ``pipe``'s own params."""
    run = hessian_run(pipe, Calibration(tuple(prompts), steps=steps, seed=CALIBRATION_SEED), progress=progress)
    unet = pipe.params["unet"]
    return {"unet": gptq.collect(unet, run, calibrate.layer_names(unet))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--lora", default=DEFAULT_LORA, help="the LoRA file (its train_lora.py log beside it)")
    ap.add_argument("--bits", default="6,4")
    ap.add_argument("--no-gptq", action="store_true", help="k-means palettization only")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--n-calibration", type=int, default=32, help="new-word and ordinary calibration prompts each")
    ap.add_argument("--json", default=None, help="write the readings here")
    ap.add_argument("--quick", action="store_true", help="4 prompts, 1 seed, 4 steps (a smoke run)")
    args = ap.parse_args(argv)
    t_start = time.time()
    log = load_log(args.lora)
    word, means = log["word"], log["means"]
    seeds = tuple(log["eval_seeds"][:1] if args.quick else log["eval_seeds"])
    held, ordinary = log["held_out_prompts"], log["ordinary_prompts"]
    if args.quick:
        held, ordinary, args.steps, args.n_calibration = held[:4], ordinary[:4], 4, 4
    known = lambda p: p.replace(f" {word} ", f" {means} ")  # noqa: E731

    def adherence(images, prompts):
        return shapes.score(images, [known(p) for p in prompts])

    base = sdjax.load(None, progress=False)
    merged = sdjax.load(None, loras=[(args.lora, 1.0)], progress=False)
    evals = {"new": Evaluator(merged, Settings(prompts=held, seeds=seeds, steps=args.steps, batch=20), progress=False),
             "ordinary": Evaluator(merged, Settings(prompts=ordinary, seeds=seeds, steps=args.steps, batch=20),
                                   progress=False)}
    avoid = set(held) | set(ordinary)
    ordinary_cal = [c for c in shapes.shuffled_captions(540, seed=31) if c not in avoid]
    cal_new = log["train_captions"][:args.n_calibration]
    cal_ord = ordinary_cal[:args.n_calibration]
    cal_base = ordinary_cal[:2 * args.n_calibration]

    rows, weights = [], []

    def measure(label, params, method, nbits):
        t0 = time.time()
        r = {"variant": label, "method": method, "nbits": nbits, "unet_bytes": shipped_bytes(params["unet"]),
             "lora_bytes": lora_branch.lora_bytes(params)}
        for what, ev in evals.items():
            out = ev.outputs(params)
            m, bad = ev.metrics(out, adherence=adherence)
            r[what] = {k: m[k] for k in ("image_psnr_db", "ssim", "final_latent_psnr_db", "latent_psnr_1step_db",
                                         "noise_psnr_db")} | {"adherence": m["adherence"], "nonfinite": bad}
            r[what]["image_psnr_per_pair"] = metrics.per_sample_psnr_db(ev.reference["images"], out["images"],
                                                                        peak=1.0).tolist()
        r["seconds"] = time.time() - t0
        rows.append(r)
        print(_row(r), flush=True)

    print(_HEADER, flush=True)
    measure("float, LoRA merged (reference)", merged.params, "float", 16)
    measure("float base, no LoRA", base.params, "float", 16)
    H = Hb = None
    if not args.no_gptq:
        t0 = time.time()
        H = hessians(merged, cal_new + cal_ord, args.steps, progress=False)
        Hb = hessians(base, cal_base, args.steps, progress=False)
        print(f"(GPTQ statistics: {time.time() - t0:.0f} s)", flush=True)
    for nbits in [int(b) for b in args.bits.split(",")]:
        for gq in ([False] if args.no_gptq else [False, True]):
            recipe = f"palette-{nbits}bit" + ("-gptq" if gq else "")
            qa = quant.apply_recipe(merged.params, recipe, hessian=H if gq else None)
            measure(f"(a) merge, then {recipe}", qa, recipe, nbits)
            qb = lora_branch.apply(quant.apply_recipe(base.params, recipe, hessian=H if gq else None),
                                   [(args.lora, 1.0)], base.configs)
            measure(f"(b) {recipe} base + float16 LoRA branch", qb, recipe, nbits)
            weights.append(weight_errors(recipe, base.params["unet"], merged.params["unet"], qa["unet"], qb["unet"]))
            if gq:
                q = quant.apply_recipe(base.params, recipe, hessian=Hb)
                measure(f"(b) {recipe} base calibrated without the LoRA + branch",
                        lora_branch.apply(q, [(args.lora, 1.0)], base.configs), recipe, nbits)
    print()
    for w in weights:
        print(f"{w['recipe']}: over the {w['layers']} palettized layers the LoRA updates, median ||dW|| / ||W|| = "
              f"{w['update_over_weight']:.3f}; rounding error / ||dW||: (a) {w['a_error_over_update']:.2f}, "
              f"(b) {w['b_error_over_update']:.2f}")
    for a, b in zip(rows, rows[1:]):
        if a["variant"].startswith("(a)") and b["variant"].startswith("(b)"):
            for what in ("new", "ordinary"):
                d = np.asarray(b[what]["image_psnr_per_pair"]) - np.asarray(a[what]["image_psnr_per_pair"])
                d = d[np.isfinite(d)]
                print(f"{a['method']}, {what} prompts: image PSNR (b) - (a) = {d.mean():+.2f} dB "
                      f"(paired s.e. {d.std(ddof=1) / np.sqrt(len(d)):.2f}, (b) higher on {np.mean(d > 0):.0%} of "
                      f"{len(d)} pairs)")
    minutes = (time.time() - t_start) / 60
    print(f"\n{len(held)} held-out '{word}' prompts and {len(ordinary)} ordinary prompts x seeds {list(seeds)}, "
          f"{args.steps} steps; {minutes:.1f} min")
    if args.json:
        atomic_write_json(args.json, {"args": vars(args), "rows": rows, "weights": weights, "minutes": minutes,
                                      "calibration": {"new": cal_new, "ordinary": cal_ord, "base": cal_base}}, indent=1)
    return rows


def weight_errors(recipe, base, merged, qa, qb):
    """Over the palettized layers the LoRA updates: the median of ||dW|| / ||W|| (the LoRA's update against
    the base weight) and of each way's rounding error against the update: (a) ||Q(W + dW) - (W + dW)|| /
    ||dW||, (b) ||Q(W) - W|| / ||dW|| (the branch adds dW exactly, up to float16 factors)."""
    fb, fm, fa, fq = (nn.flatten(p) for p in (base, merged, qa, qb))
    upd, ea, eb = [], [], []
    for name, w in fq.items():
        if not isinstance(w, lora_branch.LoraBranchWeight):
            continue
        W, M = np.asarray(fb[name], np.float64), np.asarray(fm[name], np.float64)
        dw = np.linalg.norm(M - W)
        upd.append(dw / np.linalg.norm(W))
        ea.append(np.linalg.norm(np.asarray(nn.float_value(fa[name]), np.float64) - M) / dw)
        eb.append(np.linalg.norm(np.asarray(nn.float_value(w.base), np.float64) - W) / dw)
    return {"recipe": recipe, "layers": len(upd), "update_over_weight": float(np.median(upd)),
            "a_error_over_update": float(np.median(ea)), "b_error_over_update": float(np.median(eb))}


_HEADER = ("| UNet | bytes (LoRA) | new word: image PSNR / SSIM / final-latent PSNR | colour / all five "
           "| ordinary: image PSNR | all five |\n| --- | --- | --- | --- | --- | --- |")


def _db(x):
    return "ref" if not np.isfinite(x) else f"{x:.2f}"


def _row(r):
    n, o = r["new"], r["ordinary"]
    lb = f" ({r['lora_bytes'] / 1e3:.1f} KB)" if r["lora_bytes"] else ""
    ssim = "ref" if n["ssim"] >= 1 else f"{n['ssim']:.4f}"
    return (f"| {r['variant']} | {r['unet_bytes'] / 1e6:.3f} MB{lb} | {_db(n['image_psnr_db'])} / {ssim} / "
            f"{_db(n['final_latent_psnr_db'])} | {n['adherence']['color']:.3f} / {n['adherence']['all']:.3f} | "
            f"{_db(o['image_psnr_db'])} | {o['adherence']['all']:.3f} |")


if __name__ == "__main__":
    main()
