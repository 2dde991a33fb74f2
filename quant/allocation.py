"""Our mixed-bit allocator: the bits per layer that minimise the predicted output error at a size
(``allocate``), and the smallest size that meets a measured quality (``allocate_for_quality``).

The model (``quant.mixed_bit``'s docstring states it in full): the output errors of independently
palettized layers add up as noise energies ``e_l(b) = 10**(-psnr_l(b)/10) - 10**(-base_psnr/10)``,
so ``psnr = -10 log10(e_base + sum_l e_l(b_l))`` (``predicted_psnr``), and the allocation is a
multiple-choice knapsack over those energies and each width's stored bits.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from tqdm.auto import tqdm

from .mixed_bit import (FLOAT_BITS, NBITS, _by_nbits, _cost_fn, _measured, _nbits, _nbits_list, _numel,
                        _only_palettized, _positive_int, average_bits)

DEFAULT_BINS = 4096                  # least cost-axis resolution of allocate's dynamic programme
DP_CELLS = 20_000_000                # ... raised to use this many cells (layers x options x units)

__all__ = ["DEFAULT_BINS", "allocate", "allocate_for_quality", "noise_energy", "predicted_psnr"]


def noise_energy(psnr, base_psnr=None):
    """``10**(-psnr/10)`` less the base model's, clipped at 0 (``nan`` -> inf: unusable)."""
    p = float(psnr)
    if math.isnan(p):
        return math.inf
    e = 10.0 ** (-p / 10) if p != -math.inf else math.inf
    return max(e - _base_energy(base_psnr), 0.0)


def _base_energy(base_psnr):
    if base_psnr is None:
        return 0.0
    p = float(base_psnr)
    if math.isnan(p):
        raise ValueError("base_psnr is nan")
    return 10.0 ** (-p / 10)


def predicted_psnr(single, assignment, base_psnr=None):
    """``-10 log10(e_base + sum_l e_l(b_l))`` of ``assignment`` from the single-layer sweep
    ``{nbits: {layer: psnr}}`` (float layers add nothing; inf when nothing adds noise)."""
    sweeps = _by_nbits(single, "single")
    total = _base_energy(base_psnr)
    for layer, b in assignment.items():
        b = _nbits(b)
        if b == FLOAT_BITS:
            continue
        if b not in sweeps or layer not in sweeps[b]:
            raise ValueError(f"single has no {b}-bit PSNR for layer {layer!r}")
        total += noise_energy(sweeps[b][layer], base_psnr)
    if math.isnan(total):
        return math.nan
    return math.inf if total == 0 else -10 * math.log10(total)


