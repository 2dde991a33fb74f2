"""LoRA files merged into float params: W' = W + scale * (alpha / rank) * up @ down.

Reads the formats people have, as safetensors:

- diffusers/PEFT (``save_lora_weights``): ``unet.<module>.lora_A.weight`` / ``lora_B.weight``,
  ``text_encoder.`` and ``text_encoder_2.`` likewise (with or without transformers' ``text_model.``),
  alpha and rank from the ``lora_adapter_metadata`` PEFT config diffusers stores in the header
  (``lora_alpha``, ``alpha_pattern``, ``rank_pattern``, ``use_rslora``) or per-module ``.alpha``
  tensors; the older diffusers spellings ``.lora.down.weight``, ``.lora_linear_layer.down.weight`` and
  ``…processor.to_q_lora.down.weight`` too.
- kohya-ss (``lora_unet_<module>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, ``lora_te_``,
  and SDXL's ``lora_te1_`` / ``lora_te2_``), module names in diffusers' layout (SD 1.x files) or in
  the original LDM/SGM layout (``lora_unet_input_blocks_4_1_…``, SDXL files), mapped through the
  single-file key tables of ``convert_ldm`` / ``convert_sdxl``; LoCon convolutions (k x k down, 1 x 1 up).

As PEFT and kohya define it: rank is the down factor's first dimension, an absent alpha means
alpha = rank (factor 1), use_rslora divides by sqrt(rank); a convolution's update is
``einsum("or,rihw->oihw", up, down)``. Every file is checked against the model (key, ranks, shapes,
architecture), all problems reported at once, before any weight is touched; each touched weight is
merged in float32 and cast back to its dtype, one weight at a time. ``factors`` gives the same updates
unmerged, per layer in sdjax layout (``quant.lora_branch`` runs them beside quantized weights).
"""
from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .nn import flatten, is_quantized, unflatten
from .params import CheckpointError, torch_shape
from .safetensors_io import Reader, SafetensorsError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# diffusers/PEFT key prefixes, the longest first ("text_encoder_2." before "text_encoder.")
COMPONENT_PREFIXES = ("text_encoder_2", "text_encoder", "unet")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
SUFFIX_ROLES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                (".lora_linear_layer.up.weight", "up"), (".alpha", "alpha"))
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# diffusers' attention-processor LoRAs (<= 0.20): <attention>.processor.to_q_lora.down.weight
OLD_ATTENTION = re.compile(r"(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
                           r"(?P<role>down|up)\.weight")
OLD_PROJECTIONS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                   "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
UNSUPPORTED = (("lora_magnitude_vector", "DoRA"), ("dora_scale", "DoRA"), ("hada_", "LoHa (LyCORIS)"),
               ("lokr_", "LoKr (LyCORIS)"), ("lora_mid", "LoCon with a Tucker middle factor"),
               ("lora_embedding_", "an embedding LoRA"), (".lora_A.bias", "a LoRA with biases"),
               (".lora_B.bias", "a LoRA with biases"))
# the UNet cross-attention width of each family, to name what a mismatched LoRA was made for
CROSS_ATTENTION_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 1280: "the SDXL refiner", 2048: "SDXL"}
MAX_LISTED = 12


class LoraError(CheckpointError):
    """A LoRA that cannot be merged: names the file, the key and what was expected."""


# --- which files, how strongly ---------------------------------------------------------

def parse_spec(text: str) -> tuple[str, float]:
    """"FILE" or "FILE:SCALE" -> (path, scale). The text splits at its last ':' when what follows
    is a number; a text that names an existing file is taken whole. ValueError otherwise."""
    head, sep, tail = text.rpartition(":")
    if not sep or os.path.exists(text) or "/" in tail or os.sep in tail:  # a ':' inside the path
        return _checked(text, 1.0)
    try:
        scale = float(tail)
    except ValueError:
        raise ValueError(f"{text!r}: {tail!r} is not a scale (expected FILE or FILE:SCALE, e.g. "
                         f"style.safetensors:0.8)") from None
    return _checked(head, scale, text)


