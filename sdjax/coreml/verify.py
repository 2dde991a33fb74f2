"""``sdjax verify-coreml``: any Stable Diffusion Core ML resource folder, checked against the float
model on Linux.

    from sdjax.coreml import verify
    results = verify.verify("coreml-out", sdjax.load("stable-diffusion-v1-5"))
    print(verify.table(results))

Every ``.mlpackage`` in the folder (and in ``controlnet/``) is read back, run by
``sdjax.coreml.interp`` on seeded random inputs, and compared with sdjax's own model function on
the same inputs in the same layout: PSNR in dB per output (``mil.psnr``). Both namings are
understood: the Swift pipeline's (``TextEncoder``, ``TextEncoder2``, ``Unet``,
``UnetChunk1``/``2``, ``UnetRefiner``, ``ControlledUnet``, ``VAEDecoder``, ``VAEEncoder``,
``controlnet/NAME``; what ``sdjax export-coreml`` writes) and the file names of
apple/ml-stable-diffusion's ``torch2coreml`` (``Stable_Diffusion_version_<model>_unet.mlpackage``,
``..._unet_chunk1``, ``..._control-unet``, ``ControlNet_<name>.mlpackage``, ...). A package with
another name is recognised by its inputs. Chunks are run as the Swift pipeline runs them: chunk 2
gets the UNet's inputs and chunk 1's outputs.

What a package computes is read from its spec: the input names and shapes (``input_ids``;
``sample``, ``timestep``, ``encoder_hidden_states`` (B, D, 1, L), ``time_ids``/``text_embeds`` for
SDXL, ``additional_residual_i``, ``controlnet_cond``; ``z``; ``x``), so the batch, sequence length
and latent size are the package's. Each input is rounded to the dtype the package declares
(Apple's UNets take float16) before both sides see it. References:

* text encoders: ``clip.apply`` -> ``last_hidden_state``, ``hidden_embeds`` (SDXL: the penultimate
  hidden state), ``pooled_outputs`` (projected for text_encoder_2), on ids ``[BOS, random, EOS,
  EOS padding]``;
* UNets: ``unet.apply`` -> ``noise_pred`` (NCHW), with SDXL's ``added_cond`` and a
  ControlledUnet's residuals; ControlNets: ``controlnet.apply(conditioning_scale=1)`` ->
  ``additional_residual_i``;
* VAE: as the Swift pipeline uses them: the decoder's ``z`` is ``latents / 0.18215`` (0.13025 for
  SDXL), so the reference is ``vae.decode(z * 0.18215 / scaling_factor)``; the encoder's ``latent``
  is the mean and clamped log-variance of ``vae.encode`` rescaled by ``scaling_factor / 0.18215``
  (``sdjax.coreml.vae``'s docstring). For SD's own scaling factor this is Apple's
  ``decoder(post_quant_conv(z))`` and ``quant_conv(encoder(x))`` exactly.

Precision: the "float32" column runs every op in float32 (``interp.run(dtype=np.float32)``: only
the stored weights' rounding counts); with ``fp16=True`` a second column runs the package at its
own precision (every op's result rounded to float16 where the package computes in float16), the
closest Linux gets to the Neural Engine.

``.mlmodelc`` folders (compiled models) cannot be read: Core ML's compiled format has no reader
outside Apple's runtime. They are listed with that reason; check the ``.mlpackage`` they were
compiled from.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import numpy as np

from . import metadata

DEFAULT_MIN_PSNR = 35.0  # Apple's torch2coreml parity floor (ABSOLUTE_MIN_PSNR)
SWIFT_FACTORS = {False: 0.18215, True: 0.13025}  # what the Swift pipeline divides latents by (SD, SDXL)
COMPILED = "Core ML's compiled format (.mlmodelc) cannot be read outside Apple's runtime: check the .mlpackage " \
           "it was compiled from"

# (file name stem pattern, role): the Swift pipeline's names, then torch2coreml's output names
_ROLES = [
    (r"TextEncoder2|.*_text_encoder_2", "text_encoder_2"),
    (r"TextEncoder|.*_text_encoder", "text_encoder"),
    (r"UnetRefiner(Chunk[12])?|.*_refiner(_chunk[12])?", "refiner"),
    (r"ControlledUnet(Chunk[12])?|.*_control-unet(_chunk[12])?", "unet"),
    (r"Unet(Chunk[12])?|.*_unet(_chunk[12])?", "unet"),
    (r"VAEDecoder|.*_vae_decoder", "vae_decoder"),
    (r"VAEEncoder|.*_vae_encoder", "vae_encoder"),
    (r"ControlNet_.+", "controlnet"),
    (r"SafetyChecker|.*_safety_checker", "safety_checker"),
]


class VerifyError(ValueError):
    """A folder or package that cannot be checked (the message names it and why)."""


@dataclasses.dataclass
class Package:
    """One component to check: ``paths`` (two for a chunked UNet), its ``role`` (a pipeline component,
    "controlnet", "vae_decoder", ...; "unknown" with ``error`` saying why) and, for a ControlNet, its
    ``name``."""
    paths: list
    role: str
    name: str = ""
    label: str = ""
    error: str = ""

    def __post_init__(self):
        if not self.label:  # controlnet/NAME.mlpackage keeps its folder
            self.label = " + ".join(os.path.join(*os.path.normpath(p).split(os.sep)[-2:])
                                    if os.path.basename(os.path.dirname(p)) == "controlnet" else os.path.basename(p)
                                    for p in self.paths)


@dataclasses.dataclass
class Result:
    """PSNR (dB) per output: ``psnr`` with float32 ops, ``psnr16`` at the package's own precision
    (None when not asked); ``error`` when the package could not be checked."""
    label: str
    psnr: dict = dataclasses.field(default_factory=dict)
    psnr16: dict | None = None
    error: str = ""
    seconds: float = 0.0

    def worst(self):
        vals = list(self.psnr.values()) + list((self.psnr16 or {}).values())
        return min(vals) if vals else -math.inf

    def passed(self, min_psnr):
        return not self.error and self.worst() >= min_psnr


# --------------------------------------------------------------------------- finding packages

def _role(stem):
    for pattern, role in _ROLES:
        if re.fullmatch(pattern, stem):
            return role
    return None


def _chunk(stem):
    m = re.search(r"[Cc]hunk([12])$", stem)
    return int(m.group(1)) if m else None


def find_packages(folder) -> tuple[list, list]:
    """``([Package], [(path, reason)])``: the packages to check in ``folder`` (or ``folder`` itself,
    one .mlpackage) and those skipped (compiled models, safety checkers, a chunk without its pair).
    VerifyError when there is nothing to check."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise VerifyError(f"{folder}: no such folder")
    if folder.rstrip(os.sep).endswith(".mlpackage"):
        entries = [os.path.normpath(folder)]
    else:
        entries = []
        for sub in ("", "controlnet", "Resources"):
            d = os.path.join(folder, sub)
            if os.path.isdir(d):
                entries += [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith((".mlpackage", ".mlmodelc"))]
    skipped, found, chunks = [], [], {}
    for path in entries:
        stem = os.path.splitext(os.path.basename(path))[0]
        if path.endswith(".mlmodelc"):
            skipped.append((path, COMPILED))
            continue
        in_controlnet = os.path.basename(os.path.dirname(path)) == "controlnet"
        role = "controlnet" if in_controlnet else _role(stem)
        if role is None:
            try:
                role = _role_from_inputs(path)
            except VerifyError as e:  # reported as this package's error, not skipped
                found.append(Package([path], "unknown", error=str(e)))
                continue
        if role == "safety_checker":
            skipped.append((path, "a safety checker: not part of sdjax's model"))
            continue
        name = re.sub(r"^ControlNet_", "", stem) if role == "controlnet" else ""
        n = _chunk(stem)
        if n is None:
            found.append(Package([path], role, name))
        else:
            chunks.setdefault(stem[:-1], {})[n] = path
    for base, pair in chunks.items():
        if set(pair) == {1, 2}:
            found.append(Package([pair[1], pair[2]], _role(base + "1") or "unet"))
        else:
            for p in pair.values():
                skipped.append((p, "one chunk of a UNet without the other"))
    if not found:
        what = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped) or "no .mlpackage files"
        raise VerifyError(f"{folder}: no Core ML packages to check ({what})")
    return found, skipped


