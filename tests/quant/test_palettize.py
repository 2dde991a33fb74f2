"""k-means palettization, checked against things we did not write: brute force over all partitions,
coremltools (its vendored exact kmeans1d, its palettize_weights pass, its bit packer) and the float
path of sdjax's primitives."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant.palettize import (SUPPORTED_NBITS, PalettizedWeight, coremltools_kmeans, kmeans, kmeans_1d, pack_bits,
                             unpack_bits)
from sdjax import nn

ct = pytest.importorskip("coremltools")
from coremltools._deps import kmeans1d as ct_kmeans1d  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types as mil_types  # noqa: E402
from coremltools.optimize import _utils as ct_utils  # noqa: E402
from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig  # noqa: E402
from coremltools.optimize.coreml._quantization_passes import palettize_weights as ct_palettize  # noqa: E402


def objective(x, c, bounds):
    """Weighted squared error of contiguous clusters around their weighted means, float64."""
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
    return sum(float(c[s:e] @ (x[s:e] - np.average(x[s:e], weights=c[s:e])) ** 2)
               for s, e in zip(bounds[:-1], bounds[1:]))


def sqnr(w, wq):
    w = np.asarray(w, np.float64)
    return 10 * np.log10(np.sum(w * w) / np.sum((w - np.asarray(wq, np.float64)) ** 2))


def heavy(rng, shape, kind):
    """Test tensors: Gaussian, Laplace, Student-t (df 2) and Gaussian with 0.1% large outliers."""
    if kind == "normal":
        a = rng.standard_normal(shape)
    elif kind == "laplace":
        a = rng.laplace(size=shape)
    elif kind == "student":
        a = rng.standard_t(2, size=shape)
    else:
        a = rng.standard_normal(shape) * np.where(rng.random(shape) < 1e-3, 40.0, 1.0)
    return (a * 0.02).astype(np.float16)


# --- (a) the exact solver ------------------------------------------------------------------------

def test_kmeans_1d_equals_brute_force_over_all_partitions():
    rng = np.random.default_rng(0)
    for t in range(250):
        n, k = int(rng.integers(1, 15)), int(rng.integers(1, 6))
        pool = np.arange(-7, 8) * 0.5 if t % 2 else rng.standard_normal(40)  # ties on the grid
        x = np.sort(rng.choice(pool, n, replace=False))
        c = rng.integers(1, 5, n).astype(float) if t % 3 else rng.random(n) + 1e-3
        bounds, centroids = kmeans_1d(x, c, k)
        kk = min(k, n)
        assert len(bounds) == kk + 1 and bounds[0] == 0 and bounds[-1] == n and np.all(np.diff(bounds) > 0)
        seg = np.full((n + 1, n + 1), np.inf)  # seg[s, e]: cost of one cluster x[s:e]
        for s_, e in itertools.combinations(range(n + 1), 2):
            seg[s_, e] = objective(x, c, (s_, e))
        cuts = list(itertools.combinations(range(1, n), kk - 1))
        cuts = np.array(cuts, int).reshape(len(cuts), kk - 1)
        b = np.concatenate([np.zeros((len(cuts), 1), int), cuts, np.full((len(cuts), 1), n)], 1)
        best = seg[b[:, :-1], b[:, 1:]].sum(1).min()  # every partition into kk contiguous clusters
        assert objective(x, c, bounds) <= best * (1 + 1e-12) + 1e-15
        means = [np.average(x[s:e], weights=c[s:e]) for s, e in zip(bounds[:-1], bounds[1:])]
        np.testing.assert_allclose(centroids, means, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [2, 16, 64])
def test_kmeans_1d_equals_coremltools_smawk(k):
    """Same optimum as coremltools' vendored kmeans1d (exact, SMAWK, C++), counts and real weights."""
    rng = np.random.default_rng(k)
    x = np.unique(heavy(rng, 40_000, "student")).astype(np.float64)
    for c in (rng.integers(1, 50, x.size).astype(float), rng.random(x.size) ** 3 + 1e-6):
        ours = objective(x, c, kmeans_1d(x, c, k)[0])
        clusters = np.asarray(ct_kmeans1d.cluster(x, k, weights=c).clusters)
        theirs = objective(x, c, np.r_[0, np.flatnonzero(np.diff(clusters)) + 1, x.size])
        assert ours <= theirs * (1 + 1e-9)
        assert ours >= theirs * (1 - 1e-9)


