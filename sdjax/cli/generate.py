"""``sdjax generate``: text-to-image, img2img and inpainting to PNG or .npy; SDXL's micro-conditioning
and its base + refiner ensemble of experts (``--refiner``)."""
from __future__ import annotations

import json

import numpy as np

from .common import UsageError, finite_float, int_pair, lora_arg, lora_label, model_arg

# SDXL flags: (argparse dest, flag, which model takes it: "sdxl" both, "base", "refiner")
DEFAULT_DENOISING_END = 0.8  # diffusers' documented high-noise fraction for the ensemble of experts


def register(sub):
    """Add the subcommand and its arguments to ``sub`` (argparse subparsers)."""
    p = sub.add_parser("generate", help="text-to-image, img2img (--init-image) and inpainting (--mask)")
    model_arg(p)
    lora_arg(p, "--model (not --refiner)")
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--negative-prompt", default=None,
                   help="what to steer away from (default none: the empty prompt, or zero embeddings for SDXL "
                   "models whose force_zeros_for_empty_prompt is set, as diffusers)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=finite_float, default=7.5)
    p.add_argument("--sampler", default="dpmpp_2m", help="ddim, plms, euler, euler_a, heun, lms, dpmpp_2m, "
                   "dpmpp_2m_karras, unipc, lcm (default dpmpp_2m)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's own size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--latents", default=None, metavar="FILE.npy", help="x_T, NCHW float32 (as diffusers)")
    p.add_argument("--init-image", default=None, metavar="IMAGE", help="img2img / inpainting source image")
    p.add_argument("--strength", type=finite_float, default=None,
                   help="how much of the init image to repaint, in [0, 1] (default 0.8, inpainting 1.0)")
    p.add_argument("--mask", default=None, metavar="IMAGE", help="inpainting mask: white is repainted")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--scheduler-option", action="append", metavar="KEY=VALUE",
                   help="override a scheduler_config.json field, e.g. timestep_spacing=trailing, "
                   "prediction_type=v_prediction (repeatable)")
    p.add_argument("--clip-skip", type=int, default=0, help="use the text encoder's output this many layers "
                   "before the last (SDXL: before the penultimate, which it always uses)")
    p.add_argument("--guidance-rescale", type=finite_float, default=0.0, metavar="F",
                   help="rescale the guided prediction towards the text prediction's standard deviation, "
                   "in [0, 1] (diffusers' guidance_rescale; 0.7 in the paper; default 0: off)")
    x = p.add_argument_group("SDXL", "micro-conditioning and the base + refiner ensemble (SDXL models only)")
    size, crop = int_pair("H,W", 1), int_pair("Y,X", 0)
    x.add_argument("--original-size", type=size, metavar="H,W",
                   help="the size the model is told the training image had (default: --height,--width)")
    x.add_argument("--crops-coords-top-left", type=crop, metavar="Y,X",
                   help="the crop's top-left corner the model is told of (default 0,0: well centred)")
    x.add_argument("--target-size", type=size, metavar="H,W",
                   help="base only: the target size (default: the output size)")
    x.add_argument("--negative-original-size", type=size, metavar="H,W",
                   help="original size for the negative conditioning (default: --original-size)")
    x.add_argument("--negative-crops-coords-top-left", type=crop, metavar="Y,X",
                   help="crop corner for the negative conditioning (default as diffusers)")
    x.add_argument("--negative-target-size", type=size, metavar="H,W",
                   help="base only: target size for the negative conditioning (default: --target-size)")
    x.add_argument("--aesthetic-score", type=finite_float, metavar="S",
                   help="refiner only: the aesthetic score to condition on (default 6.0)")
    x.add_argument("--negative-aesthetic-score", type=finite_float, metavar="S",
                   help="refiner only: the negative conditioning's aesthetic score (default 2.5)")
    x.add_argument("--refiner", metavar="MODEL", default=None,
                   help="an SDXL refiner: --model (the SDXL base) denoises until --denoising-end, the refiner "
                   "finishes from its latents (ensemble of experts)")
    x.add_argument("--denoising-end", type=finite_float, metavar="F", default=None,
                   help=f"with --refiner: the fraction of the schedule the base runs, in (0, 1) "
                   f"(default {DEFAULT_DENOISING_END})")
    _controlnet_args(p)
    p.add_argument("--out", "-o", default="out.png", help="FILE.png (one per image: -0, -1, ... when batched) "
                   "or FILE.npy (float32 NHWC in [0, 1])")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args):
    import sdjax
    from sdjax.conditioning import BASE_ONLY, REFINER_ONLY
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
    if args.refiner is None and args.denoising_end is not None:
        raise UsageError("--denoising-end: only with --refiner (where the base hands its latents to the refiner)")
    if args.denoising_end is not None and not 0 < args.denoising_end < 1:
        raise UsageError(f"--denoising-end {args.denoising_end}: must be a fraction strictly between 0 and 1")
    control = _load_controlnets(args)
    pipe = sdjax.load(args.model, dtype=args.dtype, progress=not args.quiet, loras=args.lora)
    refiner = sdjax.load(args.refiner, dtype=args.dtype, progress=not args.quiet) if args.refiner else None
    sdxl = _check_sdxl_flags(args, pipe, refiner)
    prompts = [args.prompt] * args.batch_size
    common = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                  sampler=args.sampler, seed=args.seed, clip_skip=args.clip_skip, scheduler_overrides=overrides,
                  guidance_rescale=args.guidance_rescale, progress=not args.quiet)
    base_kw = {k: v for k, v in sdxl.items() if k not in REFINER_ONLY}
    try:
        if refiner is None:
            images = pipe.generate(prompts, height=args.height, width=args.width, latents=latents, output_type="np",
                                   init_image=args.init_image, strength=args.strength, mask=args.mask, **common,
                                   **sdxl, **control)
        else:
            end = DEFAULT_DENOISING_END if args.denoising_end is None else args.denoising_end
            lat = pipe.generate(prompts, height=args.height, width=args.width, latents=latents, output_type="latent",
                                init_image=args.init_image, strength=args.strength, mask=args.mask,
                                denoising_end=end, **common, **base_kw, **control)
            refiner_kw = {k: v for k, v in sdxl.items() if k not in BASE_ONLY}
            images = refiner.generate(prompts, init_latents=lat, mask=args.mask, denoising_start=end,
                                      output_type="np", **common, **refiner_kw)
    except (GenerationError, ImageError, ValueError) as e:
        raise UsageError(str(e)) from None
    if out.endswith(".npy"):
        save_npy(images, out)
        print(f"wrote {out} {images.shape} float32")
        return
    meta = {"prompt": args.prompt, "seed": args.seed,
            "sampler": args.sampler, "steps": args.steps, "guidance_scale": args.guidance_scale,
            "height": images.shape[1], "width": images.shape[2], "dtype": args.dtype,
            "model": pipe.source,
            "recipe": ((pipe.quantization or {}).get("recipe") or {}).get("name", "?") if pipe.quantization
            else "none (float)", "software": f"sdjax {sdjax.__version__}"}
    if pipe.loras:
        meta["loras"] = lora_label(pipe.loras)
    if args.negative_prompt is not None:  # absent: none given (SDXL: zero embeddings)
        meta["negative_prompt"] = args.negative_prompt
    for k in ("init_image", "strength", "mask", "clip_skip", "guidance_rescale"):
        if getattr(args, k) not in (None, 0) and (k != "strength" or args.init_image or args.mask):
            meta[k] = getattr(args, k)
    for k, v in sdxl.items():
        meta[k] = ",".join(map(str, v)) if isinstance(v, tuple) else v
    if refiner is not None:
        meta.update(refiner=refiner.source, denoising_end=end)
    if control:
        meta.update(controlnet="; ".join(args.controlnet), control_image="; ".join(args.control_image),
                    control_scale=",".join(map(str, args.control_scale or [1.0])))
    stem = out[:-4]
    for i, im in enumerate(to_pil(images)):
        path = out if len(images) == 1 else f"{stem}-{i}.png"
        save_png(im, path, dict(meta, batch_index=i))
        print(f"wrote {path}")