def _checked(path, scale, text=None):
    what = repr(text if text is not None else path)
    if not path:
        raise ValueError(f"{what}: no file before the scale (expected FILE or FILE:SCALE)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"{what}: the scale {scale!r} is not a number")
    if not math.isfinite(scale):
        raise ValueError(f"{what}: the scale {scale} is not a finite number")
    return os.fspath(path), float(scale)


def normalize(loras) -> list[tuple[str, float]]:
    """[(path, scale)] from a path, or a list of paths (scale 1.0) and (path, scale) pairs. A path is
    taken as it is (no ':SCALE' parsing here: that is ``parse_spec``'s, for command lines)."""
    if loras is None:
        return []
    if isinstance(loras, (str, os.PathLike)):
        loras = [loras]
    out = []
    for item in loras:
        if isinstance(item, (str, os.PathLike)):
            out.append(_checked(os.fspath(item), 1.0))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, os.PathLike)):
            out.append(_checked(os.fspath(item[0]), item[1], f"{os.fspath(item[0])} with scale {item[1]!r}"))
        else:
            raise ValueError(f"loras: {item!r} is neither a path nor a (path, scale) pair")
    return out


def _open(path) -> Reader:
    if not os.path.exists(path):
        raise LoraError(f"{path}: LoRA file not found")
    if os.path.isdir(path):
        found = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
        hint = f" (it holds {', '.join(found[:3])})" if found else ""
        raise LoraError(f"{path}: is a folder; pass the LoRA's .safetensors file{hint}")
    if not path.endswith(".safetensors"):
        raise LoraError(f"{path}: sdjax reads LoRAs as .safetensors (pickled .ckpt/.pt LoRAs can run code when "
                        "loaded; convert them to safetensors)")
    try:
        return Reader(path)
    except SafetensorsError as e:
        raise LoraError(str(e)) from None


def check_files(loras):
    """Open each LoRA file's header (before the model is loaded): LoraError for a missing, non-
    safetensors, corrupt or truncated file."""
    for path, _ in normalize(loras):
        _open(path).close()


# --- what a file says: (component, module) -> down / up / alpha keys ---------------------

def _unsupported(key):
    return next((what for marker, what in UNSUPPORTED if marker in key), None)


def _parse_diffusers(key, comp, rest):
    """(module, role) of a diffusers/PEFT key under ``comp.``; or a problem string."""
    m = OLD_ATTENTION.fullmatch(rest)
    if m:
        names = OLD_PROJECTIONS["unet" if comp == "unet" else "text"]
        return f"{m['module']}.{names[m['proj']]}", m["role"]
    for suffix, role in SUFFIX_ROLES:
        if rest.endswith(suffix):
            return rest[:-len(suffix)], role
    return None


def _parse_kohya(rest):
    name, _, leaf = rest.partition(".")
    role = KOHYA_ROLES.get(leaf)
    return (name, role) if role else None


def read_entries(reader, path):
    """{(component, module as the file names it, kind "diffusers" | "kohya"): {role: key}} and the
    problems of keys that are no LoRA tensor sdjax reads."""
    entries, problems = {}, []
    for key in reader.keys():
        what = _unsupported(key)
        if what:
            problems.append(f"{key}: {what} is not supported (plain LoRA and LoCon only)")
            continue
        parsed = None
        kohya = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
        if kohya:
            comp, kind = KOHYA_PREFIXES[kohya], "kohya"
            parsed = _parse_kohya(key[len(kohya):])
        else:
            comp = next((c for c in COMPONENT_PREFIXES if key.startswith(c + ".")), None)
            kind = "diffusers"
            if comp:
                parsed = _parse_diffusers(key, comp, key[len(comp) + 1:])
        if parsed is None:
            problems.append(f"{key}: not a LoRA tensor sdjax reads (expected unet./text_encoder./text_encoder_2. "
                            "keys ending in .lora_A.weight / .lora_B.weight / .alpha (diffusers, PEFT) or "
                            "lora_unet_/lora_te_/lora_te1_/lora_te2_ keys ending in .lora_down.weight / "
                            ".lora_up.weight / .alpha (kohya))")
            continue
        module, role = parsed
        slot = entries.setdefault((comp, module, kind), {})
        if role in slot:
            problems.append(f"{key}: a second {role} tensor for {comp} {module} (the first: {slot[role]})")
        slot[role] = key
    return entries, problems


def _metadata(reader, path):
    """{component: PEFT LoraConfig dict} from diffusers' header entry (empty when absent)."""
    raw = reader.metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError
    except ValueError:
        raise LoraError(f"{path}: the header's {METADATA_KEY} is not a JSON object") from None
    out = {}
    for comp in COMPONENT_PREFIXES:
        conf = {k[len(comp) + 1:]: v for k, v in meta.items() if k.startswith(comp + ".")}
        if conf:
            out[comp] = conf
    return out


