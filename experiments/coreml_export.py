"""Size, peak memory and time of exporting the full-size SD 1.5 UNet, 6-bit palettized, to Core ML.

Issue 7's targets: the 6-bit per-tensor package <= 660 MB (Apple's ``coreml-stable-diffusion-v1-5``
6-bit UNet is 648 MB), and exporting it peaks below 1.5x the UNet's float16 bytes in RAM.

Weights: random full-size SD 1.5 UNet, drawn tensor by tensor and palettized with sdjax's k-means
(``quant.palettize.kmeans``, one LUT per tensor, 6 bits) by ``quant_memory.prepare``: conv/linear
weights with at least ``--min-size`` elements (default 2048, the recipes' and coremltools' weight
threshold), everything else float16. Each variant runs in its own fresh process (peak RSS = VmHWM):

- ``sdjax``: load the palettized weights and write ``Unet.mlpackage`` with ``sdjax.coreml.unet.export``
  (the path ``sdjax export-coreml`` takes), float16 compute precision;
- ``coremltools`` (``--with-coremltools``): what a coremltools user does instead: the float16 package
  (built here by sdjax's exporter from the float16 weights: Apple's own route traces PyTorch, which
  needs more than 16 GB) re-palettized with ``coremltools.optimize.coreml.palettize_weights``
  (6-bit k-means per tensor, weight_threshold 2048; coremltools' k-means needs scikit-learn,
  ``pip install scikit-learn``, which sdjax itself does not use). Its peak and time are printed side
  by side and as ratios.

    python experiments/coreml_export.py [--workdir /tmp/sdjax-coreml-sd15] [--with-coremltools]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quant_memory as qm  # noqa: E402

APPLE_6BIT_UNET_MB = 648  # apple/coreml-stable-diffusion-v1-5-palettized, Unet.mlmodelc weights


def child(variant, workdir, precision, attention):
    import jax

    from sdjax import configs
    from sdjax.coreml import unet
    from sdjax.coreml.export import dir_bytes
    from sdjax.memory import peak_rss_bytes

    cfg = configs.preset("sd15")["unet"]
    r = dict(variant=variant, rss_after_imports=qm.current_rss_bytes())
    t0 = time.perf_counter()
    params = qm.build_params(workdir, "palettized6" if variant == "sdjax" else "float16")
    jax.block_until_ready(params)
    r["load_s"] = time.perf_counter() - t0
    r["weights_bytes"] = qm.tree_nbytes(params)
    r["rss_after_load"] = qm.current_rss_bytes()
    out = os.path.join(workdir, f"{variant}-Unet.mlpackage")
    t0 = time.perf_counter()
    unet.export(params, cfg, out, compute_precision=precision, attention=attention, overwrite=True)
    r["export_s"] = time.perf_counter() - t0
    if variant == "coremltools":
        import coremltools as ct
        import coremltools.optimize.coreml as cto
        del params
        r["float_package_bytes"] = dir_bytes(out)
        t0 = time.perf_counter()
        model = ct.models.MLModel(out, skip_model_load=True)
        conf = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=6,
                                                                            weight_threshold=2048))
        model = cto.palettize_weights(model, conf)
        out2 = os.path.join(workdir, "coremltools-Unet-6bit.mlpackage")
        model.save(out2)
        r["palettize_s"] = time.perf_counter() - t0
        r["export_s"] += r["palettize_s"]
        out = out2
    r["package_bytes"] = dir_bytes(out)
    r["peak_rss"] = peak_rss_bytes()
    print("RESULT " + json.dumps(r), flush=True)


def run_child(args, variant):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--workdir", args.workdir,
           "--compute-precision", args.compute_precision, "--attention", args.attention]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"variant {variant} failed with exit code {p.returncode}")
    r = json.loads(line[-1][7:])
    r["wall_s"] = time.perf_counter() - t0
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/sdjax-coreml-sd15")
    ap.add_argument("--min-size", type=int, default=2048)
    ap.add_argument("--compute-precision", default="float16", choices=["float16", "float32"])
    ap.add_argument("--attention", default="split_einsum_v2", choices=["split_einsum_v2", "original"])
    ap.add_argument("--with-coremltools", action="store_true", help="also run coremltools' palettize_weights route")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.workdir, args.compute_precision, args.attention)

    from sdjax import configs, unet
    shapes = unet.param_shapes(configs.preset("sd15")["unet"])
    f16_bytes = 2 * sum(int(np.prod(s)) for s in shapes.values())
    qm.prepare("sd15", args.workdir, 6, args.min_size)
    results = [run_child(args, "sdjax")]
    if args.with_coremltools:
        results.append(run_child(args, "coremltools"))
    print(f"\nSD 1.5 UNet, 6-bit per-tensor LUTs, {args.compute_precision}, {args.attention}; "
          f"float16 weights {f16_bytes / 2**20:.0f} MiB, memory target 1.5x = {1.5 * f16_bytes / 2**20:.0f} MiB")
    print(f"{'route':12s} {'package MB':>10s} {'peak RSS MiB':>12s} {'x f16':>6s} {'floor MiB':>9s} "
          f"{'export s':>8s} {'wall s':>7s}")
    for r in results:
        print(f"{r['variant']:12s} {r['package_bytes'] / 1e6:10.1f} {r['peak_rss'] / 2**20:12.0f} "
              f"{r['peak_rss'] / f16_bytes:6.2f} {r['rss_after_imports'] / 2**20:9.0f} {r['export_s']:8.1f} "
              f"{r['wall_s']:7.1f}")
    s = results[0]
    print(f"size: {s['package_bytes'] / 1e6:.1f} MB (target <= 660, Apple's 6-bit UNet {APPLE_6BIT_UNET_MB}); "
          f"peak: {s['peak_rss'] / f16_bytes:.2f}x float16 bytes (target < 1.5)")
    if len(results) > 1:
        c = results[1]
        print(f"coremltools / sdjax: peak RSS {c['peak_rss'] / s['peak_rss']:.2f}x, time "
              f"{c['export_s'] / s['export_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(f16_bytes=f16_bytes, results=results, args=vars(args)), fh, indent=2)


if __name__ == "__main__":
    main()
