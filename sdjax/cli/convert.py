"""``sdjax convert``: a checkpoint (single file or folder) to a diffusers folder."""
from __future__ import annotations


def register(sub):
    """Add the subcommand and its arguments to ``sub`` (argparse subparsers)."""
    p = sub.add_parser("convert", help="convert a checkpoint (single file or folder) to a diffusers folder")
    p.add_argument("path", help="source: diffusers folder or single .safetensors/.ckpt")
    p.add_argument("-o", "--out", required=True, help="output diffusers folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args):
    import sdjax
    pipe = sdjax.load(args.path, dtype=args.dtype, progress=not args.quiet)
    out = pipe.save(args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
