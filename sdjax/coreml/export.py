"""``sdjax export-coreml``: a whole pipeline as the resource folder apple/ml-stable-diffusion's
Swift ``StableDiffusion`` package loads.

    from sdjax.coreml.export import export_pipeline
    export_pipeline(sdjax.load(None).quantize("palette-6bit"), "coreml-out")

writes ``TextEncoder.mlpackage``, ``Unet.mlpackage`` (or ``UnetChunk1/2.mlpackage`` with
``chunk_unet``), ``VAEDecoder.mlpackage``, ``VAEEncoder.mlpackage``, ``vocab.json``,
``merges.txt`` and ``sdjax_export.json`` (settings, recipe, per-package size and time). On a Mac,
``xcrun coremlcompiler compile X.mlpackage OUT/`` turns each package into the ``X.mlmodelc`` the
Swift package reads (``StableDiffusionPipeline+Resources.swift``).

The quantized weights go in as they are (``sdjax.coreml.mil.weight``): the packages carry the
LUTs, indices and int8 data sdjax evaluated. A layer with int8 activations (W8A8: its weight has an
``act_scale``) also gets sdjax's activation quantization of its input (``mil.activation_quant``:
iOS17 ``quantize``/``dequantize`` with the calibrated scales). That needs iOS17 / macOS14 or later,
which ``check_exportable`` checks before any work. ``--attention`` applies to the text encoder and the
UNet; the VAE's single mid-block attention is exported "original", as Apple's VAE is.

SDXL (a pipeline whose UNet takes "text_time" conditioning) gets the layout of
apple/ml-stable-diffusion's ``StableDiffusionXLPipeline(resourcesAt:)``
(``swift/StableDiffusion/pipeline/StableDiffusionXL+Resources.swift``): ``TextEncoder.mlpackage``
(text_encoder; absent for a refiner, which has none) and ``TextEncoder2.mlpackage``
(text_encoder_2), both with SDXL's outputs ``hidden_embeds`` (penultimate layer) and
``pooled_outputs`` (``TextEncoderXL.swift``; see ``text_encoder.build``'s ``xl``); ``Unet.mlpackage``
(or ``UnetChunk1/2``) with the ``time_ids`` and ``text_embeds`` inputs (``unet.build``), the base's
or, for a refiner pipeline on its own, the refiner's (the Swift pipeline tells a refiner by its
5 time ids); with ``refiner=`` (a refiner pipeline beside a base) also ``UnetRefiner.mlpackage``
(or ``UnetRefinerChunk1/2``); ``VAEDecoder``/``VAEEncoder`` for Swift's SDXL scale factor 0.13025
(``vae.SWIFT_XL_SCALING_FACTOR``) and, when the VAE config's ``force_upcast`` is true (SDXL's VAE
overflows float16), converted with float32 compute precision whatever ``compute_precision`` says,
as Apple's converter does (its manifest entry records the precision each package got). One
``vocab.json``/``merges.txt`` pair serves both tokenizers there (Swift builds tokenizer 2 from
the same files, padding with "!"): the two must hold the same vocabulary and merges, else
ExportError. Apple's XL pipeline always runs the UNet at batch 2.

ControlNets (``controlnets=``, ``sdjax export-coreml --controlnet``) get the layout of
``StableDiffusionPipeline(resourcesAt:controlNet:)`` (``StableDiffusionPipeline+Resources.swift``):
``controlnet/<name>.mlpackage`` per ControlNet (``sdjax.coreml.controlnet``; the Swift pipeline
is given the names and loads ``controlnet/<name>.mlmodelc``) and ``ControlledUnet.mlpackage`` (or
``ControlledUnetChunk1/2``), the UNet with the residual inputs (``unet.build``'s ``residuals``),
which Swift loads instead of ``Unet`` whenever ControlNets are named; ``Unet.mlpackage`` is
written too (for runs without ControlNets) unless ``Settings.controlled_unet_only``. Swift runs
ControlNets at batch 2 (``SWIFT_CONTROLNET_BATCH``) and conditioning scale 1. Refused before any
work: a ControlNet that does not fit the UNet (``sdjax.controlnet.check_fits``), one whose control
image is not image-sized (its downscale differs from the VAE's), names that collide, a UNet batch
other than 2, ControlNets beside a refiner-only pipeline. An SDXL base gets SDXL ControlNets with
the XL inputs (``time_ids``, ``text_embeds``) on both packages; Apple's SDXL pipeline runs none.

Crash safety and resume: everything is written into ``OUT.partial`` next to ``OUT``, each package
saved atomically inside it, and ``OUT.partial`` is renamed to ``OUT`` at the end. A rerun with the
same settings after an interruption keeps the packages already finished; with other settings it is
refused (``overwrite`` starts it afresh).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import time

from ..files import Store, StoreError, replace_folder
from ..memory import peak_rss_bytes
from . import metadata

MANIFEST = "sdjax_export.json"
PRECISIONS = ("float16", "float32")
TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
XL_TOKENIZER_2_PAD = "!"  # what StableDiffusionXL+Resources.swift pads text_encoder_2's ids with
GROUPED_LUT_TARGET = "iOS18"  # grouped LUTs and per-channel scales need the iOS18 / macOS15 opset
ACT_QUANT_TARGET = "iOS17"  # int8 activations (W8A8: quantize/dequantize) need the iOS17 / macOS14 opset


class ExportError(ValueError):
    """Settings or weights that cannot be exported (the message names the argument or layer)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    compute_precision: str = "float16"
    attention: str = "split_einsum_v2"
    minimum_deployment_target: str = "iOS16"
    chunk_unet: bool = False
    unet_batch: int = 2
    latent_shape: tuple | None = None   # (h, w); None: the model's own size
    controlled_unet_only: bool = False  # with ControlNets: no plain Unet beside the ControlledUnet

    def check(self):
        from . import mil
        if self.compute_precision not in PRECISIONS:
            raise ExportError(f"compute precision {self.compute_precision!r}: expected one of {PRECISIONS}")
        if self.attention not in mil.ATTENTION_MODES:
            raise ExportError(f"attention {self.attention!r}: expected one of {mil.ATTENTION_MODES}")
        if self.minimum_deployment_target not in TARGETS:
            raise ExportError(f"minimum deployment target {self.minimum_deployment_target!r}: expected one of "
                              f"{TARGETS} (the constexpr weight ops need iOS16 / macOS13)")
        if self.unet_batch < 1:
            raise ExportError(f"unet batch {self.unet_batch}: expected >= 1 (2 for classifier-free guidance)")

    def target(self):
        import coremltools as ct
        return getattr(ct.target, self.minimum_deployment_target)


