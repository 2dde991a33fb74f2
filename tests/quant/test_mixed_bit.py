"""Mixed-bit selection (quant.mixed_bit) on synthetic additive "models" whose truth is known:
layer l palettized to b bits adds the noise energy a_l * 4**-b, and the PSNR is
-10 log10(e_base + sum of the energies)."""
import itertools
import math

import numpy as np
import pytest

from quant import allocation as al, mixed_bit as mb


class Synthetic:
    """An additive model: measure(assignment) = -10 log10(base + sum_l a_l 4**-b_l), exactly."""

    def __init__(self, n_layers=8, seed=0, numel=None, a=None, base=0.0):
        rng = np.random.default_rng(seed)
        self.layers = [f"layer{i:02d}" for i in range(n_layers)]
        a = 10 ** rng.uniform(-3, 0, n_layers) if a is None else np.asarray(a, float)
        self.a = dict(zip(self.layers, a))
        if numel is None:
            numel = rng.integers(1_000, 200_000, n_layers)
        self.numel = {layer: int(n) for layer, n in zip(self.layers, numel)}
        self.base = base
        self.calls = []

    def energy(self, layer, b):
        return 0.0 if b == 16 else self.a[layer] * 4.0 ** -b

    def psnr(self, assignment):
        total = self.base + sum(self.energy(layer, b) for layer, b in assignment.items())
        return math.inf if total == 0 else -10 * math.log10(total)

    def measure(self, assignment):
        assert all(b != 16 for b in assignment.values()), "measure gets palettized layers only"
        self.calls.append(dict(assignment))
        return self.psnr(assignment)

    def base_psnr(self):
        return self.psnr({})


def brute_force(model, widths, budget_avg, include_float=True, cost=None):
    """(min total energy, its assignment) over every assignment within the budget."""
    cost = cost or (lambda layer, b: b * model.numel[layer])
    options = list(widths) + ([16] if include_float else [])
    combos = np.array(list(itertools.product(range(len(options)), repeat=len(model.layers))))
    c = np.array([[cost(layer, b) for b in options] for layer in model.layers], float)
    e = np.array([[model.energy(layer, b) for b in options] for layer in model.layers])
    rows = np.arange(len(model.layers))
    bits, energy = c[rows, combos].sum(1), e[rows, combos].sum(1)
    fits = bits <= budget_avg * sum(model.numel.values()) * (1 + 1e-12)
    if not fits.any():
        return math.inf, None
    best = np.flatnonzero(fits)[np.argmin(energy[fits])]
    return float(energy[best]), {layer: options[k] for layer, k in zip(model.layers, combos[best])}


def energy_of(model, assignment):
    return sum(model.energy(layer, b) for layer, b in assignment.items())


# --- sweeps ----------------------------------------------------------------------------------

def test_single_layer_sweep_values_and_calls():
    m = Synthetic(6, seed=1)
    out = mb.single_layer_sweep(m.measure, m.layers, progress=False)
    assert list(out) == list(mb.NBITS)
    for b in mb.NBITS:
        assert list(out[b]) == m.layers
        for layer in m.layers:
            assert out[b][layer] == pytest.approx(-10 * math.log10(m.a[layer] * 4.0 ** -b), rel=1e-12)
    assert len(m.calls) == len(m.layers) * len(mb.NBITS)
    assert sorted((layer, b) for c in m.calls for layer, b in c.items()) == sorted(
        itertools.product(m.layers, mb.NBITS))
    assert all(len(c) == 1 for c in m.calls)


