"""The ``sdjax`` command line. ``sdjax --help`` lists the subcommands."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


class UsageError(Exception):
    """A bad argument: exit status 2."""


def _model_arg(p):
    p.add_argument("--model", "-m", default=None,
                   help="diffusers folder or single .safetensors/.ckpt file (default: the embedded reference model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter and compute dtype (default float32)")


def cmd_inspect(args):
    import sdjax
    from sdjax.nn import flatten
    if args.random:
        if args.model or args.path:
            raise UsageError("give either a model or --random, not both")
        from sdjax.pipeline import random
        pipe = random(args.random, dtype=args.dtype)
    else:
        pipe = sdjax.load(args.model if args.model is not None else args.path, dtype=args.dtype,
                          progress=not args.quiet)
    print(f"model: {pipe.source}")
    total = 0
    for comp in ("text_encoder", "unet", "vae"):
        flat = flatten(pipe.params[comp])
        n = sum(int(np.prod(v.shape)) for v in flat.values())
        nbytes = sum(int(getattr(v, "nbytes", 0)) for v in flat.values())
        total += nbytes
        print(f"  {comp:13s} {len(flat):5d} tensors {n / 1e6:9.2f} M params {nbytes / 2**20:9.1f} MiB")
        if args.verbose:
            cfg = pipe.configs[comp]
            for field, value in vars(cfg).items():
                print(f"      {field} = {value}")
    print(f"  {'total':13s} {'':29s} {total / 2**20:9.1f} MiB ({args.dtype})")
    sched = pipe.scheduler_config
    if sched:
        print(f"  scheduler     {sched.get('_class_name', '?')}, prediction_type={sched.get('prediction_type', 'epsilon')}")
    print(f"  tokenizer     {pipe.tokenizer.folder if pipe.tokenizer else 'none'}")


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
            "model": pipe.source, "recipe": "none (float)", "software": f"sdjax {sdjax.__version__}"}
    for k in ("init_image", "strength", "mask", "clip_skip"):
        if getattr(args, k) not in (None, 0) and (k != "strength" or args.init_image or args.mask):
            meta[k] = getattr(args, k)
    stem = out[:-4]
    for i, im in enumerate(to_pil(images)):
        path = out if len(images) == 1 else f"{stem}-{i}.png"
        save_png(im, path, dict(meta, batch_index=i))
        print(f"wrote {path}")


def build_parser():
    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion as pure JAX functions: "
                                     "load, quantize, evaluate and export.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="text-to-image, img2img (--init-image) and inpainting (--mask)")
    _model_arg(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--sampler", default="dpmpp_2m", help="ddim, plms, euler, euler_a, heun, lms, dpmpp_2m, "
                   "dpmpp_2m_karras, unipc, lcm (default dpmpp_2m)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's own size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--latents", default=None, metavar="FILE.npy", help="x_T, NCHW float32 (as diffusers)")
    p.add_argument("--init-image", default=None, metavar="IMAGE", help="img2img / inpainting source image")
    p.add_argument("--strength", type=float, default=None,
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_inspect)

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
