"""Data-free fine-tuning ("lut": LUTs learned, indices kept; or "ste") of uniform palette-4bit and palette-2bit
on the embedded reference model: time, distillation loss and sdjax's one-step latent PSNR against
the float model before and after, on the default evaluation prompts (never trained on).

    python experiments/qat_reference.py [--steps 300] [--lr 1e-3] [--out DIR]
"""
from __future__ import annotations

import argparse
import time

import quant
import sdjax
from sdjax import shapes
from sdjax.evaluation import qat
from sdjax.evaluation.evaluator import Evaluator, Settings

EVAL_PROMPTS = 24        # sdjax eval's default evaluation captions on the embedded model (seed 6)
CALIBRATION_PROMPTS = 32  # its default calibration captions (seed 99, never evaluation prompts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--method", default="lut", choices=("lut", "ste"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--recipes", nargs="+", default=["palette-4bit", "palette-2bit"])
    ap.add_argument("--out", default=None, help="folder for resumable checkpoints (one subfolder per recipe)")
    args = ap.parse_args(argv)

    pipe = sdjax.load(None, progress=False)
    evals = shapes.captions(EVAL_PROMPTS, seed=6)
    cal = shapes.shuffled_captions(CALIBRATION_PROMPTS, seed=99, exclude=set(evals))
    t0 = time.perf_counter()
    ev = Evaluator(pipe, Settings(prompts=tuple(evals), seeds=(0,), n_one_step=8), progress=False)
    print(f"evaluator (float reference): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    samples = qat.training_samples(pipe, cal, batch=args.batch)
    print(f"training samples ({len(samples)} rows from {len(cal)} prompts): {time.perf_counter() - t0:.1f} s")
    cfg = pipe.configs["unet"]
    for name in args.recipes:
        q = quant.apply_recipe(pipe.params, name)["unet"]
        before = (qat.distillation_loss(q, cfg, samples), ev.one_step_psnr(q))
        t0 = time.perf_counter()
        tuned = qat.finetune(pipe, q, cal, method=args.method, steps=args.steps, lr=args.lr, batch=args.batch,
                             eval_prompts=evals, samples=samples, progress=False,
                             out_dir=None if args.out is None else f"{args.out}/{name}")
        dt = time.perf_counter() - t0
        after = (qat.distillation_loss(tuned, cfg, samples), ev.one_step_psnr(tuned))
        print(f"{name}: {args.method} x {args.steps} steps (lr {args.lr}, batch {args.batch}) in {dt:.1f} s; "
              f"distillation loss {before[0]:.5f} -> {after[0]:.5f}; "
              f"one-step latent PSNR {before[1]:.2f} -> {after[1]:.2f} dB", flush=True)


if __name__ == "__main__":
    main()
