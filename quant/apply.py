"""Applying a recipe: which weight each layer becomes (``plan``), and the quantized params
(``apply_recipe``), with the statistics some methods need (activation scales, importances, GPTQ's
``X^T X``), the fine-tuning step of recipes with ``"finetune"``, and a cache of quantized weights
shared between recipes. The recipe format is ``quant.recipes``'s.
"""
from __future__ import annotations

import dataclasses
import hashlib

import jax
import numpy as np
from tqdm.auto import tqdm

from sdjax import nn
from sdjax.nn import is_quantized

from . import calibrate, gptq, int8, llm_int8, palettize
from .palettize import PalettizedWeight
from .recipes import COMPONENTS, METHODS, RecipeError, Rule, is_act_quantized, layers, parse

# --- planning -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Assignment:
    method: str
    options: dict
    rule: Rule | None
    note: str = ""              # why float: "no rule", "small (n <= threshold)"


def _is_pipeline(params):
    return (isinstance(params, dict) and bool(params) and set(params) <= set(COMPONENTS)
            and all(isinstance(v, dict) for v in params.values()))


def _targets(params, recipe, component):
    """[(component, component params)] the recipe applies to."""
    if _is_pipeline(params):
        missing = [c for c in recipe.components if c not in params]
        if missing:
            raise RecipeError(f"recipe {recipe.name!r} quantizes {missing}, which params do not have "
                              f"(they have {sorted(params)})")
        return [(c, params[c]) for c in recipe.components], True
    if component is None:
        component = recipe.components[0] if len(recipe.components) == 1 else "unet"
    return [(component, params)], False


def small_layer_threshold(recipe, rule, name, size):
    """The weight threshold under which ``rule`` leaves layer ``name`` of ``size`` weights float, or None
    when the rule applies: a layer of at most the rule's (else the recipe's) threshold stays float unless
    the rule keeps it float anyway or names the layer exactly."""
    thr = recipe.weight_threshold if rule.weight_threshold is None else rule.weight_threshold
    return thr if rule.method != "float" and size <= thr and rule.pattern != name else None


def plan(params, recipe, component=None, select=None):
    """{component: {layer: Assignment}} for every conv/linear layer the recipe looks at, after
    checking every rule (patterns matching nothing, group sizes); nothing is quantized.

    ``params``: a pipeline's ``{"text_encoder", "unet", "vae"}`` params (the recipe's components
    are used) or one component's params (named by ``component``, default the recipe's single
    component, else "unet")."""
    recipe = parse(recipe, select)
    targets, _ = _targets(params, recipe, component)
    out, matched, applies = {}, {}, {}
    for comp, p in targets:
        rules = [r for r in recipe.rules if r.components is None or comp in r.components]
        # rules that name one layer exactly (Apple's recipes: hundreds) are looked up, not scanned
        literal, scanned = {}, []
        for r in rules:
            applies[r.index] = True
            if r.pattern is not None and not any(c in r.pattern for c in "*?["):
                literal.setdefault(r.pattern, []).append(r)
            else:
                scanned.append(r)
        assign = {}
        for name, w in layers(p).items():
            candidates = sorted(scanned + literal.get(name, []), key=lambda r: r.index)
            hits = [r for r in candidates if r.matches(name, w)]
            for r in hits:
                matched[r.index] = True
            if not hits:
                assign[name] = Assignment("float", {}, None, "no rule")
                continue
            rule = hits[0]  # first match wins
            size = int(np.prod(w.shape))
            thr = small_layer_threshold(recipe, rule, name, size)
            if thr is not None:
                assign[name] = Assignment("float", {}, rule, f"small ({size} <= {thr} weights)")
                continue
            opts = dict(rule.options)
            if rule.method == "palettize" and opts["group_size"] is not None and w.shape[-1] % opts["group_size"]:
                if opts["indivisible"] == "error":
                    raise RecipeError(f"{rule}: group_size {opts['group_size']} does not divide the "
                                      f"{w.shape[-1]} output channels of {comp} layer {name!r} {tuple(w.shape)} "
                                      f"(set \"indivisible\": \"per_tensor\" to give such layers one LUT)")
                opts["group_size"] = None
            assign[name] = Assignment(rule.method, opts, rule)
        out[comp] = assign
    for r in recipe.rules:
        if applies.get(r.index) and not matched.get(r.index):
            comps = [c for c, _ in targets if r.components is None or c in r.components]
            sample = next(iter(out[comps[0]]), None) if comps else None
            raise RecipeError(f"{r}: matches no conv/linear layer of {', '.join(comps)}"
                              + (f" (kind {r.kind!r})" if r.kind else "")
                              + (f"; layer names look like {sample!r}" if sample else ""))
    return out