class _Problem:
    """The knapsack: per layer, options (nbits, cost in bits, noise energy), padded to arrays."""

    def __init__(self, single, numel, cost_bits, nbits, include_float, base_psnr):
        numel = _numel(numel)
        widths = _nbits_list(nbits)
        sweeps = _by_nbits(single, "single")
        cost = _cost_fn(numel, cost_bits)
        candidates = set()
        for b in widths:
            candidates.update((sweeps.get(b) or {}).keys())
        unknown = [layer for layer in candidates if layer not in numel]
        if unknown:
            raise ValueError(f"single has layers missing from numel: {unknown[:5]!r}")
        if not candidates:
            raise ValueError(f"single has no results for the widths {widths}")
        self.layers = list(numel)
        self.numel = numel
        self.total_numel = sum(numel.values())
        self.base_energy = _base_energy(base_psnr)
        options = []
        for layer in self.layers:
            opts = []
            for b in widths:
                p = (sweeps.get(b) or {}).get(layer)
                if p is None:
                    continue
                e = noise_energy(p, base_psnr)
                if math.isfinite(e):
                    opts.append((b, cost(layer, b), e))
            if include_float or layer not in candidates:
                opts.append((FLOAT_BITS, cost(layer, FLOAT_BITS), 0.0))
            if not opts:
                raise ValueError(f"layer {layer!r} has no usable width: its PSNRs are nan/-inf and "
                                 "include_float is False")
            options.append(sorted(opts, key=lambda o: (o[1], o[2], o[0])))
        m = max(len(o) for o in options)
        n = len(self.layers)
        self.bits = np.full((n, m), -1, np.int64)
        self.cost = np.full((n, m), np.inf)
        self.err = np.full((n, m), np.inf)
        for i, opts in enumerate(options):
            for j, (b, c, e) in enumerate(opts):
                self.bits[i, j], self.cost[i, j], self.err[i, j] = b, c, e
        self.min_cost = float(self.cost.min(1).sum())
        self.max_cost = float(np.where(np.isfinite(self.cost), self.cost, -np.inf).max(1).sum())

    @property
    def min_avg(self):
        return self.min_cost / self.total_numel

    @property
    def max_avg(self):
        return self.max_cost / self.total_numel

    def totals(self, pick):
        rows = np.arange(len(pick))
        return float(self.cost[rows, pick].sum()), float(self.err[rows, pick].sum())

    def assignment(self, pick):
        return {layer: int(self.bits[i, j]) for i, (layer, j) in enumerate(zip(self.layers, pick))}

    def psnr(self, pick):
        total = self.totals(pick)[1] + self.base_energy
        return math.inf if total == 0 else -10 * math.log10(total)

    def budget_bits(self, budget_avg_bits):
        budget_avg_bits = float(budget_avg_bits)
        if math.isnan(budget_avg_bits):
            raise ValueError("budget_avg_bits is nan")
        if budget_avg_bits * self.total_numel < self.min_cost * (1 - 1e-12):
            raise ValueError(f"budget {budget_avg_bits:.6g} bits/weight is below the minimum "
                             f"{self.min_avg:.6g} bits/weight that these widths can reach")
        # a relative 1e-12 of slack: bits/weight times numel is not exactly the bits it came from
        return max(budget_avg_bits * self.total_numel * (1 + 1e-12), self.min_cost)


def _grid(values):
    """The gcd of integer-valued costs (0 if they are not all integers below 2**53)."""
    v = values[values > 0]
    if v.size == 0:
        return 0.0
    if not np.all(v == np.rint(v)) or v.max() >= 2.0 ** 53:
        return 0.0
    return float(np.gcd.reduce(np.rint(v).astype(np.int64)))


