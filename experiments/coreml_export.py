"""Size, peak memory and time of exporting a full-size UNet (SD 1.5 or SDXL base), palettized, to Core ML.

Targets: issue 7 (SD 1.5): the 6-bit per-tensor package <= 660 MB (Apple's ``coreml-stable-diffusion-v1-5``
6-bit UNet is 648 MB), exporting it below 1.5x the UNet's float16 bytes in RAM. Issue 17 (SDXL base,
2.57 B UNet parameters, 5.1 GB in float16): the 6-bit package and a mixed recipe near 4.5 bits (Apple's
4.50-bit SDXL UNet: ~1.46 GB), with ``split_einsum_v2`` and ``original`` attention, below 1.5x the float16
bytes; coremltools' own route beside it, or the point where it ran out of memory.

Weights: random full-size UNet weights, drawn tensor by tensor and palettized with sdjax's k-means
(``quant.palettize.kmeans``, one LUT per tensor) by ``quant_memory.prepare``: conv/linear weights
with at least ``--min-size`` elements (default 2048, the recipes' and coremltools' weight threshold),
everything else float16. Recipes:

- ``6bit``: every such weight at 6 bits;
- ``w8a8`` (issue 23): every such weight int8 per output channel with int8 activations (W8A8), exported
  at iOS17 as ``quantize``/``dequantize`` of each layer's input before its int8 weight;
- ``w4a8`` (issue 23): every such weight 4-bit with int8 LUT entries and int8 activations, exported at
  iOS18 (``constexpr_lut_to_dense`` with an int8 LUT + ``constexpr_blockwise_shift_scale``, behind the
  same activation ``quantize``/``dequantize``). Random weights have no calibration run, so every layer
  gets the activation scale ``SYNTHETIC_ACT_SCALE``: the package's bytes, the export's memory and its
  time do not depend on the scales' values (one float per layer);
- ``mixed``: ``mixed_bits``, a fixed mixed recipe at 4.5 average bits over those weights. Random
  weights have no sensitivities to choose by, so the choice only mimics the shape of Apple's recipes
  (a few layers at 8 bits, many at 6, most of the bytes at 4); the package's size and the export's
  memory and time depend on the bit widths and shapes, not on which layer got which.

Each variant runs in its own fresh process (peak RSS = VmHWM):

- ``sdjax``: load the palettized weights and write ``Unet.mlpackage`` with ``sdjax.coreml.unet.export``
  (the path ``sdjax export-coreml`` takes), float16 compute precision;
- ``coremltools`` (``--with-coremltools``, 6-bit, the first ``--attention``): what a coremltools user
  does instead: the float16 package (built here by sdjax's exporter from the float16 weights: Apple's
  own route traces PyTorch, which needs more than 16 GB for SD 1.5) re-palettized with
  ``coremltools.optimize.coreml.palettize_weights`` (6-bit k-means per tensor, weight_threshold 2048;
  coremltools' k-means needs scikit-learn, ``pip install scikit-learn``, which sdjax itself does not
  use). A watchdog stops it when its RSS passes ``--memory-limit-gib`` (default 22, this 24 GiB
  machine less what the system keeps) and reports the phase it was in.

    python experiments/coreml_export.py [--with-coremltools]                         # SD 1.5, 6-bit
    python experiments/coreml_export.py --recipes w8a8,w4a8                          # SD 1.5, integer activations
    python experiments/coreml_export.py --config sdxl --recipes 6bit,mixed --attention split_einsum_v2,original \\
        --with-coremltools --json /tmp/coreml-sdxl.json                             # SDXL (~1 h on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quant_memory as qm  # noqa: E402

CONFIGS = ("sd15", "sdxl", "micro", "sdxl-micro")   # the micro ones: quick checks (tests)
RECIPES = ("6bit", "mixed", "w8a8", "w4a8")
SYNTHETIC_ACT_SCALE = 0.05   # every layer's activation scale in w8a8/w4a8 (no calibration on random weights)
TARGETS = {"w8a8": "iOS17", "w4a8": "iOS18"}   # the first deployment target each recipe exports to
ATTENTIONS = ("split_einsum_v2", "original")
APPLE_UNET_MB = {("sd15", "6bit"): 648,      # apple/coreml-stable-diffusion-v1-5-palettized, Unet weights
                 ("sdxl", "mixed"): 1460}    # Apple's 4.50-bit mixed-bit SDXL base UNet (~1.46 GB)
MIXED_TARGET_BITS = 4.5


def mixed_bits(config, min_size, target=MIXED_TARGET_BITS):
    """{parameter name: nbits} for the quantizable weights: 4 bits everywhere, then 8 bits for the
    time and added-conditioning embeddings (small, and where Apple's recipes keep more bits), then 6
    bits for attention projections (cross-attention first, in the model's order) while the average
    over the quantizable weights stays at most ``target``."""
    from sdjax import unet
    shapes = {n: s for n, s in unet.param_shapes(qm.unet_config(config)).items()
              if qm.quantizable(n, s, min_size)}
    size = {n: int(np.prod(s)) for n, s in shapes.items()}
    total = sum(size.values())
    bits = {n: 4 for n in shapes}
    spent = 4 * total

    def upgrade(names, b):
        nonlocal spent
        for n in names:
            extra = (b - bits[n]) * size[n]
            if extra > 0 and spent + extra <= target * total:
                bits[n], spent = b, spent + extra

    upgrade([n for n in shapes if n.startswith(("time_embedding.", "add_embedding.")) or ".time_emb_proj." in n], 8)
    upgrade([n for n in shapes if ".attn2." in n], 6)
    upgrade([n for n in shapes if ".attn1." in n or ".proj_in." in n or ".proj_out." in n], 6)
    return bits


def average_bits(bits, config):
    from sdjax import unet
    shapes = unet.param_shapes(qm.unet_config(config))
    size = {n: int(np.prod(shapes[n])) for n in bits}
    return sum(bits[n] * size[n] for n in bits) / sum(size.values())


def _text_embeds_dim(cfg):
    return cfg.projection_class_embeddings_input_dim - qm.SDXL_TIME_IDS * cfg.addition_time_embed_dim


def _target(recipe):
    import coremltools as ct
    return getattr(ct.target, TARGETS[recipe]) if recipe in TARGETS else None


def with_activations(params, recipe):
    """``params`` as the recipe's integer-activation weights: w8a8 (int8 weights) and w4a8 (palettized
    weights given int8 LUT entries) get ``SYNTHETIC_ACT_SCALE`` as every conv/linear input's scale."""
    import jax
    import jax.numpy as jnp

    from quant import palettize
    from quant.int8 import Int8Weight
    from sdjax import nn

    def one(w):
        if isinstance(w, Int8Weight):
            return w.replace(act_scale=jnp.float32(SYNTHETIC_ACT_SCALE))
        if isinstance(w, palettize.PalettizedWeight):
            return palettize.with_act_scale(palettize.int8_lut(w), SYNTHETIC_ACT_SCALE)
        return w
    return jax.tree.map(one, params, is_leaf=nn.is_quantized)


def child(variant, config, folder, precision, attention, out, recipe="6bit"):
    import jax

    from sdjax.coreml import unet
    from sdjax.coreml.export import dir_bytes
    from sdjax.memory import peak_rss_bytes

    cfg = qm.unet_config(config)
    r = dict(variant=variant, rss_after_imports=qm.current_rss_bytes())
    phase = lambda p: print(f"PHASE {p}", flush=True)  # noqa: E731  (read by the watchdog)
    phase("load")
    t0 = time.perf_counter()
    params = qm.build_params(folder, "float16" if variant != "sdjax" else "int8" if recipe == "w8a8" else "palettized6")
    if recipe in TARGETS:
        params = with_activations(params, recipe)
    jax.block_until_ready(params)
    r["load_s"] = time.perf_counter() - t0
    r["weights_bytes"] = qm.tree_nbytes(params)
    r["rss_after_load"] = qm.current_rss_bytes()
    kw = dict(text_embeds_dim=_text_embeds_dim(cfg)) if cfg.is_sdxl else {}
    phase("export float16 package" if variant == "coremltools" else "export")
    t0 = time.perf_counter()
    unet.export(params, cfg, out, compute_precision=precision, attention=attention, overwrite=True,
                minimum_deployment_target=_target(recipe), **kw)
    r["export_s"] = time.perf_counter() - t0
    if variant == "coremltools":
        import coremltools as ct
        import coremltools.optimize.coreml as cto
        del params
        r["float_package_bytes"] = dir_bytes(out)
        r["peak_rss_float_package"] = peak_rss_bytes()
        phase("palettize_weights")
        t0 = time.perf_counter()
        model = ct.models.MLModel(out, skip_model_load=True)
        conf = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=6,
                                                                            weight_threshold=2048))
        model = cto.palettize_weights(model, conf)
        out = out.replace(".mlpackage", "-6bit.mlpackage")
        phase("save")
        model.save(out)
        r["palettize_s"] = time.perf_counter() - t0
        r["export_s"] += r["palettize_s"]
    r["package_bytes"] = dir_bytes(out)
    r["peak_rss"] = peak_rss_bytes()
    print("RESULT " + json.dumps(r), flush=True)


