"""``sdjax generate``: text-to-image, img2img and inpainting to PNG or .npy."""
from __future__ import annotations

import json

import numpy as np

from .common import UsageError, finite_float, model_arg


def register(sub):
    """Add the subcommand and its arguments to ``sub`` (argparse subparsers)."""
    p = sub.add_parser("generate", help="text-to-image, img2img (--init-image) and inpainting (--mask)")
    model_arg(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--negative-prompt", default="")
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
    p.add_argument("--clip-skip", type=int, default=0)
    p.add_argument("--out", "-o", default="out.png", help="FILE.png (one per image: -0, -1, ... when batched) "
                   "or FILE.npy (float32 NHWC in [0, 1])")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args):
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
