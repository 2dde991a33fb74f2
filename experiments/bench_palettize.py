"""Per-tensor k-means palettization, sdjax against coremltools, on every conv/linear weight of a
full-size SD 1.5 UNet with random weights: time and SQNR per layer, summed totals, time ratio.

    python experiments/bench_palettize.py --bits 6 4 [--max-layers N] [--json OUT] [--repeat N]

Both sides get the same float16 tensor (what a Core ML float16 model holds), and the SQNR of each is
measured against it. The coremltools side is ``palettize_weights.blockwise_compress(w, "KMEANS",
nbits, per-tensor block sizes)``: the function its ``palettize_weights`` pass calls for every const
(the pass adds only graph bookkeeping around it), on the weight in PyTorch layout as Core ML sees it.
The sdjax side is ``quant.palettize.kmeans(w, nbits)`` up to its packed, device-resident result.

The weights are drawn one tensor at a time with the fan-in scaled normal init of
``unet.init_params`` (``sdjax.params.make_params``, seeded per tensor), so the run never holds the
3.4 GB float32 UNet; only the shapes and the distribution matter here.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from quant import palettize
from sdjax import configs, nn, params, unet


def sqnr(w, wq):
    w = np.asarray(w, np.float64)
    err = np.sum((w - np.asarray(wq, np.float64)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(w * w) / err))


def weights(max_layers=None, seed=0):
    """(name, sdjax-layout float16 array) of every UNet conv/linear weight, built lazily."""
    shapes = unet.param_shapes(configs.preset("sd15")["unet"])
    names = [n for n, s in shapes.items() if n.endswith(".weight") and len(s) in (2, 4)]
    for i, name in enumerate(names[:max_layers]):
        tree = params.make_params({name: shapes[name]}, seed * 100_003 + i)
        yield name, np.asarray(nn.child(tree, name), np.float16)


def run_sdjax(w, nbits):
    t = time.perf_counter()
    pw = palettize.kmeans(w, nbits)
    jax.block_until_ready(pw.packed)
    seconds = time.perf_counter() - t
    return seconds, sqnr(w, pw.dequantize())


def run_coreml(w_torch, nbits):
    from coremltools.optimize import _utils as ct_utils
    from coremltools.optimize.coreml._quantization_passes import palettize_weights
    t = time.perf_counter()
    p = palettize_weights.blockwise_compress(w_torch, "KMEANS", nbits, [0] * w_torch.ndim)
    seconds = time.perf_counter() - t
    return seconds, sqnr(w_torch, ct_utils.lut_to_dense(p.indices, p.lut, None))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[6, 4], choices=palettize.SUPPORTED_NBITS)
    ap.add_argument("--max-layers", type=int, default=None, help="only the first N weights")
    ap.add_argument("--json", default=None, help="write per-layer rows and totals here")
    ap.add_argument("--repeat", type=int, default=1, help="best of N timings per layer and side")
    args = ap.parse_args(argv)

    warm = np.random.default_rng(0).standard_normal((128, 96)).astype(np.float16)  # imports, tables
    for nbits in args.bits:
        run_sdjax(warm, nbits), run_coreml(warm, nbits)

    rows = []
    head = f"{'layer':<66} {'shape':>18} {'bits':>4} {'sdjax ms':>9} {'coreml ms':>9} {'sdjax dB':>9} {'coreml dB':>9} {'diff':>7}"
    print(head)
    for name, w in weights(args.max_layers):
        w_torch = np.ascontiguousarray(params.sdjax_to_torch(name, w))
        for nbits in args.bits:
            (ts, qs), (tc, qc) = (min(f(a, nbits) for _ in range(args.repeat))
                                  for f, a in ((run_sdjax, w), (run_coreml, w_torch)))
            rows.append(dict(layer=name, shape=list(w.shape), nbits=nbits, sdjax_s=ts, coreml_s=tc,
                             sdjax_sqnr_db=qs, coreml_sqnr_db=qc))
            print(f"{name:<66} {str(w.shape):>18} {nbits:>4} {ts * 1e3:9.1f} {tc * 1e3:9.1f} "
                  f"{qs:9.3f} {qc:9.3f} {qs - qc:+7.3f}", flush=True)

    totals = {}
    for nbits in args.bits:
        r = [x for x in rows if x["nbits"] == nbits]
        ts, tc = sum(x["sdjax_s"] for x in r), sum(x["coreml_s"] for x in r)
        diff = [x["sdjax_sqnr_db"] - x["coreml_sqnr_db"] for x in r]
        totals[nbits] = dict(layers=len(r), sdjax_s=ts, coreml_s=tc, time_ratio_sdjax_over_coreml=ts / tc,
                             min_sqnr_diff_db=min(diff), mean_sqnr_diff_db=float(np.mean(diff)),
                             layers_within_0_05_db=sum(d >= -0.05 for d in diff),
                             slowest_ratio=max(x["sdjax_s"] / x["coreml_s"] for x in r))
        print(f"{nbits}-bit, {len(r)} layers: sdjax {ts:.2f} s, coremltools {tc:.2f} s, sdjax/coremltools "
              f"{ts / tc:.3f} (worst layer {totals[nbits]['slowest_ratio']:.2f}); SQNR sdjax - coremltools "
              f"min {min(diff):+.4f} dB, mean {np.mean(diff):+.4f} dB, "
              f"{totals[nbits]['layers_within_0_05_db']}/{len(r)} layers within 0.05 dB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, totals=totals), f, indent=1)
    return totals


if __name__ == "__main__":
    main()