def test_single_layer_sweep_resumes():
    m = Synthetic(5, seed=2)
    full = mb.single_layer_sweep(Synthetic(5, seed=2).measure, m.layers, progress=False)
    done = {"4": {m.layers[0]: full[4][m.layers[0]], m.layers[3]: full[4][m.layers[3]]},  # JSON keys
            8: dict(full[8])}
    seen = []
    out = mb.single_layer_sweep(m.measure, m.layers, done=done, progress=False,
                                on_result=lambda b, layer, v: seen.append((b, layer, v)))
    assert out == full
    expected = [(b, layer) for b in mb.NBITS for layer in m.layers
                if not (b == 8 or (b == 4 and layer in (m.layers[0], m.layers[3])))]
    assert [(b, layer) for b, layer, _ in seen] == expected
    assert [v for *_, v in seen] == [full[b][layer] for b, layer in expected]
    assert len(m.calls) == len(expected)
    # a subset of the layers and widths; done values for other layers are ignored
    out = mb.single_layer_sweep(m.measure, m.layers[:2], nbits=4, done=done, progress=False)
    assert out == {4: {layer: full[4][layer] for layer in m.layers[:2]}}


def apple_order(single):
    """Apple's descending_psnr_order (sorted by -psnr, a stable sort) over name-sorted layers."""
    return [k for k, _ in sorted(sorted(single.items()), key=lambda kv: -kv[1])]


def test_cumulative_sweep_is_apples_order():
    a = [0.5, 0.01, 0.2, 0.01, 0.9, 0.05]          # two ties: broken by name
    m = Synthetic(6, seed=3, a=a)
    single = mb.single_layer_sweep(m.measure, m.layers, nbits=(2, 4), progress=False)
    m.calls.clear()
    cum = mb.cumulative_sweep(m.measure, single, 4, progress=False)
    order = apple_order(single[4])
    assert [layer for layer, _ in cum] == order == mb.sensitivity_order(single[4])
    assert order[:2] == ["layer01", "layer03"]
    for i, (layer, value) in enumerate(cum):
        assert m.calls[i] == {x: 4 for x in order[:i + 1]}
        assert value == m.psnr({x: 4 for x in order[:i + 1]})
    # the {layer: psnr} of one width works too, and done= resumes a prefix
    m.calls.clear()
    seen = []
    again = mb.cumulative_sweep(m.measure, single[4], 4, done=cum[:3], progress=False,
                                on_result=lambda b, layer, v: seen.append((b, layer, v)))
    assert again == cum
    assert len(m.calls) == 3 and seen == [(4, layer, v) for layer, v in cum[3:]]
    with pytest.raises(ValueError, match="prefix"):
        mb.cumulative_sweep(m.measure, single, 4, done=cum[1:3], progress=False)
    both = mb.cumulative_sweeps(m.measure, single, nbits=(2, 4), done={"4": cum}, progress=False)
    assert both[4] == cum and [layer for layer, _ in both[2]] == apple_order(single[2])


def test_nan_and_inf_in_sweeps():
    m = Synthetic(5, seed=4)

    def measure(assignment):
        if "layer01" in assignment and assignment["layer01"] <= 2:
            return math.nan                          # e.g. a diverged run
        if assignment == {"layer03": 8}:
            return math.inf                          # bit-exact
        return m.measure(assignment)

    single = mb.single_layer_sweep(measure, m.layers, progress=False)
    assert math.isnan(single[1]["layer01"]) and math.isnan(single[2]["layer01"])
    assert single[8]["layer03"] == math.inf
    order = mb.sensitivity_order(single[2])
    assert order[-1] == "layer01"                    # nan: the most sensitive
    assert mb.sensitivity_order(single[8])[0] == "layer03"  # inf: the least
    cum = {b: mb.cumulative_sweep(measure, single, b, progress=False) for b in mb.NBITS}
    assert math.isnan(dict(cum[2])["layer01"])
    recipe = mb.apple_recipe(cum, -100.0)            # every finite PSNR passes; nan never does
    assert recipe["layer01"] == 4 and all(recipe[x] == 1 for x in m.layers if x != "layer01")
    # the allocator never picks a nan width
    total = sum(m.numel.values())
    lowest = (total + 3 * m.numel["layer01"]) / total         # layer01 cannot go below 4 bits
    with pytest.raises(ValueError, match="below the minimum"):
        al.allocate(single, m.numel, 1.0)
    for budget in (lowest, 1.5 * lowest, 2.0, 3.0):
        got = al.allocate(single, m.numel, budget)
        assert got["layer01"] not in (1, 2)
    assert al.predicted_psnr(single, {"layer03": 8}) == math.inf
    assert al.predicted_psnr({1: {"a": math.nan}}, {"a": 1}) == -math.inf


