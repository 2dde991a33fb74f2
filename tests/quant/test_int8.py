"""int8 weights: the published absmax formulas in float64 NumPy, the integer and simulated W8A8
paths, the sdjax primitives under jit, sizes, pytree behaviour, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant import int8
from sdjax import nn

U = 2.0 ** -24  # float32 unit roundoff


# --- float64 NumPy statement of the method ---------------------------------------------------
#   weight:      s[o] = max_c |W[c, o]| / 127,   Wq = clip(round(W / s), -127, 127)
#   per channel: W is replaced by diag(a) W before the above (the activation scale folded in)
#   activation:  xq = clip(round(x / a), -127, 127)
#   output:      y = (xq @ Wq) * s * (a if per tensor else 1)

def ref_weight(w, a=None):
    w = np.asarray(w, np.float64)
    if a is not None and np.ndim(a) == 1:
        w = w * np.asarray(a, np.float64)[:, None]
    s = np.abs(w).reshape(-1, w.shape[-1]).max(0) / 127
    return np.clip(np.round(w / s), -127, 127), s


def ref_act(x, a):
    return np.clip(np.round(np.asarray(x, np.float64) / np.asarray(a, np.float64)), -127, 127)


def np_conv(x, w, stride=1, padding=((0, 0), (0, 0))):
    """Direct float64 NHWC x HWIO convolution: a sum over kernel offsets of strided slices."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), padding[0], padding[1], (0, 0)))
    kh, kw, _, cout = w.shape
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], oh, ow, cout))
    for dy in range(kh):
        for dx in range(kw):
            xs = x[:, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
            y += xs @ np.asarray(w[dy, dx], np.float64)
    return y


def grid(rng, shape, step, absmax_per_out=False, lo=-127, hi=127):
    """Values (k + u) * step with integer k and |u| <= 0.35, so every rounding in the method is at
    least 0.15 away from a tie and float32 vs float64 cannot disagree on it. ``step`` broadcasts
    against the last axis. With ``absmax_per_out`` each slice along the last axis has exactly one
    element +-127 * step and all others below it, so the absmax scale is exactly ``step``."""
    v = rng.integers(lo, hi + 1, shape) + rng.uniform(-0.35, 0.35, shape)
    if absmax_per_out:
        v = np.clip(v, -126.6, 126.6).reshape(-1, shape[-1])
        v[rng.integers(0, v.shape[0], shape[-1]), np.arange(shape[-1])] = 127 * rng.choice([-1, 1], shape[-1])
        v = v.reshape(shape)
    return (v * step).astype(np.float32)


def sum_abs_terms(xq, wq, scale, conv=None):
    """sum_c |xq[c]| |wq[c, o]| * scale[o]: what float rounding of the paths is relative to."""
    if conv is None:
        return (np.abs(xq) @ np.abs(wq)) * scale
    return np_conv(np.abs(xq), np.abs(wq), *conv) * scale


# --- weight quantization ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(48, 24), (3, 3, 16, 8), (1, 1, 20, 12)])
def test_weight_codes_and_scales_match_the_formula(shape):
    rng = np.random.default_rng(0)
    step = rng.uniform(0.001, 0.05, shape[-1]).astype(np.float32)
    w = grid(rng, shape, step, absmax_per_out=True)
    q = int8.quantize(w)
    wq, s = ref_weight(w)
    assert q.data.dtype == jnp.int8 and q.scale.dtype == jnp.float32 and q.mode == "w8a16"
    np.testing.assert_array_equal(np.asarray(q.data), wq)
    np.testing.assert_allclose(np.asarray(q.scale), s, rtol=2 * U)
    np.testing.assert_allclose(np.asarray(q.dequantize()), wq * s, rtol=3 * U)


def test_ties_round_half_to_even():
    # scale exactly 1: codes are round(w), with ties to even as torch.round and numpy do
    q = int8.quantize(np.array([[127.0], [0.5], [1.5], [2.5], [-0.5], [-1.5]], np.float32))
    assert float(q.scale[0]) == 1.0
    np.testing.assert_array_equal(np.asarray(q.data)[:, 0], [127, 0, 2, 2, 0, -2])
    a = int8.quantize(np.eye(2, dtype=np.float32), act_scale=1.0)
    np.testing.assert_array_equal(np.asarray(a.quantize_input(np.array([0.5, 2.5, 200.0, -300.0]))),
                                  [0, 2, 127, -127])


def test_zero_output_channel_gets_unit_scale_and_no_nan():
    w = np.ones((4, 3), np.float32)
    w[:, 1] = 0
    q = int8.quantize(w)
    assert float(q.scale[1]) == 1.0 and np.all(np.asarray(q.data[:, 1]) == 0)
    assert np.all(np.isfinite(np.asarray(q.dequantize())))


def test_per_channel_act_scale_is_folded_into_the_weight():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.01, 0.2, 16).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    q = int8.quantize(w, act_scale=a)
    wq, s = ref_weight(w, a)
    mismatch = np.asarray(q.data) != wq  # float32 vs float64 fold may only flip exact-tie cases
    assert mismatch.sum() <= 1
    np.testing.assert_allclose(np.asarray(q.scale), s, rtol=4 * U)
    # dequantize gives the weight the codes represent, in the original (unfolded) units
    np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(q.data) * s / a[:, None], rtol=8 * U)
    assert np.abs(np.asarray(q.dequantize()) - w).max() <= 0.5 * (s / a[:, None]).max() * (1 + 1e-5)