def _sdxl_flags():
    """(settings field, flag, which SDXL model takes it), from the library's own lists (imported here:
    they come with jax, which the parser does not need)."""
    from sdjax.conditioning import BASE_ONLY, MICRO_CONDITIONING, REFINER_ONLY
    return tuple((dest, "--" + dest.replace("_", "-"),
                  "base" if dest in BASE_ONLY else "refiner" if dest in REFINER_ONLY else "sdxl")
                 for dest in MICRO_CONDITIONING)


def _check_sdxl_flags(args, pipe, refiner):
    """{settings field: value} of the SDXL flags given, after UsageErrors for flags the models do not
    take: micro-conditioning for an SD 1.x/2.x model, a refiner as --model without an init image,
    aesthetic scores without a refiner, target sizes for a refiner, a --refiner that is not one."""
    flags = _sdxl_flags()
    given = {dest: getattr(args, dest) for dest, _, _ in flags if getattr(args, dest) is not None}
    flag = {dest: name for dest, name, _ in flags}
    takes = {dest: who for dest, _, who in flags}
    arch = pipe.architecture
    if arch == "sd":
        used = [flag[k] for k in given] + (["--refiner"] if refiner else []) + (
            ["--denoising-end"] if args.denoising_end is not None else [])
        if used:
            raise UsageError(f"{used[0]}: only applies to SDXL models; {pipe.source} is an SD 1.x/2.x model")
    if arch == "sdxl-refiner":
        if refiner is not None or args.init_image is None:
            raise UsageError(f"--model {pipe.source}: this is a refiner (5 time ids): pass it with --refiner "
                             "and the SDXL base with --model (or refine an image with --init-image)")
        wrong = [k for k in given if takes[k] == "base"]
        if wrong:
            raise UsageError(f"{flag[wrong[0]]}: only the SDXL base takes it; {pipe.source} is a refiner")
    if arch == "sdxl" and refiner is None:
        wrong = [k for k in given if takes[k] == "refiner"]
        if wrong:
            raise UsageError(f"{flag[wrong[0]]}: only the SDXL refiner takes it; pass one with --refiner")
    if refiner is not None:
        if arch != "sdxl":
            raise UsageError(f"--model {pipe.source}: the base of a --refiner ensemble must be an SDXL base")
        if refiner.architecture != "sdxl-refiner":
            kind = {"sd": "an SD 1.x/2.x model", "sdxl": "an SDXL base (6 time ids)"}.get(refiner.architecture,
                                                                                       refiner.architecture)
            raise UsageError(f"--refiner {refiner.source}: not an SDXL refiner (5 time ids); it is {kind}")
    return given