# --- Apple's recipes -------------------------------------------------------------------------

def test_apple_thresholds_are_linspace():
    np.testing.assert_array_equal(mb.apple_thresholds(30.0, 20.0), np.linspace(29.0, 25.0, 7))
    np.testing.assert_array_equal(mb.apple_thresholds(41.5, 33.25, num=4), np.linspace(40.5, 38.25, 4))


def apple_build_recipe(cumulative, sizes, threshold, default_nbits, nbits=(1, 2, 4, 6, 8)):
    """Apple's build_recipe restated (one prompt's PSNR per layer instead of a list)."""
    recipe, total = {}, 0
    for key in cumulative[nbits[0]]:
        achieved = default_nbits
        for b in nbits:
            if cumulative[b][key] > threshold:
                achieved = b
                break
        recipe[key] = achieved
        total += achieved * sizes[key]
    return recipe, total / sum(sizes.values())


def test_apple_recipe_matches_a_restatement():
    m = Synthetic(7, seed=5, base=1e-5)
    single = mb.single_layer_sweep(m.measure, m.layers, progress=False)
    cum = mb.cumulative_sweeps(m.measure, single, progress=False)
    original, linear8 = m.base_psnr(), m.psnr({x: 8 for x in m.layers})
    thresholds = list(mb.apple_thresholds(original, linear8)) + [v for _, v in cum[4][:3]]
    as_dicts = {b: dict(v) for b, v in cum.items()}
    for t in thresholds:                              # includes thresholds equal to values: strict >
        for default in (16, 8):
            recipe = mb.apple_recipe(cum, t, default_nbits=default)
            expected, bits = apple_build_recipe(as_dicts, m.numel, t, default)
            assert recipe == expected
            assert mb.average_bits(recipe, m.numel) == pytest.approx(bits, rel=1e-12)
    recipes = mb.apple_recipes(cum, original, linear8)
    assert recipes == [mb.apple_recipe(cum, t) for t in mb.apple_thresholds(original, linear8)]
    # json round trip: string keys, lists of pairs
    as_json = {str(b): [list(p) for p in v] for b, v in cum.items()}
    assert mb.apple_recipe(as_json, thresholds[3]) == mb.apple_recipe(cum, thresholds[3])


def test_average_bits():
    numel = {"a": 100, "b": 300, "c": 600}
    assert mb.average_bits({"a": 4, "b": 8, "c": 2}, numel) == pytest.approx((400 + 2400 + 1200) / 1000)
    assert mb.average_bits({"a": 4}, numel) == pytest.approx((400 + 16 * 900) / 1000)   # absent: float
    cost = mb.stored_bits(numel)
    assert cost("a", 4) == 8 * 50 + 16 * 16 and cost("a", 3) == 8 * 38 + 16 * 8 and cost("a", 16) == 1600
    assert mb.average_bits({"a": 4, "b": 16, "c": 1}, numel, cost) == pytest.approx(
        (8 * 50 + 256 + 16 * 300 + 8 * 75 + 32) / 1000)
    with pytest.raises(ValueError, match="missing from numel"):
        mb.average_bits({"z": 4}, numel)


