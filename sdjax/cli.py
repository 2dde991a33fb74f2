"""The ``sdjax`` command line. ``sdjax --help`` lists the subcommands."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np


class UsageError(Exception):
    """A bad argument: exit status 2."""


def _finite_float(text):
    """argparse type: a finite number (``nan`` and ``inf`` are refused, naming the flag)."""
    import math
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def _model_arg(p):
    p.add_argument("--model", "-m", default=None,
                   help="diffusers folder or single .safetensors/.ckpt file (default: the embedded reference model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter and compute dtype (default float32)")


def _layer_stats(w):
    """(absmax, std, fraction of |w| > 6 std) of a weight's float value."""
    a = np.asarray(w.dequantize(np.float32) if hasattr(w, "dequantize") else w, np.float64)
    std = float(a.std())
    return float(np.abs(a).max()), std, float(np.mean(np.abs(a) > 6 * std)) if std > 0 else 0.0


def _signal_noise(ref, w):
    """(|ref|^2, |ref - w|^2) of the weights' float values, for an SQNR."""
    r = np.asarray(ref.dequantize(np.float32) if hasattr(ref, "dequantize") else ref, np.float64)
    q = np.asarray(w.dequantize(np.float32) if hasattr(w, "dequantize") else w, np.float64)
    return float(np.sum(r * r)), float(np.sum((r - q) ** 2))


def _db(signal, noise):
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10 * np.log10(signal / noise)


def _print_layers(comp, params, against, source):
    from quant import io as qio
    from quant.recipes import layers as layer_table
    table = layer_table(params)
    ref_table = None
    if against is not None:
        ref_table = layer_table(against.params[comp])
        bad = [f"{n} {tuple(w.shape)} vs {tuple(ref_table[n].shape) if n in ref_table else 'missing'}"
               for n, w in table.items() if n not in ref_table or tuple(ref_table[n].shape) != tuple(w.shape)]
        if bad:
            from .params import CheckpointError
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
        absmax, std, frac = _layer_stats(w)
        line = (f"    {name:{width}s} {qio.label(w):20s} {qio.bits_per_weight(w):6.2f} {qio.nbytes(w):11d} "
                f"{absmax:9.4f} {std:9.5f} {frac:8.2e}")
        if ref_table is not None:
            s_, n_ = _signal_noise(ref_table[name], w)
            sig, noise = sig + s_, noise + n_
            line += f" {_db(s_, n_):8.2f}"
        print(line)
    print(f"    {comp} conv/linear weights: {', '.join(f'{n} {m}' for m, n in counts.items())}; {stored} bytes, "
          f"{2 * weights / max(stored, 1):.2f}x vs float16, {8 * stored / max(weights, 1):.2f} bits per weight"
          + (f"; SQNR {_db(sig, noise):.2f} dB (pooled) against {against.source}" if ref_table is not None else ""))


def cmd_inspect(args):
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
    total = total_params = 0
    for comp in ("text_encoder", "unet", "vae"):
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
    for comp in ("text_encoder", "unet", "vae"):
        if args.layers or qio.has_quantized(pipe.params[comp]):
            _print_layers(comp, pipe.params[comp], against, pipe.source)


