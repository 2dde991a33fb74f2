"""The ``sdjax`` command line. ``sdjax --help`` lists the subcommands."""
from __future__ import annotations

import argparse
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


def build_parser():
    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion as pure JAX functions: "
                                     "load, quantize, evaluate and export.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
