"""Palettized weights expanded inside the computation, against the same layers in bfloat16 (issue 27, point 3).

A palettized weight (``quant.palettize.PalettizedWeight``: bit-packed indices and a float16 LUT) is expanded by
``sdjax.nn`` inside the jitted layer (unpack the bits, look up the LUT, cast to the activations' dtype) and then
multiplied as a float weight. The target: a palettized layer at <= 1.1x the time of the same layer with bfloat16
weights. This script times, for SD 1.5 UNet layers at 512x512 with guidance (batch 2), each layer four ways in one
process, the weights always passed as arguments (so nothing is constant-folded at compile time):

    float32     float32 weights and activations (what sdjax-fp32 runs)
    bfloat16    bfloat16 weights and activations (the reference of the target)
    p6, p4      6-bit / 4-bit palettized weights (one float16 LUT per tensor, ``palette-6bit`` / ``palette-4bit``
                presets' layout), bfloat16 activations: sdjax.nn.linear / conv2d as the UNet calls them

Each row is checked: the palettized layer against a float64 NumPy statement of the same product (the LUT entries
looked up, x and the products in float64), relative L2 error, next to bfloat16's own error against float64.
Times: median of --reps calls after one warm-up call.

    python experiments/bench_palettized.py
    python experiments/bench_palettized.py --reps 10 --json pal.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

# (name, kind, x shape, weight shape); 512x512 latents are 64x64, guided batch 2
LAYERS = (
    ("attn1 q/k/v/out 320 (64x64 tokens)", "linear", (2, 4096, 320), (320, 320)),
    ("ff 320 -> 2560 (64x64 tokens)", "linear", (2, 4096, 320), (320, 2560)),
    ("attn2 k/v 768 -> 1280 (77 tokens)", "linear", (2, 77, 768), (768, 1280)),
    ("ff 1280 -> 10240 (8x8 tokens)", "linear", (2, 64, 1280), (1280, 10240)),
    ("conv3x3 320 (64x64)", "conv", (2, 64, 64, 320), (3, 3, 320, 320)),
    ("conv3x3 1280 (16x16)", "conv", (2, 16, 16, 1280), (3, 3, 1280, 1280)),
    ("conv3x3 1280 (8x8)", "conv", (2, 8, 8, 1280), (3, 3, 1280, 1280)),
)
VARIANTS = ("float32", "bfloat16", "p6", "p4")


def palettized(shape, nbits, rng):
    """A PalettizedWeight of ``shape`` with random indices and a sorted random float16 LUT (one per tensor)."""
    import jax.numpy as jnp
    from quant import palettize
    size = int(np.prod(shape))
    idx = rng.integers(0, 2 ** nbits, size)
    lut = np.sort(rng.standard_normal(2 ** nbits) / np.sqrt(np.prod(shape[:-1]))).astype(np.float16)
    w = palettize.PalettizedWeight(packed=jnp.asarray(palettize.pack_bits(idx, nbits)), lut=jnp.asarray(lut[None]),
                                   shape=tuple(shape), nbits=nbits)
    return w, lut.astype(np.float64)[idx].reshape(shape)


def reference(kind, x, w):
    """float64 NumPy: x @ w, or the 3x3 'same' convolution (stride 1)."""
    return x @ w if kind == "linear" else bc.conv3x3_same_f64(x, w)


def layer_rows(name, kind, xshape, wshape, reps, rng):
    import jax
    import jax.numpy as jnp
    from sdjax import nn

    def layer(x, w):
        p = {"weight": w}
        return nn.linear(x, p) if kind == "linear" else nn.conv2d(x, p, 1, ((1, 1), (1, 1)))

    f = jax.jit(layer)
    x32 = rng.standard_normal(xshape).astype(np.float32)
    w32 = (rng.standard_normal(wshape) / np.sqrt(np.prod(wshape[:-1]))).astype(np.float32)
    rows = []
    for v in VARIANTS:
        dt = jnp.float32 if v == "float32" else jnp.bfloat16   # the activations' dtype
        x = jnp.asarray(x32, dt)
        if v in ("p6", "p4"):
            w, w64 = palettized(wshape, int(v[1]), rng)
        else:
            w = jnp.asarray(w32, dt)
            w64 = np.asarray(w, np.float64)
        out, first, times = bc.timed_calls(lambda: f(x, w).block_until_ready(), reps)
        err = bc.rel_l2(out, reference(kind, np.asarray(x, np.float64), w64))
        rows.append({"layer": name, "variant": v, "s": statistics.median(times), "first_s": first, "rel_l2": err,
                     "weight_bytes": w.nbytes})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="also write the rows here (atomically)")
    a = ap.parse_args(argv)
    if a.reps < 1:
        ap.error(f"--reps {a.reps}: must be at least 1 (the median of that many timed calls)")
    import jax
    cpu = bc.cpu_info()
    print(bc.machine_header(cpu, bc.versions()))
    rng = np.random.default_rng(0)
    rows = []
    for spec in LAYERS:
        rows += layer_rows(*spec, a.reps, rng)
    by = {(r["layer"], r["variant"]): r for r in rows}
    print(f"\njax {jax.__version__}; median of {a.reps} calls; x bf16 = time / the same layer with bfloat16 weights")
    print(f"{'layer':<38} {'variant':<9} {'ms':>9} {'x bf16':>7} {'rel L2 vs f64':>14} {'weight MB':>10}")
    total = dict.fromkeys(VARIANTS, 0.0)
    for r in rows:
        ratio = r["s"] / by[(r["layer"], "bfloat16")]["s"]
        r["x_bf16"] = ratio
        total[r["variant"]] += r["s"]
        print(f"{r['layer']:<38} {r['variant']:<9} {1e3 * r['s']:9.2f} {ratio:7.2f} {r['rel_l2']:14.2e} "
              f"{r['weight_bytes'] / 1e6:10.2f}")
    print("\nall layers once: " + ", ".join(f"{v} {1e3 * total[v]:.1f} ms ({total[v] / total['bfloat16']:.2f}x bf16)"
                                           for v in VARIANTS))
    if a.json:
        bc.atomic_write_json(a.json, {"cpu": cpu, "versions": bc.versions(), "rows": rows, "total_s": total})


if __name__ == "__main__":
    main()