def cmd_quantize(args):
    import sdjax
    import quant
    from quant import io as qio
    try:
        recipe = quant.parse_recipe(args.recipe, select=args.select,
                                    components=args.components.split(",") if args.components else None)
    except quant.RecipeError as e:
        raise UsageError(str(e)) from None
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out}: already exists (pass --overwrite to replace it)")
    prompts = _sensitivity_prompts(args, recipe)
    pipe = sdjax.load(args.model, dtype=args.dtype, progress=not args.quiet)
    calibration = hessian = None
    if recipe.needs_calibration or recipe.needs_hessian:
        # one guided generation over the calibration prompts drives the model; apply_recipe observes it
        # on the W8A8 layers (activation scales) and on the GPTQ layers (X^T X of their inputs)
        run = _calibration_run(pipe, args)
        what = [w for w, needed in (("W8A8 activation scales", recipe.needs_calibration),
                                    ("GPTQ X^T X", recipe.needs_hessian)) if needed]
        n = len(args.calibration_prompt or CALIBRATION_PROMPTS)
        print(f"collecting input statistics ({' and '.join(what)}) on {n} calibration prompt{'s' * (n != 1)}, "
              f"{args.calibration_steps} sampler step{'s' * (args.calibration_steps != 1)} each", flush=True)
        calibration = run if recipe.needs_calibration else None
        if recipe.needs_hessian:  # GPTQ: the generation, then its images noised at stratified timesteps
            from sdjax.evaluation.calibration import Calibration, hessian_run
            cal = Calibration(tuple(args.calibration_prompt or CALIBRATION_PROMPTS), steps=args.calibration_steps)
            hessian = hessian_run(pipe, cal, progress=not args.quiet)
            print(f"  (GPTQ also sees each image noised at {cal.n_timesteps} timesteps)", flush=True)
    try:
        importance = None if prompts is None else _sensitivities(pipe, recipe, prompts, args)
        qpipe = pipe.quantize(recipe, calibration=calibration, importance=importance, hessian=hessian,
                              progress=not args.quiet)
    except quant.RecipeError as e:
        raise UsageError(str(e)) from None
    out = qio.save(qpipe, args.out, recipe=recipe, overwrite=args.overwrite, progress=not args.quiet)
    for comp in recipe.components:
        table = quant.recipes.layers(qpipe.params[comp])
        counts = {}
        for w in table.values():
            counts[qio.label(w)] = counts.get(qio.label(w), 0) + 1
        before, after = quant.size_bytes(pipe.params[comp]), quant.size_bytes(qpipe.params[comp])
        print(f"{comp}: {', '.join(f'{n} {m}' for m, n in counts.items())}; "
              f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")
    print(f"wrote {out} (recipe {recipe.name!r}; sdjax format: load it with sdjax, diffusers cannot)")


SENSITIVITY_REFERENCE_PROMPTS = 32  # dataset captions used for the embedded reference model by default


def _sensitivity_prompts(args, recipe):
    """The sensitivity calibration prompts when the recipe has sensitive palettize rules, else None."""
    sensitive = [str(r) for r in recipe.rules if r.method == "palettize" and r.options.get("sensitive")]
    if args.sensitivity_timesteps < 1:
        raise UsageError(f"--sensitivity-timesteps {args.sensitivity_timesteps}: must be >= 1")
    if not sensitive:
        if args.sensitivity_prompts is not None:
            raise UsageError(f"--sensitivity-prompts: recipe {recipe.name!r} has no sensitive palettize rule "
                             "(add \"sensitive\": true to a palettize rule), so it uses no sensitivities")
        return None
    if args.sensitivity_prompts is None:
        if args.model is not None:
            raise UsageError(f"recipe {recipe.name!r}: {sensitive[0]} is sensitive palettization, which needs "
                             "calibration prompts for the sensitivities: pass --sensitivity-prompts FILE "
                             "(one prompt per line)")
        return _reference_captions(SENSITIVITY_REFERENCE_PROMPTS, seed=11)
    return _read_prompts("--sensitivity-prompts", args.sensitivity_prompts)


def _read_prompts(flag, path):
    """The non-empty lines of a prompts file, or a UsageError naming the flag and file."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: cannot read the prompts file ({e})") from None
    if not prompts:
        raise UsageError(f"{flag} {path}: the file has no prompts (one per line)")
    return prompts


def _reference_captions(n, seed):
    """n distinct captions of the embedded model's dataset, a fixed pick per seed."""
    from . import shapes
    scenes = shapes.all_scenes()
    pick = np.random.default_rng([2026, seed]).choice(len(scenes), min(n, len(scenes)), replace=False)
    return [scenes[i].caption for i in sorted(pick)]


def _sensitivities(pipe, recipe, prompts, args):
    """{component: {layer: importance}} for the components with sensitive palettize layers."""
    import quant
    from sdjax.evaluation import fisher
    comps = sorted({c for c, table in quant.plan(pipe.params, recipe).items() for a in table.values()
                    if a.method == "palettize" and a.options.get("sensitive")})
    out = {}
    for comp in comps:
        try:
            out[comp] = fisher.fisher(pipe, prompts, n_timesteps=args.sensitivity_timesteps, component=comp,
                                           progress=not args.quiet)
        except ValueError as e:
            raise UsageError(f"sensitivities of {comp} for recipe {recipe.name!r}: {e}") from None
    return out


CALIBRATION_PROMPTS = ("a photo of a cat", "a red circle on a blue square", "a landscape painting at sunset",
                       "a portrait of a person, studio lighting")


def _calibration_run(pipe, args):
    """run(params) for quant.calibrate.observe (W8A8) and quant.gptq.collect (GPTQ): guided generation
    over the calibration prompts."""
    from sdjax.evaluation.calibration import Calibration, generation_run
    if args.calibration_steps < 1:
        raise UsageError(f"--calibration-steps {args.calibration_steps}: must be >= 1")
    return generation_run(pipe, Calibration(tuple(args.calibration_prompt or CALIBRATION_PROMPTS),
                                            steps=args.calibration_steps))


def cmd_convert(args):
    import sdjax
    pipe = sdjax.load(args.path, dtype=args.dtype, progress=not args.quiet)
    out = pipe.save(args.out, overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_generate(args):
    import sdjax
    from sdjax.generate import GenerationError
    from sdjax.images import ImageError, save_npy, save_png, to_pil

    out = args.out
    if not out.endswith((".png", ".npy")):
        raise UsageError(f"--out {out}: must end in .png (images) or .npy (float32 NHWC array)")
    if args.latents is not None:
        try:
            latents = np.load(args.latents)
        except (OSError, ValueError) as e:
            raise UsageError(f"--latents {args.latents}: cannot read a .npy array ({e})") from None
    else:
        latents = None
    overrides = {}
    for item in args.scheduler_option or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--scheduler-option {item!r}: expected KEY=VALUE, e.g. timestep_spacing=trailing")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string such as trailing or v_prediction
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    pipe = sdjax.load(args.model, dtype=args.dtype, progress=not args.quiet)
    prompts = [args.prompt] * args.batch_size
    try:
        images = pipe.generate(prompts, negative_prompt=args.negative_prompt, steps=args.steps,
                               guidance_scale=args.guidance_scale, sampler=args.sampler, seed=args.seed,
                               height=args.height, width=args.width, latents=latents, output_type="np",
                               clip_skip=args.clip_skip, init_image=args.init_image, strength=args.strength,
                               mask=args.mask, scheduler_overrides=overrides, progress=not args.quiet)
    except (GenerationError, ImageError, ValueError) as e:
        raise UsageError(str(e)) from None
    if out.endswith(".npy"):
        save_npy(images, out)
        print(f"wrote {out} {images.shape} float32")
        return
    meta = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed,
            "sampler": args.sampler, "steps": args.steps, "guidance_scale": args.guidance_scale,
            "height": images.shape[1], "width": images.shape[2], "dtype": args.dtype,
            "model": pipe.source,
            "recipe": ((pipe.quantization or {}).get("recipe") or {}).get("name", "?") if pipe.quantization
            else "none (float)", "software": f"sdjax {sdjax.__version__}"}
    for k in ("init_image", "strength", "mask", "clip_skip"):
        if getattr(args, k) not in (None, 0) and (k != "strength" or args.init_image or args.mask):
            meta[k] = getattr(args, k)
    stem = out[:-4]
    for i, im in enumerate(to_pil(images)):
        path = out if len(images) == 1 else f"{stem}-{i}.png"
        save_png(im, path, dict(meta, batch_index=i))
        print(f"wrote {path}")


EVAL_REFERENCE_PROMPTS = 24  # dataset captions of the default evaluation set (embedded model)
EVAL_GENERIC_PROMPTS = (    # other models, without --prompts
    "a photograph of an astronaut riding a horse",
    "a red sports car parked on a city street at night",
    "a bowl of fruit on a wooden table, oil painting",
    "a snowy mountain lake at sunrise",
    "a portrait of an old fisherman, dramatic lighting",
    "a cozy living room with a fireplace",
    "a watercolor painting of a fox in a forest",
    "a plate of pasta with basil, food photography",
)


def _eval_prompts(args):
    if args.n_prompts is not None and args.n_prompts < 1:
        raise UsageError(f"--n-prompts {args.n_prompts}: must be >= 1")
    if args.prompts:
        prompts = _read_prompts("--prompts", args.prompts)
        return prompts[:args.n_prompts] if args.n_prompts else prompts
    if args.model is None:  # the embedded model's own captions: adherence is measurable on them
        return _reference_captions(args.n_prompts or EVAL_REFERENCE_PROMPTS, seed=6)
    return list(EVAL_GENERIC_PROMPTS[:args.n_prompts or len(EVAL_GENERIC_PROMPTS)])


EVAL_CALIBRATION_PROMPTS = 32  # dataset captions calibrating GPTQ on the embedded model by default


def _eval_calibration_prompts(args, eval_prompts):
    """GPTQ's calibration prompts for sdjax eval: --calibration-prompts, else dataset captions (the
    embedded model) or the generic calibration prompts, never an evaluation prompt."""
    if args.calibration_prompts:
        return _read_prompts("--calibration-prompts", args.calibration_prompts)
    skip = set(eval_prompts)
    if args.model is None:  # a random pick of the other captions (a sorted pick would be mostly small shapes)
        from . import shapes
        caps = [s.caption for s in shapes.all_scenes() if s.caption not in skip]
        return [caps[i] for i in np.random.default_rng([2026, 99]).permutation(len(caps))[:EVAL_CALIBRATION_PROMPTS]]
    return [p for p in CALIBRATION_PROMPTS if p not in skip]


def _int_list(name, text):
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name} {text!r}: a comma-separated list of integers") from None
    if not out:
        raise UsageError(f"{name}: empty")
    return out