def _pattern_value(patterns, module, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# --- the model's layer names -------------------------------------------------------------

def _underscored(name):
    return name.replace(".", "_")


def _ldm_unet_modules(config):
    """{LDM/SGM module name: diffusers module name} of the UNet's weights, from the single-file key
    tables (empty for a UNet they do not describe)."""
    from . import configs as cfgs, convert_sdxl
    try:
        table = convert_sdxl.sgm_unet_table(cfgs.to_dict(config))
    except (KeyError, TypeError, ValueError, IndexError):
        return {}
    out = {}
    for ldm_mod, dif_mod, leaves in table:
        for ldm, dif, _ in leaves:
            if isinstance(dif, str) and ldm.endswith(".weight") and dif.endswith(".weight"):
                out[".".join(p for p in (ldm_mod, ldm[:-7]) if p)] = ".".join(p for p in (dif_mod, dif[:-7]) if p)
    return out


class _Layers:
    """One component's weights a LoRA may update (>= 2-D), their PyTorch-layout shapes, and the
    kohya names (underscored) that lead to them."""

    def __init__(self, comp, params, config):
        self.comp = comp
        self.flat = flatten(params)
        self.shapes = {n: torch_shape(n, np.shape(w)) for n, w in self.flat.items()
                       if n.endswith(".weight") and len(np.shape(w)) >= 2 and "embedding" not in n}
        modules = [n[:-len(".weight")] for n in self.shapes]
        self.kohya = {_underscored(m): m for m in modules}
        if comp in TEXT_ENCODERS:  # kohya keeps transformers' text_model. prefix
            self.kohya.update({"text_model_" + _underscored(m): m for m in modules})
        elif config is not None:
            self.kohya.update({_underscored(ldm): dif for ldm, dif in _ldm_unet_modules(config).items()
                               if dif + ".weight" in self.shapes})

    def weight(self, module, kind):
        """The sdjax weight name a file's module name leads to, or None."""
        if kind == "kohya":
            module = self.kohya.get(module)
            return None if module is None else module + ".weight"
        if self.comp in TEXT_ENCODERS:
            module = module.removeprefix("text_model.")
        name = module + ".weight"
        return name if name in self.shapes else None


# --- planning: every check before any merge work ----------------------------------------

def _expected(weight, rank):
    """(down shape, up shape) that fit a PyTorch-layout weight shape."""
    if len(weight) == 2:
        return (rank, weight[1]), (weight[0], rank)
    return (rank, *weight[1:]), (weight[0], rank, 1, 1)


def _fits(weight, down, up):
    """Whether down/up fit the weight; a 1x1 conv and a linear layer take either form."""
    rank = down[0]
    want_down, want_up = _expected(weight, rank)
    if len(weight) == 4 and weight[2:] == (1, 1) or len(weight) == 2:
        squeeze = lambda s: tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)  # noqa: E731
        return squeeze(down) == squeeze(want_down) and squeeze(up) == squeeze(want_up)
    return tuple(down) == want_down and tuple(up) == want_up


def _alpha(reader, key, path):
    a = reader.get(key)
    if a.size != 1:
        raise LoraError(f"{path}: {key}: an alpha is one number, this tensor has shape {a.shape}")
    value = float(np.asarray(a, np.float32).reshape(-1)[0])
    if not math.isfinite(value):
        raise LoraError(f"{path}: {key}: alpha is {value}")
    return value


