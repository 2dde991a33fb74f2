"""Mixed-bit palettization: how many bits each layer gets, as pure functions over a ``measure``.

Everything here is independent of the model: the caller supplies

    measure(assignment: dict[layer, nbits]) -> float

the end-to-end quality (PSNR in dB, higher is better; ``nan``/``inf`` allowed) of the model with
the layers in ``assignment`` palettized to ``nbits`` and every other layer left as it is (float).
Sweeps and searches only ever pass palette widths, never 16, so layers absent from the dict are
the float ones. Results are plain dicts, so a caller persists them as JSON (integer nbits keys that
came back from JSON as strings are accepted everywhere).

Apple's procedure (ml-stable-diffusion ``mixed_bit_compression_pre_analysis.py``), restated
---------------------------------------------------------------------------------------------
- ``single_layer_sweep``: for each width in ``NBITS`` (those the Neural Engine accelerates) and
  each candidate layer, palettize that layer alone and measure.
- ``cumulative_sweep``: for each width, order the layers least sensitive first (descending
  single-layer PSNR; ``sensitivity_order``) and palettize them cumulatively, measuring after each.
- ``apple_thresholds``: ``linspace(original - 1, linear_8bit + 5, num)`` of the baselines' PSNRs.
- ``apple_recipe``: for each layer, the smallest width whose *cumulative* PSNR at that layer's
  position in that width's cumulative order is > the threshold, else ``default_nbits``.
- ``average_bits``: ``sum(nbits * numel) / sum(numel)``, 16 for float layers.

What else Apple's run fixes, for callers that reproduce it as Apple runs it (``sdjax.evaluation.apple``):
candidates are conv/linear tensors of more than ``APPLE_MIN_SIZE`` weights, visited in the model's
module order (its sort is stable, so ties in the rounded PSNRs keep that order: ``sensitivity_order``'s
``tie_order``); each is palettized per tensor as coremltools clusters it
(``quant.palettize.coremltools_kmeans``); its "linear_8bit" baseline quantizes *every* weight of the
UNet (norms too) with ``apple_linear8``, per-tensor asymmetric int8.

Our allocator (``quant.allocation``)
------------------------------------
Apple ranks layers by PSNR alone: a small layer that is slightly less sensitive than a big one is
compressed first although it saves a fraction of the bytes. ``allocate`` instead models the
output errors of independently palettized layers as additive noise energies,

    e_l(b) = 10**(-psnr_l(b) / 10) - 10**(-base_psnr / 10)       (clipped at 0)

(all PSNRs share one peak, so these are MSEs in units of peak**2; a float layer adds 0), predicts
``psnr = -10 log10(e_base + sum_l e_l(b_l))`` (``predicted_psnr``) and solves the multiple-choice
knapsack

    minimise sum_l e_l(b_l)   subject to   sum_l cost(l, b_l) <= budget

so error is spent where it buys the most bytes. See ``quant.allocation.allocate`` for the dynamic programme and its
guarantee, ``allocate_for_quality`` for the end-to-end (measured) search of the smallest size
meeting a PSNR target, and ``fisher_estimate``/``rank_agreement`` for a cheap sensitivity proxy.

``base_psnr`` is the PSNR of the unquantized model under the same ``measure`` (for a float32
reference and a float16 model, Apple's "original" baseline): every single-layer PSNR contains that
noise floor, and without subtracting it the allocator would count it once per palettized layer.
Leave it None when the reference is the unquantized model itself (its PSNR is inf).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from tqdm.auto import tqdm


NBITS = (1, 2, 4, 6, 8)              # the widths the Neural Engine accelerates (Apple's NBITS)
APPLE_MIN_SIZE = 1e5                 # Apple's PALETTIZE_MIN_SIZE: candidates have more weights than this
PALETTE_NBITS = (1, 2, 3, 4, 6, 8)   # every width quant.palettize supports
FLOAT_BITS = 16                      # "not palettized": the layer stays float16
VALID_NBITS = PALETTE_NBITS + (FLOAT_BITS,)

__all__ = [
    "NBITS", "PALETTE_NBITS", "FLOAT_BITS", "VALID_NBITS",
    "single_layer_sweep", "sensitivity_order", "cumulative_sweep", "cumulative_sweeps",
    "apple_thresholds", "apple_recipe", "apple_recipes", "apple_linear8", "average_bits", "stored_bits",
    "fisher_estimate", "rank_agreement",
]

# --- validation --------------------------------------------------------------------------------

def _nbits(b, allow_float=True):
    """``b`` as an int if it is a known width (a decimal string, as JSON keys come back, too)."""
    valid = VALID_NBITS if allow_float else PALETTE_NBITS
    value = b
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) not in valid:
        raise ValueError(f"unknown nbits {b!r}: expected one of {valid}")
    return int(value)


def _nbits_list(nbits):
    """Palette widths (never 16) from an int or an iterable, duplicates refused, order kept."""
    if isinstance(nbits, (int, np.integer, str)):
        nbits = [nbits]
    out = [_nbits(b, allow_float=False) for b in nbits]
    if not out:
        raise ValueError("nbits is empty: give at least one palette width")
    if len(set(out)) != len(out):
        raise ValueError(f"nbits has duplicates: {list(nbits)!r}")
    return out


def _by_nbits(mapping, name, allow_float=False):
    """``{nbits: x}`` with validated int keys."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{name} must be a mapping {{nbits: ...}}, got {type(mapping).__name__}")
    out = {}
    for key, value in mapping.items():
        b = _nbits(key, allow_float=allow_float)
        if b in out:
            raise ValueError(f"{name}: nbits {b} appears twice ({key!r})")
        out[b] = value
    return out