def cmd_eval(args):
    if args.distributed or args.coordinator:
        import jax
        # CPU devices of different processes exchange results through gloo (other backends ignore this;
        # asking which backend this is would start it, and initialize() must come first)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if args.coordinator:
            if args.num_processes is None or args.process_id is None:
                raise UsageError("--coordinator needs --num-processes and --process-id")
            jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                       process_id=args.process_id)
        else:
            jax.distributed.initialize()  # a cluster it detects (SLURM, Open MPI, ...)
    import sdjax
    from quant import metrics as qmetrics
    from sdjax.evaluation import sweep
    from sdjax.evaluation.evaluator import Settings
    names = [n.strip() for n in args.recipes.split(",") if n.strip()] if args.recipes else list(sweep.DEFAULT_RECIPES)
    try:
        sweep.resolve(names)
        prompts, seeds = _eval_prompts(args), _int_list("--seeds", args.seeds)
        # the one-step metric on every pair (Apple's pre-analysis takes 8 prompts; one step is cheap,
        # and recipes that differ by tenths of a dB need more than 8 samples to be told apart)
        settings = Settings(prompts=prompts, seeds=seeds, steps=args.steps, sampler=args.sampler,
                            guidance_scale=args.guidance_scale, batch=args.batch,
                            n_one_step=len(prompts) * len(seeds))
    except (sweep.EvalError, ValueError) as e:
        raise UsageError(str(e)) from None
    plugins = []
    try:
        for spec in args.metric or ():
            plugins.append(qmetrics.load_plugin(spec))
        if args.clip_score_model:
            plugins.append(qmetrics.clip_score(args.clip_score_model))
    except (ValueError, ImportError, OSError) as e:
        raise UsageError(str(e)) from None
    pipe = sdjax.load(args.model, dtype=args.dtype, progress=not args.quiet)
    adherence = None
    if args.model is None:
        from . import shapes
        adherence = shapes.score
    try:
        results = sweep.run(pipe, names, args.out, settings, adherence=adherence, plugins=plugins,
                            progress=not args.quiet, fisher=not args.no_fisher,
                            model_label=args.model or "embedded reference model",
                            calibration=_eval_calibration_prompts(args, settings.prompts))
    except sweep.EvalError as e:
        raise UsageError(str(e)) from None
    import jax
    if jax.process_index():
        return
    _print_eval_summary(results)
    print(f"wrote {os.path.join(args.out, 'report.md')} (and report.json, plots, grids)")