def plan(path, reader, layers, configs, quantized_ok=False):
    """[(component, weight name, down key, up key, factor)] of one LoRA file, factor = alpha / rank
    (or / sqrt(rank) with use_rslora). LoraError naming every problem at once. A quantized layer is
    one of them unless ``quantized_ok`` (``factors``, whose updates are not merged into the weight)."""
    entries, problems = read_entries(reader, path)
    meta = _metadata(reader, path)
    out, missing_comp, no_layer, cross, seen = [], {}, [], [], {}
    for (comp, module, kind), keys in sorted(entries.items()):
        any_key = next(iter(keys.values()))
        if comp not in layers:
            missing_comp.setdefault(comp, any_key)
            continue
        if "down" not in keys or "up" not in keys:
            have = " and ".join(sorted(keys))
            problems.append(f"{any_key}: {comp} {module} has {have} but no {'down' if 'down' not in keys else 'up'} "
                            "tensor (a LoRA update needs both factors)")
            continue
        name = layers[comp].weight(module, kind)
        if name is None:
            no_layer.append(f"{keys['down']}: matches no layer of this model's {comp} ({module})")
            continue
        weight = layers[comp].shapes[name]
        down, up = tuple(reader.shape(keys["down"])), tuple(reader.shape(keys["up"]))
        if len(down) not in (2, 4) or len(up) not in (2, 4) or len(up) == 4 and up[2:] != (1, 1):
            problems.append(f"{keys['down']}: factors of shape down {down}, up {up}; expected down (rank, in) or "
                            "(rank, in, k, k) and up (out, rank) or (out, rank, 1, 1)")
            continue
        if down[0] != up[1]:
            problems.append(f"{keys['up']}: rank {up[1]}, but its down factor {keys['down']} has rank {down[0]} "
                            f"(up {up}, down {down})")
            continue
        if not _fits(weight, down, up):
            want_down, want_up = _expected(weight, down[0])
            problems.append(f"{keys['down']}: down {down} and up {up} make an update of shape "
                            f"{(up[0], *down[1:])}, but {comp} {name} is {weight} (expected down {want_down}, "
                            f"up {want_up})")
            if comp == "unet" and re.search(r"attn2\.to_[kv]$", name[:-7]) and down[1] != weight[1]:
                cross.append(down[1])
            continue
        if (comp, name) in seen:
            problems.append(f"{keys['down']}: updates {comp} {name}, as {seen[comp, name]} does already")
            continue
        seen[comp, name] = keys["down"]
        if is_quantized(layers[comp].flat[name]) and not quantized_ok:
            problems.append(f"{keys['down']}: {comp} {name} is quantized; LoRAs merge into float weights "
                            "(merge first, then quantize)")
            continue
        rank = down[0]
        alpha, rslora = None, False
        if "alpha" in keys:
            alpha = _alpha(reader, keys["alpha"], path)
        elif comp in meta and kind == "diffusers":
            conf = meta[comp]
            if conf.get("use_dora"):
                problems.append(f"{keys['down']}: the {comp} adapter is DoRA (use_dora in {METADATA_KEY}), "
                                "which is not supported")
                continue
            r = _pattern_value(conf.get("rank_pattern"), module, conf.get("r", rank))
            if r != rank:
                problems.append(f"{keys['down']}: {METADATA_KEY} says rank {r} for {module}, the tensors have "
                                f"rank {rank}")
                continue
            alpha = _pattern_value(conf.get("alpha_pattern"), module, conf.get("lora_alpha", rank))
            rslora = bool(conf.get("use_rslora"))
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                problems.append(f"{keys['down']}: {METADATA_KEY} gives {module} the alpha {alpha!r}, not a number")
                continue
        if alpha is None:
            factor = 1.0
        else:
            factor = float(alpha) / (math.sqrt(rank) if rslora else rank)
        out.append((comp, name, keys["down"], keys["up"], factor))
    if problems or no_layer or missing_comp or cross:
        raise LoraError(_report(path, problems, no_layer, missing_comp, cross, layers, configs, len(entries)))
    if not out:
        raise LoraError(f"{path}: holds no LoRA update ({len(reader.keys())} tensors)")
    return out


def _family(width):
    return f" ({CROSS_ATTENTION_WIDTHS[width]})" if width in CROSS_ATTENTION_WIDTHS else ""