def _layer_list(layers):
    if isinstance(layers, (str, bytes)) or isinstance(layers, Mapping):
        raise TypeError("layers must be a sequence of layer names")
    layers = list(layers)
    if not layers:
        raise ValueError("the layer list is empty: nothing to sweep")
    if len(set(layers)) != len(layers):
        raise ValueError("the layer list has duplicate names")
    return layers


def _numel(numel):
    if not isinstance(numel, Mapping) or not numel:
        raise ValueError("numel must be a non-empty mapping {layer: number of weights}")
    out = {}
    for layer, n in numel.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"numel[{layer!r}] must be a positive integer, got {n!r}")
        out[layer] = int(n)
    return out


def _cost_fn(numel, cost_bits):
    """``cost(layer, nbits) -> bits``, validated; the default is Apple's ``nbits * numel``."""
    if cost_bits is None:
        return lambda layer, b: float(b * numel[layer])

    def cost(layer, b):
        c = float(cost_bits(layer, b))
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"cost_bits({layer!r}, {b}) must be finite and >= 0, got {c!r}")
        return c
    return cost


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _measured(value):
    return float(value)


def _only_palettized(assignment):
    """What ``measure`` receives: the palettized layers (absent = float)."""
    return {layer: b for layer, b in assignment.items() if b != FLOAT_BITS}


# --- Apple's sweeps and recipes ------------------------------------------------------------------

def single_layer_sweep(measure, layers, nbits=NBITS, done=None, on_result=None, progress=True):
    """PSNR of the model with one layer at a time palettized: ``{nbits: {layer: psnr}}``.

    Calls ``measure({layer: b})`` once for each ``b`` in ``nbits`` (in that order) and each layer in
    ``layers`` (in that order), except the pairs already in ``done`` (an earlier, possibly partial
    result of the same form: resumability), whose values are copied. ``on_result(nbits, layer,
    psnr)`` is called after each measurement, so the caller can persist it as it comes. The result
    holds the requested widths and layers only, in the requested order.
    """
    layers = _layer_list(layers)
    widths = _nbits_list(nbits)
    done = _by_nbits(done or {}, "done")
    results = {b: {} for b in widths}
    todo = []
    for b in widths:
        previous = done.get(b) or {}
        for layer in layers:
            if layer in previous:
                results[b][layer] = _measured(previous[layer])
            else:
                todo.append((b, layer))
    with tqdm(total=len(todo), disable=not progress, desc="single-layer sweep", leave=False) as bar:
        for b, layer in todo:
            value = _measured(measure({layer: b}))
            results[b][layer] = value
            if on_result is not None:
                on_result(b, layer, value)
            bar.set_postfix_str(f"{b}-bit {layer}: {value:.2f} dB", refresh=False)
            bar.update()
    return {b: {layer: results[b][layer] for layer in layers} for b in widths}