def test_few_distinct_values_are_lossless_and_signed_zeros_are_one_value():
    rng = np.random.default_rng(1)
    w = rng.choice(np.array([-0.0, 0.0, 0.5, -1.25, 3.0], np.float16), (40, 24))
    for nbits in (2, 3, 8):
        np.testing.assert_array_equal(np.asarray(kmeans(w, nbits).dequantize()), w.astype(np.float32))


def test_accepts_jax_and_bfloat16_arrays_as_their_float16_values():
    w = jnp.asarray(np.random.default_rng(2).standard_normal((48, 40)), jnp.bfloat16)
    ref = kmeans(np.asarray(w, np.float32).astype(np.float16), 4)
    got = kmeans(w, 4)
    np.testing.assert_array_equal(got.packed, ref.packed)
    np.testing.assert_array_equal(got.lut, ref.lut)


# --- (b) quality against coremltools' palettize_weights ----------------------------------------

def coreml_palettize(w, nbits, group_size=None):
    """Dense weight (sdjax layout) after coremltools' palettize_weights pass on a one-op program."""
    wt = np.ascontiguousarray(w.T)  # torch layout (out, in) of a linear layer

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, wt.shape[1]), dtype=mil_types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=wt)

    kw = {} if group_size is None else dict(granularity="per_grouped_channel", group_size=group_size,
                                             channel_axis=0)
    config = OpPalettizerConfig(mode="kmeans", nbits=nbits, weight_threshold=0, **kw)
    ct_palettize(config=OptimizationConfig(global_config=config)).apply(prog)
    op, = [op for op in prog.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    dense = ct_utils.lut_to_dense(op.indices.val, op.lut.val, None)
    return dense.T.astype(np.float32)


@pytest.mark.parametrize("kind,shape", [("normal", (160, 96)), ("laplace", (128, 128)),
                                        ("student", (96, 160)), ("outliers", (200, 64))])
def test_sqnr_matches_coremltools_per_tensor(kind, shape):
    w = heavy(np.random.default_rng(len(kind)), shape, kind)
    for nbits in (2, 4, 6):
        ours, theirs = sqnr(w, kmeans(w, nbits).dequantize()), sqnr(w, coreml_palettize(w, nbits))
        assert ours >= theirs - 0.05, (nbits, ours, theirs)


def test_sqnr_matches_coremltools_grouped():
    w = (heavy(np.random.default_rng(7), (640, 32), "student") * 4.0 ** np.repeat(np.arange(2), 16)).astype(np.float16)
    for nbits in (3, 4):
        ours = sqnr(w, kmeans(w, nbits, group_size=16).dequantize())
        assert ours >= sqnr(w, coreml_palettize(w, nbits, group_size=16)) - 0.05


# --- (c, d) packing and size --------------------------------------------------------------------

@pytest.mark.parametrize("nbits", SUPPORTED_NBITS)
def test_packing_round_trips_and_equals_coremltools_bytes(nbits):
    rng = np.random.default_rng(nbits)
    for count in (1, 7, 8, 9, 24, 1001):
        idx = rng.integers(0, 1 << nbits, count).astype(np.uint8)
        packed = pack_bits(idx, nbits)
        assert packed.dtype == np.uint8 and packed.size == math.ceil(count * nbits / 8)
        np.testing.assert_array_equal(packed, ct_utils.pack_elements_into_bits(idx, nbits))
        np.testing.assert_array_equal(np.asarray(unpack_bits(packed, nbits, count)), idx)
        np.testing.assert_array_equal(ct_utils.restore_elements_from_packed_bits(packed, nbits, count), idx)


@pytest.mark.parametrize("nbits", SUPPORTED_NBITS)
def test_chunked_numpy_packing_across_chunk_boundaries(nbits, monkeypatch):
    """pack_bits / unpack_bits_np work a few words at a time: with tiny chunks the bytes still equal
    coremltools' packing and the indices round-trip, for counts on and off the chunk and word edges."""
    from quant import palettize
    monkeypatch.setattr(palettize, "_CHUNK_WORDS", 3)
    rng = np.random.default_rng(10 + nbits)
    per = 8 // math.gcd(nbits, 8)
    for count in (1, per * 3 - 1, per * 3, per * 3 + 1, per * 7 + 5, 1000):
        idx = rng.integers(0, 1 << nbits, count).astype(np.uint8)
        packed = palettize.pack_bits(idx, nbits)
        np.testing.assert_array_equal(packed, ct_utils.pack_elements_into_bits(idx, nbits))
        got = palettize.unpack_bits_np(packed, nbits, count)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, idx)
    with pytest.raises(ValueError, match="fewer than"):
        palettize.unpack_bits_np(packed[:-1], nbits, count)


