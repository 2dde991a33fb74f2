"""``sdjax inspect``: components, sizes and configs of a checkpoint; per-layer tables."""
from __future__ import annotations

import numpy as np

from .common import UsageError, model_arg


def register(sub):
    """Add the subcommand and its arguments to ``sub`` (argparse subparsers)."""
    p = sub.add_parser("inspect", help="describe a checkpoint: components, sizes, configs")
    p.add_argument("path", nargs="?", default=None, help="checkpoint (same as --model)")
    model_arg(p)
    p.add_argument("--random", metavar="ARCH", choices=["sd15", "sd21"],
                   help="a full-size architecture with random weights instead of a checkpoint (sd15, sd21)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every config field")
    p.add_argument("--layers", action="store_true",
                   help="per-layer table (method, bits per weight with overhead, bytes, absmax, std, fraction "
                   "|w| > 6 std) for every component; printed anyway for quantized components")
    p.add_argument("--against", metavar="FLOAT_MODEL", default=None,
                   help="float model (the quantized model's source) to measure each layer's SQNR against, "
                   "10 log10(|w|^2 / |w - w_q|^2), as a column of the per-layer tables")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _print_layers(comp, params, against, source):
    from quant import io as qio, metrics
    from quant.recipes import layers as layer_table
    from sdjax.nn import float_value
    table = layer_table(params)
    ref_table = None
    if against is not None:
        ref_table = layer_table(against.params[comp])
        bad = [f"{n} {tuple(w.shape)} vs {tuple(ref_table[n].shape) if n in ref_table else 'missing'}"
               for n, w in table.items() if n not in ref_table or tuple(ref_table[n].shape) != tuple(w.shape)]
        if bad:
            from sdjax.params import CheckpointError
            raise CheckpointError(f"{against.source}: does not have the layers of {source} ({comp}): "
                                  + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    width = max([len(n) for n in table] + [5])
    print(f"  {comp} layers:")
    print(f"    {'layer':{width}s} {'method':20s} {'bits/w':>6s} {'bytes':>11s} {'absmax':>9s} {'std':>9s} "
          f"{'>6std':>8s}" + (f" {'SQNR dB':>8s}" if against else ""))
    sig = noise = 0.0
    counts, stored, weights = {}, 0, 0
    for name, w in table.items():
        counts[qio.method_of(w)] = counts.get(qio.method_of(w), 0) + 1
        stored, weights = stored + qio.nbytes(w), weights + int(np.prod(w.shape))
        absmax, std, frac = metrics.weight_stats(float_value(w))
        line = (f"    {name:{width}s} {qio.label(w):20s} {qio.bits_per_weight(w):6.2f} {qio.nbytes(w):11d} "
                f"{absmax:9.4f} {std:9.5f} {frac:8.2e}")
        if ref_table is not None:
            s_, n_ = metrics.signal_noise(float_value(ref_table[name]), float_value(w))
            sig, noise = sig + s_, noise + n_
            line += f" {metrics.ratio_db(s_, n_):8.2f}"
        print(line)
    print(f"    {comp} conv/linear weights: {', '.join(f'{n} {m}' for m, n in counts.items())}; {stored} bytes, "
          f"{2 * weights / max(stored, 1):.2f}x vs float16, {8 * stored / max(weights, 1):.2f} bits per weight"
          + (f"; SQNR {metrics.ratio_db(sig, noise):.2f} dB (pooled) against {against.source}" if ref_table is not None else ""))


def run(args):
    import sdjax
    from quant import io as qio, size_bytes
    from sdjax.nn import flatten
    if args.random:
        if args.model or args.path:
            raise UsageError("give either a model or --random, not both")
        from sdjax.pipeline import random
        pipe = random(args.random, dtype=args.dtype)
    else:
        pipe = sdjax.load(args.model if args.model is not None else args.path, dtype=args.dtype,
                          progress=not args.quiet)
    against = None
    if args.against is not None:
        against = sdjax.load(args.against, dtype="float32", progress=not args.quiet)
    print(f"model: {pipe.source}")
    if pipe.quantization:
        recipe = pipe.quantization.get("recipe") or {}
        comps = list((pipe.quantization.get("components") or {}).keys()) or recipe.get("components", [])
        print(f"  quantized     recipe {recipe.get('name', '?')!r} ({', '.join(comps)}; "
              f"sdjax quantized format v{qio.FORMAT_VERSION})")
        if pipe.quantization.get("loras"):
            print("  LoRAs merged  " + ", ".join(f"{f}:{s:g}" for f, s in pipe.quantization["loras"])
                  + " (into the float weights, before quantizing)")
        if isinstance(recipe.get("finetune"), dict):
            print("  fine-tuned    palettized UNet weights, " + ", ".join(f"{k} {v}" for k, v in recipe["finetune"].items()))
    total = total_params = 0
    for comp in _components(pipe):
        flat = flatten(pipe.params[comp])
        n = sum(int(np.prod(v.shape)) for v in flat.values())
        nbytes = size_bytes(pipe.params[comp])
        total += nbytes
        total_params += n
        print(f"  {comp:13s} {len(flat):5d} tensors {n / 1e6:9.2f} M params {nbytes / 2**20:9.1f} MiB")
        if args.verbose:
            cfg = pipe.configs[comp]
            for field, value in vars(cfg).items():
                print(f"      {field} = {value}")
    print(f"  {'total':13s} {'':29s} {total / 2**20:9.1f} MiB ({args.dtype})")
    print(f"  {'compression':13s} {2 * total_params / max(total, 1):.2f}x vs float16: {total} bytes stored, "
          f"{2 * total_params} as float16, {8 * total / max(total_params, 1):.2f} bits per parameter")
    sched = pipe.scheduler_config
    if sched:
        print(f"  scheduler     {sched.get('_class_name', '?')}, prediction_type={sched.get('prediction_type', 'epsilon')}")
    print(f"  tokenizer     {pipe.tokenizer.folder if pipe.tokenizer else 'none'}")
    for comp in _components(pipe):
        if args.layers or qio.has_quantized(pipe.params[comp]):
            _print_layers(comp, pipe.params[comp], against, pipe.source)


def _components(pipe):
    """The pipeline's model components in the recipe format's order (SDXL has text_encoder_2; a refiner
    has no text_encoder)."""
    from quant.recipes import COMPONENTS
    return [c for c in COMPONENTS if c in pipe.params]