# --- applying -------------------------------------------------------------------------------

def _calibration_scales(calibration, needs, targets, pipeline, params):
    """{(component, layer): activation scale} for the layers in ``needs`` (int8-w8a8, and palettize with
    int8 activations)."""
    if not needs:
        return {}
    first = next(iter(needs.values()))
    if calibration is None:
        what = "int8-w8a8 needs" if first.method == "int8-w8a8" else "palettize with int8 activations needs"
        raise RecipeError(f"{first.rule}: {what} activation scales: pass calibration= "
                          "(a dict of per-layer scales or quant.calibrate statistics, or a function "
                          "run(params) that drives the model over calibration data)")
    comps = sorted({c for c, _ in needs})
    if callable(calibration):
        names = [f"{c}.{n}" if pipeline else n for c, n in needs]
        stats = calibrate.observe(params, calibration, names)
        found = {(c, n): stats.get(f"{c}.{n}" if pipeline else n) for c, n in needs}
    else:
        if not isinstance(calibration, dict):
            raise RecipeError(f"calibration must be a dict or a function; got {type(calibration).__name__}")
        nested = bool(calibration) and all(k in COMPONENTS and isinstance(v, dict) for k, v in calibration.items())
        if not nested and len(comps) > 1:
            raise RecipeError(f"int8-activation layers in {comps}: give calibration as "
                              "{component: {layer: scale}}")
        found = {(c, n): (calibration.get(c, {}) if nested else calibration).get(n) for c, n in needs}
    missing = [f"{c}:{n}" if len(comps) > 1 else n for (c, n), v in found.items() if v is None]
    if missing:
        raise RecipeError(f"{first.rule}: no activation scales for {len(missing)} int8-activation layer(s): "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    out = {}
    for key, v in found.items():
        if isinstance(v, calibrate.LayerStats):
            o = needs[key].options
            v = calibrate.act_scales({"x": v}, o["act_method"], o["granularity"], o["percentile"])["x"]
        out[key] = v
    return out


def _importances(importance, needs, pipeline):
    """{(component, layer): importance array} for the sensitive palettize layers in ``needs``."""
    if not needs:
        return {}
    first = next(iter(needs.values()))
    if importance is None:
        raise RecipeError(f"{first.rule}: sensitive palettization needs per-weight importances: pass "
                          "importance= ({layer: array of the weight's shape}, e.g. from "
                          "sdjax.evaluation.fisher.fisher(pipe, prompts); `sdjax quantize` computes them with "
                          "--sensitivity-prompts)")
    if not isinstance(importance, dict):
        raise RecipeError(f"importance must be a dict {{layer: array}} or {{component: {{layer: array}}}}; "
                          f"got {type(importance).__name__}")
    comps = sorted({c for c, _ in needs})
    nested = bool(importance) and all(k in COMPONENTS and isinstance(v, dict) for k, v in importance.items())
    if not nested and len(comps) > 1:
        raise RecipeError(f"sensitive palettize layers in {comps}: give importance as "
                          "{component: {layer: array}}")
    found = {(c, n): (importance.get(c, {}) if nested else importance).get(n) for c, n in needs}
    missing = [(c, n) for (c, n), v in found.items() if v is None]
    if missing:
        c, n = missing[0]
        names = [f"{c}:{n}" if len(comps) > 1 else n for c, n in missing]
        raise RecipeError(f"{needs[missing[0]].rule}: no importance for {len(missing)} sensitive layer(s) of "
                          f"{c}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    return found


HESSIAN_BUDGET = 2 << 30  # bytes of float64 X^T X one calibration run collects (a callable hessian=)


class _Hessians:
    """The GPTQ layers' hessians: looked up in a dict, or collected by running a callable, a group of
    layers at a time (at most ``HESSIAN_BUDGET`` bytes of statistics held; one calibration run per
    group), and released once their layer is quantized."""

    def __init__(self, hessian, needs, pipeline, params):
        self.needs, self.pipeline, self.params, self.run = needs, pipeline, params, None
        self.found, self.groups = {}, []
        if not needs:
            return
        first = next(iter(needs.values()))
        comps = sorted({c for c, _ in needs})
        self.comps = comps
        if hessian is None:
            raise RecipeError(f"{first.rule}: GPTQ palettization needs each layer's input statistics: pass "
                              "hessian= ({layer: X^T X} from quant.gptq.collect, or a function run(params) that "
                              "drives the model over calibration data); `sdjax quantize` collects them from "
                              "its calibration prompts")
        if callable(hessian):
            self.run = hessian
            flat = {c: nn.flatten(params[c] if pipeline else params) for c in comps}
            group, size = [], 0
            for c, n in needs:  # in quantizing order
                d = int(np.prod(flat[c][n + ".weight"].shape[:-1]))
                if group and size + 8 * d * d > HESSIAN_BUDGET:
                    self.groups.append(group)
                    group, size = [], 0
                group.append((c, n))
                size += 8 * d * d
            self.groups.append(group)
            self.group_of = {key: g for g in self.groups for key in g}
            return
        if not isinstance(hessian, dict):
            raise RecipeError(f"hessian must be a dict {{layer: (d, d) array}}, {{component: {{layer: array}}}} "
                              f"or a function; got {type(hessian).__name__}")
        nested = bool(hessian) and all(k in COMPONENTS and isinstance(v, dict) for k, v in hessian.items())
        if not nested and len(comps) > 1:
            raise RecipeError(f"GPTQ palettize layers in {comps}: give hessian as {{component: {{layer: array}}}}")
        self.found = {(c, n): (hessian.get(c, {}) if nested else hessian).get(n) for c, n in needs}
        self._check(list(needs))

    def _check(self, keys):
        missing = [k for k in keys if self.found.get(k) is None]
        if missing:
            c, n = missing[0]
            names = [f"{c}:{n}" if len(self.comps) > 1 else n for c, n in missing]
            raise RecipeError(f"{self.needs[missing[0]].rule}: no hessian for {len(missing)} GPTQ layer(s) of {c} "
                              f"(the calibration run never reached them?): {', '.join(names[:5])}"
                              f"{' ...' if len(names) > 5 else ''}")

    def get(self, comp, name):
        key = (comp, name)
        if key not in self.needs:
            return None
        if self.run is not None and key not in self.found:
            group = self.group_of[key]
            names = [f"{c}.{n}" if self.pipeline else n for c, n in group]
            got = gptq.collect(self.params, self.run, names)
            self.found.update({(c, n): got.get(f"{c}.{n}" if self.pipeline else n) for c, n in group})
            self._check(group)
        return self.found[key]

    def release(self, comp, name):
        if self.run is not None:
            self.found.pop((comp, name), None)


def array_digest(a):
    """A short hash of an array's bytes (GPTQ cache keys: the weight depends on the hessian)."""
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def quantize_weight(w, method, options, act_scale=None, importance=None, hessian=None):
    """One weight by one method (options as a rule's, defaults filled in). ``importance``: per-weight
    importances for palettization (used whether or not the options say ``sensitive``); ``hessian``:
    the layer's ``X^T X`` for ``"gptq": true`` palettization; ``act_scale``: the activation scale of
    int8-w8a8 and of palettization with ``"activations": "int8"``."""
    if method == "float":
        return w
    if method == "palettize" and options.get("activations", "float") != "float":
        if act_scale is None:
            raise RecipeError("palettize with int8 activations needs the layer's activation scale")
        w = quantize_weight(w, method, dict(options, activations="float"), None, importance, hessian)
        return palettize.with_act_scale(w, act_scale)
    if method == "palettize" and options.get("lut_dtype", "float16") == "int8":
        return palettize.int8_lut(quantize_weight(w, method, dict(options, lut_dtype="float16"), None, importance,
                                                  hessian))
    if is_quantized(w):  # re-quantizing: start from the value it represents
        w = w.dequantize(np.float32)
    if method == "palettize" and options.get("gptq"):
        if hessian is None:
            raise RecipeError("gptq palettization needs the layer's hessian")
        return gptq.palettize(np.asarray(w), hessian, options["nbits"], group_size=options.get("group_size"),
                              per_channel_scale=options.get("per_channel_scale", False))
    if method == "palettize" and options.get("clustering") == "coremltools":
        return palettize.coremltools_kmeans(np.asarray(w), options["nbits"])
    if method == "palettize":
        return palettize.kmeans(np.asarray(w), options["nbits"], options.get("group_size"),
                                importance=None if importance is None else np.asarray(importance),
                                per_channel_scale=options.get("per_channel_scale", False))
    if method == "int8":
        return int8.quantize(w)
    if method == "int8-w8a8":
        return int8.quantize(w, act_scale=act_scale, path=options.get("path", "integer"))
    if method == "llm-int8":
        return llm_int8.quantize(w, options.get("threshold", llm_int8.DEFAULT_THRESHOLD),
                                 options.get("path", "integer"), options.get("max_outlier_cols", 64))
    raise RecipeError(f"unknown method {method!r}")


def cache_key(component, layer, method, options, hessian=None, numel=None):
    """The key ``apply_recipe(cache=...)`` stores a quantized weight under: what determines it
    (component, layer, method, options with defaults filled in; not how indivisible groups are
    reported; for GPTQ, a digest of the layer's ``hessian`` too). ``numel``: the weight's size; coremltools'
    clustering of a tensor of ``palettize.COREMLTOOLS_KMEANS1D_MIN`` weights or more is plain exact k-means
    (``palettize.coremltools_kmeans``), so it shares that key and Apple's sweep and sdjax's cluster it once."""
    opts = dict(METHODS[method], **options)
    opts.pop("indivisible", None)
    if (method == "palettize" and opts.get("clustering") == "coremltools" and numel is not None
            and numel >= palettize.COREMLTOOLS_KMEANS1D_MIN):
        opts["clustering"] = "exact"
    if method == "palettize" and opts["activations"] == "float":  # activation options do not make the weight
        for k in ("activations", "act_method", "granularity", "percentile"):
            opts.pop(k)
    key = (component, layer, method, tuple(sorted(opts.items())))
    return key if hessian is None else key + (array_digest(np.asarray(hessian)),)


def _cacheable(method, options):
    # W8A8 scales come from calibration and sensitive LUTs from importances: not a function of the key
    return method in ("palettize", "int8", "llm-int8") and not options.get("sensitive")


def _check_finetune(recipe, finetune, assignments, targets):
    """Before any work: a recipe with ``finetune`` gets a callable and palettizes some UNet layer."""
    if recipe.finetune is None:
        return
    if finetune is None:
        raise RecipeError(f"recipe {recipe.name!r} fine-tunes its palettized UNet weights (its \"finetune\" "
                          "settings): pass finetune= (a function (unet params, settings) -> fine-tuned unet params, "
                          "e.g. sdjax.evaluation.qat_recipe.finetune_callable(pipe, calibration prompts)); "
                          "`sdjax quantize` builds it from its calibration prompts")
    if not callable(finetune):
        raise RecipeError(f"finetune must be a function (unet params, settings) -> unet params; got "
                          f"{type(finetune).__name__}")
    if "unet" not in [c for c, _ in targets]:
        raise RecipeError(f"recipe {recipe.name!r}: finetune trains the UNet, and these params are the "
                          f"{targets[0][0]}'s")
    if not any(a.method == "palettize" for a in assignments.get("unet", {}).values()):
        raise RecipeError(f"finetune trains palettized weights; recipe {recipe.name!r} has none on this UNet (its "
                          "palettize rules leave every layer float here: small layers?)")


def _finetuned(recipe, finetune, unet):
    """``finetune(unet, settings)``, checked: the same palettized layers, each the same layout and bytes."""
    try:
        tuned = finetune(unet, dict(recipe.finetune))
    except ValueError as e:
        raise RecipeError(f"recipe {recipe.name!r}: fine-tuning: {e}") from None
    before, after = nn.flatten(unet), nn.flatten(tuned) if isinstance(tuned, dict) else None
    if after is None or set(before) != set(after):
        raise RecipeError(f"recipe {recipe.name!r}: finetune= returned params of another structure than the UNet's")
    for path, w in before.items():
        if isinstance(w, PalettizedWeight):
            t = after[path]
            if not isinstance(t, PalettizedWeight) or (t.shape, t.nbits, t.group_size, t.nbytes) != \
                    (w.shape, w.nbits, w.group_size, w.nbytes):
                raise RecipeError(f"recipe {recipe.name!r}: finetune= changed the layout of {path} (a fine-tuned "
                                  "weight keeps its PalettizedWeight shape, nbits, groups and bytes)")
    return tuned


def apply_recipe(params, recipe, calibration=None, *, importance=None, hessian=None, finetune=None, component=None,
                 select=None, progress=False, cache=None):
    """Quantize ``params`` by ``recipe`` (see the module docstring) -> new params, same structure.

    ``params``: a pipeline's ``{"text_encoder", "unet", "vae"}`` params (the recipe's components are
    quantized) or one component's params (``component`` names it; default the recipe's single
    component, else "unet"). ``recipe``: anything ``parse`` takes.

    ``calibration`` (only for "int8-w8a8" rules): ``{layer: scale}`` with scales from
    ``quant.calibrate.act_scales`` (a scalar, or ``(in,)`` per input channel); or
    ``{layer: LayerStats}`` from ``quant.calibrate.observe`` (turned into scales with the rule's
    ``act_method``/``granularity``/``percentile``); or a function ``run(params)`` driving the model,
    which is observed on the W8A8 layers (it receives params shaped like ``params``). With pipeline
    params and W8A8 layers in several components, nest the dict as ``{component: {layer: ...}}``.

    ``importance`` (only for ``"sensitive": true`` palettize rules, ignored by the others):
    ``{layer: array of the weight's shape}`` of nonnegative per-weight importances, from
    ``sdjax.evaluation.fisher.fisher``; nested as ``{component: {layer: array}}`` like ``calibration``.
    A sensitive layer missing from it is an error naming the layer.

    ``cache``: a dict shared between calls on the same params (``sdjax eval`` quantizes one model
    by many recipes): weights quantized with the same method and options (``cache_key``) are
    reused instead of recomputed. Not for sensitive or W8A8 layers; GPTQ layers are keyed by a
    digest of their hessian too.

    ``hessian`` (only for ``"gptq": true`` palettize rules): ``{layer: (d, d) array}``, the mean
    ``x x^T`` of the layer's input rows (``quant.gptq.collect``), nested by component like
    ``calibration``; or a function ``run(params)`` that is observed on the GPTQ layers.

    ``finetune`` (only for recipes with ``"finetune"`` settings, ignored by the others): a function
    ``finetune(unet_params, settings) -> unet_params`` called once the rules are applied, with the
    UNet's params (palettized weights as ``PalettizedWeight``) and the recipe's settings dict; it returns
    them fine-tuned, every ``PalettizedWeight`` of the same layout and bytes (checked), other leaves as
    they were. ``sdjax.evaluation.qat_recipe.finetune_callable`` builds one (``quant`` drives no model).
    A ValueError it raises becomes a RecipeError naming the recipe.
    """
    recipe = parse(recipe, select)
    assignments = plan(params, recipe, component)
    targets, pipeline = _targets(params, recipe, component)
    needs = {(c, n): a for c, table in assignments.items() for n, a in table.items()
             if is_act_quantized(a.method, a.options)}
    scales = _calibration_scales(calibration, needs, targets, pipeline, params)
    sensitive = {(c, n): a for c, table in assignments.items() for n, a in table.items()
                 if a.method == "palettize" and a.options.get("sensitive")}
    imps = _importances(importance, sensitive, pipeline)
    gq = {(c, n): a for c, table in assignments.items() for n, a in table.items()
          if a.method == "palettize" and a.options.get("gptq")}
    hess = _Hessians(hessian, gq, pipeline, params)
    _check_finetune(recipe, finetune, assignments, targets)
    out = dict(params) if pipeline else params
    for comp, p in targets:
        flat = nn.flatten(p)
        todo = [(n, a) for n, a in assignments[comp].items() if a.method != "float"]
        for name, a in tqdm(todo, desc=f"quantizing {comp}", unit="layer", disable=not progress, leave=False):
            key = name + ".weight"
            h = hess.get(comp, name)
            # a palettized weight with int8 activations: the weight (cached), then its activation scale
            a8 = a.method == "palettize" and is_act_quantized(a.method, a.options)
            opts = dict(a.options, activations="float") if a8 else a.options
            numel = int(np.prod(flat[key].shape))
            ck = cache_key(comp, name, a.method, opts, h, numel) \
                if cache is not None and _cacheable(a.method, opts) else None
            try:
                f16 = None if ck is None or opts.get("lut_dtype") != "int8" else \
                    cache_key(comp, name, a.method, dict(opts, lut_dtype="float16"), h, numel)
                if ck is not None and ck in cache:
                    w = cache[ck]
                elif f16 is not None and f16 in cache:  # the same LUTs in float16: their entries to int8
                    w = cache[ck] = palettize.int8_lut(cache[f16])
                else:
                    w = quantize_weight(flat[key], a.method, opts, None if a8 else scales.get((comp, name)),
                                        imps.get((comp, name)), h)
                    if ck is not None:
                        cache[ck] = w
                flat[key] = palettize.with_act_scale(w, scales[(comp, name)]) if a8 else w
            except ValueError as e:
                raise RecipeError(f"{a.rule}: {comp} layer {name!r} {tuple(flat[key].shape)}: {e}") from None
            hess.release(comp, name)
        if pipeline:
            out[comp] = nn.unflatten(flat)
        else:
            out = nn.unflatten(flat)
    if recipe.finetune is not None:
        if pipeline:
            out["unet"] = _finetuned(recipe, finetune, out["unet"])
        else:
            out = _finetuned(recipe, finetune, out)
    return out


def size_bytes(params):
    """Bytes of ``params`` as stored: float arrays' ``nbytes`` plus quantized weights' ``.nbytes``."""
    return int(sum(int(x.nbytes) for x in jax.tree.leaves(params, is_leaf=is_quantized)))