def _dp(prob, budget, bins, cells=DP_CELLS):
    """Exact MCKP on a discretised cost axis (see ``allocate``); returns the option per layer."""
    cost, err = prob.cost, prob.err
    n, m = cost.shape
    cmin = cost.min(1)
    excess = budget - float(cmin.sum())
    d = cost - cmin[:, None]                     # the extra cost of each option over the cheapest
    finite = np.isfinite(d)
    g = _grid(d[finite & (d <= excess * (1 + 1e-12))])
    bins = max(int(bins), cells // (n * m))
    exact = g > 0 and excess / g <= bins
    if excess <= 0 or g == 0 and not np.any(finite & (d > 0)):
        K, units = 0, np.where(finite & (d <= 0), 0, 1)
    elif exact:                                  # every cost is a multiple of the grid
        K = int(math.floor(excess / g + 1e-9))
        units = np.where(finite, np.rint(np.where(finite, d, 0) / g), K + 1)
    else:                                        # rounded up: a DP-feasible pick is truly feasible
        K = int(bins)
        step = excess / K
        units = np.where(finite, np.ceil(np.where(finite, d, 0) / step - 1e-9), K + 1)
    # The DP runs up to K + n units: the table then holds the optimum of every budget up to that,
    # and a larger k whose picks' true cost still fits recovers most of what rounding up wasted.
    top = K if exact or K == 0 else K + n
    units = np.minimum(units, top + 1).astype(np.int64)
    usable = finite & (units <= top)
    dp = np.zeros(top + 1)                       # min error with extra cost <= k units
    choice = np.empty((n, top + 1), np.int8)
    for i in range(n):
        new = np.full(top + 1, np.inf)
        ch = choice[i]
        for j in range(m):
            if not usable[i, j]:
                continue
            u = units[i, j]
            cand = dp[:top + 1 - u] + err[i, j]
            tgt = new[u:]
            better = cand < tgt
            tgt[better] = cand[better]
            ch[u:][better] = j
        dp = new
    ks = np.arange(K, top + 1)                   # reconstruct every candidate budget at once
    picks = np.empty((n, ks.size), np.int64)
    k = ks.copy()
    for i in range(n - 1, -1, -1):
        j = choice[i, k]
        picks[i] = j
        k -= units[i, j]
    rows = np.arange(n)[:, None]
    true_cost = cost[rows, picks].sum(0)
    true_err = np.where(true_cost <= budget, err[rows, picks].sum(0), np.inf)
    best = int(np.argmin(true_err))              # k = K (index 0) fits, up to float rounding
    return picks[:, best] if np.isfinite(true_err[best]) else np.argmin(cost, 1)


def _hulls(prob):
    """Per layer, the lower convex hull of its (cost, error) options as [(cost, err, option)]."""
    hulls = []
    for i in range(prob.cost.shape[0]):
        pts = sorted((c, e, j) for j, (c, e) in enumerate(zip(prob.cost[i], prob.err[i])) if np.isfinite(c))
        hull = []
        for c, e, j in pts:
            if hull and e >= hull[-1][1]:
                continue                         # dominated: costs more, no less error
            while len(hull) >= 2:
                (c0, e0, _), (c1, e1, _) = hull[-2], hull[-1]
                if (e1 - e0) * (c - c1) >= (e - e1) * (c1 - c0):
                    hull.pop()                   # not below the chord: off the convex hull
                else:
                    break
            hull.append((c, e, j))
        hulls.append(hull)
    return hulls


def _hull_greedy(prob, budget):
    """Lagrangian (convex-hull) greedy: apply hull segments in order of error saved per bit while
    they fit. Returns (pick, LP lower bound on the optimal error at this budget)."""
    hulls = _hulls(prob)
    pick = np.array([h[0][2] for h in hulls], np.int64)
    pos = [0] * len(hulls)
    left = budget - sum(h[0][0] for h in hulls)
    err = sum(h[0][1] for h in hulls)
    segments = sorted(((h[k + 1][1] - h[k][1]) / (h[k + 1][0] - h[k][0]), i, k)
                      for i, h in enumerate(hulls) for k in range(len(h) - 1))
    blocked, bound = set(), None
    for slope, i, k in segments:
        if i in blocked or pos[i] != k:
            continue
        dc = hulls[i][k + 1][0] - hulls[i][k][0]
        if dc <= left:
            left -= dc
            err += hulls[i][k + 1][1] - hulls[i][k][1]
            pos[i] = k + 1
            pick[i] = hulls[i][k + 1][2]
        else:
            if bound is None:                    # the LP relaxation takes a fraction of this one
                bound = err + slope * left
            blocked.add(i)
    return pick, (err if bound is None else bound)


def _fill(prob, pick, budget):
    """Spend what is left of the budget: repeatedly take the single-layer upgrade that fits with
    the most error saved per bit (free improvements first)."""
    pick = pick.copy()
    rows = np.arange(len(pick))
    cost, err = prob.cost, prob.err
    while True:
        cur_c, cur_e = cost[rows, pick], err[rows, pick]
        left = budget - cur_c.sum()
        dc = cost - cur_c[:, None]
        gain = cur_e[:, None] - err
        ok = np.isfinite(cost) & (gain > 0) & (dc <= left)
        if not ok.any():
            return pick
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ok, gain / np.maximum(dc, 1e-300), -np.inf)
        i, j = np.unravel_index(np.argmax(ratio), ratio.shape)
        pick[i] = j


