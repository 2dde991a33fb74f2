"""Does a model use each caption attribute? For captions that differ in one attribute only
(position, colour, shape, size, background; from "a large red square at the top left on a white background"),
prints how far apart their text encoder states are and how far apart the UNet's noise predictions
are at several timesteps, beside how far each is from the unconditional prediction. An attribute
whose spread is near zero is ignored by the model, whatever the detector later reads.

    python experiments/position_probe.py                  # the embedded reference model
    python experiments/position_probe.py runs/reference/model
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import sdjax
from samplers import schedule
from sdjax import shapes, unet, vae

BASE = shapes.Scene("large", "red", "square", "top left", "white")
VARIANTS = {"position": list(shapes.POSITIONS), "color": list(shapes.COLORS), "shape": list(shapes.SHAPES),
            "size": list(shapes.SIZES), "background": list(shapes.BACKGROUNDS)}


def spread(x):
    """Mean distance of rows to their mean, rows flattened."""
    x = x.reshape(len(x), -1)
    return float(np.linalg.norm(x - x.mean(0, keepdims=True), axis=-1).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="a diffusers folder (default: the embedded model)")
    ap.add_argument("--timesteps", default="999,800,600,400,200")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    pipe = sdjax.load(args.model, progress=False)
    uc, vc = pipe.configs["unet"], pipe.configs["vae"]
    caps = {k: [dataclasses.replace(BASE, **{k: v}).caption for v in vals] for k, vals in VARIANTS.items()}
    states = {k: np.asarray(pipe.encode_prompt(v)) for k, v in caps.items()}
    print("text encoder states: spread across captions / mean norm")
    for k, h in states.items():
        print(f"  {k:9s} {spread(h) / float(np.linalg.norm(h.reshape(len(h), -1), axis=-1).mean()):.4f}")
    eps = jax.jit(lambda x, t, c: unet.apply(pipe.params["unet"], uc, x, t, c))
    uncond = jnp.asarray(pipe.encode_prompt([""]))
    mean, _ = vae.encode(pipe.params["vae"], vc, jnp.asarray(shapes.render(BASE)[None] * 2 - 1))
    z0 = np.asarray(mean) * vc.scaling_factor
    acp = schedule.alphas_cumprod(pipe.scheduler_config)
    rng = np.random.default_rng(args.seed)
    print("noise predictions from the base scene's noisy latent: spread across captions / "
          "mean distance to the unconditional prediction")
    for t in (int(s) for s in args.timesteps.split(",")):
        xt = jnp.asarray(np.sqrt(acp[t]) * z0 + np.sqrt(1 - acp[t]) * rng.standard_normal(z0.shape), jnp.float32)
        eu = np.asarray(eps(xt, jnp.array([t]), uncond))
        row = []
        for k, h in states.items():
            e = np.stack([np.asarray(eps(xt, jnp.array([t]), jnp.asarray(h[i:i + 1])))[0] for i in range(len(h))])
            guide = float(np.linalg.norm((e - eu).reshape(len(e), -1), axis=-1).mean())
            row.append(f"{k} {spread(e):.3f}/{guide:.3f}")
        print(f"  t={t:4d}: " + "  ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