def _role_from_inputs(path):
    names = set(_io(path)[0])
    for key, role in (("input_ids", "text_encoder"), ("controlnet_cond", "controlnet"), ("sample", "unet"),
                      ("z", "vae_decoder"), ("x", "vae_encoder")):
        if key in names:
            return role
    raise VerifyError(f"{path}: not a Stable Diffusion component (inputs {sorted(names)})")


def _io(path):
    """``({input: (shape, numpy dtype)}, {output: shape})`` from a package's spec."""
    from coremltools.proto import FeatureTypes_pb2 as ft
    kinds = {ft.ArrayFeatureType.FLOAT16: np.float16, ft.ArrayFeatureType.FLOAT32: np.float32,
             ft.ArrayFeatureType.DOUBLE: np.float64, ft.ArrayFeatureType.INT32: np.int32}
    try:
        desc = metadata.read_spec(path).description
    except (ValueError, OSError) as e:
        raise VerifyError(f"{path}: cannot read the package's spec ({e})") from None
    ins = {f.name: (tuple(f.type.multiArrayType.shape), kinds.get(f.type.multiArrayType.dataType, np.float32))
           for f in desc.input}
    return ins, {f.name: tuple(f.type.multiArrayType.shape) for f in desc.output}


# --------------------------------------------------------------------------- references

