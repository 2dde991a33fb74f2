"""Recipes: which quantization method each layer gets, by layer name.

A recipe is a JSON object (or the same dict in Python)::

    {"name": "attn-4bit",
     "components": ["unet"],                  # default ["unet"]; also "text_encoder", "vae", "controlnet"
     "weight_threshold": 2048,                # default 2048 (see "Small layers")
     "rules": [
        {"pattern": "*attn*.to_[qkv]", "method": "palettize", "nbits": 4, "group_size": 16},
        {"pattern": "*", "kind": "conv", "method": "int8"},
        {"regex": "up_blocks\\.[01]\\..*", "method": "float"}]}

Layers are the conv and linear weights of a component, named by their diffusers module name
(the parameter path without ``.weight``: ``down_blocks.0.resnets.0.conv1``); embeddings, norms and
biases are never quantized.

Patterns: ``pattern`` is a shell-style glob matched against the whole layer name with
``fnmatch.fnmatchcase`` (``*`` also crosses dots, ``?`` one character, ``[qkv]`` a class);
``regex`` is a Python regular expression that must match the whole name (``re.fullmatch``).
A trailing ``.weight`` in a glob is ignored. Optional filters: ``"kind": "conv"`` (4-D HWIO
weights, 1x1 convs included) or ``"linear"`` (2-D), and ``"component"`` (a name or list)
restricting the rule to some of the recipe's components.

First match wins: each layer takes the first rule, in order, whose pattern and filters match it;
a layer no rule matches stays float. A rule whose pattern matches no layer at all (in the
components it applies to) is an error naming it.

Methods and their options (any other key in a rule is an error naming the rule):

- ``"palettize"``: k-means LUT (``quant.palettize.kmeans``); ``nbits`` (1, 2, 3, 4, 6, 8;
  required), ``group_size`` (one LUT per that many output channels; must divide the output
  channels of every layer the rule takes unless ``"indivisible": "per_tensor"``, which gives
  those layers one LUT), ``per_channel_scale`` (bool), ``sensitive`` (bool, default false):
  sensitivity-weighted k-means, minimising ``sum(importance * (w - w_q)**2)`` with per-weight
  importances (squared gradients of the denoising loss, ``sdjax.evaluation.fisher.fisher``) that
  ``apply_recipe`` takes as ``importance=``; a sensitive rule without them is an error.
  ``gptq`` (bool, default false): GPTQ palettization (``quant.gptq.palettize``): the same LUTs and
  bytes, with indices chosen to minimise the layer's *output* error on calibration inputs, given
  as ``apply_recipe``'s ``hessian=`` (``X^T X`` per layer, ``quant.gptq.collect``); not together
  with ``sensitive``. ``clustering`` ("exact", the default, or "coremltools"): "coremltools" clusters
  as coremltools does for Apple's mixed-bit pre-analysis (``quant.palettize.coremltools_kmeans``:
  scikit-learn's k-means for tensors under 10,000 weights), per tensor only. ``lut_dtype`` "int8"
  (default "float16"): int8 LUT entries, a float16 scale per LUT (``quant.palettize.int8_lut``; iOS18).
  ``activations`` "int8" (default "float"): calibrated per-tensor int8 inputs as ``int8-w8a8``'s
  (``act_method``, ``percentile``; ``granularity`` "tensor" only); with int8 LUTs, W4A8 (W6A8, W2A8).
- ``"int8"``: W8A16, per-output-channel symmetric int8 (``quant.int8.quantize``).
- ``"int8-w8a8"``: int8 weights and int8 activations; needs activation scales (see
  ``apply_recipe``'s ``calibration``); ``path`` ("integer" or "simulated"), and, when the
  calibration gives statistics rather than scales, ``act_method`` ("max" or "percentile"),
  ``granularity`` ("tensor" or "channel"), ``percentile`` (default 99.99).
- ``"llm-int8"``: LLM.int8() (``quant.llm_int8.quantize``); ``threshold`` (default 6.0),
  ``path``, ``max_outlier_cols``.
- ``"float"``: keep the float weight (use it to exempt layers from a later rule).

Small layers: a layer with ``weight_threshold`` elements or fewer (default 2048, coremltools'
``weight_threshold``: only weights with more elements are compressed) stays float even when a
rule matches it, unless the rule names it exactly (a glob equal to the layer name) or the rule
sets its own ``weight_threshold``. SD 1.5 then keeps only the VAE's ``quant_conv`` and
``post_quant_conv`` (64 and 16 weights) float.

Apple's mixed-bit recipes (``python_coreml_stable_diffusion/mixed_bit_compression_pre_analysis.py``)
are recognised automatically: a flat ``{layer name: nbits}`` object (nbits 1, 2, 3, 4, 6, 8 are
palettized with one k-means LUT per tensor, 16 or 32 keep the layer float, layers not named stay
float, as Apple's ``fake_palette_from_recipe``), or the whole pre-analysis JSON whose
``"recipes"`` object holds such dicts (pick one with ``select=``; one recipe is taken as is).
Every entry names a layer exactly, so the size threshold does not apply to them.

Presets by name (``PRESETS`` lists them; all for the UNet):

- ``w8-int8conv``: int8 (W8A16) on conv weights, linear layers float;
- ``w8a8-int8conv``: int8 W8A8 on conv weights (needs calibration), linear layers float;
- ``w8-int8``: int8 (W8A16) on every conv and linear layer;
- ``llm-int8``: LLM.int8() (threshold 6) on the linear layers; convolutions stay float, as
  bitsandbytes replaces only ``nn.Linear`` (a custom rule may still give convs "llm-int8": they
  run as the same product over im2col patches);
- ``palette-{8,6,4,3,2,1}bit``: k-means palettization of every conv and linear layer, one LUT
  per tensor;
- ``palette-{n}bit-g{G}``: one LUT per G output channels (coremltools' ``per_grouped_channel``);
  a layer whose output channels G does not divide gets one LUT.
- ``palette-{n}bit[-g{G}]-gptq``: the same LUTs with GPTQ indices (needs ``hessian=``);
- ``palette-{n}bit[-g{G}][-gptq]-int8lut[-a8]``: the same with int8 LUT entries (``"lut_dtype": "int8"``),
  and with ``-a8`` int8 activations too (``"activations": "int8"``: W4A8 at 4 bits; needs calibration);
- ``qat-{n}bit[-g{G}][-gptq]``: the palette preset of the same name plus ``"finetune": qat_defaults(n)``.

Fine-tuning (quantization-aware, of the palettized UNet weights): a recipe-level key

    {"name": "p4-tuned", "rules": [...], "finetune": {"method": "lut", "steps": 300, "lr": 1e-3}}

whose keys are ``FINETUNE_KEYS`` (``check_finetune`` says what each must be; ``method``, ``steps``,
``lr`` and ``loss`` default to ``QAT_DEFAULTS``, the others to ``sdjax.evaluation.qat.finetune``'s).
After the rules are applied, ``apply_recipe`` hands the palettized UNet params to its ``finetune=``
callable (``sdjax.evaluation.qat_recipe.finetune_callable``: distillation of the float UNet on
calibration prompts), which returns the fine-tuned ones: the same ``PalettizedWeight`` layout and
bytes. Only palettized UNet weights train; int8, W8A8 and LLM.int8 weights, float layers and other
components are carried unchanged. A recipe with ``finetune`` needs a palettize rule on the UNet.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import numbers
import os
import re

import numpy as np

from sdjax import nn

from . import apple_layers, calibrate, int8, llm_int8, palettize
from .finetune import METHODS as FINETUNE_METHODS

# text_encoder_2: SDXL's second; controlnet: a ControlNet's params (sdjax.load_controlnet), quantized
# with component="controlnet" or beside a pipeline's as {"unet": ..., "controlnet": ...}
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae", "controlnet")
DEFAULT_COMPONENTS = ("unet",)
DEFAULT_WEIGHT_THRESHOLD = 2048
APPLE_FLOAT_NBITS = (16, 32)
KINDS = ("conv", "linear")

_REQUIRED = object()
# method -> {option: default}
METHODS = {
    "float": {},
    "palettize": {"nbits": _REQUIRED, "group_size": None, "per_channel_scale": False, "indivisible": "error",
                  "sensitive": False, "gptq": False, "clustering": "exact", "lut_dtype": "float16",
                  "activations": "float", "act_method": "max", "granularity": "tensor",
                  "percentile": calibrate.DEFAULT_PERCENTILE},
    "int8": {},
    "int8-w8a8": {"path": "integer", "act_method": "max", "granularity": "tensor",
                  "percentile": calibrate.DEFAULT_PERCENTILE},
    "llm-int8": {"threshold": llm_int8.DEFAULT_THRESHOLD, "path": "integer", "max_outlier_cols": 64},
}
_PALETTE_A8_DEFAULTS = {k: METHODS["palettize"][k] for k in ("lut_dtype", "activations", "act_method", "granularity",
                                                               "percentile")}
_RULE_KEYS = {"pattern", "regex", "method", "kind", "component", "components", "weight_threshold", "comment"}
_RECIPE_KEYS = {"name", "components", "weight_threshold", "rules", "description", "comment", "format", "source",
                "finetune"}

# fine-tuning settings (the recipe-level "finetune" key; see the module docstring). QAT_DEFAULTS fill in what a
# recipe leaves out, and are the qat-* presets' and sdjax eval's fine-tuned families' settings.
# Measured on the embedded model (experiments/qat_reference.py): at 4 bits, GPTQ's indices as the start, the float
# weights trained straight-through from them at 1e-4 with a cosine decay beat LUT-only training; at 2 bits,
# LUT-only training at 1e-3 did best (QAT_LOW_BITS, used by qat_defaults for nbits <= 2).
QAT_DEFAULTS = {"method": "ste", "steps": 1000, "lr": 1e-4, "w_lr": 1e-4, "loss": "guided", "schedule": "cosine",
                "w_init": "quantized", "train_bias": True}
QAT_LOW_BITS = {"method": "lut", "lr": 1e-3}
FINETUNE_KEYS = ("method", "steps", "lr", "w_lr", "temperature", "loss", "batch", "n_timesteps", "seed", "schedule",
                 "refine", "w_init", "train_bias", "remat")
FINETUNE_W_INITS = ("float", "quantized")     # its w_init= (where "dkm"/"ste" start the float weights)
FINETUNE_LOSSES = ("guided", "eps")           # sdjax.evaluation.qat.finetune's loss=
FINETUNE_SCHEDULES = ("constant", "cosine")   # its schedule= (qat.SCHEDULES)


def qat_defaults(nbits=None):
    """The fine-tuning settings of the qat-Nbit presets: ``QAT_DEFAULTS``, with ``QAT_LOW_BITS`` over them
    at ``nbits <= 2``."""
    return dict(QAT_DEFAULTS, **(QAT_LOW_BITS if nbits is not None and nbits <= 2 else {}))


class RecipeError(ValueError):
    """A recipe that cannot be applied (names the rule, and the layer where one is at fault)."""


# --- parsing --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    index: int                  # 1-based position in the recipe
    method: str
    options: dict               # the method's options, defaults filled in
    pattern: str | None = None  # glob
    regex: str | None = None
    kind: str | None = None
    components: tuple | None = None
    weight_threshold: int | None = None

    def __str__(self):
        what = f"pattern {self.pattern!r}" if self.pattern is not None else f"regex {self.regex!r}"
        return f"rule {self.index} ({what}, method {self.method!r})"

    def matches(self, name, w):
        if self.kind is not None and len(w.shape) != (4 if self.kind == "conv" else 2):
            return False
        if self.pattern is not None:
            return fnmatch.fnmatchcase(name, self.pattern)
        return re.fullmatch(self.regex, name) is not None

    def to_json(self):
        d = {"pattern": self.pattern} if self.pattern is not None else {"regex": self.regex}
        d["method"] = self.method
        if self.kind:
            d["kind"] = self.kind
        if self.components:
            d["component"] = list(self.components)
        if self.weight_threshold is not None:
            d["weight_threshold"] = self.weight_threshold
        d.update(self.options)
        if self.method == "palettize":  # the int8 LUT and activation options only where used
            quiet = {"lut_dtype": "float16"} if self.options["activations"] == "int8" else _PALETTE_A8_DEFAULTS
            for k, v in quiet.items():
                if d.get(k) == v:
                    del d[k]
        return d


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    components: tuple
    rules: tuple
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD
    source: str = "sdjax"       # "sdjax", "preset", "apple-mixed-bit"
    finetune: dict | None = None  # fine-tuning settings (check_finetune's), or None

    def to_json(self):
        """A plain dict that ``parse`` reads back into this recipe."""
        d = {"name": self.name, "components": list(self.components),
             "weight_threshold": self.weight_threshold, "source": self.source,
             "rules": [r.to_json() for r in self.rules]}
        if self.finetune is not None:
            d["finetune"] = dict(self.finetune)
        return d

    @property
    def needs_finetune(self):
        """Whether the recipe fine-tunes its palettized UNet weights (``apply_recipe`` then needs ``finetune``)."""
        return self.finetune is not None

    @property
    def needs_calibration(self):
        """Whether a rule quantizes activations (int8-w8a8, or palettize with ``"activations": "int8"``):
        ``apply_recipe`` then needs ``calibration``."""
        return any(is_act_quantized(r.method, r.options) for r in self.rules)

    @property
    def needs_importance(self):
        """Whether a rule is sensitive palettization (``apply_recipe`` then needs ``importance``)."""
        return any(r.method == "palettize" and r.options.get("sensitive") for r in self.rules)

    @property
    def needs_hessian(self):
        """Whether a rule is GPTQ palettization (``apply_recipe`` then needs ``hessian``)."""
        return any(r.method == "palettize" and r.options.get("gptq") for r in self.rules)


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_act_quantized(method, options):
    """Whether a rule's (or an assignment's) method and options quantize the layer's activations to int8."""
    return method == "int8-w8a8" or (method == "palettize" and options.get("activations") == "int8")