def cmd_export_coreml(args):
    import sdjax
    from quant import io as qio
    from sdjax.coreml import export as cx
    from sdjax.memory import peak_rss_bytes
    cx.import_coremltools()
    if args.quantized and (args.model or args.recipe):
        raise UsageError("--quantized DIR is a model already quantized by `sdjax quantize`: give it alone, "
                         "without --model or --recipe")
    if args.quantized and not qio.is_quantized_folder(args.quantized):
        raise UsageError(f"--quantized {args.quantized}: not an sdjax quantized folder (write one with "
                         "`sdjax quantize`, or pass a float model with --model)")
    recipe = None
    if args.recipe:
        import quant
        try:
            recipe = quant.parse_recipe(args.recipe)
        except quant.RecipeError as e:
            raise UsageError(str(e)) from None
        if recipe.needs_calibration:  # not after `sdjax quantize` either: check_exportable refuses W8A8 weights
            raise UsageError(f"--recipe {args.recipe}: has int8-w8a8 rules (quantized activations, calibrated), "
                             "which Core ML's weight-only compression cannot express: use an int8 (W8A16) or "
                             "palettize recipe")
        needs = [what for what, needed in (("sensitivities (sensitive palettize rules)", recipe.needs_importance),
                                           ("calibration statistics (GPTQ palettize rules)", recipe.needs_hessian))
                 if needed]
        if needs:
            raise UsageError(f"--recipe {args.recipe}: needs {' and '.join(needs)}, which export-coreml does not "
                             f"collect; quantize first, then export the folder: `sdjax quantize --recipe "
                             f"{args.recipe} -o Q ...` then `sdjax export-coreml --quantized Q`")
    if (args.height is None) != (args.width is None):
        raise UsageError("give both --height and --width, or neither")
    settings = cx.Settings(args.compute_precision, args.attention, args.min_deployment_target, args.chunk_unet,
                           args.unet_batch)
    try:
        settings.check()
    except cx.ExportError as e:
        raise UsageError(str(e)) from None
    if os.path.lexists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out}: already exists (pass --overwrite to replace it)")
    # float16 packages: float weights load as float16 (half the memory, the same package); a
    # recipe quantizes the float32 weights, as `sdjax quantize` does
    dtype = "float16" if args.compute_precision == "float16" and recipe is None else "float32"
    if args.random:
        if args.model or args.quantized:
            raise UsageError("give either a model or --random, not both")
        from sdjax.pipeline import random
        pipe = random(args.random, dtype=dtype)
    else:
        pipe = sdjax.load(args.quantized or args.model, dtype=dtype, progress=not args.quiet)
    if args.height is not None:
        try:
            latent = cx.latent_from_image(args.height, args.width, pipe.vae_scale_factor,
                                          2 ** (len(pipe.configs["unet"].block_out_channels) - 1))
        except cx.ExportError as e:
            raise UsageError(str(e)) from None
        settings = dataclasses.replace(settings, latent_shape=latent)
    if recipe is not None:
        try:
            pipe = pipe.quantize(recipe, progress=not args.quiet)
        except quant.RecipeError as e:
            raise UsageError(str(e)) from None
    t0 = time.perf_counter()
    try:
        manifest = cx.export_pipeline(pipe, args.out, settings, overwrite=args.overwrite, progress=not args.quiet)
    except cx.ExportError as e:
        raise UsageError(str(e)) from None
    except FileExistsError as e:
        raise UsageError(str(e)) from None
    except NotImplementedError as e:  # a model feature or weight type the exporter does not build
        from .configs import ConfigError
        raise ConfigError(f"cannot export {pipe.source}: {e}") from None
    print(cx.summary(manifest))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s (peak RSS {peak_rss_bytes() / 2**30:.2f} GiB); "
          f"on a Mac: for p in {args.out}/*.mlpackage; do xcrun coremlcompiler compile \"$p\" {args.out}; done")