def sensitivity_order(psnr, tie_order=None):
    """Layers least sensitive first: descending PSNR (``inf`` first), ``nan`` last (the most
    sensitive). Apple's ``descending_psnr_order``. Ties are broken by layer name, or, with
    ``tie_order`` (a sequence of every layer), by position in it: Apple's stable sort over its
    candidates in module order."""
    rank = None if tie_order is None else {layer: i for i, layer in enumerate(tie_order)}
    if rank is not None and any(layer not in rank for layer in psnr):
        raise ValueError(f"tie_order is missing layers: {[x for x in psnr if x not in rank][:5]!r}")

    def key(item):
        layer, p = item
        p = float(p)
        nan = math.isnan(p)
        return (nan, 0.0 if nan else -p, str(layer) if rank is None else rank[layer])
    return [layer for layer, _ in sorted(psnr.items(), key=key)]


def _single_for(single, b):
    """The ``{layer: psnr}`` of width ``b`` from either that mapping or a full sweep result."""
    if not isinstance(single, Mapping) or not single:
        raise ValueError("single must be a non-empty mapping")
    if all(isinstance(v, Mapping) for v in single.values()):
        sweeps = _by_nbits(single, "single")
        if b not in sweeps:
            raise ValueError(f"single has no {b}-bit results (it has {sorted(sweeps)})")
        single = sweeps[b]
        if not single:
            raise ValueError(f"single[{b}] is empty")
    return single


def cumulative_sweep(measure, single, nbits, done=None, on_result=None, progress=True, tie_order=None):
    """Apple's cumulative sweep of one width: ``[(layer, psnr), ...]`` in palettization order.

    ``single`` is the ``{layer: psnr}`` of this width (or the whole ``single_layer_sweep`` result).
    Layers are ordered by ``sensitivity_order`` and palettized cumulatively: entry ``i`` is the
    PSNR with the first ``i + 1`` layers palettized to ``nbits``. ``done`` (the earlier partial
    list, or a ``{layer: psnr}`` dict) must be a prefix of that order; those values are reused
    without measuring. ``on_result(nbits, layer, psnr)`` is called after each measurement.
    ``tie_order``: as ``sensitivity_order``'s.
    """
    b = _nbits(nbits, allow_float=False)
    order = sensitivity_order(_single_for(single, b), tie_order)
    done = dict(done or {})
    if set(done) != set(order[:len(done)]):
        raise ValueError(f"done is not a prefix of the {b}-bit cumulative order (was single changed?)")
    out, assignment = [], {}
    todo = len(order) - len(done)
    with tqdm(total=todo, disable=not progress, desc=f"{b}-bit cumulative sweep", leave=False) as bar:
        for layer in order:
            assignment[layer] = b
            if layer in done:
                value = _measured(done[layer])
            else:
                value = _measured(measure(dict(assignment)))
                if on_result is not None:
                    on_result(b, layer, value)
                bar.set_postfix_str(f"{len(assignment)} layers: {value:.2f} dB", refresh=False)
                bar.update()
            out.append((layer, value))
    return out