def _check_options(where, method, given):
    spec = METHODS[method]
    unknown = sorted(set(given) - set(spec))
    if unknown:
        allowed = ", ".join(sorted(spec)) or "none"
        raise RecipeError(f"{where}: unknown option(s) {unknown} for method {method!r} (its options: {allowed})")
    opts = {}
    for key, default in spec.items():
        if key not in given:
            if default is _REQUIRED:
                raise RecipeError(f"{where}: method {method!r} needs {key!r}")
            opts[key] = default
        else:
            opts[key] = given[key]
    bad = lambda key, what: RecipeError(f"{where}: {key} must be {what}; got {opts[key]!r}")
    if method == "palettize":
        if not _is_int(opts["nbits"]) or opts["nbits"] not in palettize.SUPPORTED_NBITS:
            raise bad("nbits", f"one of {palettize.SUPPORTED_NBITS} (unsupported nbits)")
        if opts["group_size"] is not None and (not _is_int(opts["group_size"]) or opts["group_size"] < 1):
            raise bad("group_size", "a positive integer or null")
        if not isinstance(opts["per_channel_scale"], bool):
            raise bad("per_channel_scale", "true or false")
        if opts["indivisible"] not in ("error", "per_tensor"):
            raise bad("indivisible", "'error' or 'per_tensor'")
        if not isinstance(opts["sensitive"], bool):
            raise bad("sensitive", "true or false")
        if not isinstance(opts["gptq"], bool):
            raise bad("gptq", "true or false")
        if opts["gptq"] and opts["sensitive"]:
            raise RecipeError(f"{where}: gptq and sensitive cannot be combined (GPTQ fits its LUT with the "
                              "layer's input statistics instead of per-weight importances)")
        if opts["clustering"] not in ("exact", "coremltools"):
            raise bad("clustering", "'exact' or 'coremltools'")
        if opts["clustering"] == "coremltools" and (opts["group_size"] is not None or opts["per_channel_scale"]
                                                     or opts["sensitive"] or opts["gptq"]):
            raise RecipeError(f"{where}: clustering 'coremltools' is plain per-tensor k-means (Apple's pre-analysis): "
                              "not with group_size, per_channel_scale, sensitive or gptq")
        if opts["lut_dtype"] not in palettize.LUT_DTYPES:
            raise bad("lut_dtype", f"one of {palettize.LUT_DTYPES} (the LUT entries' type: int8 entries with a "
                      "float16 scale per LUT need Core ML iOS18)")
        if opts["activations"] not in ("float", "int8"):
            raise bad("activations", "'float' or 'int8' (int8: calibrated per-tensor activation scales, W4A8 etc.)")
        if opts["granularity"] != "tensor":
            raise bad("granularity", "'tensor' for palettize (a per-input-channel activation scale cannot be folded "
                      "into a LUT shared by the inputs)")
        opts["nbits"] = int(opts["nbits"])
        opts["group_size"] = None if opts["group_size"] is None else int(opts["group_size"])
    if "path" in opts and opts["path"] not in int8.PATHS:
        raise bad("path", f"one of {int8.PATHS}")
    if method in ("int8-w8a8", "palettize"):
        if opts["act_method"] not in ("max", "percentile"):
            raise bad("act_method", "'max' or 'percentile'")
        if opts["granularity"] not in ("tensor", "channel"):
            raise bad("granularity", "'tensor' or 'channel'")
        p = opts["percentile"]
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 100:
            raise bad("percentile", "a number in (0, 100]")
    if method == "llm-int8":
        t = opts["threshold"]
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t > 0:
            raise bad("threshold", "a number > 0")
        if not _is_int(opts["max_outlier_cols"]) or opts["max_outlier_cols"] < 1:
            raise bad("max_outlier_cols", "an integer >= 1")
    return opts