def _controlnet_args(p):
    c = p.add_argument_group("ControlNet", "condition the UNet on control images (diffusers' ControlNet pipelines)")
    c.add_argument("--controlnet", action="append", metavar="DIR_OR_FILE",
                   help="a diffusers ControlNet folder or an original-layout single file (.safetensors/.pth); "
                   "repeat for several ControlNets, their residuals summed")
    c.add_argument("--control-image", action="append", metavar="IMAGE",
                   help="the control image of each --controlnet, in order (resized to the output size, which "
                   "defaults to the first control image's)")
    c.add_argument("--control-scale", action="append", type=finite_float, metavar="S",
                   help="conditioning scale: once for every ControlNet or once per --controlnet (default 1.0)")


def _load_controlnets(args):
    """{generate's ControlNet keywords} from the flags (empty without --controlnet), or a UsageError."""
    import sdjax
    nets, images, scales = args.controlnet or [], args.control_image or [], args.control_scale or []
    if not nets:
        for flag, given in (("--control-image", images), ("--control-scale", scales)):
            if given:
                raise UsageError(f"{flag}: given without --controlnet")
        return {}
    if not images:
        raise UsageError("--controlnet: needs --control-image (one per --controlnet)")
    if len(images) != len(nets):
        raise UsageError(f"{len(images)} --control-image for {len(nets)} --controlnet (one each, in order)")
    if len(scales) not in (0, 1, len(nets)):
        raise UsageError(f"{len(scales)} --control-scale values for {len(nets)} --controlnet (one, or one each)")
    loaded = [sdjax.load_controlnet(n, dtype=args.dtype, progress=not args.quiet) for n in nets]
    one = len(nets) == 1
    return dict(controlnet=loaded[0] if one else loaded, control_image=images[0] if one else images,
                controlnet_conditioning_scale=(scales[0] if len(scales) == 1 else scales) if scales else 1.0)