def _mismatch(pkg, name, shape, why):
    return VerifyError(f"{pkg.label}: input {name!r} has shape {shape}, but {why}: a package of another model?")


def _text_encoder(pkg, pipe, ins, rng, feed):
    import sdjax
    comp = pkg.role if pkg.role in ("text_encoder", "text_encoder_2") else "text_encoder"
    if comp not in pipe.params:
        raise VerifyError(f"{pkg.label}: the model {pipe.source} has no {comp}")
    cfg = pipe.configs[comp]
    shape = ins["input_ids"][0]
    if len(shape) != 2 or shape[0] != 1 or shape[1] > cfg.max_position_embeddings:
        raise _mismatch(pkg, "input_ids", shape, f"{comp} takes (1, L <= {cfg.max_position_embeddings})")
    n = shape[1]
    ids = rng.integers(0, cfg.vocab_size, n)
    eos = int(rng.integers(1, n)) if n > 1 else 0
    ids[0], ids[eos:] = cfg.bos_token_id, cfg.eos_token_id
    feeds = feed({"input_ids": ids[None]})  # float16 ids would be rounded: the reference reads what is fed
    last, hidden, pooled = sdjax.clip.apply(pipe.params[comp], cfg, feeds["input_ids"].astype(np.int32))
    return feeds, {"last_hidden_state": last, "hidden_embeds": hidden[-2], "pooled_outputs": pooled}