def _number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and bool(np.isfinite(v))


def check_finetune(settings, where="finetune"):
    """The fine-tuning settings ``settings`` (a dict of ``FINETUNE_KEYS``) checked, with ``QAT_DEFAULTS``
    filled in and numbers normalised, or a RecipeError naming ``where``, the key and what it must be."""
    if not isinstance(settings, dict):
        raise RecipeError(f"{where}: 'finetune' must be an object of fine-tuning settings "
                          f"({', '.join(FINETUNE_KEYS)}); got {settings!r}")
    unknown = sorted(k for k in settings if k not in FINETUNE_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown finetune key(s) {unknown} (its keys: {', '.join(FINETUNE_KEYS)})")
    s = dict(QAT_DEFAULTS, **{k: v for k, v in settings.items() if v is not None})

    def bad(key, what):
        return RecipeError(f"{where}: finetune {key} must be {what}; got {s[key]!r}")
    if not isinstance(s["method"], str) or s["method"] not in FINETUNE_METHODS:
        raise bad("method", f"one of {', '.join(FINETUNE_METHODS)}")
    for key, lo in (("steps", 1), ("batch", 1), ("n_timesteps", 1), ("seed", 0)):
        if key in s:
            if not _is_int(s[key]) or s[key] < lo:
                raise bad(key, f"an integer >= {lo}")
            s[key] = int(s[key])
    for key in ("lr", "w_lr"):
        if key in s:
            if not _number(s[key]) or not 0 < s[key] <= 1:
                raise bad(key, "a learning rate, a number in (0, 1]")
            s[key] = float(s[key])
    if s["method"] == "dkm":
        if "temperature" not in s:
            raise RecipeError(f"{where}: finetune method 'dkm' needs a temperature (a number > 0, in units of the "
                              "weights squared)")
    elif "temperature" in s:
        raise RecipeError(f"{where}: finetune temperature applies to method 'dkm' only (its soft assignment); "
                          f"method {s['method']!r} takes none")
    if "temperature" in s:
        if not _number(s["temperature"]) or not s["temperature"] > 0:
            raise bad("temperature", "a number > 0")
        s["temperature"] = float(s["temperature"])
    if s["loss"] not in FINETUNE_LOSSES:
        raise bad("loss", f"one of {', '.join(FINETUNE_LOSSES)}")
    if "schedule" in s and s["schedule"] not in FINETUNE_SCHEDULES:
        raise bad("schedule", f"one of {', '.join(FINETUNE_SCHEDULES)}")
    if "w_init" in s and s["w_init"] not in FINETUNE_W_INITS:
        raise bad("w_init", f"one of {', '.join(FINETUNE_W_INITS)}")
    if "train_bias" in s and not isinstance(s["train_bias"], bool):
        raise bad("train_bias", "true or false")
    if "remat" in s and not (isinstance(s["remat"], bool) or s["remat"] == "auto"):
        raise bad("remat", "true, false or auto")
    if "refine" in s:
        if not isinstance(s["refine"], bool):
            raise bad("refine", "true or false")
        if s["refine"] and s["method"] == "lut":
            raise RecipeError(f"{where}: finetune refine re-clusters the trained float weights, and method 'lut' "
                              "trains none (use 'ste' or 'dkm')")
    return s


def _check_finetune_target(recipe):
    """A recipe with ``finetune`` must palettize something of the UNet."""
    if recipe.finetune is None:
        return
    if "unet" not in recipe.components:
        raise RecipeError(f"recipe {recipe.name!r}: finetune trains the UNet's palettized weights, and the recipe "
                          f"quantizes {list(recipe.components)} only")
    if not any(r.method == "palettize" and (r.components is None or "unet" in r.components) for r in recipe.rules):
        raise RecipeError(f"finetune trains palettized weights; recipe {recipe.name!r} has none (no palettize rule "
                          "on the unet; int8, W8A8 and LLM.int8 weights are carried unchanged, not trained)")
    for r in recipe.rules:
        if r.method == "palettize" and (r.options["lut_dtype"] != "float16" or r.options["activations"] != "float"):
            raise RecipeError(f"recipe {recipe.name!r}, {r}: finetune trains float16 LUTs with float activations; "
                              "int8 LUT entries and int8 activations are not trained (leave out finetune, or the "
                              "rule's lut_dtype/activations)")


def with_finetune(recipe, settings, where=None):
    """``recipe`` (anything ``parse`` takes) with fine-tuning ``settings`` (``check_finetune``'s; None
    removes it)."""
    r = parse(recipe)
    ft = None if settings is None else check_finetune(settings, where or f"recipe {r.name!r}")
    out = dataclasses.replace(r, finetune=ft)
    _check_finetune_target(out)
    return out


def _components(where, value):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) for c in value):
        raise RecipeError(f"{where}: components must be a name or a non-empty list of names from {COMPONENTS}")
    bad = [c for c in value if c not in COMPONENTS]
    if bad:
        raise RecipeError(f"{where}: unknown component(s) {bad}; choose from {COMPONENTS}")
    return tuple(dict.fromkeys(value))


