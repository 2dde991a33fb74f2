"""Which layers run W8A8: the multiply-accumulates of a layer and an allocator that puts as many of a
model's MACs on the int8 x int8 path as a quality floor allows.

The int8 path of a Neural Engine (A17 Pro, M4) speeds up a layer in proportion to its MACs, not its
weights, so the allocation weighs layers by MACs at the resolution that is run (``conv_macs``,
``linear_macs``: counted from shapes, padding included as the hardware computes it).

The error model is the mixed-bit allocator's (``quant.allocation``): a layer whose activations are
int8 alone reads ``single[l]`` dB against the float model, and the noise energies
``e_l = 10**(-single[l]/10) - 10**(-base/10)`` (``base``: the model with every layer's activations
float, here int8 weights everywhere) add up: ``psnr = -10 log10(e_base + sum_l e_l)``. Choosing the
layers is then a 0/1 knapsack: most MACs for a noise budget. Its greedy order, least energy per MAC
first (``order``), is what both searches walk:

- ``allocate_for_macs``: the least predicted noise with at least a fraction of the MACs int8 (the
  shortest prefix of the order reaching the fraction, then layers it no longer needs dropped, noisiest
  first) -- the recipe to compare with another at the same int8 share;
- ``allocate_for_quality``: the longest prefix whose *measured* PSNR (a callback) stays >= a floor,
  found by bisection on the prefix length.

Model-free: layers are names, ``measure`` is the caller's (``sdjax.evaluation.act_sensitivity``).
"""
from __future__ import annotations

import math

from tqdm.auto import tqdm

from .allocation import noise_energy

__all__ = ["allocate_for_macs", "allocate_for_quality", "conv_macs", "linear_macs", "mac_fraction", "order",
           "predicted_psnr"]


def conv_macs(weight_shape, input_shape, stride=1, padding=0):
    """MACs of one 2-D convolution: ``N * OH * OW * kh * kw * Cin * Cout``. ``weight_shape`` HWIO,
    ``input_shape`` NHWC, ``stride`` an int, ``padding`` an int or ``((top, bottom), (left, right))``;
    padded positions count (the hardware multiplies them)."""
    kh, kw, cin, cout = (int(v) for v in weight_shape)
    n, h, w, c = (int(v) for v in input_shape)
    if c != cin:
        raise ValueError(f"conv_macs: input has {c} channels, the weight {tuple(weight_shape)} expects {cin}")
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    (pt, pb), (pl, pr) = padding
    oh = (h + pt + pb - kh) // stride + 1
    ow = (w + pl + pr - kw) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"conv_macs: a {kh}x{kw} kernel does not fit the padded {h}x{w} input")
    return n * oh * ow * kh * kw * cin * cout


def linear_macs(weight_shape, input_shape):
    """MACs of ``x @ w`` for ``x`` of ``input_shape`` (..., in) and ``w`` (in, out)."""
    cin, cout = (int(v) for v in weight_shape)
    if int(input_shape[-1]) != cin:
        raise ValueError(f"linear_macs: input has {input_shape[-1]} features, the weight {tuple(weight_shape)} "
                         f"expects {cin}")
    return math.prod(int(v) for v in input_shape[:-1]) * cin * cout


def _macs(macs):
    if not isinstance(macs, dict) or not macs:
        raise ValueError("macs: a non-empty {layer: MACs} dict")
    bad = [k for k, v in macs.items() if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v))]
    if bad:
        raise ValueError(f"macs[{bad[0]!r}] = {macs[bad[0]]!r}: must be a finite number >= 0")
    if sum(macs.values()) <= 0:
        raise ValueError("macs: every layer has 0 MACs")
    return macs


def mac_fraction(chosen, macs):
    """The fraction of ``macs``' total that the layers in ``chosen`` hold."""
    macs = _macs(macs)
    unknown = [n for n in chosen if n not in macs]
    if unknown:
        raise ValueError(f"chosen layer {unknown[0]!r} has no MAC count")
    return sum(macs[n] for n in set(chosen)) / sum(macs.values())


def _energies(single, macs, base_psnr):
    missing = [n for n in macs if n not in single]
    if missing:
        raise ValueError(f"single has no PSNR for layer {missing[0]!r} (of {len(missing)} without one)")
    return {n: noise_energy(single[n], base_psnr) for n in macs}


def predicted_psnr(single, chosen, base_psnr=None):
    """``-10 log10(e_base + sum of the chosen layers' energies)`` (inf when nothing adds noise)."""
    total = (10.0 ** (-float(base_psnr) / 10)) if base_psnr is not None else 0.0
    total += sum(noise_energy(single[n], base_psnr) for n in chosen)
    return math.inf if total == 0 else -10 * math.log10(total)


def order(single, macs, base_psnr=None):
    """Layers of ``macs`` by noise energy per MAC, least first (ties: more MACs first, then name);
    layers with no MACs last; an unusable layer (NaN PSNR: infinite energy) is never listed."""
    e = _energies(single, _macs(macs), base_psnr)
    usable = [n for n in macs if math.isfinite(e[n])]

    def key(n):
        m = macs[n]
        return (m == 0, e[n] / m if m else math.inf, -m, n)
    return sorted(usable, key=key)


def allocate_for_macs(single, macs, fraction, base_psnr=None):
    """The layers to run W8A8 with the least predicted noise among greedy choices holding at least
    ``fraction`` of the MACs: the shortest prefix of ``order`` that reaches it, then each chosen layer,
    noisiest first, dropped while the rest still reach it. Returns a list in ``order``'s order.
    A fraction the usable layers cannot reach raises ValueError."""
    f = float(fraction)
    if not 0 <= f <= 1:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction!r}")
    seq = order(single, macs, base_psnr)
    total = sum(macs.values())
    need = f * total * (1 - 1e-12)
    chosen, held = [], 0.0
    for n in seq:
        if held >= need:
            break
        chosen.append(n)
        held += macs[n]
    if held < need:
        raise ValueError(f"fraction {f:.4f}: the usable layers hold only {held / total:.4f} of the MACs")
    e = _energies(single, macs, base_psnr)
    for n in sorted(chosen, key=lambda n: -e[n]):
        if held - macs[n] >= need:
            chosen.remove(n)
            held -= macs[n]
    return chosen


def allocate_for_quality(measure, single, macs, floor_psnr, base_psnr=None, progress=True):
    """The longest prefix of ``order`` whose measured PSNR (``measure(list of layers)``) is >=
    ``floor_psnr``, by bisection on the prefix length (the measured PSNR of a growing prefix is
    taken to fall monotonically, as the additive model says). Returns ``(layers, measured,
    mac_fraction, history)``; ``history``: every ``(prefix length, measured)`` in order. The empty
    prefix (nothing int8) is returned, unmeasured (``measured`` None), when even one layer misses."""
    floor = float(floor_psnr)
    if math.isnan(floor):
        raise ValueError("floor_psnr is nan")
    seq = order(single, macs, base_psnr)
    lo, hi = 0, len(seq)            # lo: longest prefix known to hold the floor; > hi: known to miss
    history, best = [], None
    with tqdm(total=max(1, math.ceil(math.log2(len(seq) + 1))), disable=not progress,
              desc="W8A8 allocation", leave=False) as bar:
        while lo < hi:
            k = (lo + hi + 1) // 2
            got = float(measure(list(seq[:k])))
            history.append((k, got))
            bar.update()
            if got >= floor:
                lo, best = k, got
            else:
                hi = k - 1
    chosen = list(seq[:lo])
    return chosen, best, mac_fraction(chosen, macs) if chosen else 0.0, history