# --- the allocator ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_allocate_is_optimal_against_brute_force(seed):
    widths = [(1, 2, 4), (2, 4, 8), (1, 4, 6, 8)][seed % 3]
    include_float = seed != 3
    rng = np.random.default_rng(100 + seed)
    # integer multiples of a grid: the DP is exact; arbitrary sizes: rounded, then recovered
    for numel in (rng.integers(1, 40, 6) * 1000, rng.integers(1_000, 100_000, 6)):
        m = Synthetic(6, seed=seed, numel=numel)
        single = mb.single_layer_sweep(m.measure, m.layers, nbits=widths, progress=False)
        prob = al._Problem(single, m.numel, None, widths, include_float, None)
        lo, hi = prob.min_avg, prob.max_avg
        for budget in np.linspace(lo, hi, 9)[:-1] + rng.uniform(0, (hi - lo) / 8, 8):
            got = al.allocate(single, m.numel, budget, nbits=widths, include_float=include_float)
            assert mb.average_bits(got, m.numel) <= budget * (1 + 1e-12)
            best, _ = brute_force(m, widths, budget, include_float)
            assert energy_of(m, got) == pytest.approx(best, rel=1e-9, abs=1e-300)
            # coarse bins exercise the rounded DP alone: it keeps the guarantee of optimality
            # at the budget less one unit per layer
            pick = al._dp(prob, prob.budget_bits(budget), 16, cells=0)
            c, e = prob.totals(pick)
            assert c <= budget * prob.total_numel * (1 + 1e-12)
            unit = (budget - lo) * prob.total_numel / 16
            worse, _ = brute_force(m, widths, budget - len(m.layers) * unit / prob.total_numel, include_float)
            assert e <= worse * (1 + 1e-9)


def test_allocate_respects_the_budget_with_stored_sizes():
    m = Synthetic(12, seed=7, numel=np.geomspace(2_000, 2_000_000, 12).astype(int))
    single = mb.single_layer_sweep(m.measure, m.layers, progress=False)
    cost = mb.stored_bits(m.numel)
    previous = math.inf
    for budget in np.linspace(1.02, 16, 25):
        got = al.allocate(single, m.numel, budget, cost_bits=cost)
        assert set(got) == set(m.layers)
        assert mb.average_bits(got, m.numel, cost) <= budget * (1 + 1e-12)
        e = energy_of(m, got)
        assert e <= previous * (1 + 1e-9)            # more budget never hurts
        previous = e
        assert al.predicted_psnr(single, got) == pytest.approx(m.psnr(got), rel=1e-9)
    assert all(b == 16 for b in al.allocate(single, m.numel, 16.0).values())


def test_allocate_with_base_psnr_and_non_candidates():
    m = Synthetic(6, seed=8, base=3e-6)
    single = mb.single_layer_sweep(m.measure, m.layers[:4], progress=False)  # layers 4, 5: not candidates
    base = m.base_psnr()
    for budget in (6.0, 9.0, 12.0):
        got = al.allocate(single, m.numel, budget, base_psnr=base)
        assert got["layer04"] == got["layer05"] == 16
        assert al.predicted_psnr(single, got, base_psnr=base) == pytest.approx(m.psnr(got), rel=1e-9)
        # the same as the best over the candidates alone, with what the float layers leave
        fixed = 16 * (m.numel["layer04"] + m.numel["layer05"])
        sub = Synthetic(4, numel=[m.numel[x] for x in m.layers[:4]], a=[m.a[x] for x in m.layers[:4]])
        rest = (budget * sum(m.numel.values()) - fixed) / sum(sub.numel.values())
        best, _ = brute_force(sub, mb.NBITS, rest)
        assert energy_of(m, got) == pytest.approx(best, rel=1e-9)
        assert mb.average_bits(got, m.numel) <= budget
    # the floor is not counted per layer: without base_psnr the palettized layers look worse
    biased = al.predicted_psnr(single, {x: 8 for x in m.layers[:4]})
    assert biased < al.predicted_psnr(single, {x: 8 for x in m.layers[:4]}, base_psnr=base)