def _threshold(where, value):
    if not _is_int(value) or value < 0:
        raise RecipeError(f"{where}: weight_threshold must be an integer >= 0; got {value!r}")
    return int(value)


def _rule(index, d):
    where = f"rule {index}"
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: must be an object with a pattern and a method; got {d!r}")
    has_p, has_r = "pattern" in d, "regex" in d
    if has_p == has_r:
        raise RecipeError(f"{where}: give exactly one of 'pattern' (a glob) or 'regex'; got {sorted(d)}")
    pattern, regex = d.get("pattern"), d.get("regex")
    if has_p:
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(f"{where}: pattern must be a non-empty string; got {pattern!r}")
        if pattern.endswith(".weight"):
            pattern = pattern[:-len(".weight")]
        where = f"rule {index} (pattern {pattern!r})"
    else:
        if not isinstance(regex, str) or not regex:
            raise RecipeError(f"{where}: regex must be a non-empty string; got {regex!r}")
        where = f"rule {index} (regex {regex!r})"
        try:
            re.compile(regex)
        except re.error as e:
            raise RecipeError(f"{where}: not a valid regular expression ({e})") from None
    method = d.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise RecipeError(f"{where}: unknown method {method!r}; choose from {sorted(METHODS)}")
    kind = d.get("kind")
    if kind is not None and (not isinstance(kind, str) or kind not in KINDS):
        raise RecipeError(f"{where}: kind must be 'conv' or 'linear'; got {kind!r}")
    comps = None
    if "component" in d or "components" in d:
        comps = _components(where, d.get("component", d.get("components")))
    thr = _threshold(where, d["weight_threshold"]) if "weight_threshold" in d else None
    given = {k: v for k, v in d.items() if k not in _RULE_KEYS}
    opts = _check_options(where, method, given)
    return Rule(index, method, opts, pattern if has_p else None, regex, kind, comps, thr)