def cumulative_sweeps(measure, single, nbits=NBITS, done=None, on_result=None, progress=True):
    """``cumulative_sweep`` for each width: ``{nbits: [(layer, psnr), ...]}``; ``done`` is
    ``{nbits: partial list}``."""
    done = _by_nbits(done or {}, "done")
    return {b: cumulative_sweep(measure, single, b, done=done.get(b), on_result=on_result,
                                progress=progress)
            for b in _nbits_list(nbits)}


def apple_thresholds(original_psnr, linear8_psnr, num=7):
    """Apple's recipe thresholds: ``np.linspace(original_psnr - 1, linear8_psnr + 5, num)``."""
    num = _positive_int("num", num)
    return np.linspace(float(original_psnr) - 1, float(linear8_psnr) + 5, num)


def apple_recipe(cumulative, threshold, default_nbits=FLOAT_BITS):
    """Apple's ``build_recipe``: ``{layer: nbits}`` for every layer of the cumulative sweeps.

    ``cumulative`` is ``{nbits: [(layer, psnr), ...]}`` (or ``{nbits: {layer: psnr}}``). Each layer
    gets the smallest width (ascending) whose cumulative PSNR at that layer is > ``threshold``
    (strictly; ``nan`` never is), else ``default_nbits`` (16: stays float), which is included in the
    result. A layer missing from a width's (partial) sweep cannot get that width.
    """
    sweeps = {b: dict(v) for b, v in _by_nbits(cumulative, "cumulative").items()}
    if not sweeps:
        raise ValueError("cumulative is empty")
    default = _nbits(default_nbits, allow_float=True)
    threshold = float(threshold)
    widths = sorted(sweeps)
    layers = list(dict.fromkeys(layer for b in widths for layer in sweeps[b]))
    recipe = {}
    for layer in layers:
        chosen = default
        for b in widths:
            p = sweeps[b].get(layer)
            if p is not None and float(p) > threshold:
                chosen = b
                break
        recipe[layer] = chosen
    return recipe


def apple_recipes(cumulative, original_psnr, linear8_psnr, num=7, default_nbits=FLOAT_BITS):
    """All of Apple's recipes, ``[recipe, ...]``: ``apple_recipe`` at each of ``apple_thresholds(
    original_psnr, linear8_psnr, num)`` in that order (largest threshold first). Recipes can
    repeat when no layer's choice changes between two thresholds."""
    return [apple_recipe(cumulative, t, default_nbits)
            for t in apple_thresholds(original_psnr, linear8_psnr, num)]


def apple_linear8(w):
    """Apple's "linear_8bit" baseline weight (``fake_linear_quantize(w)`` of its pre-analysis, copied
    there from coremltools 7.0b1): ``w`` as float16 (the pipeline's dtype), quantized to int8 with
    one scale and zero point for the whole tensor (its ``axis=-1`` leaves no axis out of the range),
    the range widened to hold 0:

        lo, hi = min(w, 0), max(w, 0);  zp = clip(round((-128 hi - 127 lo) / (hi - lo)), -128, 127)
        q = clip(round(w * 255 / (hi - lo)) + zp, -128, 127);  w' = (q - zp) * (hi - lo) / 255

    every step in float16 as NumPy does it for a float16 array. Returns float16 of ``w``'s shape."""
    v = np.asarray(w).astype(np.float16)
    if v.size == 0:
        raise ValueError("apple_linear8: empty weight")
    lo = np.minimum(np.float16(0), v.min())
    hi = np.maximum(np.float16(0), v.max())
    if hi == lo:   # an all-zero tensor: Apple's division would give NaN; it stays zero
        return v.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        zp = np.round((-128 * hi - 127 * lo) / (hi - lo))
        zp = np.clip(zp, -128, 127).astype(np.int8)
        scale = ((hi - lo) / np.float16(255)).astype(np.float16)
        q = np.round(v * 255 / (hi - lo)) + zp
        q = np.clip(q, -128, 127).astype(np.int8)
        return (q.astype(np.float16) - zp.astype(np.float16)) * scale