def _watch(proc, limit_bytes, state):
    """Poll the child's RSS every 0.2 s; past ``limit_bytes`` kill it and note the highest RSS seen."""
    path = f"/proc/{proc.pid}/status"
    while proc.poll() is None:
        try:
            with open(path) as f:
                rss = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            break
        state["max_rss"] = max(state.get("max_rss", 0), rss)
        if rss > limit_bytes:
            state["killed"] = True
            proc.kill()
            break
        time.sleep(0.2)


def run_child(args, variant, folder, recipe, attention):
    out = os.path.join(args.workdir, f"{variant}-{recipe}-{attention}-Unet.mlpackage")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--config", args.config, "--folder", folder,
           "--out", out, "--compute-precision", args.compute_precision, "--attention", attention, "--recipe", recipe]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = {}
    watcher = threading.Thread(target=_watch, args=(proc, args.memory_limit_gib * 2**30, state), daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    wall = time.perf_counter() - t0
    phases = [ln[6:] for ln in stdout.splitlines() if ln.startswith("PHASE ")]
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if state.get("killed") or proc.returncode in (-9, 137) or not line:
        if not state.get("killed") and proc.returncode not in (-9, 137):
            sys.stderr.write(stderr[-4000:])
            raise SystemExit(f"variant {variant} failed with exit code {proc.returncode}")
        return dict(variant=variant, recipe=recipe, attention=attention, out_of_memory=True, wall_s=wall,
                    max_rss=state.get("max_rss", 0), phase=phases[-1] if phases else "start")
    r = json.loads(line[-1][7:])
    r.update(recipe=recipe, attention=attention, wall_s=wall)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="sd15", choices=CONFIGS, help="full-size UNet: SD 1.5 or SDXL base")
    ap.add_argument("--workdir", default=None, help="weights and packages (default /tmp/sdjax-coreml-CONFIG)")
    ap.add_argument("--recipes", default="6bit", help=f"comma-separated, of {', '.join(RECIPES)} (default 6bit)")
    ap.add_argument("--min-size", type=int, default=2048)
    ap.add_argument("--compute-precision", default="float16", choices=["float16", "float32"])
    ap.add_argument("--attention", default="split_einsum_v2",
                    help=f"comma-separated, of {', '.join(ATTENTIONS)} (default split_einsum_v2)")
    ap.add_argument("--with-coremltools", action="store_true", help="also run coremltools' palettize_weights route")
    ap.add_argument("--memory-limit-gib", type=float, default=22.0,
                    help="stop a variant whose RSS passes this and report where it was (default 22)")
    ap.add_argument("--keep-packages", action="store_true", help="keep the written packages (default: delete)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--recipe", default="6bit", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.config, args.folder, args.compute_precision, args.attention, args.out,
                     args.recipe)
    recipes = [r for r in args.recipes.split(",") if r]
    attentions = [a for a in args.attention.split(",") if a]
    for name, got, known in (("--recipes", recipes, RECIPES), ("--attention", attentions, ATTENTIONS)):
        bad = [x for x in got if x not in known] or ([] if got else ["(none)"])
        if bad:
            ap.error(f"{name}: unknown {bad}; known: {', '.join(known)}")
    args.workdir = args.workdir or f"/tmp/sdjax-coreml-{args.config}"

    import shutil

    from sdjax import unet
    shapes = unet.param_shapes(qm.unet_config(args.config))
    f16_bytes = 2 * sum(int(np.prod(s)) for s in shapes.values())
    results, avg = [], {}
    for recipe in recipes:
        bits = {"6bit": 6, "w8a8": 8, "w4a8": 4}.get(recipe) or mixed_bits(args.config, args.min_size)
        avg[recipe] = float(bits) if isinstance(bits, int) else average_bits(bits, args.config)
        folder = os.path.join(args.workdir, recipe)
        qm.prepare(args.config, folder, bits, args.min_size, variants=("int8",) if recipe == "w8a8" else ("palettized6",))
        for attention in attentions:
            results.append(run_child(args, "sdjax", folder, recipe, attention))
            print(json.dumps(results[-1]), flush=True)
    if args.with_coremltools:
        folder = os.path.join(args.workdir, "float16")
        qm.prepare(args.config, folder, 6, args.min_size, variants=("float16",))
        results.append(run_child(args, "coremltools", folder, "6bit", attentions[0]))
        print(json.dumps(results[-1]), flush=True)
    if not args.keep_packages:
        for p in os.listdir(args.workdir):
            if p.endswith(".mlpackage"):
                shutil.rmtree(os.path.join(args.workdir, p), ignore_errors=True)

    name = {"sd15": "SD 1.5", "sdxl": "SDXL base"}.get(args.config, args.config)
    print(f"\n{name} UNet, {args.compute_precision} compute; float16 weights {f16_bytes / 2**20:.0f} MiB, "
          f"memory target 1.5x = {1.5 * f16_bytes / 2**20:.0f} MiB")
    print(f"{'route':12s} {'recipe':11s} {'attention':15s} {'package MB':>10s} {'peak RSS MiB':>12s} {'x f16':>6s} "
          f"{'floor MiB':>9s} {'export s':>8s} {'wall s':>7s}")
    for r in results:
        label = f"{r['recipe']} ({avg.get(r['recipe'], 6.0):.2f} b)"
        if r.get("out_of_memory"):
            print(f"{r['variant']:12s} {label:11s} {r['attention']:15s} {'-':>10s} {r['max_rss'] / 2**20:12.0f} "
                  f"{r['max_rss'] / f16_bytes:6.2f} {'-':>9s} {'-':>8s} {r['wall_s']:7.1f}  stopped past "
                  f"{args.memory_limit_gib:g} GiB in: {r['phase']}")
            continue
        print(f"{r['variant']:12s} {label:11s} {r['attention']:15s} {r['package_bytes'] / 1e6:10.1f} "
              f"{r['peak_rss'] / 2**20:12.0f} {r['peak_rss'] / f16_bytes:6.2f} {r['rss_after_imports'] / 2**20:9.0f} "
              f"{r['export_s']:8.1f} {r['wall_s']:7.1f}")
    for r in results:
        apple = APPLE_UNET_MB.get((args.config, r["recipe"]))
        if r["variant"] == "sdjax" and apple:
            print(f"{r['recipe']} {r['attention']}: {r['package_bytes'] / 1e6:.1f} MB (Apple's: {apple} MB); "
                  f"peak {r['peak_rss'] / f16_bytes:.2f}x float16 bytes (target < 1.5)")
    ours = next((r for r in results if r["variant"] == "sdjax" and r["recipe"] == "6bit"
                 and r["attention"] == attentions[0]), None)
    theirs = next((r for r in results if r["variant"] == "coremltools"), None)
    if ours and theirs and not theirs.get("out_of_memory"):
        print(f"coremltools / sdjax (6-bit, {attentions[0]}): peak RSS {theirs['peak_rss'] / ours['peak_rss']:.2f}x, "
              f"time {theirs['export_s'] / ours['export_s']:.2f}x")
    elif ours and theirs:
        print(f"coremltools ran out: past {args.memory_limit_gib:g} GiB in {theirs['phase']} after "
              f"{theirs['wall_s']:.0f} s; sdjax peaked at {ours['peak_rss'] / 2**30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(f16_bytes=f16_bytes, average_bits=avg, results=results, args=vars(args)), fh, indent=2)


if __name__ == "__main__":
    main()
