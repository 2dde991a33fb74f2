"""``sdjax verify-coreml``: a Core ML resource folder (sdjax's or Apple's) checked against the float
model on Linux, PSNR per component (``sdjax.coreml.verify``)."""
from __future__ import annotations

import json
import os

from .common import UsageError, finite_float


def register(sub):
    """Add the subcommand and its arguments to ``sub`` (argparse subparsers)."""
    from sdjax.coreml.verify import DEFAULT_MIN_PSNR
    p = sub.add_parser("verify-coreml", help="run every .mlpackage of a Stable Diffusion Core ML folder (sdjax's or "
                       "apple/ml-stable-diffusion's) with sdjax's MIL interpreter and compare it with the model, "
                       "PSNR per output; exit status 1 below --min-psnr")
    p.add_argument("packages", metavar="PACKAGE_DIR",
                   help="folder of .mlpackage files (TextEncoder, Unet or UnetChunk1/2, ControlledUnet, VAEDecoder, "
                        "VAEEncoder, controlnet/NAME, or torch2coreml's file names), or one .mlpackage")
    p.add_argument("--model", "-m", default=None,
                   help="the model the packages were made from: diffusers folder, single file or `sdjax quantize` "
                        "folder (default: the one PACKAGE_DIR/sdjax_export.json names; for a package quantized by "
                        "--recipe the float model's PSNR includes the quantization error)")
    p.add_argument("--refiner", default=None, metavar="MODEL",
                   help="SDXL: the refiner, for UnetRefiner packages (default: from sdjax_export.json)")
    p.add_argument("--controlnet", action="append", metavar="DIR_OR_FILE",
                   help="a ControlNet the controlnet/NAME packages were made from (repeatable; matched by name; "
                        "default: those sdjax_export.json names)")
    p.add_argument("--min-psnr", type=finite_float, default=DEFAULT_MIN_PSNR,
                   help=f"fail (exit status 1) when any output is below this many dB (default {DEFAULT_MIN_PSNR:g}, "
                        "Apple's converter's floor)")
    p.add_argument("--fp16", action="store_true",
                   help="also run each package at its own precision (every op rounded to float16 where the package "
                        "computes in float16), a second PSNR column")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _from_manifest(folder):
    """``(model, refiner, {ControlNet name: path})`` that ``sdjax export-coreml`` recorded in
    ``folder/sdjax_export.json`` and that still exist (None / {} otherwise)."""
    try:
        with open(os.path.join(folder, "sdjax_export.json"), encoding="utf-8") as f:
            settings = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None, {}

    def existing(d):
        path = d.get("model") if isinstance(d, dict) else None
        return path if isinstance(path, str) and os.path.exists(path) else None
    nets = {name: existing(v) for name, v in (settings.get("controlnets") or {}).items()}
    return existing(settings), existing(settings.get("refiner")), {k: v for k, v in nets.items() if v}


def run(args):
    import sdjax
    from sdjax.coreml import export as cx, verify
    cx.import_coremltools()
    if not os.path.isdir(args.packages):
        raise UsageError(f"PACKAGE_DIR {args.packages}: no such folder")
    model, refiner, controlnets = _from_manifest(args.packages)
    model, refiner = args.model or model, args.refiner or refiner
    if args.controlnet:
        controlnets = {cx.controlnet_name(c): c for c in args.controlnet}
    if model is None:
        raise UsageError("--model: give the model the packages were made from (a diffusers folder, single file or "
                         "`sdjax quantize` folder)")
    try:
        verify.find_packages(args.packages)  # before loading the model: a folder with nothing fails fast
    except verify.VerifyError as e:
        raise UsageError(str(e)) from None
    pipe = sdjax.load(model, dtype="float32", progress=not args.quiet)
    refiner = sdjax.load(refiner, dtype="float32", progress=not args.quiet) if refiner else None
    nets = {name: sdjax.load_controlnet(c, dtype="float32", progress=not args.quiet) for name, c in controlnets.items()}
    results = verify.verify(args.packages, pipe, refiner, nets, seed=args.seed, fp16=args.fp16,
                            progress=not args.quiet)
    print(f"{args.packages} against {pipe.source} (seed {args.seed}):")
    print(verify.table(results, args.min_psnr))
    return 0 if all(r.passed(args.min_psnr) for r in results) else 1