# --- W8A8: integer path against the formula, simulated vs integer -------------------------------

CONVS = [  # (x shape, w shape, stride, padding)
    ((2, 9, 9, 16), (3, 3, 16, 8), 1, ((1, 1), (1, 1))),
    ((2, 10, 10, 16), (3, 3, 16, 8), 2, ((0, 1), (0, 1))),   # the VAE/UNet downsampler
    ((1, 6, 7, 12), (1, 1, 12, 20), 1, ((0, 0), (0, 0))),
    ((1, 8, 8, 24), (3, 3, 24, 4), 2, ((1, 1), (1, 1))),
]


def _w8a8_case(rng, w_shape, x_shape, granularity):
    cin = w_shape[-2]
    a = np.float32(0.05) if granularity == "tensor" else rng.uniform(0.01, 0.1, cin).astype(np.float32)
    # the folded weight diag(a) W lies on a grid, so its codes are tie-free in any precision
    step = rng.uniform(0.001, 0.01, w_shape[-1]).astype(np.float32)
    folded = grid(rng, w_shape, step, absmax_per_out=True).astype(np.float64)
    w = (folded / (np.asarray(a, np.float64)[:, None] if np.ndim(a) else 1)).astype(np.float32)
    x = grid(rng, x_shape, a, lo=-140, hi=140)  # some codes clip at +-127
    return x, w, a


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_w8a8_integer_linear_matches_the_formula(granularity):
    rng = np.random.default_rng(2)
    x, w, a = _w8a8_case(rng, (40, 24), (3, 5, 40), granularity)
    y = jax.jit(lambda q, x: q.linear(x))(int8.quantize(w, a, path="integer"), x)
    wq, s = ref_weight(w, a)
    want = (ref_act(x, a) @ wq) * s * (a if granularity == "tensor" else 1)
    # int32 sums are exact; from float32 inputs the result is rounded at most 6 times (fold, /127,
    # a*scale, int->float, product), so it matches the float64 formula to 8 u
    np.testing.assert_allclose(np.asarray(y), want, rtol=8 * U, atol=0)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("x_shape,w_shape,stride,padding", CONVS)
def test_w8a8_integer_conv_matches_the_formula(x_shape, w_shape, stride, padding, granularity):
    rng = np.random.default_rng(3)
    x, w, a = _w8a8_case(rng, w_shape, x_shape, granularity)
    q = int8.quantize(w, a, path="integer")
    y = jax.jit(lambda q, x: q.conv2d(x, stride, padding))(q, x)
    wq, s = ref_weight(w, a)
    want = np_conv(ref_act(x, a), wq, stride, padding) * s * (a if granularity == "tensor" else 1)
    np.testing.assert_allclose(np.asarray(y), want, rtol=8 * U, atol=0)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("x_shape,w_shape,stride,padding", CONVS + [((3, 4, 64), (64, 16), None, None)])