def apple_pipeline(m, single, wide=False):
    """Apple's recipes on the synthetic model: its own thresholds (from the float and all-8-bit
    PSNRs; on these models they give near-float recipes), or with ``wide`` 12 thresholds across
    the whole range of cumulative PSNRs (every size Apple's rule can produce)."""
    cum = mb.cumulative_sweeps(m.measure, single, progress=False)
    original, linear8 = m.base_psnr(), m.psnr({x: 8 for x in m.layers})
    recipes = mb.apple_recipes(cum, original, linear8)
    if wide:
        values = [v for sweep in cum.values() for _, v in sweep]
        recipes += [mb.apple_recipe(cum, t) for t in np.linspace(min(values), max(values), 12)]
    return recipes


def margins_over_apple(m, single, wide=True):
    out = []
    for recipe in apple_pipeline(m, single, wide):
        bits = mb.average_bits(recipe, m.numel)
        ours = al.allocate(single, m.numel, bits, base_psnr=m.base_psnr())
        assert mb.average_bits(ours, m.numel) <= bits * (1 + 1e-12)
        out.append(m.psnr(ours) - m.psnr(recipe))
    return np.array(out)


@pytest.mark.parametrize("seed", range(3))
def test_allocate_beats_apple_at_equal_bits(seed):
    m = Synthetic(10, seed=20 + seed, base=1e-6)
    single = mb.single_layer_sweep(m.measure, m.layers, progress=False)
    assert margins_over_apple(m, single).min() >= -1e-9


def test_allocate_beats_apple_by_a_margin_when_sizes_vary():
    # 40 small layers a little less sensitive than 2 big ones: Apple palettizes the small ones
    # first at every width (few bytes), so to reach a size it must give them few bits; the
    # knapsack spends those bits on the big layers instead
    numel = [10_000] * 40 + [2_000_000] * 2
    a = [0.02] * 40 + [0.05] * 2
    m = Synthetic(42, numel=numel, a=a, base=1e-7)
    single = mb.single_layer_sweep(m.measure, m.layers, progress=False)
    margins = margins_over_apple(m, single)
    assert margins.min() >= -1e-9
    assert margins.max() > 10.0 and np.median(margins) > 3.0, margins


def test_allocate_for_quality_finds_the_smallest_size():
    m = Synthetic(7, seed=11, numel=np.random.default_rng(1).integers(1, 50, 7) * 1000, base=1e-6)
    single = mb.single_layer_sweep(m.measure, m.layers, progress=False)
    base = m.base_psnr()
    for target in (20.0, 30.0, 40.0):
        m.calls.clear()
        got, measured, bits, history = al.allocate_for_quality(
            m.measure, single, m.numel, target, base_psnr=base, progress=False)
        assert measured >= target and measured == m.psnr(got)
        assert bits == pytest.approx(mb.average_bits(got, m.numel))
        assert len(history) == len(m.calls) <= 12
        for (b, predicted, meas), call in zip(history, m.calls):
            assert meas == m.psnr(call)
            assert predicted == pytest.approx(meas, rel=1e-9)   # the additive model is exact
        assert (bits, measured) in [(b, v) for b, _, v in history]
        # no assignment meets the target with tol_bits fewer bits
        options = list(mb.NBITS) + [16]
        combos = np.array(list(itertools.product(options, repeat=len(m.layers))))
        n = np.array([m.numel[x] for x in m.layers])
        a = np.array([m.a[x] for x in m.layers])
        psnr = -10 * np.log10(m.base + (a * np.where(combos == 16, 0.0, 4.0 ** -combos)).sum(1))
        smallest = ((combos * n).sum(1) / n.sum())[psnr >= target].min()
        assert smallest <= bits <= smallest + 0.05