@pytest.mark.parametrize("nbits,group_size,pcs", [(1, None, False), (3, 8, False), (6, None, True),
                                                  (8, 4, True), (4, 1, False)])
def test_nbytes_is_exact(nbits, group_size, pcs):
    w = heavy(np.random.default_rng(0), (3, 3, 5, 16), "normal")
    pw = kmeans(w, nbits, group_size=group_size, per_channel_scale=pcs)
    groups = 1 if group_size is None else 16 // group_size
    expected = math.ceil(w.size * nbits / 8) + groups * (1 << nbits) * 2 + (16 * 2 if pcs else 0)
    assert pw.nbytes == expected == sum(np.asarray(a).nbytes for a in jax.tree.leaves(pw))
    assert pw.lut.dtype == jnp.float16 and pw.lut.shape == (groups, 1 << nbits)
    assert pw.shape == w.shape and pw.size == w.size and pw.ndim == 4
    assert pw.bits_per_weight == 8 * expected / w.size


# --- (e) variants reduce the error they are meant to ------------------------------------------

def test_grouped_luts_never_worse_and_better_on_unlike_groups():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 32)) * 4.0 ** np.repeat(np.arange(8) - 4, 4)).astype(np.float16)
    wq = {g: np.asarray(kmeans(w, 4, group_size=g).dequantize()) for g in (None, 16, 8, 4)}
    err = {g: sqnr(w, q) for g, q in wq.items()}
    assert err[None] <= err[16] + 1e-3 <= err[8] + 2e-3 <= err[4] + 3e-3  # nested groups: optimal each
    small = {g: sqnr(w[:, :4], q[:, :4]) for g, q in wq.items()}  # the group of the smallest weights
    assert small[None] < 1 and small[4] > 15, small  # shared LUT: all near zero; own LUT: 4-bit quality


def test_per_channel_scale_helps_channels_of_unlike_scale_and_reconstructs_lut_times_scale():
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((300, 48)) * np.exp(rng.uniform(-5, 0, 48))).astype(np.float16)
    plain, scaled = kmeans(w, 4), kmeans(w, 4, per_channel_scale=True)
    assert sqnr(w, scaled.dequantize()) > sqnr(w, plain.dequantize()) + 3
    np.testing.assert_array_equal(np.asarray(scaled.scale), np.abs(w).max(0))
    idx = np.asarray(scaled.indices())
    expected = np.asarray(scaled.lut, np.float32)[0][idx] * np.asarray(scaled.scale, np.float32)
    np.testing.assert_array_equal(np.asarray(scaled.dequantize()), expected)
    zero = w.copy()
    zero[:, 5] = 0  # an all-zero channel gets scale 1 (as in coremltools) and the entry nearest 0
    z = kmeans(zero, 4, per_channel_scale=True)
    assert float(z.scale[5]) == 1.0
    assert np.all(np.abs(np.asarray(z.dequantize())[:, 5]) == np.abs(np.asarray(z.lut, np.float32)).min())