def test_simulated_and_integer_paths_agree_within_scale_rounding(x_shape, w_shape, stride, padding, granularity):
    """Both paths use the same codes; the integer sum is exact and rescaled once, while the
    simulated path multiplies K = fan-in products of rounded float32 factors (q*a, data*scale,
    /a) and sums them in float32. The standard worst-case bound for that is
    |y_sim - y_int| <= (K + 8) u sum_c |q_c| |data_co| scale_o (a): a one-level error in any
    single code would exceed it for these data."""
    rng = np.random.default_rng(4)
    cin = w_shape[-2]
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = (rng.standard_normal(x_shape) * 2).astype(np.float32)
    a = np.float32(0.02) if granularity == "tensor" else rng.uniform(0.005, 0.05, cin).astype(np.float32)
    qi = int8.quantize(w, a, path="integer")
    qs = qi.replace(path="simulated")
    if stride is None:
        f = jax.jit(lambda q, x: q.linear(x))
        conv = None
    else:
        f = jax.jit(lambda q, x: q.conv2d(x, stride, padding))
        conv = (stride, padding)
    yi, ys = np.asarray(f(qi, x), np.float64), np.asarray(f(qs, x), np.float64)
    xq = np.asarray(qi.quantize_input(x), np.float64)
    out_scale = np.asarray(qi.scale, np.float64) * (a if granularity == "tensor" else 1)
    terms = sum_abs_terms(xq, np.asarray(qi.data, np.float64), out_scale, conv)
    k = np.prod(w_shape[:-1])
    bound = (k + 8) * U * terms
    assert np.all(np.abs(ys - yi) <= bound)


@pytest.mark.parametrize("impl", ["xla", "im2col"])
def test_both_int8_convolutions_are_exact(monkeypatch, impl):
    monkeypatch.setattr(int8, "INT8_CONV", impl)
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.integers(-127, 128, (2, 9, 11, 16)), jnp.int8)
    w = jnp.asarray(rng.integers(-127, 128, (3, 3, 16, 8)), jnp.int8)
    for stride, pad in [(1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1)))]:
        y = np.asarray(int8.int8_conv(q, w, stride, pad))
        assert y.dtype == np.int32
        np.testing.assert_array_equal(y, np_conv(np.asarray(q), np.asarray(w), stride, pad))


# --- the sdjax primitives run the new types ---------------------------------------------------

@pytest.mark.parametrize("act", ["none", "tensor", "channel"])
@pytest.mark.parametrize("path", ["integer", "simulated"])
def test_nn_linear_and_conv2d_under_jit(act, path):
    rng = np.random.default_rng(6)
    wl = rng.standard_normal((24, 8)).astype(np.float32)
    wc = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    x = rng.standard_normal((2, 10, 10, 24)).astype(np.float32)

    def scale(c):
        return {"none": None, "tensor": np.float32(0.03),
                "channel": np.linspace(0.01, 0.05, c).astype(np.float32)}[act]
    params = {"lin": {"weight": int8.quantize(wl, scale(24), path), "bias": np.arange(8, dtype=np.float32)},
              "down": {"weight": int8.quantize(wc, scale(8), path), "bias": -np.ones(8, np.float32)},
              "conv": {"weight": int8.quantize(wc, scale(8), path)}}

    @jax.jit
    def model(p, x):
        h1 = nn.linear(x, p["lin"])
        h2 = nn.conv2d(h1, p["down"], stride=2, padding=((0, 1), (0, 1)))
        return h1, h2, nn.conv2d(h2, p["conv"])  # default padding from the weight's shape: 1

    h1, h2, y = model(params, x)
    assert h2.shape == (2, 5, 5, 8) and y.shape == (2, 5, 5, 8) and y.dtype == jnp.float32

    def ref(q, xin, layer):
        """The layer from its stored codes: activation codes evaluated in float32 as the formula
        is (so no tie can round differently), everything after in float64."""
        w = np.asarray(q.data, np.float64) * np.asarray(q.scale, np.float64)
        xin = np.asarray(xin, np.float32)
        if q.act_scale is not None:
            a = np.asarray(q.act_scale, np.float32)
            xin = np.clip(np.round(xin / a), -127, 127).astype(np.float64) * a
            if a.ndim:
                w = w / a[:, None]
        return layer(np.asarray(xin, np.float64), w)
    # each layer against the reference on the same input
    for got, want in [(h1, ref(params["lin"]["weight"], x, lambda v, w: v @ w) + np.arange(8)),
                      (h2, ref(params["down"]["weight"], h1, lambda v, w: np_conv(v, w, 2, ((0, 1), (0, 1)))) - 1),
                      (y, ref(params["conv"]["weight"], h2, lambda v, w: np_conv(v, w, 1, ((1, 1), (1, 1)))))]:
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())


