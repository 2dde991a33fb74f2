"""``sdjax eval``: the quality-vs-bits report of the float model and every recipe."""
from __future__ import annotations

import os

from .common import UsageError, finite_float, int_list, lora_arg, lora_label, model_arg, read_prompts

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

EVAL_CALIBRATION_PROMPTS = 128  # dataset captions calibrating GPTQ and fine-tuning on the embedded model by default
# (the first sweep.SELECTION_PROMPTS of them are the selection pairs' prompts)



def register(sub):
    """Add the subcommand and its arguments to ``sub`` (argparse subparsers)."""
    p = sub.add_parser("eval", help="quality vs bits: the float model and every recipe on a fixed prompt x seed set, "
                       "into a report folder (report.md, report.json, plots, image grids)",
                       description="Run the float model and every recipe on the same prompts and seeds and compare: "
                       "noise-prediction PSNR, sdjax's one-step latent PSNR, Apple's one-step reading, final-latent and "
                       "image PSNR and SSIM against the float model's from the same x_T, prompt adherence (embedded model), "
                       "plug-in metrics. apple-mbp (Apple's mixed-bit pre-analysis as Apple runs it), apple-rule (Apple's "
                       "thresholds on sdjax's sweep), mixed-sdjax and mixed-gptq (sdjax's allocator at the sizes of Apple's "
                       "recipes and at uniform 6-bit's quality, over k-means or GPTQ layers) run per-layer sensitivity "
                       "sweeps and build mixed-bit recipes, choosing them on the calibration prompts with other x_T, "
                       "never on the evaluation pairs they are reported on. qat-4bit-gptq, qat-2bit-gptq and qat-mixed-gptq fine-tune the "
                       "palettized UNet weights of palette-4bit-gptq, palette-2bit-gptq and mixed-gptq's recipe at uniform 6-bit's "
                       "one-step PSNR on the calibration prompts (quantization-aware fine-tuning, same bytes), drawn "
                       "beside the post-training recipes as their own families. Resumable: rerun the same command "
                       "after an interruption and only what is missing is computed. Runs the prompt x seed batches "
                       "on every JAX device (data parallel); on one machine, "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=N splits the CPU into N devices.")
    model_arg(p)
    lora_arg(p, "the model (the float reference every recipe is compared with)")
    p.add_argument("--recipes", "-r", default=None, metavar="LIST",
                   help="comma-separated presets, recipe JSON files, apple-mbp, apple-rule, mixed-sdjax, mixed-gptq, "
                   "qat-mixed-gptq (default: palette-8/6/4/3/2bit, palette-4/2bit-gptq, w8-int8, apple-mbp, apple-rule, mixed-sdjax, "
                   "mixed-gptq, and the fine-tuned qat-4bit-gptq, qat-2bit-gptq, qat-mixed-gptq; add w8-int8conv or llm-int8 "
                   "for those; add w8a8-apple and w8a8-sdjax for the W8A8 families: per-layer activation sensitivity "
                   "on the calibration prompts, Apple's thresholds and overrides against sdjax's allocator of int8 MACs, "
                   "plotted against the share of MACs on the int8 path, with Apple's layer lists written beside the "
                   "recipes; W8A8 recipes take their activation scales from the calibration prompts)")
    p.add_argument("--no-finetune", action="store_true",
                   help="leave out the fine-tuned recipes (qat-4bit-gptq, qat-2bit-gptq: palette-4/2bit-gptq with their palettized "
                   "UNet weights fine-tuned on the calibration prompts; qat-mixed-gptq: mixed-gptq's recipe at "
                   "uniform 6-bit's one-step PSNR, fine-tuned; recipe files with \"finetune\" settings), which "
                   "otherwise train (resumably, in OUT/state/finetune/) and are drawn as their own families")
    p.add_argument("-o", "--out", default="eval-out", help="report folder (default eval-out); an existing one "
                   "of the same model and settings is resumed, another is refused")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts, one per line (default: 24 captions of the embedded model's dataset; 8 generic "
                   "prompts for other models)")
    p.add_argument("--n-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--calibration-prompts", default=None, metavar="FILE",
                   help="prompts, one per line, whose guided generation gives GPTQ recipes (mixed-gptq, palette-*-gptq) "
                   "their layers' input statistics and fine-tuned recipes (qat-*) their training samples, and on "
                   "which (with x_T seeds of their own; the first 32 of them) mixed-bit recipes are chosen; none may be an evaluation "
                   "prompt (default: 128 other captions of the embedded model's dataset; 4 generic prompts for other models)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; every prompt runs with every seed (default 0,1)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps of the final images (default 25)")
    p.add_argument("--sampler", default="dpmpp_2m", help="as sdjax generate's (default dpmpp_2m)")
    p.add_argument("--guidance-scale", type=finite_float, default=7.5, help="classifier-free guidance (default 7.5)")
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
    p.set_defaults(func=run)


def run(args):
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
        resolved = sweep.resolve(names)
        if args.no_finetune:
            names = [n for n, (m, r) in zip(names, resolved) if not sweep.is_finetuned(m, r)]
            if not names:
                raise UsageError("--no-finetune leaves no recipe of --recipes to evaluate")
        prompts, seeds = _eval_prompts(args), int_list("--seeds", args.seeds)
        # sdjax's one-step metric on every pair (Apple's reading takes 8 prompts; one step is cheap,
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
    pipe = sdjax.load(args.model, dtype=args.dtype, progress=not args.quiet, loras=args.lora)
    adherence = None
    if args.model is None:
        from sdjax import shapes
        adherence = shapes.score
    try:
        options = sweep.Options(calibration=_eval_calibration_prompts(args, settings.prompts), adherence=adherence,
                                plugins=plugins, fisher=not args.no_fisher,
                                model_label=(args.model or "embedded reference model")
                                + (f" + LoRA {lora_label(args.lora)}" if args.lora else ""))
        results = sweep.run(pipe, names, args.out, settings, options, progress=not args.quiet)
    except sweep.EvalError as e:
        raise UsageError(str(e)) from None
    import jax
    if jax.process_index():
        return
    _print_eval_summary(results)
    print(f"wrote {os.path.join(args.out, 'report.md')} (and report.json, plots, grids)")
    _write_html(args.out)


def _write_html(out):
    """report.html, the page `sdjax report` writes, from the folder just finished; like a plot that fails,
    a page that cannot be written is warned about without losing the rest of the report."""
    import sys
    from sdjax.evaluation import html_report
    try:
        written = html_report.write_html(out)
    except (html_report.ReportError, OSError) as e:
        print(f"sdjax eval: warning: report.html not written: {e}", file=sys.stderr)
        return
    print(f"wrote {written['html']}, the report as one page for a browser ({written['bytes'] / 1e6:.1f} MB with "
          f"{html_report.FILES_DIR}/)")


def _eval_prompts(args):
    if args.n_prompts is not None and args.n_prompts < 1:
        raise UsageError(f"--n-prompts {args.n_prompts}: must be >= 1")
    if args.prompts:
        prompts = read_prompts("--prompts", args.prompts)
        return prompts[:args.n_prompts] if args.n_prompts else prompts
    if args.model is None:  # the embedded model's own captions: adherence is measurable on them
        from sdjax import shapes
        return shapes.captions(args.n_prompts or EVAL_REFERENCE_PROMPTS, seed=6)
    return list(EVAL_GENERIC_PROMPTS[:args.n_prompts or len(EVAL_GENERIC_PROMPTS)])


def _eval_calibration_prompts(args, eval_prompts):
    """GPTQ's calibration prompts for sdjax eval: --calibration-prompts, else dataset captions (the
    embedded model) or the generic calibration prompts, never an evaluation prompt."""
    if args.calibration_prompts:
        return read_prompts("--calibration-prompts", args.calibration_prompts)
    skip = set(eval_prompts)
    if args.model is None:  # a random pick of the other captions
        from sdjax import shapes
        return shapes.shuffled_captions(EVAL_CALIBRATION_PROMPTS, seed=99, exclude=skip)
    from .quantize import CALIBRATION_PROMPTS
    return [p for p in CALIBRATION_PROMPTS if p not in skip]


def _print_eval_summary(results):
    """One line per recipe of an ``EvalResult``, then its targets."""
    def f(v, nd=2):
        return "-" if v is None else ("inf" if v == float("inf") else f"{v:.{nd}f}")
    print(f"{'recipe':<22} {'bits':>5} {'UNet MiB':>8} {'1-step dB':>9} {'image dB':>8} {'SSIM':>6} {'noise dB':>8}")
    for r in results.recipes:
        m = r.metrics
        if not r.finite:
            print(f"{r.name:<22} {r.avg_bits:5.2f} {r.bytes['unet'] / 2**20:8.2f}  NaN/Inf in output ({r.nonfinite})")
            continue
        print(f"{r.name:<22} {r.avg_bits:5.2f} {r.bytes['unet'] / 2**20:8.2f} {f(m.get('latent_psnr_1step_db')):>9} "
              f"{f(m.get('image_psnr_db')):>8} {f(m.get('ssim'), 3):>6} {f(m.get('noise_psnr_db')):>8}")
    for t in results.targets:
        print(f"target {'PASS' if t.passed else 'FAIL'}: {t.name}: {t.got}")