def _unet_inputs(pkg, cfg, ins, rng, f, residuals=True):
    """Random UNet inputs for the package's shapes (checked against ``cfg``): (feeds NCHW, kwargs of
    ``unet.apply`` after ``sample``, ``timestep``, ``context``)."""
    s = ins["sample"][0]
    n_down = 2 ** (len(cfg.block_out_channels) - 1)
    if len(s) != 4 or s[1] != cfg.in_channels or s[2] % n_down or s[3] % n_down:
        raise _mismatch(pkg, "sample", s, f"the UNet takes (B, {cfg.in_channels}, h, w), h and w multiples of {n_down}")
    b, h, w = s[0], s[2], s[3]
    c = ins["encoder_hidden_states"][0]
    if len(c) != 4 or c[0] != b or c[1] != cfg.cross_attention_dim or c[2] != 1:
        raise _mismatch(pkg, "encoder_hidden_states", c, f"the UNet cross-attends to (B, {cfg.cross_attention_dim}, 1, L)")
    feeds = {"sample": rng.standard_normal(s), "timestep": rng.integers(1, 1000, b).astype(np.float64),
             "encoder_hidden_states": rng.standard_normal(c)}
    if cfg.is_sdxl != ("text_embeds" in ins):
        raise VerifyError(f"{pkg.label}: {'no' if cfg.is_sdxl else 'an'} SDXL text_embeds input, but the model's UNet "
                          f"{'takes' if cfg.is_sdxl else 'does not take'} SDXL's text_time conditioning")
    if cfg.is_sdxl:
        p, t = ins["text_embeds"][0], ins["time_ids"][0]
        try:
            n_ids = cfg.time_ids_length(p[-1])
        except ValueError as e:
            raise _mismatch(pkg, "text_embeds", p, str(e)) from None
        if t != (b, n_ids):
            raise _mismatch(pkg, "time_ids", t, f"the UNet takes {n_ids} time ids per sample")
        size = [h * f, w * f, 0, 0, h * f, w * f] if n_ids == 6 else [h * f, w * f, 0, 0, 6.0]
        feeds["time_ids"] = np.tile(np.asarray((size + [0.0] * n_ids)[:n_ids]), (b, 1))
        feeds["text_embeds"] = rng.standard_normal(p)
    if residuals:
        from .unet import residual_shapes
        for name, shape in residual_shapes(cfg, b, (h, w)).items():
            if name in ins:
                if ins[name][0] != shape:
                    raise _mismatch(pkg, name, ins[name][0], f"the UNet's skip there is {shape}")
                feeds[name] = rng.standard_normal(shape) * 0.5
    return feeds


