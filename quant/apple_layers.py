"""Apple's activation-quantization layer lists, read and written.

Apple's ``python_coreml_stable_diffusion/activation_quantization.py --layerwise-sensitivity`` writes
``<model>_quantization_recipe.json``:

    {"conv": {"down_blocks.0.resnets.0.conv1": 41.3, ...},      # PSNR (dB) of each Conv2d alone at W8A8
     "einsum": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.einsum": 35.2, ...},
     "model_version": "stabilityai/stable-diffusion-2-1-base"}

and ``--quantize-pytorch`` turns it into a model: every conv and einsum at W8A8 except those under
``--conv-psnr`` (default 40.0) / ``--attn-psnr`` (default 30.0), which keep int8 weights and float
activations (W8A16), then two hand overrides: up-block resnet ``conv1`` layers and upsampler convs are
forced to W8A8 (they are the slowest), and every ``to_out`` layer is kept W8A16 (its input is the concat
of the attention heads, whose scales Core ML's conversion shares). ``select`` is that rule.

Names: Apple's UNet keeps diffusers' module names (its linear layers are 1x1 ``Conv2d`` under the same
names), so a "conv" entry is an sdjax layer name (its param path less ".weight"). An "einsum" entry is
an attention core (``...attn1.einsum``: the q.k and attention.v products), which has no weight: sdjax
does not quantize those products, so einsum entries are checked against the model (their attention
must exist) and otherwise left out of the recipe (``to_recipe``).

sdjax adds three optional keys, which Apple's script ignores: ``conv_psnr``, ``attn_psnr`` and
``overrides`` (the thresholds and whether the two overrides apply when sdjax reads the file). A list
written from an sdjax *selection* (``selection_layers``: not a threshold rule) stores 100.0 for its
W8A8 layers and 0.0 for the rest, ``"sdjax_selection": true``, ``overrides: false``: any threshold
between reproduces it, in Apple's script too if its overrides are switched off.
"""
from __future__ import annotations

import json
import math
import numbers
import os

CONV_PSNR, ATTN_PSNR = 40.0, 30.0          # Apple's defaults (tuned for SD 2.1 base)
SELECTED, NOT_SELECTED = 100.0, 0.0        # what selection_layers stores
KEYS = {"conv", "einsum", "model_version", "conv_psnr", "attn_psnr", "overrides", "sdjax_selection", "note"}

__all__ = ["ATTN_PSNR", "CONV_PSNR", "check_names", "is_apple_layers", "read", "select", "selection_layers",
           "sensitivity_layers", "to_recipe", "write"]


class AppleLayersError(ValueError):
    """A layer list that cannot be used (bad structure, unknown layers)."""


def is_apple_layers(d):
    """Whether ``d`` looks like Apple's layer list: an object with "conv" and "einsum" objects."""
    return isinstance(d, dict) and isinstance(d.get("conv"), dict) and isinstance(d.get("einsum"), dict) \
        and "rules" not in d


def read(source, where=None):
    """A checked layer list (a dict as above) from a path or a dict; errors name the file and key."""
    where = where or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "Apple layer list")
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise AppleLayersError(f"{where}: file not found") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AppleLayersError(f"{where}: cannot read it as JSON ({e})") from None
    else:
        d = source
    if not is_apple_layers(d):
        got = sorted(d)[:8] if isinstance(d, dict) else type(d).__name__
        raise AppleLayersError(f"{where}: not Apple's layer list: expected an object with 'conv' and 'einsum' "
                               f"objects of {{layer: PSNR}}; got {got}")
    unknown = sorted(set(d) - KEYS)
    if unknown:
        raise AppleLayersError(f"{where}: unknown key(s) {unknown} (known: {sorted(KEYS)})")
    for kind in ("conv", "einsum"):
        for name, v in d[kind].items():
            if not isinstance(name, str) or not name or any(c in name for c in "*?["):
                raise AppleLayersError(f"{where}: {kind} entry {name!r} is not a layer name")
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
                raise AppleLayersError(f"{where}: {kind}[{name!r}] = {v!r}: expected a PSNR in dB (a number)")
    if not d["conv"]:
        raise AppleLayersError(f"{where}: 'conv' names no layer")
    for key in ("conv_psnr", "attn_psnr"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v)):
            raise AppleLayersError(f"{where}: {key} = {v!r}: expected a number (dB)")
    if not isinstance(d.get("overrides", True), bool):
        raise AppleLayersError(f"{where}: overrides = {d['overrides']!r}: expected true or false")
    return d