def import_coremltools():
    """coremltools, imported without its import-time warnings where they say nothing useful: on
    Linux it cannot load Core ML's runtime (eight "Failed to load _ML...Proxy" lines) and it warns
    about any torch version newer than it was tested with (sdjax's export does not use torch)."""
    import logging
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import coremltools
    finally:
        log.setLevel(level)
    return coremltools


def dir_bytes(path):
    """Bytes of every file under ``path`` (a package's size on disk)."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _check_act_scale(label, w, target_name, needs17):
    """ExportError when weight ``w`` (with an activation scale) cannot be exported: a target below
    iOS17, or scales that are not finite and > 0 or not shaped () / (in,)."""
    import numpy as np
    if needs17:
        raise ExportError(f"{label} quantizes its activations (W8A8/W4A8 int8 activations: act_scale), which Core ML expresses with the "
                          f"quantize/dequantize ops only from {ACT_QUANT_TARGET} (macOS14): pass --min-deployment-target "
                          f"{ACT_QUANT_TARGET} or later (or macOS14), not {target_name}")
    a = np.asarray(w.act_scale, np.float64)
    cin = int(w.shape[-2])
    if a.shape not in ((), (cin,)):
        raise ExportError(f"{label}: activation scale of shape {a.shape}; expected a scalar or ({cin},), one per input "
                          "channel")
    if not (np.all(np.isfinite(a)) and np.all(a > 0)):
        raise ExportError(f"{label}: activation scales must be finite and > 0; got min {a.min()}, max {a.max()}")


def check_exportable(params, target_name):
    """Raise ExportError naming the first layer the deployment target or Core ML cannot express
    (``params``: {component name: params}, every component is checked). A weight with an
    activation scale (``act_scale``: W8A8) needs iOS17 (macOS14) or later and finite, positive
    scales, whatever its weight form."""
    import coremltools as ct
    import quant
    from ..nn import method_of
    target = getattr(ct.target, target_name)
    needs18 = target < ct.target.iOS18  # iOS16/17, macOS13/14 (macOS15 is iOS18's opset)
    needs17 = target < ct.target.iOS17  # iOS16, macOS13 (macOS14 is iOS17's opset)
    for comp in params:
        for name, w in quant.recipes.layers(params[comp]).items():
            kind = method_of(w)
            if kind == "palettize" and needs18 and (w.num_groups != 1 or w.scale is not None or w.lut_scale is not None):
                what = f"{w.num_groups} LUT groups" if w.num_groups != 1 else \
                    "a per-channel scale" if w.scale is not None else "int8 LUT entries"
                raise ExportError(f"{comp}.{name} is palettized with {what}, which Core ML expresses only "
                                  f"from {GROUPED_LUT_TARGET} (macOS15): pass --min-deployment-target "
                                  f"{GROUPED_LUT_TARGET} (or macOS15), not {target_name}")
            if kind not in ("palettize", "int8", "int8-w8a8", "float"):
                raise ExportError(f"{comp}.{name} is {type(w).__name__} ({kind}), which has no Core ML weight form "
                                  "(supported: palettize, int8 W8A16 and W8A8, float)")
            if getattr(w, "act_scale", None) is not None:
                _check_act_scale(f"{comp}.{name}", w, target_name, needs17)


def check_recipe(recipe, label=None, target_name=None):
    """Raise ExportError when a parsed recipe needs statistics or training this exporter does not do
    (W8A8's calibration, sensitive or GPTQ palettization, fine-tuning: quantize first), or, with
    ``target_name`` (one of TARGETS; others are Settings.check's to refuse), W8A8 rules below iOS17."""
    import coremltools as ct
    label = label or recipe.name
    if recipe.needs_calibration and target_name in TARGETS and getattr(ct.target, target_name) < ct.target.iOS17:
        raise ExportError(f"{label}: has int8 activations (int8-w8a8 rules or palettize rules with "
                          "\"activations\": \"int8\"), which Core ML expresses with the "
                          f"quantize/dequantize ops only from {ACT_QUANT_TARGET} (macOS14): pass "
                          f"--min-deployment-target {ACT_QUANT_TARGET} or later, not {target_name}")
    needs = [what for what, needed in (("activation scales (int8-w8a8 rules, int8-activation palettize rules: calibration)", recipe.needs_calibration),
                                       ("sensitivities (sensitive palettize rules)", recipe.needs_importance),
                                       ("calibration statistics (GPTQ palettize rules)", recipe.needs_hessian),
                                       ("fine-tuning (its \"finetune\" settings)", recipe.needs_finetune))
             if needed]
    if needs:
        raise ExportError(f"{label}: needs {' and '.join(needs)}, which export-coreml does not "
                          f"compute; quantize first, then export the folder: `sdjax quantize --recipe "
                          f"{label} -o Q ...` then `sdjax export-coreml --quantized Q`"
                          + (f" (with --min-deployment-target {ACT_QUANT_TARGET} or later)"
                             if recipe.needs_calibration else ""))


def _check_xl_tokenizers(pipe, log):
    """SDXL's two tokenizers share Apple's one vocab.json/merges.txt: ExportError when their
    vocabularies differ; a log line when tokenizer_2 does not pad with "!" as Swift's does."""
    t1, t2 = pipe.tokenizer, pipe.tokenizer_2
    if t2 is None:
        return
    if t1 is not None and t1._tok.get_vocab() != t2._tok.get_vocab():
        raise ExportError(f"{pipe.source}: tokenizer and tokenizer_2 have different vocabularies, but Apple's SDXL "
                          "resources hold one vocab.json/merges.txt for both text encoders")
    pad = t2._tok.pad_token
    if pad != XL_TOKENIZER_2_PAD:
        log(f"warning: tokenizer_2 pads with {pad!r}; the Swift SDXL pipeline pads text_encoder_2's ids with "
            f"{XL_TOKENIZER_2_PAD!r} (StableDiffusionXL+Resources.swift)")


def _tokenizer_files(pipe, folder):
    """vocab.json and merges.txt: the checkpoint's own (tokenizer, else SDXL's tokenizer_2), else
    the standard CLIP BPE files."""
    names = ("vocab.json", "merges.txt")
    tok = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
    src = tok.folder if tok is not None else None
    if src and all(os.path.isfile(os.path.join(src, n)) for n in names):
        for n in names:
            shutil.copyfile(os.path.join(src, n), os.path.join(folder, n))
        return "the checkpoint's tokenizer"
    tj = os.path.join(src, "tokenizer.json") if src else None
    if tj and os.path.isfile(tj):  # a tokenizer.json-only folder: its BPE model holds both tables
        try:
            with open(tj, encoding="utf-8") as fh:
                model = json.load(fh)["model"]
            vocab, merges = model["vocab"], model["merges"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{tj}: cannot read the BPE vocabulary and merges ({type(e).__name__}: {e})") from None
        from ..tokenizer import write_files
        write_files(folder, vocab, merges)
        return "the checkpoint's tokenizer.json"
    from ..tokenizer import clip_tokenizer_files
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer_files(tmp, "sd1")
        for n in names:
            shutil.copyfile(os.path.join(tmp, n), os.path.join(folder, n))
    return "the standard CLIP vocabulary (the model has no tokenizer)"


def is_xl(pipe) -> bool:
    """Whether ``pipe`` is exported in Apple's SDXL layout (its UNet takes "text_time" conditioning)."""
    return bool(pipe.configs["unet"].is_sdxl)


def _text_embeds_dim(pipe):
    te2 = pipe.configs.get("text_encoder_2")
    if te2 is None or not te2.with_projection:
        raise ExportError(f"{pipe.source}: an SDXL UNet needs text_encoder_2 (CLIPTextModelWithProjection) for its "
                          "text_embeds input")
    return te2.projection_dim


def _unet_jobs(pipe, settings, common, ukw, names, chunk_names, label):
    from . import unet
    p, c = pipe.params["unet"], pipe.configs["unet"]
    if is_xl(pipe):
        ukw = dict(ukw, text_embeds_dim=_text_embeds_dim(pipe))
    if settings.chunk_unet:
        return [(f"{label} (2 chunks)", list(chunk_names),
                 lambda paths: unet.export_chunks(p, c, paths, **common, **ukw), common["compute_precision"])]
    return [(label, [names], lambda paths: unet.export(p, c, paths[0], **common, **ukw), common["compute_precision"])]


def _controlnet_jobs(pipe, settings, common, ukw, controlnets):
    """The ControlledUnet (or its chunks) and ``controlnet/NAME.mlpackage`` per ControlNet."""
    from . import controlnet, unet
    jobs = _unet_jobs(pipe, settings, common, dict(ukw, residuals=True), unet.CONTROLLED_NAME,
                      unet.CONTROLLED_CHUNK_NAMES, "ControlledUnet")
    if is_xl(pipe):
        ukw = dict(ukw, text_embeds_dim=_text_embeds_dim(pipe))
    for name, (params, config, _) in controlnets.items():
        jobs.append((f"ControlNet {name}", [f"{controlnet.DIR}/{name}.mlpackage"],
                     lambda paths, params=params, config=config: controlnet.export(params, config, paths[0], **common,
                                                                                 **ukw),
                     common["compute_precision"]))
    return jobs


def _jobs(pipe, settings, target, refiner=None, controlnets=None):
    """[(label, package file names, fn(paths), compute precision)] in export order."""
    from . import text_encoder, unet, vae
    p, c = pipe.params, pipe.configs
    prec = settings.compute_precision
    xl = is_xl(pipe)
    latent = settings.latent_shape or vae.default_latent_shape(c["vae"])
    f = c["vae"].scale_factor
    common = dict(compute_precision=prec, minimum_deployment_target=target, overwrite=True)
    ukw = dict(batch=settings.unet_batch, latent_shape=latent, attention=settings.attention)
    jobs = []
    for comp, name in (("text_encoder", "TextEncoder.mlpackage"), ("text_encoder_2", "TextEncoder2.mlpackage")):
        if comp in p and (comp == "text_encoder" or xl):
            jobs.append((comp.replace("_", " "), [name],
                         lambda paths, comp=comp: text_encoder.export(p[comp], c[comp], paths[0], xl=xl,
                                                                      attention=settings.attention, **common), prec))
    if not (controlnets and settings.controlled_unet_only):
        jobs += _unet_jobs(pipe, settings, common, ukw, unet.NAME, unet.CHUNK_NAMES, "UNet")
    if controlnets:
        jobs += _controlnet_jobs(pipe, settings, common, ukw, controlnets)
    if refiner is not None:
        jobs += _unet_jobs(refiner, settings, common, ukw, unet.REFINER_NAME, unet.REFINER_CHUNK_NAMES, "refiner UNet")
    vcommon = dict(common)
    if xl:
        vcommon["swift_scaling_factor"] = vae.SWIFT_XL_SCALING_FACTOR
        if c["vae"].force_upcast:  # SDXL's VAE overflows float16: Apple converts it in float32 too
            vcommon["compute_precision"] = "float32"
    jobs.append(("VAE decoder", ["VAEDecoder.mlpackage"],
                 lambda paths: vae.export_decoder(p["vae"], c["vae"], paths[0], latent_shape=latent, **vcommon),
                 vcommon["compute_precision"]))
    image = (latent[0] * f, latent[1] * f)
    jobs.append(("VAE encoder", ["VAEEncoder.mlpackage"],
                 lambda paths: vae.export_encoder(p["vae"], c["vae"], paths[0], image_shape=image, **vcommon),
                 vcommon["compute_precision"]))
    return jobs


def _check_refiner(pipe, refiner):
    """A refiner beside ``pipe``: an SDXL refiner whose text_encoder_2 is configured as the base's
    (the Swift pipeline feeds both UNets from the one TextEncoder2)."""
    from ..checkpoint import architecture
    if architecture(pipe.configs) != "sdxl":
        raise ExportError(f"refiner: only an SDXL base pipeline takes a refiner beside it, not {pipe.source} "
                          f"({architecture(pipe.configs)})")
    if architecture(refiner.configs) != "sdxl-refiner":
        raise ExportError(f"refiner {refiner.source}: not an SDXL refiner ({architecture(refiner.configs)})")
    if refiner.configs.get("text_encoder_2") != pipe.configs.get("text_encoder_2"):
        raise ExportError(f"refiner {refiner.source}: its text_encoder_2 is configured unlike the base's, but the Swift "
                          "pipeline conditions both UNets with the base's TextEncoder2")


SWIFT_CONTROLNET_BATCH = 2  # ControlNet.swift's timestep is [t, t] and its control image is stacked twice


def controlnet_name(path) -> str:
    """The name a ControlNet from ``path`` is exported (and looked up by the Swift pipeline) under:
    its folder's or file's name without the suffix (``controlnet/<name>.mlpackage``)."""
    base = os.path.basename(os.path.normpath(os.fspath(path)))
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in (".safetensors", ".ckpt", ".pth", ".pt", ".bin") else base


def _controlnets(controlnets):
    """``{name: (params, config, info)}`` from ``export_pipeline``'s ``controlnets`` (values
    ``(params, config)`` or ``(params, config, info)``)."""
    out = {}
    for name, v in (controlnets or {}).items():
        if not isinstance(v, (tuple, list)) or len(v) not in (2, 3):
            raise ExportError(f"controlnet {name!r}: expected (params, ControlNetConfig[, info]), got "
                              f"{type(v).__name__}")
        out[name] = (v[0], v[1], dict(v[2]) if len(v) == 3 and v[2] is not None else {})
    return out


def _check_controlnets(pipe, settings, controlnets, log):
    """ExportError naming what keeps these ControlNets from running beside ``pipe``'s UNet in the
    Swift pipeline's layout, before any work."""
    from ..checkpoint import architecture
    from ..configs import ControlNetConfig
    from ..controlnet import check_fits
    if not controlnets:
        if settings.controlled_unet_only:
            raise ExportError("controlled_unet_only (--controlled-unet-only): needs ControlNets (--controlnet)")
        return
    arch = architecture(pipe.configs)
    if arch not in ("sd", "sdxl"):
        raise ExportError(f"controlnet: {pipe.source} is an {arch} pipeline; ControlNets are exported beside an SD "
                          "1.x/2.x or SDXL base UNet (diffusers' ControlNet pipelines; a refiner takes none)")
    if settings.unet_batch != SWIFT_CONTROLNET_BATCH:
        raise ExportError(f"unet batch {settings.unet_batch} with ControlNets: the Swift pipeline runs each ControlNet "
                          f"on a batch of {SWIFT_CONTROLNET_BATCH} (ControlNet.swift: timestep [t, t], the control "
                          "image stacked twice) and feeds its residuals to the ControlledUnet as they are: use "
                          f"--unet-batch {SWIFT_CONTROLNET_BATCH}")
    f = pipe.configs["vae"].scale_factor
    for name, (_, cfg, _) in controlnets.items():
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ExportError(f"controlnet name {name!r}: expected a file name (controlnet/<name>.mlpackage)")
        if not isinstance(cfg, ControlNetConfig):
            raise ExportError(f"controlnet {name}: expected a ControlNetConfig, got {type(cfg).__name__}")
        try:
            check_fits(cfg, pipe.configs["unet"], pipe.configs["unet"].in_channels, f"controlnet {name}")
        except ValueError as e:
            raise ExportError(str(e)) from None
        if cfg.downscale != f:
            raise ExportError(f"controlnet {name}: its conditioning embedding downscales control images {cfg.downscale}x"
                              f", the VAE {f}x: its controlnet_cond would not be image-sized")
        if cfg.conditioning_channels != 3:
            log(f"warning: controlnet {name} reads {cfg.conditioning_channels}-channel control images; the Swift "
                "pipeline feeds 3 (planar RGB of a CGImage, ControlNet.swift)")
    lower = sorted(n.lower() for n in controlnets)
    dup = [a for a, b in zip(lower, lower[1:]) if a == b]
    if dup:  # macOS and iOS file systems are case-insensitive by default
        raise ExportError(f"controlnet names {dup[0]!r}: two ControlNets would be written to the same "
                          f"controlnet/{dup[0]}.mlpackage (case-insensitively); rename one's folder or file")


def _manifest_settings(pipe, settings, refiner=None, controlnets=None):
    recipe = (pipe.quantization or {}).get("recipe")
    out = {"model": pipe.source, "recipe": recipe, **dataclasses.asdict(settings),
           "latent_shape": list(settings.latent_shape) if settings.latent_shape else None}
    if refiner is not None:
        out["refiner"] = {"model": refiner.source, "recipe": (refiner.quantization or {}).get("recipe")}
    if controlnets:
        out["controlnets"] = {name: info for name, (_, _, info) in controlnets.items()}
    return out


def export_pipeline(pipe, out, settings: Settings = Settings(), overwrite=False, progress=True, log=print,
                    refiner=None, controlnets=None, license=None):
    """Export ``pipe`` (an ``sdjax.Pipeline``, quantized or not) into the folder ``out``; returns
    the manifest dict (settings and, per package, bytes on disk, seconds and compute precision).
    ``refiner``: an SDXL refiner pipeline exported beside an SDXL base ``pipe`` as
    ``UnetRefiner.mlpackage``. ``controlnets``: ``{name: (params, ControlNetConfig)}``
    (``sdjax.load_controlnet``'s pairs, quantized or not; a third element, a JSON-able dict, is
    recorded in the manifest's settings), exported as ``controlnet/<name>.mlpackage`` with a
    ``ControlledUnet.mlpackage`` (module docstring). See the module docstring for the folder,
    resume and overwrite rules. Every package gets author, license (``license``, else the model
    card's: ``sdjax.coreml.metadata``), version and input/output descriptions."""
    from tqdm.auto import tqdm

    settings.check()
    controlnets = _controlnets(controlnets)
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    check_exportable(pipe.params, settings.minimum_deployment_target)
    if refiner is not None:
        _check_refiner(pipe, refiner)
        check_exportable({"refiner.unet": refiner.params["unet"]}, settings.minimum_deployment_target)
    _check_controlnets(pipe, settings, controlnets, log)
    for name, (params, _, _) in controlnets.items():
        check_exportable({f"controlnet {name}": params}, settings.minimum_deployment_target)
    if is_xl(pipe):
        _check_xl_tokenizers(pipe, log)
    target = settings.target()
    partial = out + ".partial"
    wanted = _manifest_settings(pipe, settings, refiner, controlnets)
    if os.path.isdir(partial):
        try:
            before = (Store(partial, writer=False).read(MANIFEST) or {}).get("settings")
        except (StoreError, AttributeError):
            before = None
        if before != wanted and not overwrite:
            diff = sorted(k for k in wanted if (before or {}).get(k) != wanted[k])
            raise FileExistsError(f"{partial}: an interrupted export with other settings ({', '.join(diff)}); "
                                  "pass --overwrite to start afresh, or the same settings to resume")
        if before != wanted:
            shutil.rmtree(partial)
    store = Store(partial)  # the interrupted export's record: which packages are complete
    manifest = {"settings": wanted, "packages": (store.read(MANIFEST) or {}).get("packages", {})}

    def save_manifest():
        store.write(manifest, MANIFEST)

    save_manifest()
    jobs = _jobs(pipe, settings, target, refiner, controlnets)
    describe = metadata.describer(pipe, license, refiner, controlnets)
    bar = tqdm(total=len(jobs), desc="export-coreml", unit="package", disable=not progress)
    for label, names, fn, precision in jobs:
        paths = [os.path.join(partial, n) for n in names]
        if all(os.path.isdir(pth) for pth in paths) and all(n in manifest["packages"] for n in names):
            log(f"{label}: kept from the interrupted run ({', '.join(names)})")
            describe(paths, precision)  # the license given now
            bar.update(1)
            continue
        bar.set_postfix_str(label)
        t0 = time.perf_counter()
        from .text_encoder import phase_hook

        def show(path, phase, label=label):
            bar.set_postfix_str(f"{label}: {phase} {os.path.basename(path)}")
        with contextlib.redirect_stderr(io.StringIO()), phase_hook(show):  # hides coremltools' per-pass bars
            fn(paths)
        describe(paths, precision)
        dt = time.perf_counter() - t0
        for n, pth in zip(names, paths):
            manifest["packages"][n] = {"bytes": dir_bytes(pth), "seconds": round(dt / len(names), 2),
                                       "peak_rss_bytes": peak_rss_bytes(), "compute_precision": precision}
        save_manifest()
        bar.update(1)
    bar.close()
    manifest["tokenizer"] = _tokenizer_files(pipe, partial)
    save_manifest()
    replace_folder(partial, out)  # overwrite: the old folder is moved aside and dropped after the rename
    return manifest


def summary(manifest) -> str:
    """The manifest's packages as a small table."""
    lines = [f"{'package':28s} {'MB':>9s} {'seconds':>8s} {'peak RSS GiB':>13s}"]
    for n, r in manifest["packages"].items():
        lines.append(f"{n:28s} {r['bytes'] / 1e6:9.1f} {r['seconds']:8.1f} {r['peak_rss_bytes'] / 2**30:13.2f}")
    total = sum(r["bytes"] for r in manifest["packages"].values())
    lines.append(f"{'total':28s} {total / 1e6:9.1f}")
    return "\n".join(lines)


def latent_from_image(height, width, scale_factor, unet_factor=1):
    """(h, w) latents for an image size, checking that it divides into the VAE's and the UNet's
    downsamplings (``unet_factor``: 2 ** the UNet's downsampling steps)."""
    step = scale_factor * unet_factor
    for name, v in (("--height", height), ("--width", width)):
        if v <= 0 or v % step:
            raise ExportError(f"{name} {v}: expected a positive multiple of {step} (VAE scale factor "
                              f"{scale_factor} x {unet_factor} for the UNet's downsamplings)")
    return height // scale_factor, width // scale_factor


__all__ = ["export_pipeline", "Settings", "ExportError", "check_exportable", "summary", "latent_from_image", "is_xl",
           "controlnet_name"]