def _added(feeds):
    return {"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]} if "text_embeds" in feeds else None


def _nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def _context(feeds):
    return feeds["encoder_hidden_states"][:, :, 0].transpose(0, 2, 1)  # (B, D, 1, L) -> (B, L, D)


def _unet(pkg, pipe, refiner, ins, rng, feed):
    import sdjax
    from .unet import residual_name
    src = refiner if pkg.role == "refiner" else pipe
    if src is None:
        raise VerifyError(f"{pkg.label}: an SDXL refiner UNet: give the refiner model (--refiner)")
    cfg = src.configs["unet"]
    feeds = _unet_inputs(pkg, cfg, ins, rng, pipe.vae_scale_factor)
    feeds = feed(feeds)
    n = len([k for k in feeds if k.startswith("additional_residual_")])
    res = {}
    if n:
        down = tuple(_nhwc(feeds[residual_name(i)]) for i in range(n - 1))
        res = dict(down_block_additional_residuals=down, mid_block_additional_residual=_nhwc(feeds[residual_name(n - 1)]))
    out = sdjax.unet.apply(src.params["unet"], cfg, _nhwc(feeds["sample"]), feeds["timestep"], _context(feeds),
                           added_cond=_added(feeds), **res)
    return feeds, {"noise_pred": _nchw(out)}


def _controlnet(pkg, pipe, controlnets, ins, rng, feed):
    import sdjax
    from .unet import residual_name
    net = _match_controlnet(pkg, controlnets)
    params, config = net
    feeds = _unet_inputs(pkg, config.unet, ins, rng, pipe.vae_scale_factor, residuals=False)
    cond = ins["controlnet_cond"][0]
    b, _, h, w = ins["sample"][0]
    d = config.downscale
    if cond != (b, config.conditioning_channels, h * d, w * d):
        raise _mismatch(pkg, "controlnet_cond", cond, f"the ControlNet reads ({b}, {config.conditioning_channels}, "
                        f"{h * d}, {w * d}) control images ({d}x the latents)")
    feeds["controlnet_cond"] = rng.random(cond)
    feeds = feed(feeds)
    down, mid = sdjax.controlnet.apply(params, config, _nhwc(feeds["sample"]), feeds["timestep"], _context(feeds),
                                       _nhwc(feeds["controlnet_cond"]), conditioning_scale=1.0, added_cond=_added(feeds))
    return feeds, {residual_name(i): _nchw(r) for i, r in enumerate(tuple(down) + (mid,))}


def _match_controlnet(pkg, controlnets):
    if not controlnets:
        raise VerifyError(f"{pkg.label}: a ControlNet: give its model (--controlnet DIR_OR_FILE)")
    if pkg.name in controlnets:
        return controlnets[pkg.name]
    ends = [k for k in controlnets if pkg.name.endswith(k) or k.endswith(pkg.name)]
    if len(ends) == 1:
        return controlnets[ends[0]]
    if len(controlnets) == 1:
        return next(iter(controlnets.values()))
    raise VerifyError(f"{pkg.label}: which ControlNet? none of {sorted(controlnets)} is named {pkg.name!r}")


def _vae(pkg, pipe, ins, rng, feed):
    import sdjax
    from .export import is_xl
    cfg, params = pipe.configs["vae"], pipe.params["vae"]
    swift = SWIFT_FACTORS[is_xl(pipe)]
    if pkg.role == "vae_decoder":
        z = ins["z"][0]
        if len(z) != 4 or z[1] != cfg.latent_channels:
            raise _mismatch(pkg, "z", z, f"the VAE has {cfg.latent_channels} latent channels")
        feeds = feed({"z": rng.standard_normal(z)})
        out = sdjax.vae.decode(params, cfg, _nhwc(feeds["z"]) * (swift / cfg.scaling_factor))
        return feeds, {"image": _nchw(out)}
    x = ins["x"][0]
    f = cfg.scale_factor
    if len(x) != 4 or x[1] != cfg.in_channels or x[2] % f or x[3] % f:
        raise _mismatch(pkg, "x", x, f"the VAE encodes ({cfg.in_channels}, H, W) images, H and W multiples of {f}")
    feeds = feed({"x": np.tanh(rng.standard_normal(x))})
    mean, logvar = sdjax.vae.encode(params, cfg, _nhwc(feeds["x"]))
    r = cfg.scaling_factor / swift
    return feeds, {"latent": _nchw(np.concatenate([np.asarray(mean) * r, np.asarray(logvar) + 2 * np.log(r)], -1))}


# --------------------------------------------------------------------------- checking

def check(pkg: Package, pipe, refiner=None, controlnets=None, seed=0, fp16=False) -> Result:
    """Run ``pkg`` with the interpreter and sdjax on the same inputs; a Result (``error`` set instead
    of raising when the package does not fit the model)."""
    from . import interp, mil
    t0 = time.perf_counter()
    result = Result(pkg.label, error=pkg.error)
    if pkg.error:
        return result
    try:
        ins, outs = _io(pkg.paths[0])
        if len(pkg.paths) == 2:  # chunk 2 takes the UNet's inputs and chunk 1's outputs
            ins2, outs2 = _io(pkg.paths[1])
            ins, outs = ins | {k: v for k, v in ins2.items() if k not in outs}, outs2
        rng = np.random.default_rng(seed)

        def feed(values):  # each input in the dtype the package declares, as both sides see it
            return {k: np.asarray(v).astype(ins[k][1]).astype(np.float32) for k, v in values.items()}

        if pkg.role in ("text_encoder", "text_encoder_2"):
            feeds, ref = _text_encoder(pkg, pipe, ins, rng, feed)
        elif pkg.role in ("unet", "refiner"):
            feeds, ref = _unet(pkg, pipe, refiner, ins, rng, feed)
        elif pkg.role == "controlnet":
            feeds, ref = _controlnet(pkg, pipe, controlnets, ins, rng, feed)
        else:
            feeds, ref = _vae(pkg, pipe, ins, rng, feed)
        missing = sorted(set(ins) - set(feeds))
        if missing:
            raise VerifyError(f"{pkg.label}: inputs {missing} that the model's {pkg.role} does not take")
        compared = [k for k in outs if k in ref]
        if not compared:
            raise VerifyError(f"{pkg.label}: none of its outputs {sorted(outs)} is one sdjax computes ({sorted(ref)})")
        progs = [interp.load_program(p) for p in pkg.paths]
        runs = [("psnr", np.float32)] + ([("psnr16", None)] if fp16 else [])
        for attr, dtype in runs:
            got = _run(progs, feeds, dtype)
            values = {}
            for k in compared:
                want = np.asarray(ref[k], np.float32)
                if got[k].shape != want.shape:
                    raise VerifyError(f"{pkg.label}: output {k!r} has shape {got[k].shape}, sdjax's {want.shape}")
                p = mil.psnr(want, got[k])
                values[k] = p if not math.isnan(p) else -math.inf  # NaN or inf in the package's output
            setattr(result, attr, values)
    except VerifyError as e:
        result.error = str(e)
    result.seconds = time.perf_counter() - t0
    return result


def _run(progs, feeds, dtype):
    """The outputs of one package, or of two chunks run as the Swift pipeline runs them."""
    from . import interp

    def inputs_of(prog, values):
        return {k: v for k, v in values.items() if k in prog.functions["main"].inputs}

    out = interp.run(progs[0], inputs_of(progs[0], feeds), dtype=dtype)
    if len(progs) == 2:
        out = interp.run(progs[1], inputs_of(progs[1], {**feeds, **out}), dtype=dtype)
    return out


def verify(folder, pipe, refiner=None, controlnets=None, seed=0, fp16=False, progress=True, log=print):
    """Check every package in ``folder`` (``find_packages``) against ``pipe``; ``controlnets``:
    ``{name: (params, ControlNetConfig)}``. Returns the Results (skipped packages logged)."""
    from tqdm.auto import tqdm
    packages, skipped = find_packages(folder)
    for path, why in skipped:
        log(f"skipped {os.path.basename(path)}: {why}")
    results = []
    bar = tqdm(packages, desc="verify-coreml", unit="package", disable=not progress)
    for pkg in bar:
        bar.set_postfix_str(pkg.label)
        results.append(check(pkg, pipe, refiner, controlnets, seed, fp16))
    bar.close()
    return results


def table(results, min_psnr=DEFAULT_MIN_PSNR) -> str:
    """The Results as a table: one row per output, then a verdict line."""
    fp16 = any(r.psnr16 is not None for r in results)
    width = max([len(r.label) for r in results] + [7])
    lines = [f"{'package':{width}s}  {'output':22s} {'float32 dB':>10s}" + (f" {'fp16 dB':>8s}" if fp16 else "")
             + f" {'seconds':>8s}"]
    for r in results:
        if r.error:
            lines.append(f"{r.label:{width}s}  error: {r.error}")
            continue
        for i, (k, v) in enumerate(r.psnr.items()):
            row = f"{r.label if i == 0 else '':{width}s}  {k:22s} {v:10.1f}"
            if fp16:
                row += f" {(r.psnr16 or {}).get(k, float('nan')):8.1f}"
            lines.append(row + (f" {r.seconds:8.1f}" if i == 0 else ""))
    bad = [r.label for r in results if not r.passed(min_psnr)]
    lines.append(f"FAILED (below {min_psnr:g} dB or not checked): {', '.join(bad)}" if bad else
                 f"all {len(results)} passed (>= {min_psnr:g} dB)")
    return "\n".join(lines)
