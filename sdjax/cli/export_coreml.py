"""``sdjax export-coreml``: the Core ML resource folder of apple/ml-stable-diffusion's Swift package."""
from __future__ import annotations

import dataclasses
import os
import time

from .common import UsageError, lora_arg


def register(sub):
    """Add the subcommand and its arguments to ``sub`` (argparse subparsers)."""
    p = sub.add_parser("export-coreml", help="the Core ML resource folder apple/ml-stable-diffusion's Swift package "
                       "loads (TextEncoder, Unet, VAEDecoder, VAEEncoder .mlpackage + vocab.json, merges.txt; SDXL: "
                       "also TextEncoder2 and, with --refiner, UnetRefiner; with --controlnet, ControlledUnet and "
                       "controlnet/NAME), quantized weights carried over as they are")
    p.add_argument("--model", "-m", default=None,
                   help="diffusers folder or single .safetensors/.ckpt file (default: the embedded reference model); "
                        "float weights load as float16 for a float16 export, else float32")
    lora_arg(p, "--model (before --recipe quantizes it)")
    p.add_argument("--recipe", "-r", default=None,
                   help="quantize the model by this recipe first (a preset such as palette-6bit, or a JSON file)")
    p.add_argument("--quantized", default=None, metavar="DIR", help="a folder written by `sdjax quantize`")
    p.add_argument("--refiner", default=None, metavar="MODEL",
                   help="SDXL: a refiner (diffusers folder, single file or `sdjax quantize` folder) exported beside "
                        "the base as UnetRefiner (quantized by --recipe too, when given)")
    p.add_argument("--controlnet", action="append", metavar="DIR_OR_FILE",
                   help="a ControlNet (diffusers folder or original .pth/.safetensors; repeatable), exported as "
                        "controlnet/NAME.mlpackage (NAME: the folder's or file's name without suffix, what the Swift "
                        "pipeline is given) with a ControlledUnet taking its residuals; a --recipe whose components "
                        "include \"controlnet\" quantizes it")
    p.add_argument("--controlled-unet-only", action="store_true",
                   help="with --controlnet: write the ControlledUnet without the plain Unet (the Swift pipeline "
                        "then needs ControlNets on every run)")
    p.add_argument("--random", metavar="ARCH", choices=["sd15", "sd21", "sdxl"],
                   help="full-size architecture with random weights (for size and memory work)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--compute-precision", default="float16", choices=["float16", "float32"],
                   help="Core ML compute precision (default float16, as Apple's packages)")
    p.add_argument("--attention", default="split_einsum_v2", choices=["split_einsum_v2", "original"],
                   help="split_einsum_v2 for the Neural Engine (default), original for GPU; text encoders and UNets")
    p.add_argument("--min-deployment-target", default="iOS16", metavar="TARGET",
                   help="iOS16 (default), iOS17, iOS18, macOS13, macOS14, macOS15; grouped LUTs and "
                        "per-channel scales need iOS18 / macOS15")
    p.add_argument("--chunk-unet", action="store_true",
                   help="write the UNet as UnetChunk1/UnetChunk2 split by weight size (for iOS)")
    p.add_argument("--unet-batch", type=int, default=2, help="UNet batch (default 2: classifier-free guidance)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--license", default=None, metavar="TEXT",
                   help="the license written into every package's metadata (default: the license: entry of the "
                        "model card, README.md in the model folder; \"unknown\" without one)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (or an interrupted export with other settings)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args):
    import sdjax
    from quant import io as qio
    from sdjax.coreml import export as cx
    from sdjax.memory import peak_rss_bytes
    if args.lora and (args.quantized or args.random):
        other = "--quantized" if args.quantized else "--random"
        raise UsageError(f"--lora: merges into the float weights of --model, not {other} (merge before quantizing: "
                         "`sdjax quantize --lora ...`, or --model with --recipe)")
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
        try:
            cx.check_recipe(recipe, args.recipe, args.min_deployment_target)
        except cx.ExportError as e:
            raise UsageError(f"--recipe {e}") from None
    if (args.height is None) != (args.width is None):
        raise UsageError("give both --height and --width, or neither")
    settings = cx.Settings(args.compute_precision, args.attention, args.min_deployment_target, args.chunk_unet,
                           args.unet_batch, controlled_unet_only=args.controlled_unet_only)
    if args.controlled_unet_only and not args.controlnet:
        raise UsageError("--controlled-unet-only: needs --controlnet")
    names = [cx.controlnet_name(c) for c in args.controlnet or []]
    same = sorted({n for n in names if names.count(n) > 1})
    if same:
        raise UsageError(f"--controlnet: two ControlNets named {same[0]!r} (the folder's or file's name names the "
                         f"package controlnet/{same[0]}.mlpackage); rename one")
    if recipe is not None and "controlnet" in recipe.components and not args.controlnet:
        raise UsageError(f"--recipe {args.recipe}: quantizes the controlnet component; give --controlnet")
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
        pipe = sdjax.load(args.quantized or args.model, dtype=dtype, progress=not args.quiet, loras=args.lora)
    refiner = None
    if args.refiner:
        if not cx.is_xl(pipe):
            raise UsageError(f"--refiner: {pipe.source} is not an SDXL pipeline; only an SDXL base takes a refiner")
        refiner = sdjax.load(args.refiner, dtype=dtype, progress=not args.quiet)
    nets = {n: sdjax.load_controlnet(c, dtype=dtype, progress=not args.quiet) for n, c in zip(names, args.controlnet or [])}
    if args.height is not None:
        try:
            latent = cx.latent_from_image(args.height, args.width, pipe.vae_scale_factor,
                                          2 ** (len(pipe.configs["unet"].block_out_channels) - 1))
        except cx.ExportError as e:
            raise UsageError(str(e)) from None
        settings = dataclasses.replace(settings, latent_shape=latent)
    if recipe is not None:
        try:
            pipe, nets = _quantize(pipe, nets, recipe, not args.quiet)
            comps = [c for c in recipe.components if c != "controlnet"]
            if refiner is not None and comps:
                refiner = refiner.quantize(recipe, components=comps, progress=not args.quiet)
        except quant.RecipeError as e:
            raise UsageError(str(e)) from None
    quantized = recipe is not None and "controlnet" in recipe.components
    controlnets = {n: (p, c, {"model": path, "recipe": recipe.to_json() if quantized else None})
                   for (n, (p, c)), path in zip(nets.items(), args.controlnet or [])}
    t0 = time.perf_counter()
    try:
        manifest = cx.export_pipeline(pipe, args.out, settings, overwrite=args.overwrite, progress=not args.quiet,
                                      refiner=refiner, controlnets=controlnets, license=args.license)
    except cx.ExportError as e:
        raise UsageError(str(e)) from None
    except FileExistsError as e:
        raise UsageError(str(e)) from None
    except NotImplementedError as e:  # a model feature or weight type the exporter does not build
        from sdjax.configs import ConfigError
        raise ConfigError(f"cannot export {pipe.source}: {e}") from None
    print(cx.summary(manifest))
    if controlnets:
        print(f"ControlNets: {', '.join(controlnets)} (StableDiffusionPipeline(resourcesAt:controlNet: "
              f"[{', '.join(repr(n) for n in controlnets)}]) loads controlnet/NAME.mlmodelc and ControlledUnet)")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s (peak RSS {peak_rss_bytes() / 2**30:.2f} GiB); "
          f"on a Mac: for p in {args.out}/*.mlpackage; do xcrun coremlcompiler compile \"$p\" {args.out}; done")


def _quantize(pipe, nets, recipe, progress):
    """``pipe`` and the ControlNets ``{name: (params, config)}`` quantized by ``recipe``: each ControlNet
    beside the pipeline's params as the "controlnet" component (``quant.apply_recipe``), so rules
    match across the components as they do for a pipeline; the pipeline's weights are quantized once
    (the cache) and ControlNets only when the recipe's components name "controlnet"."""
    import quant
    if "controlnet" not in recipe.components:
        return pipe.quantize(recipe, progress=progress), nets
    cache, params, out = {}, None, {}
    for name, (p, c) in nets.items():
        q = quant.apply_recipe({**pipe.params, "controlnet": p}, recipe, cache=cache, progress=progress)
        for k in [k for k in cache if k[0] == "controlnet"]:  # keyed by layer name: not for the next ControlNet
            del cache[k]
        out[name] = (q.pop("controlnet"), c)
        params = q if params is None else params
    return dataclasses.replace(pipe, params=params, quantization={"recipe": recipe.to_json()}), out