def test_importance_lowers_the_importance_weighted_error_and_is_optimal_for_it():
    rng = np.random.default_rng(5)
    w = heavy(rng, (128, 96), "laplace")
    imp = rng.random(w.shape) ** 4 * (np.abs(w) > 0.03)  # concentrated on the large weights
    weighted = lambda pw: float(np.sum(imp * (w.astype(np.float64) - np.asarray(pw.dequantize())) ** 2))
    plain, sens = kmeans(w, 3), kmeans(w, 3, importance=imp)
    assert weighted(sens) < 0.8 * weighted(plain)
    # optimal: the same objective as coremltools' exact solver on (value, summed importance)
    v, inv = np.unique(w.reshape(-1), return_inverse=True)
    mass = np.bincount(inv, weights=imp.reshape(-1))
    v, mass = v[mass > 0].astype(np.float64), mass[mass > 0]
    cl = np.asarray(ct_kmeans1d.cluster(v, 8, weights=mass).clusters)
    best = objective(v, mass, np.r_[0, np.flatnonzero(np.diff(cl)) + 1, v.size])
    assert weighted(sens) <= best * 1.001  # float16 LUT rounding only


# --- (f) pytree and jit behaviour, parity with the float path ---------------------------------

def test_pytree_tree_map_and_jit_keep_the_weight_compressed():
    rng = np.random.default_rng(6)
    pw = kmeans(heavy(rng, (64, 48), "normal"), 4, group_size=12, per_channel_scale=True)
    leaves, treedef = jax.tree.flatten(pw)
    assert [a.dtype for a in leaves] == [jnp.uint8, jnp.float16, jnp.float16]
    same = jax.tree.map(lambda a: a, pw)
    assert isinstance(same, PalettizedWeight) and jax.tree.structure(same) == treedef
    assert (same.nbits, same.group_size, same.shape) == (4, 12, (64, 48))
    params = {"layer": {"weight": pw, "bias": jnp.ones(48)}}
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    f = jax.jit(lambda p, x: nn.linear(x, p["layer"]))
    main, = [line for line in f.lower(params, x).as_text().splitlines() if "func.func public @main" in line]
    assert f"tensor<{pw.packed.size}xui8>" in main and "tensor<4x16xf16>" in main and "64x48" not in main
    np.testing.assert_array_equal(jax.jit(lambda p: p.dequantize())(pw), pw.dequantize())
    assert pw.dequantize(jnp.bfloat16).dtype == jnp.bfloat16 and pw.dequantize(jnp.float16).dtype == jnp.float16