def _print_eval_summary(results):
    def f(v, nd=2):
        return "-" if v is None else ("inf" if v == float("inf") else f"{v:.{nd}f}")
    print(f"{'recipe':<22} {'bits':>5} {'UNet MiB':>8} {'1-step dB':>9} {'image dB':>8} {'SSIM':>6} {'noise dB':>8}")
    for r in results["recipes"]:
        m = r["metrics"]
        if not r["finite"]:
            print(f"{r['name']:<22} {r['avg_bits']:5.2f} {r['bytes']['unet'] / 2**20:8.2f}  NaN/Inf in output ({r['nonfinite']})")
            continue
        print(f"{r['name']:<22} {r['avg_bits']:5.2f} {r['bytes']['unet'] / 2**20:8.2f} {f(m.get('latent_psnr_1step_db')):>9} "
              f"{f(m.get('image_psnr_db')):>8} {f(m.get('ssim'), 3):>6} {f(m.get('noise_psnr_db')):>8}")
    for t in results.get("targets") or ():
        print(f"target {'PASS' if t['pass'] else 'FAIL'}: {t['name']}: {t['got']}")


def build_parser():
    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion as pure JAX functions: "
                                     "load, quantize, evaluate and export.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="text-to-image, img2img (--init-image) and inpainting (--mask)")
    _model_arg(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=_finite_float, default=7.5)
    p.add_argument("--sampler", default="dpmpp_2m", help="ddim, plms, euler, euler_a, heun, lms, dpmpp_2m, "
                   "dpmpp_2m_karras, unipc, lcm (default dpmpp_2m)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's own size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--latents", default=None, metavar="FILE.npy", help="x_T, NCHW float32 (as diffusers)")
    p.add_argument("--init-image", default=None, metavar="IMAGE", help="img2img / inpainting source image")
    p.add_argument("--strength", type=_finite_float, default=None,
                   help="how much of the init image to repaint, in [0, 1] (default 0.8, inpainting 1.0)")
    p.add_argument("--mask", default=None, metavar="IMAGE", help="inpainting mask: white is repainted")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--scheduler-option", action="append", metavar="KEY=VALUE",
                   help="override a scheduler_config.json field, e.g. timestep_spacing=trailing, "
                   "prediction_type=v_prediction (repeatable)")
    p.add_argument("--clip-skip", type=int, default=0)
    p.add_argument("--out", "-o", default="out.png", help="FILE.png (one per image: -0, -1, ... when batched) "
                   "or FILE.npy (float32 NHWC in [0, 1])")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="describe a checkpoint: components, sizes, configs")
    p.add_argument("path", nargs="?", default=None, help="checkpoint (same as --model)")
    _model_arg(p)
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
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("quantize", help="quantize a model by a recipe into an sdjax quantized folder (diffusers cannot read it)",
                       description="Quantize a model by a recipe and write it as a folder in the diffusers "
                       "layout (model_index.json, tokenizer/, scheduler/, config.json files) whose quantized "
                       "components are sdjax_quantized.safetensors files: packed indices, LUTs, int8 data and "
                       "scales, with the recipe and per-layer methods in the header. sdjax.load and every sdjax "
                       "command read it; diffusers and transformers cannot (components left float are ordinary "
                       "diffusers files).")
    _model_arg(p)
    p.add_argument("--recipe", "-r", required=True,
                   help="a preset (w8-int8conv, w8a8-int8conv, w8-int8, llm-int8, palette-Nbit for N in "
                   "1,2,3,4,6,8, palette-Nbit-gG with one LUT per G output channels, either with -gptq: GPTQ palettization, "
                   "calibrated on --calibration-prompt) or a recipe JSON file: sdjax rules ({\"rules\": [{\"pattern\": GLOB, \"method\": ...}]}) "
                   "or Apple's mixed-bit {layer: nbits} / pre-analysis JSON")
    p.add_argument("--select", default=None, metavar="NAME",
                   help="which recipe of an Apple pre-analysis JSON (its \"recipes\" object) to apply")
    p.add_argument("--components", default=None, metavar="LIST",
                   help="comma-separated components to quantize, replacing the recipe's (unet,text_encoder,vae)")
    p.add_argument("--calibration-prompt", action="append", metavar="PROMPT",
                   help="prompt of the calibration run that serves W8A8 (activation scales) and GPTQ (each "
                   "layer's input statistics X^T X): the model generates it and the chosen layers' inputs are "
                   "recorded (repeatable; default: four built-in prompts; unused by other recipes)")
    p.add_argument("--calibration-steps", type=int, default=4,
                   help="sampler steps per calibration prompt (default 4)")
    p.add_argument("--sensitivity-prompts", default=None, metavar="FILE",
                   help="for recipes with \"sensitive\": true palettize rules (sensitivity-weighted k-means): "
                   "a text file of calibration prompts, one per line; the model generates an image for each and "
                   "the squared gradients of its denoising loss (quant.sensitivity.fisher) weight each layer's "
                   f"k-means. Default for the embedded reference model: {SENSITIVITY_REFERENCE_PROMPTS} of its "
                   "dataset's captions; required for other models; an error for recipes without sensitive rules")
    p.add_argument("--sensitivity-timesteps", type=int, default=8,
                   help="noise levels per sensitivity prompt (default 8)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="quality vs bits: the float model and every recipe on a fixed prompt x seed set, "
                       "into a report folder (report.md, report.json, plots, image grids)",
                       description="Run the float model and every recipe on the same prompts and seeds and compare: "
                       "noise-prediction PSNR, Apple's one-step latent PSNR, final-image PSNR and SSIM against the "
                       "float model's image from the same x_T, prompt adherence (embedded model), plug-in metrics. "
                       "mixed-apple / mixed-sdjax / mixed-gptq run the per-layer sensitivity analysis and build "
                       "mixed-bit recipes (Apple's algorithm; sdjax's allocator at the same sizes and at uniform 6-bit's "
                       "quality, over k-means or GPTQ layers), choosing them on the calibration prompts with other x_T, "
                       "never on the evaluation pairs they are reported on. Resumable: rerun the same command "
                       "after an interruption and only what is missing is computed. Runs the prompt x seed batches "
                       "on every JAX device (data parallel); on one machine, "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=N splits the CPU into N devices.")
    _model_arg(p)
    p.add_argument("--recipes", "-r", default=None, metavar="LIST",
                   help="comma-separated presets, recipe JSON files, mixed-apple, mixed-sdjax, mixed-gptq (default: "
                   "palette-8/6/4/3/2bit, w8-int8, mixed-apple, mixed-sdjax, mixed-gptq; add w8-int8conv or llm-int8 for those)")
    p.add_argument("-o", "--out", default="eval-out", help="report folder (default eval-out); an existing one "
                   "of the same model and settings is resumed, another is refused")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts, one per line (default: 24 captions of the embedded model's dataset; 8 generic "
                   "prompts for other models)")
    p.add_argument("--n-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--calibration-prompts", default=None, metavar="FILE",
                   help="prompts, one per line, whose guided generation gives GPTQ recipes (mixed-gptq, palette-*-gptq) "
                   "their layers' input statistics, and on which (with x_T seeds of their own) mixed-bit recipes are "
                   "chosen; none may be an evaluation prompt (default: 32 other captions of the embedded model's "
                   "dataset; 4 generic prompts for other models)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; every prompt runs with every seed (default 0,1)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps of the final images (default 25)")
    p.add_argument("--sampler", default="dpmpp_2m", help="as sdjax generate's (default dpmpp_2m)")
    p.add_argument("--guidance-scale", type=_finite_float, default=7.5, help="classifier-free guidance (default 7.5)")
    p.add_argument("--batch", type=int, default=16, help="prompt/seed pairs per batch (default 16)")
    p.add_argument("--metric", action="append", metavar="MODULE:CALLABLE",
                   help="a plug-in metric (images, prompts, float images) -> per-image values (repeatable)")
    p.add_argument("--clip-score-model", default=None, metavar="DIR",
                   help="add CLIP score, with a CLIP model saved on disk (transformers' save_pretrained folder; "
                   "needs PyTorch); nothing is downloaded")
    p.add_argument("--no-fisher", action="store_true",
                   help="skip the Fisher estimate of layer sensitivity (and its rank agreement with the measured one)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first, which detects SLURM, Open MPI and "
                   "other clusters; every process runs the same command, the batches are split over all their "
                   "devices, and the first process writes the folder (a resumed run needs it on a shared filesystem)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-host without a cluster manager: the first process's address (with --num-processes, --process-id)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export-coreml", help="the Core ML resource folder apple/ml-stable-diffusion's Swift package "
                       "loads (TextEncoder, Unet, VAEDecoder, VAEEncoder .mlpackage + vocab.json, merges.txt), "
                       "quantized weights carried over as they are")
    p.add_argument("--model", "-m", default=None,
                   help="diffusers folder or single .safetensors/.ckpt file (default: the embedded reference model); "
                        "float weights load as float16 for a float16 export, else float32")
    p.add_argument("--recipe", "-r", default=None,
                   help="quantize the model by this recipe first (a preset such as palette-6bit, or a JSON file)")
    p.add_argument("--quantized", default=None, metavar="DIR", help="a folder written by `sdjax quantize`")
    p.add_argument("--random", metavar="ARCH", choices=["sd15", "sd21"],
                   help="full-size architecture with random weights (for size and memory work)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--compute-precision", default="float16", choices=["float16", "float32"],
                   help="Core ML compute precision (default float16, as Apple's packages)")
    p.add_argument("--attention", default="split_einsum_v2", choices=["split_einsum_v2", "original"],
                   help="split_einsum_v2 for the Neural Engine (default), original for GPU; text encoder and UNet")
    p.add_argument("--min-deployment-target", default="iOS16", metavar="TARGET",
                   help="iOS16 (default), iOS17, iOS18, macOS13, macOS14, macOS15; grouped LUTs and "
                        "per-channel scales need iOS18 / macOS15")
    p.add_argument("--chunk-unet", action="store_true",
                   help="write the UNet as UnetChunk1/UnetChunk2 split by weight size (for iOS)")
    p.add_argument("--unet-batch", type=int, default=2, help="UNet batch (default 2: classifier-free guidance)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (or an interrupted export with other settings)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_export_coreml)

    p = sub.add_parser("convert", help="convert a checkpoint (single file or folder) to a diffusers folder")
    p.add_argument("path", help="source: diffusers folder or single .safetensors/.ckpt")
    p.add_argument("-o", "--out", required=True, help="output diffusers folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .configs import ConfigError
    from .params import CheckpointError
    from .safetensors_io import SafetensorsError
    try:
        args.func(args)
    except UsageError as e:
        print(f"sdjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ConfigError, SafetensorsError, FileNotFoundError) as e:
        print(f"sdjax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