def _from_sdjax(d, name):
    unknown = sorted(set(d) - _RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"recipe {name!r}: unknown key(s) {unknown} (recipe keys: {sorted(_RECIPE_KEYS)})")
    rules = d["rules"]
    if not isinstance(rules, list) or not rules:
        raise RecipeError(f"recipe {name!r}: 'rules' must be a non-empty list")
    comps = _components(f"recipe {name!r}", d.get("components", list(DEFAULT_COMPONENTS)))
    thr = _threshold(f"recipe {name!r}", d.get("weight_threshold", DEFAULT_WEIGHT_THRESHOLD))
    ft = d.get("finetune")
    ft = None if ft is None else check_finetune(ft, f"recipe {name!r}")
    out = Recipe(str(d.get("name", name)), comps, tuple(_rule(i + 1, r) for i, r in enumerate(rules)),
                 thr, d.get("source", "sdjax"), ft)
    _check_rule_components(out)
    return out


def _check_rule_components(recipe):
    for r in recipe.rules:
        if r.components is not None and not set(r.components) & set(recipe.components):
            raise RecipeError(f"{r}: its component(s) {list(r.components)} are not among the recipe's "
                              f"components {list(recipe.components)}")


def is_apple_recipe(d):
    """A flat ``{layer name: nbits}`` dict (Apple's mixed-bit recipe)."""
    return (isinstance(d, dict) and bool(d) and "rules" not in d
            and all(isinstance(k, str) and isinstance(v, numbers.Real) and not isinstance(v, bool)
                    for k, v in d.items()))