def _exchange(prob, pick, budget):
    """Local search: one layer's upgrade paid for by downgrading others (those that free bits at
    the least error per bit, greedily), then ``_fill``; moves are kept while the error drops."""
    cost, err = prob.cost, prob.err
    n, m = cost.shape
    rows = np.arange(n)
    finite = np.isfinite(cost)
    best_e = prob.totals(pick)[1]
    for _ in range(n * m):
        cur_c, cur_e = cost[rows, pick], err[rows, pick]
        left = budget - cur_c.sum()
        freed = cur_c[:, None] - cost
        with np.errstate(invalid="ignore"):
            ratio = np.where(finite & (freed > 0), (err - cur_e[:, None]) / np.where(freed > 0, freed, 1), np.inf)
        down = np.argmin(ratio, 1)
        order = np.argsort(ratio[rows, down], kind="stable")
        order = order[np.isfinite(ratio[order, down[order]])]
        if order.size == 0:
            return pick
        f, lo = freed[order, down[order]], err[order, down[order]] - cur_e[order]
        cf, cl = np.cumsum(f), np.cumsum(lo)
        pos = np.full(n, -1)
        pos[order] = np.arange(order.size)
        need = cost - cur_c[:, None] - left
        gain = cur_e[:, None] - err
        I, J = np.nonzero(finite & (gain > 0) & (need > 0))
        if I.size == 0:
            return pick
        need = need[I, J]
        own = pos[I]
        f_own = np.where(own >= 0, f[np.maximum(own, 0)], 0.0)
        l_own = np.where(own >= 0, lo[np.maximum(own, 0)], 0.0)
        idx = np.searchsorted(cf, need)
        inside = (own >= 0) & (own <= idx)       # the upgraded layer cannot pay for itself
        idx = np.where(inside, np.searchsorted(cf, need + f_own), idx)
        ok = idx < order.size
        if not ok.any():
            return pick
        paid = np.where(ok, cl[np.minimum(idx, order.size - 1)] - np.where(inside, l_own, 0.0), np.inf)
        net = gain[I, J] - paid
        t = int(np.argmax(net))
        if not net[t] > 0:
            return pick
        trial = pick.copy()
        for k in order[:idx[t] + 1]:
            if k != I[t]:
                trial[k] = down[k]
        trial[I[t]] = J[t]
        trial = _fill(prob, trial, budget)
        c, e = prob.totals(trial)
        if c > budget or not e < best_e * (1 - 1e-12):
            return pick
        pick, best_e = trial, e
    return pick


def _solve(prob, budget_avg_bits, bins, cells=DP_CELLS):
    """(pick, info) of the best of the DP and the hull greedy (each improved by ``_fill`` and
    ``_exchange``)."""
    bins = _positive_int("bins", bins)
    budget = prob.budget_bits(budget_avg_bits)
    dp_pick = _exchange(prob, _fill(prob, _dp(prob, budget, bins, cells), budget), budget)
    hull_pick, bound = _hull_greedy(prob, budget)
    hull_pick = _exchange(prob, _fill(prob, hull_pick, budget), budget)
    best = min((prob.totals(p)[::-1], k) for k, p in enumerate((dp_pick, hull_pick)))[1]
    pick = (dp_pick, hull_pick)[best]
    c, e = prob.totals(pick)
    if c > budget * (1 + 1e-9):  # cannot happen: every step above keeps the budget
        raise AssertionError(f"allocation over budget: {c} > {budget}")
    return pick, dict(error=e, lower_bound=min(bound, e), cost_bits=c, budget_bits=budget,
                      solver=("dp", "hull")[best])