def average_bits(assignment, numel, cost_bits=None):
    """Bits per weight of ``assignment`` over all layers of ``numel`` (absent ones are float).

    By default Apple's count ``sum(nbits * numel) / sum(numel)`` (16 for float layers); with
    ``cost_bits(layer, nbits) -> bits`` the stored size of each layer instead (it is called with
    16 for float layers too), e.g. ``stored_bits(numel)`` with the LUTs and byte padding.
    """
    numel = _numel(numel)
    unknown = [layer for layer in assignment if layer not in numel]
    if unknown:
        raise ValueError(f"assignment has layers missing from numel: {unknown[:5]!r}")
    cost = _cost_fn(numel, cost_bits)
    total = sum(cost(layer, _nbits(assignment.get(layer, FLOAT_BITS))) for layer in numel)
    return total / sum(numel.values())


def stored_bits(numel, lut_bits=16):
    """``cost_bits`` of a per-tensor palette as ``quant.palettize`` stores it: packed indices
    (``ceil(numel * nbits / 8)`` bytes) plus a ``2**nbits``-entry LUT of ``lut_bits`` each;
    ``16 * numel`` for a float16 layer."""
    numel = _numel(numel)

    def cost(layer, nbits):
        b = _nbits(nbits)
        n = numel[layer]
        if b == FLOAT_BITS:
            return 16 * n
        return 8 * (-(-n * b // 8)) + lut_bits * 2 ** b
    return cost


# --- cheap sensitivity estimates -----------------------------------------------------------------

def _kmeans_dequantized(w, nbits):
    from . import palettize
    return np.asarray(palettize.kmeans(w, nbits).dequantize())


def fisher_estimate(weights, importance, nbits=NBITS, quantize=None):
    """Second-order loss increase of palettizing each layer alone: ``{nbits: {layer: float}}``,

        0.5 * sum(F * (w - q_b(w))**2)        (float64)

    with ``F = importance[layer]`` (e.g. ``sdjax.evaluation.fisher.fisher``) and ``q_b(w) =
    quantize(w, b)``, by default the per-tensor k-means palette ``quant.palettize.kmeans(w,
    b).dequantize()`` (which clusters the float16-rounded ``w``). Larger = more sensitive.
    """
    widths = _nbits_list(nbits)
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping {layer: array}")
    missing = [layer for layer in weights if layer not in importance]
    if missing:
        raise ValueError(f"importance is missing layers: {missing[:5]!r}")
    quantize = _kmeans_dequantized if quantize is None else quantize
    out = {b: {} for b in widths}
    for layer, w in weights.items():
        w64 = np.asarray(w, np.float64)
        f = np.asarray(importance[layer], np.float64)
        if f.shape != w64.shape:
            raise ValueError(f"importance[{layer!r}] has shape {f.shape}, the weight {w64.shape}")
        for b in widths:
            q = np.asarray(quantize(np.asarray(w), b), np.float64)
            out[b][layer] = float(0.5 * np.sum(f * np.square(w64 - q)))
    return out


def rank_agreement(measured_psnr, estimate):
    """Spearman rank correlation between sensitivity as measured (lower PSNR = more sensitive;
    nan = most sensitive) and as estimated (larger = more sensitive), over the layers in both:
    1.0 = the same ranking, -1.0 = reversed, nan if either side is constant."""
    from scipy.stats import spearmanr
    layers = [layer for layer in measured_psnr if layer in estimate]
    if len(layers) < 2:
        raise ValueError(f"rank_agreement needs at least 2 common layers, got {len(layers)}")
    measured = np.array([float(measured_psnr[layer]) for layer in layers])
    measured = -np.where(np.isnan(measured), -np.inf, measured)
    est = np.array([float(estimate[layer]) for layer in layers])
    if np.isnan(est).any():
        raise ValueError("estimate has nan values")
    if np.all(measured == measured[0]) or np.all(est == est[0]):
        return math.nan
    return float(spearmanr(measured, est).statistic)