def _from_apple(d, name):
    rules = []
    for i, (layer, nbits) in enumerate(d.items()):
        if nbits in APPLE_FLOAT_NBITS:
            rules.append({"pattern": layer, "method": "float"})
        elif nbits in palettize.SUPPORTED_NBITS and float(nbits).is_integer():
            rules.append({"pattern": layer, "method": "palettize", "nbits": int(nbits)})
        else:
            raise RecipeError(f"mixed-bit recipe {name!r}, entry {i + 1} ({layer!r}): unsupported nbits {nbits!r} "
                              f"(palettized: {palettize.SUPPORTED_NBITS}; float: {APPLE_FLOAT_NBITS})")
        if any(c in layer for c in "*?["):
            raise RecipeError(f"mixed-bit recipe {name!r}, entry {i + 1}: {layer!r} is not a layer name")
    return _from_sdjax({"name": name, "components": ["unet"], "rules": rules, "source": "apple-mixed-bit"}, name)


def preset(name):
    """The recipe dict of a preset name (see the module docstring), or a RecipeError."""
    conv = {"pattern": "*", "kind": "conv"}
    table = {
        "w8-int8conv": [dict(conv, method="int8")],
        "w8a8-int8conv": [dict(conv, method="int8-w8a8")],
        "w8-int8": [{"pattern": "*", "method": "int8"}],
        "llm-int8": [{"pattern": "*", "kind": "linear", "method": "llm-int8", "threshold": 6.0}],
    }
    finetune = None
    if name in table:
        rules = table[name]
    else:
        m = re.fullmatch(r"(palette|qat)-(\d+)bit(?:-g(\d+))?(-gptq)?(-int8lut)?(-a8)?", name)
        if not m or int(m.group(2)) not in palettize.SUPPORTED_NBITS or (m.group(3) and int(m.group(3)) < 1):
            raise RecipeError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)} "
                              f"(palette-Nbit for N in {palettize.SUPPORTED_NBITS}, -gG for any group size G, "
                              "then -gptq for GPTQ indices, -int8lut for int8 LUT entries, -a8 for int8 "
                              "activations; qat-... for the same fine-tuned)")
        rule = {"pattern": "*", "method": "palettize", "nbits": int(m.group(2))}
        if m.group(3):
            rule.update(group_size=int(m.group(3)), indivisible="per_tensor")
        if m.group(4):
            rule["gptq"] = True
        if m.group(5):
            rule["lut_dtype"] = "int8"
        if m.group(6):
            rule["activations"] = "int8"
        rules = [rule]
        if m.group(1) == "qat":
            finetune = qat_defaults(int(m.group(2)))
    d = {"name": name, "components": ["unet"], "rules": copy.deepcopy(rules), "source": "preset"}
    if finetune is not None:
        d["finetune"] = finetune
    return d