def _report(path, problems, no_layer, missing_comp, cross, layers, configs, n_updates):
    """One message: what the LoRA seems made for, then every problem (the first MAX_LISTED)."""
    head = []
    if not n_updates:
        head.append("none of its tensors is a LoRA factor (a model checkpoint, or a LoRA kind sdjax does not read?)")
    ucfg = (configs or {}).get("unet")
    if cross and ucfg is not None:
        head.append(f"made for a UNet whose cross-attention takes {cross[0]} features{_family(cross[0])}; "
                    f"this model's takes {ucfg.cross_attention_dim}{_family(ucfg.cross_attention_dim)}")
    for comp, key in missing_comp.items():
        kind = " (an SDXL text encoder)" if comp == "text_encoder_2" else ""
        head.append(f"it updates {comp}{kind}, which this model does not have (it has "
                    f"{', '.join(sorted(layers))}; e.g. {key})")
    if no_layer and len(no_layer) * 2 >= n_updates:
        head.append(f"{len(no_layer)} of its {n_updates} layers match no layer of this model: a LoRA for another "
                    "architecture?")
    lines = problems + no_layer
    listed = [f"  {p}" for p in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        listed.append(f"  ... ({len(lines) - MAX_LISTED} more)")
    title = f"{path}: cannot merge this LoRA" + (": " + "; ".join(head) if head else "")
    return "\n".join([title] + listed)


# --- merging ----------------------------------------------------------------------------

def _delta(down, up, weight_ndim):
    """up @ down in sdjax layout ((in, out) or HWIO), float32."""
    r = down.shape[0]
    up2 = up.reshape(up.shape[0], r)
    if weight_ndim == 2:
        return down.reshape(r, -1).T @ up2.T
    down4 = down.reshape(down.shape[0], down.shape[1], *(down.shape[2:] or (1, 1)))
    return np.einsum("or,rihw->hwio", up2, down4)


def _open_plans(params, configs, specs, quantized_ok=False):
    """(layers, readers, {(component, weight name): [(reader, down key, up key, scale x factor)]}) of
    ``specs``; every file checked (``plan``) before the caller reads a factor. The caller closes the readers."""
    layers = {c: _Layers(c, params[c], (configs or {}).get(c)) for c in ("unet", *TEXT_ENCODERS) if c in params}
    readers, work = [], {}
    try:
        for path, scale in specs:
            reader = _open(path)
            readers.append(reader)
            for comp, name, down, up, factor in plan(path, reader, layers, configs, quantized_ok):
                work.setdefault((comp, name), []).append((reader, down, up, scale * factor))
    except BaseException:
        for r in readers:
            r.close()
        raise
    return layers, readers, work


def _sdjax_factors(down, up, weight_shape):
    """PyTorch-layout LoRA factors -> (down, up) in sdjax layout for a weight of ``weight_shape``
    (sdjax layout): a linear weight (in, out) gets down (in, rank), up (rank, out); a conv weight HWIO
    gets down (kh, kw, in, rank) (a LoCon's k x k down; 1 x 1 for plain LoRA) and up (rank, out)."""
    r = down.shape[0]
    up2 = up.reshape(up.shape[0], r).T
    if len(weight_shape) == 2:
        return down.reshape(r, -1).T, up2
    kh, kw, cin, _ = weight_shape
    return down.reshape(r, cin, kh, kw).transpose(2, 3, 1, 0), up2


def factors(params, configs, loras, dtype=np.float32):
    """Each LoRA of ``loras`` (paths or (path, scale) pairs) as per-layer factors instead of a merge:
    ``{component: {weight name: [(down, up, scale), ...]}}``, one entry per file that updates the
    weight (in ``loras``' order), ``down`` / ``up`` NumPy arrays of ``dtype`` in sdjax layout
    (``_sdjax_factors``: linear down (in, rank), up (rank, out); conv down (kh, kw, in, rank), up
    (rank, out)), ``scale`` = the file's scale x alpha / rank (PEFT's and kohya's factor), so the
    update is ``scale * down @ up`` (a conv's: ``einsum("hwir,ro->hwio", down, up) * scale``), the one
    ``merge`` adds. Every file is checked as ``merge`` checks it, except that quantized layers are
    allowed (nothing is merged into them; ``quant.lora_branch`` runs the factors beside them)."""
    specs = normalize(loras)
    out = {}
    if not specs:
        return out
    layers, readers, work = _open_plans(params, configs, specs, quantized_ok=True)
    try:
        for (comp, name), updates in sorted(work.items()):
            shape = tuple(np.shape(layers[comp].flat[name]))
            out.setdefault(comp, {})[name] = [
                (*(a.astype(dtype) for a in _sdjax_factors(reader.get(down).astype(np.float32),
                                                          reader.get(up).astype(np.float32), shape)), float(s))
                for reader, down, up, s in updates]
    finally:
        for r in readers:
            r.close()
    return out


def merge(params, configs, loras, progress=False, source="this model"):
    """A new params dict with each LoRA of ``loras`` (paths or (path, scale) pairs) merged into
    the float weights it updates: W' = W + scale * (alpha / rank) * up @ down, in float32, cast
    back to W's dtype. ``configs``: the pipeline's configs (the UNet's maps LDM/SGM kohya names and
    names the architecture in errors). ``params`` is left as it was. Every file is checked first;
    LoraError names each file, key and problem."""
    specs = normalize(loras)
    if not specs:
        return params
    layers, readers, work = _open_plans(params, configs, specs)
    try:
        merged = {c: dict(layers[c].flat) for c in {c for c, _ in work}}
        for (comp, name), updates in tqdm(sorted(work.items()), desc=f"merging {len(specs)} LoRA(s) into {source}",
                                          unit="layer", disable=not progress, leave=False):
            w = merged[comp][name]
            w32 = np.asarray(w, np.float32)
            for reader, down, up, s in updates:
                d = _delta(reader.get(down).astype(np.float32), reader.get(up).astype(np.float32), w32.ndim)
                w32 = w32 + np.float32(s) * d.reshape(w32.shape)
            merged[comp][name] = jnp.asarray(w32, dtype=w.dtype)
    finally:
        for r in readers:
            r.close()
    return {c: (unflatten(merged[c]) if c in merged else p) for c, p in params.items()}
