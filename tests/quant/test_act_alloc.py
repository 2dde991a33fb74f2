"""W8A8 allocation (quant.act_alloc): MAC counts against XLA's own cost analysis, and the two searches on
a synthetic additive model whose truth is known (layer l at int8 activations adds noise energy a_l)."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant import act_alloc as aa


def _xla_flops(f, *args):
    c = jax.jit(f).lower(*args).compile().cost_analysis()
    return (c[0] if isinstance(c, list) else c)["flops"]


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 9, 7, 3), (3, 3, 3, 5), 1, ((1, 1), (1, 1))),
    ((1, 8, 8, 4), (3, 3, 4, 6), 2, ((0, 1), (0, 1))),
    ((1, 6, 5, 8), (1, 1, 8, 3), 1, 0)])
def test_macs_match_xla_cost_analysis(shape, kernel, stride, padding):
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    # XLA counts taps on real input only, so the padding is made real input (zeros) first; the hardware
    # multiplies padded positions too, which conv_macs counts: both must agree
    padded = jnp.pad(jnp.ones(shape), ((0, 0), pad[0], pad[1], (0, 0)))
    w = jnp.ones(kernel)
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), "VALID",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert 2 * aa.conv_macs(kernel, shape, stride, padding) == _xla_flops(conv, padded, w)
    x, m = jnp.ones((2, 77, 12)), jnp.ones((12, 20))
    assert 2 * aa.linear_macs(m.shape, x.shape) == _xla_flops(jnp.matmul, x, m)
    with pytest.raises(ValueError, match="input has 5 channels"):
        aa.conv_macs(kernel, shape[:-1] + (5,), stride, padding)


class Additive:
    """measure(layers) = -10 log10(base + sum of the layers' energies), exactly."""

    def __init__(self, n=9, seed=0, macs=None):
        rng = np.random.default_rng(seed)
        self.layers = [f"l{i}" for i in range(n)]
        self.a = dict(zip(self.layers, 10 ** rng.uniform(-6, -2, n)))
        self.macs = dict(zip(self.layers, (rng.integers(1, 1000, n) if macs is None else macs).tolist()))
        self.base = 1e-7
        self.calls = 0

    def psnr(self, layers):
        return -10 * math.log10(self.base + sum(self.a[n] for n in layers))

    def single(self):
        return {n: self.psnr([n]) for n in self.layers}

    def measure(self, layers):
        self.calls += 1
        return self.psnr(layers)


def test_allocate_for_macs_is_the_optimum_when_layers_cost_alike():
    m = Additive(macs=np.full(9, 100))
    base = m.psnr([])
    for f in (0.1, 0.34, 0.5, 1.0):
        got = aa.allocate_for_macs(m.single(), m.macs, f, base)
        assert aa.mac_fraction(got, m.macs) >= f - 1e-12
        # brute force: the least total energy over every subset holding the fraction
        best = min((s for k in range(10) for s in itertools.combinations(m.layers, k)
                    if sum(m.macs[n] for n in s) >= f * 900), key=lambda s: -m.psnr(s))
        assert m.psnr(got) == pytest.approx(m.psnr(best), abs=1e-9)
        assert aa.predicted_psnr(m.single(), got, base) == pytest.approx(m.psnr(got), abs=1e-6)


def test_allocate_for_macs_prunes_and_refuses_the_unreachable():
    m = Additive(seed=3)
    single, base = m.single(), m.psnr([])
    seq = aa.order(single, m.macs, base)
    for f in (0.2, 0.6, 0.9):
        got = aa.allocate_for_macs(single, m.macs, f, base)
        assert aa.mac_fraction(got, m.macs) >= f - 1e-12
        prefix = next(seq[:k] for k in range(len(seq) + 1) if aa.mac_fraction(seq[:k], m.macs) >= f - 1e-12)
        assert m.psnr(got) >= m.psnr(prefix) - 1e-12           # never worse than the plain greedy prefix
        for n in got:                                           # nothing left that the fraction does not need
            assert aa.mac_fraction([x for x in got if x != n], m.macs) < f - 1e-12
    single[m.layers[0]] = float("nan")                          # unusable: never chosen
    with pytest.raises(ValueError, match="hold only"):
        aa.allocate_for_macs(single, m.macs, 1.0, base)
    with pytest.raises(ValueError, match="no PSNR for layer 'l1'"):
        aa.order({"l0": 50.0}, m.macs)


def test_allocate_for_quality_finds_the_longest_prefix_holding_the_floor():
    m = Additive(n=13, seed=5)
    single, base = m.single(), m.psnr([])
    seq = aa.order(single, m.macs, base)
    for floor in (m.psnr(seq[:4]) - 1e-9, m.psnr(seq[:11]) + 1e-9, m.psnr(seq) - 1e-9, base + 1.0):
        m.calls = 0
        got, measured, frac, hist = aa.allocate_for_quality(m.measure, single, m.macs, floor, base, progress=False)
        want = max((k for k in range(len(seq) + 1) if k == 0 or m.psnr(seq[:k]) >= floor))
        assert got == seq[:want]
        assert m.calls == len(hist) <= math.ceil(math.log2(len(seq) + 1))
        assert (measured is None) == (want == 0) and frac == pytest.approx(aa.mac_fraction(got, m.macs) if got else 0)