def allocate(single, numel, budget_avg_bits, cost_bits=None, nbits=NBITS, include_float=True,
             base_psnr=None, bins=DEFAULT_BINS):
    """The assignment ``{layer: nbits}`` (all layers of ``numel``; 16 = float) of least predicted
    error whose average bits (``average_bits`` with the same ``cost_bits``) is <= the budget.

    ``single`` is the single-layer sweep ``{nbits: {layer: psnr}}``; widths come from ``nbits``
    (those present in ``single``; nan/-inf PSNRs are unusable), plus float if ``include_float``.
    Layers of ``numel`` that ``single`` never measured (non-candidates) stay float and count in the
    budget. ``base_psnr``: see the module docstring.

    Why it beats Apple's recipes at equal size: Apple ranks layers by their PSNR alone, ignoring
    that compressing a big layer saves more bytes than compressing a small one; here each layer's
    noise energy ``e_l(b)`` is traded against its size in one knapsack, so error is spent where it
    buys the most bytes.

    Solver. ``sum_l e_l(b_l)`` is minimised subject to ``sum_l cost(l, b_l) <= budget`` by dynamic
    programming over the cost axis. Only each layer's cost *above its cheapest option* is
    discretised: the excess budget (what is left after every layer's cheapest option) is cut into
    ``K = max(bins, DP_CELLS / (n_layers * n_options))`` units (``bins`` = 4096 and ``DP_CELLS`` =
    2e7 table cells by default, so 13k units for 250 layers and 6 options, 500k for 7 layers).
    - If all extra costs are integer multiples of a common grid (their gcd) that needs at most
      ``K`` units, the grid is used and the DP is exact (always for a few layers with Apple's
      ``nbits * numel`` costs).
    - Otherwise each option's extra cost is rounded *up* to whole units of ``excess / K``, so the
      DP's solution at ``K`` units is feasible and optimal for the budget less ``n_layers *
      excess / K`` at worst (half that on average). To win back what the rounding wastes the table
      runs to ``K + n_layers`` units (one pass gives the optimum of every budget up to that), and
      the solution of the largest unit budget whose *true* cost fits is kept.
    The bytes still left are then spent greedily (the single-layer upgrade that saves the most
    error per bit, repeated), and a local search tries upgrades paid for by downgrading other
    layers. The Lagrangian convex-hull greedy (segments in order of error saved per bit, improved
    the same way) is solved as a cross-check, and the better of the two is returned.

    Measured: identical to brute force on 1500 random instances of 4-6 layers and 3-4 widths (the
    rounded DP alone at 4096 units, too); within 0.005 dB of the LP-relaxation lower bound on
    250-layer SD-sized instances, 30-45 ms a call. Budgets are compared with a relative slack of
    1e-12 (bits/weight times numel is not exactly the integer it came from).
    """
    prob = _Problem(single, numel, cost_bits, nbits, include_float, base_psnr)
    pick, _ = _solve(prob, budget_avg_bits, bins)
    return prob.assignment(pick)


