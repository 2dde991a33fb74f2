"""``sdjax quantize``: a model quantized by a recipe into an sdjax quantized folder."""
from __future__ import annotations

import os
import shutil

from .common import UsageError, lora_arg, model_arg, read_prompts

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
    lora_arg(p, "the model (before quantizing)")
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
                   "recorded; and of fine-tuning, which trains on the float model's own generations of these "
                   "prompts (repeatable; default: four built-in prompts, and for fine-tuning the embedded "
                   "reference model the 128 dataset captions `sdjax eval` calibrates on, none of them an evaluation "
                   "prompt; unused by other recipes)")
    p.add_argument("--calibration-steps", type=int, default=4,
                   help="sampler steps per calibration prompt of W8A8 and GPTQ (default 4; fine-tuning generates "
                   "its training images with 25)")
    p.add_argument("--finetune", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                   help="fine-tune the recipe's palettized UNet weights after quantizing (quantization-aware: the "
                   "float UNet distilled into the palettized one on the calibration prompts, "
                   "sdjax.evaluation.qat; the same bytes and layout, so the folder exports as any palettized one). "
                   "A comma-separated key=value list over the recipe's own \"finetune\" settings, else sdjax's "
                   "defaults (quant.recipes.QAT_DEFAULTS; the command prints the settings "
                   "it runs); keys: method (lut: LUTs only, indices kept; ste; dkm, which "
                   "needs temperature), steps, lr and w_lr (in (0, 1]), loss (guided, eps), batch, n_timesteps, "
                   "seed, schedule (constant, cosine), refine (true/false; ste, dkm), w_init (float, quantized: "
                   "where ste/dkm start the float weights), train_bias (true/false: also train the palettized "
                   "layers' float biases), remat (true/false/auto: recompute each block's activations in the "
                   "backward pass, which a full-size UNet needs to train in 24 GiB; auto, the default, turns it on "
                   "for UNets over 200M parameters). Bare --finetune: the defaults. "
                   "Recipes with \"finetune\" settings (the qat-Nbit presets, sdjax eval's qat-* recipes) "
                   "fine-tune without it. Only palettized weights train; int8 and LLM.int8 ones are carried as "
                   "they are. A progress bar shows the loss")
    p.add_argument("--finetune-dir", default=None, metavar="DIR",
                   help="the fine-tuning's resumable checkpoint folder (default: OUT.finetune beside --out, removed "
                   "once --out is written; a folder named here is kept). A run killed while fine-tuning, rerun with "
                   "the same command, continues from its last checkpoint (every 25 steps) and ends with the weights "
                   "of an uninterrupted run; a folder holding a run of other settings is refused")
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
    recipe = _with_finetune(args, recipe)
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out}: already exists (pass --overwrite to replace it)")
    prompts = _sensitivity_prompts(args, recipe)
    pipe = sdjax.load(args.model, dtype=args.dtype, progress=not args.quiet, loras=args.lora)
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
    tune, tune_dir = _finetune_callable(pipe, recipe, args)
    try:
        importance = None if prompts is None else _sensitivities(pipe, recipe, prompts, args)
        qpipe = pipe.quantize(recipe, calibration=calibration, importance=importance, hessian=hessian,
                              finetune=tune, progress=not args.quiet)
    except quant.RecipeError as e:
        hint = f" (--finetune-dir {tune_dir}: delete it to start over)" if tune_dir and tune_dir in str(e) else ""
        raise UsageError(str(e) + hint) from None
    out = qio.save(qpipe, args.out, recipe=recipe, overwrite=args.overwrite, progress=not args.quiet)
    if tune is not None:
        print(f"fine-tuned in {tune.seconds:.1f} s", flush=True)
        if args.finetune_dir is None:   # the default folder goes once the result is written
            shutil.rmtree(tune_dir, ignore_errors=True)
    for comp in recipe.components:
        table = quant.recipes.layers(qpipe.params[comp])
        counts = {}
        for w in table.values():
            counts[qio.label(w)] = counts.get(qio.label(w), 0) + 1
        before, after = quant.size_bytes(pipe.params[comp]), quant.size_bytes(qpipe.params[comp])
        print(f"{comp}: {', '.join(f'{n} {m}' for m, n in counts.items())}; "
              f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")
    print(f"wrote {out} (recipe {recipe.name!r}; sdjax format: load it with sdjax, diffusers cannot)")


def _setting(text):
    """A --finetune value: true/false, an integer, a number, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def finetune_settings(text):
    """``--finetune``'s ``key=value,...`` as a dict (values typed by ``_setting``), or a UsageError."""
    out = {}
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep or not key or not value:
            raise UsageError(f"--finetune {text!r}: expected key=value pairs separated by commas "
                             f"(e.g. method=lut,steps=300,lr=1e-3); got {part!r}")
        if key in out:
            raise UsageError(f"--finetune {text!r}: {key} is given twice")
        out[key] = _setting(value)
    return out


def _with_finetune(args, recipe):
    """The recipe with --finetune's settings over its own (a UsageError naming the key at fault)."""
    import quant
    if args.finetune is None:
        if args.finetune_dir is not None and not recipe.needs_finetune:
            raise UsageError(f"--finetune-dir: recipe {recipe.name!r} does not fine-tune (add --finetune)")
        return recipe
    given = finetune_settings(args.finetune)
    try:
        return quant.recipes.with_finetune(recipe, dict(recipe.finetune or {}, **given), where="--finetune")
    except quant.RecipeError as e:
        raise UsageError(str(e)) from None


def finetune_prompts(args):
    """Fine-tuning's calibration prompts: --calibration-prompt, else for the embedded model the captions
    `sdjax eval` calibrates on (never its evaluation captions), else the built-in calibration prompts."""
    if args.calibration_prompt:
        return list(args.calibration_prompt)
    if args.model is None:
        from sdjax import shapes
        from .eval import EVAL_CALIBRATION_PROMPTS, EVAL_REFERENCE_PROMPTS
        evals = shapes.captions(EVAL_REFERENCE_PROMPTS, seed=6)
        return shapes.shuffled_captions(EVAL_CALIBRATION_PROMPTS, seed=99, exclude=set(evals))
    return list(CALIBRATION_PROMPTS)


def _finetune_callable(pipe, recipe, args):
    """(finetune= callable, its checkpoint folder) for a recipe that fine-tunes, else (None, None)."""
    if not recipe.needs_finetune:
        return None, None
    from sdjax.evaluation.qat_recipe import finetune_callable
    prompts = finetune_prompts(args)
    folder = args.finetune_dir or os.path.normpath(args.out) + ".finetune"
    settings = ", ".join(f"{k} {v}" for k, v in recipe.finetune.items())
    print(f"fine-tuning the palettized UNet weights ({settings}) on {len(prompts)} calibration "
          f"prompt{'s' * (len(prompts) != 1)}; checkpoints in {folder} (rerun the same command to continue "
          "after an interruption)", flush=True)
    return finetune_callable(pipe, prompts, out_dir=folder, progress=not args.quiet), folder


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