def test_half_precision_input_keeps_its_dtype():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    for a in (None, np.float32(0.03)):
        q = int8.quantize(w, a)
        y = jax.jit(nn.linear)(jnp.asarray(x, jnp.bfloat16), {"weight": q})
        assert y.dtype == jnp.bfloat16
        y32 = nn.linear(jnp.asarray(jnp.asarray(x, jnp.bfloat16), jnp.float32), {"weight": q})
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), atol=0.01 * np.abs(y32).max())


# --- size, pytree behaviour, errors ------------------------------------------------------------

def test_nbytes_is_the_stored_bytes():
    assert int8.quantize(np.ones((3, 3, 16, 8), np.float32)).nbytes == 3 * 3 * 16 * 8 + 8 * 4
    assert int8.quantize(np.ones((16, 8), np.float32), 0.1).nbytes == 16 * 8 + 8 * 4 + 4
    assert int8.quantize(np.ones((16, 8), np.float32), np.ones(16, np.float32)).nbytes == 16 * 8 + 8 * 4 + 16 * 4


def test_quantized_weights_are_pytrees_that_stay_int8():
    rng = np.random.default_rng(8)
    params = {"a": {"weight": int8.quantize(rng.standard_normal((8, 4)).astype(np.float32), 0.1)},
              "b": {"weight": int8.quantize(rng.standard_normal((1, 1, 4, 4)).astype(np.float32)),
                    "bias": np.zeros(4, np.float32)}}
    leaves = jax.tree.leaves(params)
    assert sorted(str(v.dtype) for v in leaves) == ["float32"] * 4 + ["int8"] * 2
    moved = jax.tree.map(lambda v: v, params)
    assert isinstance(moved["a"]["weight"], int8.Int8Weight) and moved["a"]["weight"].path == "integer"
    assert jax.tree.structure(params) != jax.tree.structure(
        {**params, "a": {"weight": params["a"]["weight"].replace(path="simulated")}})  # path is static

    @jax.jit
    def f(p, x):
        assert p["a"]["weight"].data.dtype == jnp.int8  # expanded only inside the computation
        return nn.conv2d(nn.linear(x, p["a"])[:, None, None, :], p["b"])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    y = f(params, x)
    yd = nn.conv2d((x @ params["a"]["weight"].dequantize())[:, None, None, :],
                   {"weight": params["b"]["weight"].dequantize(), "bias": params["b"]["bias"]})
    assert np.abs(np.asarray(y) - np.asarray(yd)).max() < 0.1 * np.abs(np.asarray(yd)).max()


def test_bad_input_is_refused_by_argument_name():
    w = np.ones((8, 4), np.float32)
    with pytest.raises(ValueError, match="^w must"):
        int8.quantize(np.ones((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="^w must be a float"):
        int8.quantize(np.ones((8, 4), np.int32))
    with pytest.raises(ValueError, match=r"^act_scale must .*\(8,\).*got shape \(4,\)"):
        int8.quantize(w, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="^act_scale must be finite and > 0"):
        int8.quantize(w, 0.0)
    with pytest.raises(ValueError, match="^act_scale must be finite and > 0"):
        int8.quantize(w, np.array([1, 1, -1, 1, 1, 1, 1, 1], np.float32))
    with pytest.raises(ValueError, match="^path must"):
        int8.quantize(w, 0.1, path="fast")