PRESETS = ("w8-int8conv", "w8a8-int8conv", "w8-int8", "llm-int8",
           "palette-8bit", "palette-6bit", "palette-4bit", "palette-2bit",
           "palette-8bit-g16", "palette-6bit-g16", "palette-4bit-g16", "palette-2bit-g16",
           "palette-4bit-g32", "palette-8bit-gptq", "palette-6bit-gptq", "palette-4bit-gptq", "palette-2bit-gptq",
           "qat-4bit", "qat-2bit", "palette-6bit-int8lut", "palette-4bit-int8lut", "palette-2bit-int8lut",
           "palette-6bit-int8lut-a8", "palette-4bit-int8lut-a8", "palette-2bit-int8lut-a8")


def parse(recipe, select=None, components=None) -> Recipe:
    """A ``Recipe`` from a preset name, a JSON file path, a dict (sdjax rules, Apple's flat
    ``{layer: nbits}``, Apple's pre-analysis JSON with ``"recipes"``, or Apple's activation-quantization
    layer list ``{"conv": {layer: PSNR}, "einsum": {...}}``: ``quant.apple_layers``), or a ``Recipe``.

    ``select``: the recipe's name inside an Apple pre-analysis file. ``components``: replaces the
    recipe's components (a name or a list)."""
    name = "recipe"
    if isinstance(recipe, Recipe):
        out = recipe
    else:
        if isinstance(recipe, (str, os.PathLike)):
            path = os.fspath(recipe)
            if path.endswith(".json") or os.path.sep in path or os.path.isfile(path):
                try:
                    with open(path) as f:
                        recipe = json.load(f)
                except FileNotFoundError:
                    raise RecipeError(f"{path}: recipe file not found") from None
                except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise RecipeError(f"{path}: cannot read the recipe as JSON ({e})") from None
                name = os.path.splitext(os.path.basename(path))[0]
                if isinstance(recipe, dict) and "rules" in recipe:
                    recipe.setdefault("name", name)
            else:
                recipe = preset(path)
        if not isinstance(recipe, dict):
            raise RecipeError(f"{name}: a recipe must be a JSON object; got {type(recipe).__name__}")
        if "recipes" in recipe and "rules" not in recipe:  # Apple's pre-analysis output
            table = recipe["recipes"]
            if not isinstance(table, dict) or not table:
                raise RecipeError(f"{name}: 'recipes' must be a non-empty object of {{layer: nbits}} recipes")
            if select is None:
                if len(table) != 1:
                    raise RecipeError(f"{name}: holds {len(table)} mixed-bit recipes; select one of: "
                                      f"{', '.join(table)}")
                select = next(iter(table))
            if select not in table:
                raise RecipeError(f"{name}: no recipe {select!r}; it has: {', '.join(table)}")
            recipe, name, select = table[select], select, None
        if select is not None:
            raise RecipeError(f"{name}: select={select!r} applies only to Apple pre-analysis files (with 'recipes')")
        if "rules" in recipe:
            out = _from_sdjax(recipe, str(recipe.get("name", name)))
        elif apple_layers.is_apple_layers(recipe):  # Apple's activation-quantization layer list
            try:
                out = _from_sdjax(apple_layers.to_recipe(recipe, name), name)
            except apple_layers.AppleLayersError as e:
                raise RecipeError(f"{name}: {e}") from None
        elif is_apple_recipe(recipe):
            out = _from_apple(recipe, name)
        else:
            raise RecipeError(f"{name}: not a recipe: expected {{'rules': [...]}} or Apple's mixed-bit "
                              f"{{layer name: nbits}}; got keys {sorted(recipe)[:8]}")
    if components is not None:
        out = dataclasses.replace(out, components=_components(f"recipe {out.name!r}", components))
        _check_rule_components(out)
    _check_finetune_target(out)
    return out


def layers(params):
    """{layer name: weight} of the conv/linear layers of one component's params."""
    flat = nn.flatten(params)
    return {n: flat[n + ".weight"] for n in calibrate.layer_names(params)}