def _predicted_budget(prob, target, lo, hi, bins, resolution):
    """The smallest budget in [lo, hi] whose allocation's predicted PSNR >= target (hi if none),
    with the DP at ``bins`` units only (a guess: a fraction of the time of a full solve)."""
    def psnr(budget):
        return prob.psnr(_solve(prob, budget, bins, cells=0)[0])
    if psnr(hi) < target:
        return hi
    if psnr(lo) >= target:
        return lo
    while hi - lo > resolution:
        mid = 0.5 * (lo + hi)
        if psnr(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def allocate_for_quality(measure, single, numel, target_psnr, cost_bits=None, tol_bits=0.05,
                         max_evals=12, progress=True, nbits=NBITS, include_float=True,
                         base_psnr=None, bins=DEFAULT_BINS):
    """The smallest average bits whose *measured* PSNR >= ``target_psnr``, searching the budget
    of ``allocate``: ``(assignment, measured_psnr, avg_bits, history)``.

    ``history`` lists every evaluation as ``(avg_bits, predicted_psnr, measured_psnr)`` in order
    (``avg_bits`` as ``average_bits`` counts it, which may be below the budget that produced it).

    Search: a bracket [lo, hi] of budgets, hi the smallest measured to meet the target. Each probe
    is the budget at which the *prediction* reaches the target corrected by the last probe's
    (predicted - measured) offset; if that is not inside the bracket, or the last two probes did
    not halve it, the probe is the midpoint instead (so the bracket at least halves every three
    probes); when the prediction points at hi itself, hi - ``tol_bits`` is probed to confirm the
    edge (the midpoint once the bracket is narrower than 2 ``tol_bits``). On the synthetic tests
    an exact prediction takes 2-3 evaluations, one 3 dB too optimistic 3-4. Stops when hi - lo <=
    ``tol_bits`` or after ``max_evals`` measurements (assignments already measured are not
    measured again). If nothing met the target, the
    evaluation with the highest measured PSNR is returned, with a warning.
    """
    prob = _Problem(single, numel, cost_bits, nbits, include_float, base_psnr)
    target = float(target_psnr)
    if math.isnan(target):
        raise ValueError("target_psnr is nan")
    tol = float(tol_bits)
    if not tol > 0:
        raise ValueError(f"tol_bits must be > 0, got {tol_bits!r}")
    max_evals = _positive_int("max_evals", max_evals)
    lo, hi = prob.min_avg, prob.max_avg
    hi_ok = False                                # has hi been measured to meet the target?
    lo_probed = False
    history, cache, evals = [], {}, []           # evals: (avg_bits, measured, assignment)
    offset, stalls = 0.0, 0
    best = None
    with tqdm(total=max_evals, disable=not progress, desc="allocate_for_quality", leave=False) as bar:
        for _ in range(4 * max_evals + 8):       # cached repeats do not count; bound them anyway
            if len(history) >= max_evals or (hi_ok and hi - lo <= tol):
                break
            width = hi - lo
            guess = _predicted_budget(prob, target + offset, lo, hi, bins, tol / 8)
            if hi_ok and guess >= hi - tol:
                guess = max(hi - tol, lo + 0.5 * (hi - lo) if lo_probed else lo)
            if stalls >= 2 or not (lo <= guess <= hi) or (lo_probed and guess <= lo):
                guess = 0.5 * (lo + hi)
                stalls = 0
            pick, _ = _solve(prob, guess, bins)
            assignment = prob.assignment(pick)
            key = tuple(int(j) for j in pick)
            bits = average_bits(assignment, prob.numel, cost_bits)
            predicted = prob.psnr(pick)
            if key in cache:
                measured = cache[key]
            else:
                measured = _measured(measure(_only_palettized(assignment)))
                cache[key] = measured
                history.append((bits, predicted, measured))
                evals.append((bits, measured, assignment))
                bar.set_postfix_str(f"{bits:.3f} bits: {measured:.2f} dB (predicted {predicted:.2f})",
                                    refresh=False)
                bar.update()
            if measured >= target:
                hi, hi_ok = min(bits, guess), True
                if best is None or bits < best[0]:
                    best = (bits, measured, assignment)
            else:
                lo, lo_probed = guess, True
                if guess >= prob.max_avg * (1 - 1e-12):
                    break                        # even the largest allocation misses the target
            if math.isfinite(predicted) and math.isfinite(measured):
                offset = predicted - measured
            stalls = stalls + 1 if hi - lo > 0.5 * width else 0
    if best is None:
        top = max(evals, key=lambda ev: (-math.inf if math.isnan(ev[1]) else ev[1], -ev[0]))
        warnings.warn(f"no evaluated allocation reached {target} dB (best {top[1]:.3f} dB at "
                      f"{top[0]:.3f} bits after {len(history)} evaluations)", RuntimeWarning,
                      stacklevel=2)
        best = top
    bits, measured, assignment = best
    return assignment, measured, bits, history