def test_allocate_for_quality_with_an_imperfect_prediction():
    # interactions: the measured PSNR is 1.5 dB + 5% per palettized layer below the additive sum
    m = Synthetic(9, seed=12, base=1e-6)
    single = mb.single_layer_sweep(m.measure, m.layers, progress=False)

    def measure(assignment):
        e = m.base + energy_of(m, assignment) * (1.4 + 0.05 * len(assignment))
        return -10 * math.log10(e)

    got, measured, bits, history = al.allocate_for_quality(
        measure, single, m.numel, 35.0, base_psnr=m.base_psnr(), progress=False, tol_bits=0.05)
    assert measured >= 35.0 and len(history) <= 12
    assert all(meas < pred for _, pred, meas in history)
    assert any(meas < 35.0 for *_, meas in history)
    fewer = al.allocate(single, m.numel, bits - 0.05, base_psnr=m.base_psnr())
    assert measure({x: b for x, b in fewer.items() if b != 16}) < 35.0
    # unreachable: a warning, and the best evaluation
    with pytest.warns(RuntimeWarning, match="no evaluated allocation"):
        _, measured, _, history = al.allocate_for_quality(
            lambda a: 10.0, single, m.numel, 35.0, progress=False, max_evals=4)
    assert measured == 10.0 and len(history) <= 4


# --- sensitivity estimates -------------------------------------------------------------------

def test_fisher_estimate_matches_a_direct_computation():
    from quant import palettize
    rng = np.random.default_rng(3)
    weights = {"a": rng.standard_normal((16, 8)).astype(np.float32),
               "b": (0.1 * rng.standard_normal((3, 3, 4, 8))).astype(np.float32)}
    importance = {k: rng.uniform(0, 2, w.shape) for k, w in weights.items()}
    est = mb.fisher_estimate(weights, importance, nbits=(2, 4))
    for b in (2, 4):
        for k, w in weights.items():
            q = np.asarray(palettize.kmeans(w, b).dequantize(), np.float64)
            direct = 0.5 * np.sum(importance[k] * (w.astype(np.float64) - q) ** 2)
            assert est[b][k] == pytest.approx(direct, rel=1e-12)
            assert est[b][k] > 0
        assert est[2]["a"] > est[4]["a"]
    # a custom quantizer: rounding to a grid of 2**-b
    est = mb.fisher_estimate(weights, importance, nbits=4, quantize=lambda w, b: np.round(w * 2 ** b) / 2 ** b)
    q = np.round(weights["a"] * 16) / 16
    assert est[4]["a"] == pytest.approx(0.5 * np.sum(importance["a"] * (weights["a"] - q.astype(np.float64)) ** 2))
    with pytest.raises(ValueError, match="shape"):
        mb.fisher_estimate(weights, {"a": importance["a"], "b": importance["a"]}, nbits=4)


def test_rank_agreement():
    psnr = {"a": 30.0, "b": 20.0, "c": 40.0, "d": 25.0}
    same = {"a": 2.0, "b": 10.0, "c": 0.5, "d": 4.0}       # lower PSNR <-> larger loss
    reversed_ = {k: -v for k, v in same.items()}
    assert mb.rank_agreement(psnr, same) == pytest.approx(1.0)
    assert mb.rank_agreement(psnr, reversed_) == pytest.approx(-1.0)
    assert mb.rank_agreement({**psnr, "c": math.nan}, {**same, "c": 100.0}) == pytest.approx(1.0)
    assert mb.rank_agreement(psnr, {**same, "zz": 1.0}) == pytest.approx(1.0)   # common layers only


# --- bad input -------------------------------------------------------------------------------