@pytest.mark.parametrize("group_size,pcs", [(None, False), (8, True)])
def test_linear_and_conv2d_equal_the_float_path_on_the_dequantized_weight(group_size, pcs):
    rng = np.random.default_rng(8)
    lin = kmeans(heavy(rng, (40, 24), "normal"), 6, group_size=group_size, per_channel_scale=pcs)
    conv = kmeans(heavy(rng, (3, 3, 16, 24), "student"), 4, group_size=group_size, per_channel_scale=pcs)
    b = jnp.asarray(rng.standard_normal(24), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 5, 40)), jnp.float32)
    y = jax.jit(nn.linear)(x, {"weight": lin, "bias": b})
    np.testing.assert_allclose(y, nn.linear(x, {"weight": lin.dequantize(), "bias": b}), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, np.asarray(x) @ np.asarray(lin.dequantize()) + np.asarray(b), rtol=1e-5, atol=1e-5)
    img = jnp.asarray(rng.standard_normal((2, 9, 9, 16)), jnp.float32)
    for stride in (1, 2):
        got = jax.jit(lambda p, x: nn.conv2d(x, p, stride=stride))({"weight": conv, "bias": b}, img)
        ref = nn.conv2d(img, {"weight": conv.dequantize(), "bias": b}, stride=stride)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# --- (g) bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(nbits=5), r"nbits must be one of \(1, 2, 3, 4, 6, 8\), got 5"),
    (dict(nbits=0), "nbits must be one of"),
    (dict(nbits=16), "nbits must be one of"),
    (dict(nbits=True), "nbits must be one of"),
    (dict(nbits="4"), "nbits must be one of"),
    (dict(nbits=4.0), "nbits must be one of"),
    (dict(nbits=4, group_size=0), r"group_size must be None or a positive integer dividing .*w.shape\[-1\] = 12.*got 0"),
    (dict(nbits=4, group_size=-3), "group_size must"),
    (dict(nbits=4, group_size=5), "group_size must .* got 5"),
    (dict(nbits=4, group_size=2.0), "group_size must"),
    (dict(nbits=4, group_size=True), "group_size must"),
    (dict(nbits=4, importance=np.ones((12, 10))), r"importance must have the shape of w \(10, 12\), got \(12, 10\)"),
    (dict(nbits=4, importance=-np.ones((10, 12))), "importance must be finite and nonnegative"),
    (dict(nbits=4, importance=np.full((10, 12), np.nan)), "importance must be finite and nonnegative"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, match):
    w = np.random.default_rng(0).standard_normal((10, 12)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        kmeans(w, **kwargs)


@pytest.mark.parametrize("w,match", [
    (np.float32(1.0), "w must be a non-empty floating-point array"),
    (np.zeros((0, 4), np.float32), "w must be a non-empty floating-point array"),
    (np.ones((4, 4), np.int32), "w must be a non-empty floating-point array"),
    (np.array([[1.0, np.inf]], np.float32), "w must be finite in float16"),
    (np.array([[1.0, np.nan]], np.float32), "w must be finite in float16"),
    (np.array([[1.0, 1e6]], np.float32), "w must be finite in float16"),
])
def test_bad_weights_raise_value_errors(w, match):
    for pcs in (False, True):
        with pytest.raises(ValueError, match=match):
            kmeans(w, 4, per_channel_scale=pcs)


@pytest.mark.parametrize("shape,nbits", [((3, 3, 8, 16), 2), ((24, 40), 4), ((3, 3, 32, 40), 6), ((96, 128), 4)])
def test_coremltools_kmeans_is_coremltools_lookup_table(shape, nbits):
    """What Apple's fake_palettize gets from coremltools' _get_kmeans_lookup_table_and_weight on the
    float16 weight in PyTorch's layout: scikit-learn's k-means under 10,000 weights (the same values),
    kmeans1d from there (the same optimum; a value within rounding of a cluster boundary may map to
    the other float16 centroid, which only lowers the error)."""
    pytest.importorskip("sklearn")
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 0.1
    order = (3, 2, 0, 1) if len(shape) == 4 else (1, 0)
    torch_w = np.transpose(w.astype(np.float16), order)
    lut, idx = _get_kmeans_lookup_table_and_weight(nbits, torch_w)
    want = np.transpose(lut.astype(np.float16)[np.asarray(idx).reshape(-1)].reshape(torch_w.shape), np.argsort(order))
    got = np.asarray(coremltools_kmeans(w, nbits).dequantize(jnp.float16))
    if w.size < 10_000:
        np.testing.assert_array_equal(got, want)
    else:
        sse = lambda x: float(np.sum((x.astype(np.float64) - w.astype(np.float16).astype(np.float64)) ** 2))
        assert sse(got) <= sse(want) * (1 + 1e-6) and np.mean(got == want) > 0.999
