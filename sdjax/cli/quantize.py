"""``sdjax quantize``: a model quantized by a recipe into an sdjax quantized folder."""
from __future__ import annotations

import os

from .common import UsageError, model_arg, read_prompts

SENSITIVITY_REFERENCE_PROMPTS = 32  # dataset captions used for the embedded reference model by default

CALIBRATION_PROMPTS = ("a photo of a cat", "a red circle on a blue square", "a landscape painting at sunset",
                       "a portrait of a person, studio lighting")



def register(sub):
    """Add the subcommand and its arguments to ``sub`` (argparse subparsers)."""
    p = sub.add_parser("quantize", help="quantize a model by a recipe into an sdjax quantized folder (diffusers cannot read it)",
                       description="Quantize a model by a recipe and write it as a folder in the diffusers "
                       "layout (model_index.json, tokenizer/, scheduler/, config.json files) whose quantized "
                       "components are sdjax_quantized.safetensors files: packed indices, LUTs, int8 data and "
                       "scales, with the recipe and per-layer methods in the header. sdjax.load and every sdjax "
                       "command read it; diffusers and transformers cannot (components left float are ordinary "
                       "diffusers files).")
    model_arg(p)
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
                   "the squared gradients of its denoising loss (sdjax.evaluation.fisher.fisher) weight each layer's "
                   f"k-means. Default for the embedded reference model: {SENSITIVITY_REFERENCE_PROMPTS} of its "
                   "dataset's captions; required for other models; an error for recipes without sensitive rules")
    p.add_argument("--sensitivity-timesteps", type=int, default=8,
                   help="noise levels per sensitivity prompt (default 8)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args):
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
        from sdjax import shapes
        return shapes.captions(SENSITIVITY_REFERENCE_PROMPTS, seed=11)
    return read_prompts("--sensitivity-prompts", args.sensitivity_prompts)


def _sensitivities(pipe, recipe, prompts, args):
    from sdjax.evaluation import fisher
    try:
        return fisher.for_recipe(pipe, recipe, prompts, n_timesteps=args.sensitivity_timesteps,
                                 progress=not args.quiet)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _calibration_run(pipe, args):
    """run(params) for quant.calibrate.observe (W8A8) and quant.gptq.collect (GPTQ): guided generation
    over the calibration prompts."""
    from sdjax.evaluation.calibration import Calibration, generation_run
    if args.calibration_steps < 1:
        raise UsageError(f"--calibration-steps {args.calibration_steps}: must be >= 1")
    return generation_run(pipe, Calibration(tuple(args.calibration_prompt or CALIBRATION_PROMPTS),
                                            steps=args.calibration_steps))