def test_bad_input():
    m = Synthetic(4, seed=13)
    single = mb.single_layer_sweep(m.measure, m.layers, progress=False)
    for bad in (5, 0, 7, 32, True, "x", 2.0):
        with pytest.raises(ValueError, match="unknown nbits"):
            mb.single_layer_sweep(m.measure, m.layers, nbits=(4, bad), progress=False)
        with pytest.raises(ValueError, match="unknown nbits"):
            al.allocate(single, m.numel, 8.0, nbits=(bad,))
        with pytest.raises(ValueError, match="unknown nbits"):
            mb.apple_recipe({4: [("layer00", 30.0)]}, 20.0, default_nbits=bad)
        with pytest.raises(ValueError, match="unknown nbits"):
            mb.average_bits({"layer00": bad}, m.numel)
    with pytest.raises(ValueError, match="unknown nbits"):       # 16 is no palette: nothing to sweep
        mb.single_layer_sweep(m.measure, m.layers, nbits=16, progress=False)
    with pytest.raises(ValueError, match="unknown nbits"):
        mb.cumulative_sweep(m.measure, single, 5, progress=False)
    with pytest.raises(ValueError, match="unknown nbits"):
        mb.apple_recipe({5: [("layer00", 30.0)]}, 20.0)
    with pytest.raises(ValueError, match="empty"):
        mb.single_layer_sweep(m.measure, [], progress=False)
    with pytest.raises(ValueError, match="empty"):
        mb.single_layer_sweep(m.measure, m.layers, nbits=(), progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        mb.single_layer_sweep(m.measure, ["a", "a"], progress=False)
    assert mb.average_bits({x: 1 for x in m.layers}, m.numel) == 1.0
    with pytest.raises(ValueError, match=r"budget 0\.9 bits/weight is below the minimum 1 bits/weight"):
        al.allocate(single, m.numel, 0.9)
    with pytest.raises(ValueError, match=r"budget 3\.5 bits/weight is below the minimum 4 bits/weight"):
        al.allocate(single, m.numel, 3.5, nbits=(4, 8))
    assert set(al.allocate(single, m.numel, 4.0, nbits=(4, 8)).values()) == {4}
    with pytest.raises(ValueError, match="missing from numel"):
        al.allocate(single, {"layer00": 10}, 8.0)
    with pytest.raises(ValueError, match="positive integer"):
        al.allocate(single, {**m.numel, "layer00": 0}, 8.0)
    with pytest.raises(ValueError, match="rank_agreement needs at least 2"):
        mb.rank_agreement({"a": 1.0}, {"a": 2.0})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apple_linear8_is_per_tensor_asymmetric_int8_of_the_float16_weight(seed):
    """Apple's fake_linear_quantize(w) (axis=-1 reduces over every axis): one scale and zero point for
    the tensor, the range widened to hold 0, against a float64 statement of it (float16 arithmetic in
    Apple's code moves a value by at most one step)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((3, 3, 16, 24)) * 0.05 + [0.0, 0.02, -0.3][seed]).astype(np.float32)
    got = mb.apple_linear8(w)
    assert got.dtype == np.float16 and got.shape == w.shape
    v = w.astype(np.float16).astype(np.float64)
    lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
    zp = np.clip(np.round((-128 * hi - 127 * lo) / (hi - lo)), -128, 127)
    q = np.clip(np.round(v * 255 / (hi - lo)) + zp, -128, 127)
    want = (q - zp) * (hi - lo) / 255
    step = (hi - lo) / 255
    ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)  # float16 rounding of a result
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= step + 2 * ulp) and np.mean(err <= 2 * ulp) > 0.9
    assert len(np.unique(got)) <= 256 and np.all(np.abs(got.astype(np.float64) - v) <= step / 2 + 2 * ulp)
    assert np.array_equal(mb.apple_linear8(np.zeros((4, 4))), np.zeros((4, 4), np.float16))


def test_sensitivity_order_ties_follow_the_given_order():
    """Apple's stable sort keeps its candidates' (module) order among equal PSNRs."""
    psnr = {"b": 50.0, "a": 50.0, "c": 60.0, "d": float("nan")}
    assert mb.sensitivity_order(psnr) == ["c", "a", "b", "d"]
    assert mb.sensitivity_order(psnr, tie_order=["d", "c", "b", "a"]) == ["c", "b", "a", "d"]
    with pytest.raises(ValueError, match="tie_order is missing layers"):
        mb.sensitivity_order(psnr, tie_order=["a", "b"])