def _speed_override(name):
    return ("up_blocks" in name and "resnets" in name and "conv1" in name) or "upsamplers" in name


def select(layers, conv_psnr=None, attn_psnr=None, overrides=None):
    """Apple's rule: ``(w8a8, w8a16, skipped_einsum)``, sorted name lists. A conv layer under
    ``conv_psnr`` dB is W8A16, an einsum under ``attn_psnr`` keeps float products; then, with
    ``overrides``, up-block resnet conv1 and upsampler convs are forced to W8A8 and to_out layers to
    W8A16 (in that order, as Apple applies them). Defaults: the file's keys, else Apple's 40 / 30 dB and
    overrides on."""
    layers = read(layers)
    cp = float(layers.get("conv_psnr", CONV_PSNR) if conv_psnr is None else conv_psnr)
    ap = float(layers.get("attn_psnr", ATTN_PSNR) if attn_psnr is None else attn_psnr)
    ov = bool(layers.get("overrides", True) if overrides is None else overrides)
    skipped = {n for n, p in layers["conv"].items() if p < cp}
    if ov:
        skipped -= {n for n in layers["conv"] if _speed_override(n)}
        skipped |= {n for n in layers["conv"] if "to_out" in n}
    skipped_einsum = sorted(n for n, p in layers["einsum"].items() if p < ap)
    return sorted(set(layers["conv"]) - skipped), sorted(skipped), skipped_einsum


def check_names(layers, layer_names, where="Apple layer list"):
    """AppleLayersError naming the first conv entry that is not one of ``layer_names`` (the model's
    conv/linear layers, ``quant.calibrate.layer_names``) or einsum entry whose attention the model lacks."""
    layers = read(layers, where)
    known = set(layer_names)
    for name in layers["conv"]:
        if name not in known:
            raise AppleLayersError(f"{where}: conv layer {name!r} is not a conv/linear layer of the model "
                                   f"(names look like {next(iter(sorted(known)), '?')!r})")
    for name in layers["einsum"]:
        parent = name.rsplit(".", 1)[0]
        if not any(k.startswith(parent + ".") for k in known):
            raise AppleLayersError(f"{where}: einsum {name!r}: the model has no attention {parent!r}")


def to_recipe(layers, name="apple-act", conv_psnr=None, attn_psnr=None, overrides=None, layer_names=None):
    """An sdjax recipe dict from a layer list: ``int8-w8a8`` for the W8A8 conv layers, ``int8`` (W8A16)
    for the rest of its conv layers; layers the list does not name get no rule (they stay float), nor
    do its einsum entries (sdjax computes attention products in float). ``layer_names``: the model's
    layers, checked first (``check_names``)."""
    layers = read(layers)
    if layer_names is not None:
        check_names(layers, layer_names)
    w8a8, w8a16, _ = select(layers, conv_psnr, attn_psnr, overrides)
    fast = set(w8a8)
    rules = [{"pattern": n, "method": "int8-w8a8" if n in fast else "int8"} for n in layers["conv"]]
    return {"name": name, "components": ["unet"], "source": "apple-activation-quantization", "rules": rules}


def write(path, layers):
    """Write a layer list (checked) as JSON under a temporary name, then rename: nothing is left on error."""
    layers = read(layers)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(layers, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def sensitivity_layers(conv_psnr, model_version="", conv_threshold=None):
    """Apple's format of a measured sensitivity ``{layer: PSNR}`` (sdjax's, see the README for how it
    differs from Apple's measurement): Apple's tools threshold it as they threshold their own."""
    d = {"conv": {n: float(v) for n, v in conv_psnr.items()}, "einsum": {}, "model_version": str(model_version)}
    if conv_threshold is not None:
        d["conv_psnr"] = float(conv_threshold)
    return read(d)


def selection_layers(w8a8, w8a16, model_version=""):
    """Apple's format of a chosen split (sdjax's allocator): W8A8 layers 100.0, W8A16 layers 0.0 (see
    the module docstring)."""
    both = set(w8a8) & set(w8a16)
    if both:
        raise AppleLayersError(f"layer {sorted(both)[0]!r} is both W8A8 and W8A16")
    conv = {n: SELECTED for n in w8a8} | {n: NOT_SELECTED for n in w8a16}
    return read({"conv": dict(sorted(conv.items())), "einsum": {}, "model_version": str(model_version),
                 "conv_psnr": 50.0, "overrides": False, "sdjax_selection": True,
                 "note": "not PSNRs: 100 = W8A8, 0 = W8A16 (an sdjax selection); Apple's script reproduces it "
                         "with any --conv-psnr between and its two overrides switched off"})
