"""LLM.int8(): the paper's decomposition (as bitsandbytes computes it) in float64 NumPy, the
integer path against the simulated one, data-dependent outliers under jit, the sdjax primitives,
sizes, pytree behaviour, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant import llm_int8
from sdjax import nn

U = 2.0 ** -24  # float32 unit roundoff
TAU = 6.0


def reference(X, W, tau):
    """LLM.int8() for X (tokens, in) @ W (in, out), in float64, as Dettmers et al. 2022 and
    bitsandbytes' int8_vectorwise_quant / int8_mixed_scaled_mm define it."""
    X, W = np.asarray(X, np.float64), np.asarray(W, np.float64)
    outlier = np.abs(X) >= tau                     # outlier elements
    O = outlier.any(axis=0)                        # outlier feature columns (any row)
    Xn = np.where(outlier, 0.0, X)                 # row statistics ignore the outlier elements
    cx = np.abs(Xn).max(axis=1)                    # row-wise absmax of X
    Xq = np.round(Xn * 127 / cx[:, None])
    Xq[:, O] = 0                                   # outlier columns leave the int8 product
    cw = np.abs(W).max(axis=0)                     # column-wise absmax of W
    Wq = np.round(W * 127 / cw)
    Wdq = Wq * cw / 127                            # the stored weight, dequantized
    Y = (Xq @ Wq) * np.outer(cx, cw) / 127 ** 2 + X[:, O] @ Wdq[O]
    terms = (np.abs(Xq) @ np.abs(Wq)) * np.outer(cx, cw) / 127 ** 2 + np.abs(X[:, O]) @ np.abs(Wdq[O])
    return Y, terms, O


def bound(terms, k):
    """Float32 evaluation of the same sum: the int32 part is exact and rescaled by a few rounded
    factors; the float part sums at most k products of rounded factors. Standard worst case:
    (k + 8) u sum |terms|."""
    return (k + 8) * U * terms


def grid_weight(rng, shape):
    """W = v * cw / 127 with v at least 0.15 from a rounding tie and one |v| = 127 per column, so
    the codes cannot depend on float32 vs float64 arithmetic."""
    v = np.clip(rng.integers(-127, 128, shape) + rng.uniform(-0.35, 0.35, shape), -126.6, 126.6)
    v[rng.integers(0, shape[0], shape[1]), np.arange(shape[1])] = 127 * rng.choice([-1, 1], shape[1])
    return (v * rng.uniform(0.1, 1.0, shape[1]) / 127).astype(np.float32)


def grid_activations(rng, rows, n_in, outlier_cols, tau):
    """Tie-free rows (as grid_weight, row absmax cx < tau) plus outliers >= tau in
    ``outlier_cols``, one exactly tau. Each row's absmax element may sit in an outlier column
    (bitsandbytes counts it: only outlier *elements* leave the row statistics)."""
    cx = rng.uniform(0.5, 0.9 * tau, rows)
    v = np.clip(rng.integers(-127, 128, (rows, n_in)) + rng.uniform(-0.35, 0.35, (rows, n_in)), -126.6, 126.6)
    argmax = rng.integers(0, n_in, rows)
    if len(outlier_cols):
        argmax[0] = outlier_cols[0]  # make sure one row's absmax sits in an outlier column
    v[np.arange(rows), argmax] = 127 * rng.choice([-1, 1], rows)
    x = v * cx[:, None] / 127
    first = True
    for c in outlier_cols:
        for t in rng.choice(rows, size=max(1, rows // 3), replace=False):
            if argmax[t] != c:
                x[t, c] = tau if first else rng.choice([-1, 1]) * rng.uniform(tau, 4 * tau)
                first = False
    return x.astype(np.float32)


@pytest.mark.parametrize("outlier_cols", [[], [3], [0, 5, 17, 30]])
def test_integer_path_matches_the_paper_formula(outlier_cols):
    rng = np.random.default_rng(len(outlier_cols))
    x = grid_activations(rng, 12, 32, outlier_cols, TAU)
    w = grid_weight(rng, (32, 20))
    qw = llm_int8.quantize(w, TAU)
    y = jax.jit(llm_int8.matmul)(x, qw)
    want, terms, O = reference(x, w, TAU)
    assert sorted(np.flatnonzero(O)) == sorted(outlier_cols)
    assert np.all(np.abs(np.asarray(y, np.float64) - want) <= bound(terms, 32))


def test_leading_axes_are_rows_and_outliers_are_shared_across_them():
    rng = np.random.default_rng(10)
    x = grid_activations(rng, 2 * 7, 24, [4, 9], TAU)
    w = grid_weight(rng, (24, 8))
    y = llm_int8.matmul(x.reshape(2, 7, 24), llm_int8.quantize(w))
    want, terms, _ = reference(x, w, TAU)
    assert y.shape == (2, 7, 8)
    assert np.all(np.abs(np.asarray(y, np.float64).reshape(14, 8) - want) <= bound(terms, 24))


@pytest.mark.parametrize("n_outliers", [0, 2, 6, 40])
def test_simulated_and_integer_paths_agree(n_outliers):
    rng = np.random.default_rng(20 + n_outliers)
    x = rng.standard_normal((3, 16, 64)).astype(np.float32) * 1.5
    cols = rng.choice(64, n_outliers, replace=False)
    x[..., cols] *= 8  # most of these columns now hold an element >= 6
    w = rng.standard_normal((64, 24)).astype(np.float32)
    qi = llm_int8.quantize(w, max_outlier_cols=8)
    yi = np.asarray(jax.jit(llm_int8.matmul)(x, qi), np.float64)
    ys = np.asarray(jax.jit(llm_int8.matmul)(x, qi.replace(path="simulated")), np.float64)
    want, terms, _ = reference(x.reshape(-1, 64), w, TAU)
    assert np.all(np.abs(yi.reshape(-1, 24) - ys.reshape(-1, 24)) <= 2 * bound(terms, 64))
    # and both stay on the formula (codes are evaluated the same way, in float32, in both paths)
    rel = np.abs(yi.reshape(-1, 24) - want).max() / np.abs(want).max()
    assert rel < 1e-3  # at most a rare float32-vs-float64 tie flip on random data


def test_data_dependent_outlier_columns_compile_once():
    """The gathered fast path holds max_outlier_cols columns; more than that in one call switches
    to the masked full-width product inside the same compiled function."""
    rng = np.random.default_rng(30)
    w = grid_weight(rng, (40, 16))
    qw = llm_int8.quantize(w, max_outlier_cols=4)
    traces = []

    @jax.jit
    def f(x, qw):
        traces.append(1)
        return llm_int8.matmul(x, qw)
    for cols in ([], [7], [1, 2, 3, 4], [0, 5, 10, 15, 20, 25, 30, 35, 39]):
        x = grid_activations(rng, 10, 40, cols, TAU)
        want, terms, O = reference(x, w, TAU)
        assert O.sum() == len(cols)
        assert np.all(np.abs(np.asarray(f(x, qw), np.float64) - want) <= bound(terms, 40))
    assert len(traces) == 1


def test_outlier_rows_use_the_dequantized_weight():
    """Only int8 and the column scales are stored: the float part multiplies by Wq * cw / 127,
    not by the original float weight."""
    rng = np.random.default_rng(40)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    qw = llm_int8.quantize(w)
    x = np.zeros((5, 16), np.float32)
    x[:, [2, 11]] = rng.uniform(7, 20, (5, 2)) * rng.choice([-1, 1], (5, 2))  # outlier columns only
    y = np.asarray(llm_int8.matmul(x, qw), np.float64)
    wdq = np.asarray(qw.data, np.float64) * np.asarray(qw.absmax, np.float64) / 127
    np.testing.assert_allclose(y, x @ wdq, rtol=1e-6, atol=1e-6 * np.abs(x @ wdq).max())
    assert np.abs(y - x.astype(np.float64) @ w).max() > 1e-4


def test_rows_without_int8_content_give_no_nan():
    w = np.random.default_rng(41).standard_normal((6, 3)).astype(np.float32)
    x = np.array([[0, 0, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0], [1, 2, 3, -1, 0.5, 0]], np.float32)
    y = np.asarray(llm_int8.matmul(x, llm_int8.quantize(w)))
    assert np.all(np.isfinite(y)) and np.all(y[0] == 0)
    wdq = np.asarray(llm_int8.quantize(w).dequantize())
    np.testing.assert_allclose(y[1], 7 * wdq[0], rtol=1e-6)


def test_float_weight_is_quantized_on_the_fly_and_threshold_overrides():
    rng = np.random.default_rng(42)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    x = rng.standard_normal((4, 16)).astype(np.float32) * 3
    np.testing.assert_array_equal(np.asarray(llm_int8.matmul(x, w)),
                                  np.asarray(llm_int8.matmul(x, llm_int8.quantize(w))))
    for tau in (2.0, 100.0):
        want, terms, _ = reference(x, w, tau)  # float-weight codes can tie: compare at the formula level
        got = np.asarray(llm_int8.matmul(x, llm_int8.quantize(w), threshold=tau), np.float64)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


# --- the sdjax primitives -----------------------------------------------------------------------

def np_patches(x, kh, kw, stride, padding):
    """float64 im2col written independently of the implementation: features ordered (dy, dx, c)."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), padding[0], padding[1], (0, 0)))
    n, hp, wp, c = x.shape
    oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    out = np.zeros((n, oh, ow, kh, kw, c))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
    return out.reshape(n, oh, ow, kh * kw * c)


@pytest.mark.parametrize("path", ["integer", "simulated"])
def test_nn_linear_and_conv2d_under_jit(path):
    rng = np.random.default_rng(50)
    x = rng.standard_normal((2, 8, 8, 12)).astype(np.float32)
    x[..., 3] *= 10  # an outlier channel
    wl = grid_weight(rng, (12, 12))
    w1 = grid_weight(rng, (12, 6)).reshape(1, 1, 12, 6)
    w3 = grid_weight(rng, (3 * 3 * 6, 5)).reshape(3, 3, 6, 5)
    bias = np.arange(12, dtype=np.float32)
    params = {"lin": {"weight": llm_int8.quantize(wl, path=path), "bias": bias},
              "pw": {"weight": llm_int8.quantize(w1, path=path)},
              "down": {"weight": llm_int8.quantize(w3, path=path)}}

    @jax.jit
    def model(p, x):
        h1 = nn.linear(x, p["lin"])
        h2 = nn.conv2d(h1, p["pw"])
        return h1, h2, nn.conv2d(h2, p["down"], stride=2, padding=((0, 1), (0, 1)))
    h1, h2, y = model(params, x)
    assert y.shape == (2, 4, 4, 5)
    checks = [(h1, x.reshape(-1, 12), wl, bias),
              (h2, np.asarray(h1).reshape(-1, 12), w1.reshape(12, 6), 0),
              (y, np_patches(h2, 3, 3, 2, ((0, 1), (0, 1))).reshape(-1, 54), w3.reshape(54, 5), 0)]
    for got, rows, w, b in checks:
        want, terms, _ = reference(rows, w, TAU)
        err = np.abs(np.asarray(got, np.float64).reshape(want.shape) - b - want)
        # activation codes of these random rows are not tie-proofed: allow a rare one-level flip
        assert np.mean(err <= 2 * bound(terms, w.shape[0]) + 1e-6 * np.abs(want).max()) > 0.99
        assert err.max() <= 1e-2 * np.abs(want).max()


def test_conv_is_the_product_over_patches():
    rng = np.random.default_rng(51)
    x = (rng.standard_normal((1, 7, 9, 8)) * 3).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 4)).astype(np.float32)
    qw = llm_int8.quantize(w)
    y = jax.jit(nn.conv2d, static_argnums=(2, 3))(x, {"weight": qw}, 2, ((0, 1), (0, 1)))
    cols = np_patches(x, 3, 3, 2, ((0, 1), (0, 1))).astype(np.float32)
    flat = qw.replace(data=qw.data.reshape(72, 4))
    want = jax.jit(llm_int8.matmul)(cols, flat)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-6, atol=1e-6)


# --- size, pytree behaviour, errors ------------------------------------------------------------

def test_nbytes_is_the_stored_bytes():
    assert llm_int8.quantize(np.ones((40, 16), np.float32)).nbytes == 40 * 16 + 16 * 4
    assert llm_int8.quantize(np.ones((3, 3, 8, 4), np.float32)).nbytes == 3 * 3 * 8 * 4 + 4 * 4


def test_weights_are_pytrees_that_stay_int8():
    rng = np.random.default_rng(60)
    params = {"a": {"weight": llm_int8.quantize(rng.standard_normal((8, 4)).astype(np.float32)),
                    "bias": np.zeros(4, np.float32)}}
    assert sorted(str(v.dtype) for v in jax.tree.leaves(params)) == ["float32", "float32", "int8"]
    moved = jax.tree.map(lambda v: v, params)
    assert isinstance(moved["a"]["weight"], llm_int8.LLMInt8Weight) and moved["a"]["weight"].threshold == TAU
    other = llm_int8.quantize(rng.standard_normal((8, 4)).astype(np.float32), threshold=3.0)
    assert jax.tree.structure(params["a"]["weight"]) != jax.tree.structure(other)  # threshold is static
    y = jax.jit(nn.linear)(rng.standard_normal((3, 8)).astype(np.float32), params["a"])
    assert y.shape == (3, 4) and y.dtype == jnp.float32


def test_bad_input_is_refused_by_argument_name():
    w = np.ones((8, 4), np.float32)
    x = np.ones((2, 8), np.float32)
    for t in (0, -1.0, "6", None):
        with pytest.raises(ValueError, match="^threshold must be a number > 0"):
            llm_int8.quantize(w, threshold=t)
    for t in (0.0, -6.0):
        with pytest.raises(ValueError, match="^threshold must be a number > 0"):
            llm_int8.matmul(x, llm_int8.quantize(w), threshold=t)
    with pytest.raises(ValueError, match="^w must"):
        llm_int8.quantize(np.ones((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"^x must have 8 features"):
        llm_int8.matmul(np.ones((2, 5), np.float32), llm_int8.quantize(w))
    with pytest.raises(ValueError, match="^qw must be an"):
        llm_int8.matmul(x, llm_int8.quantize(np.ones((1, 1, 8, 4), np.float32)))
    with pytest.raises(ValueError, match="^path must"):
        llm_int8.quantize(w, path="fast")
    with pytest.raises(ValueError, match="^max_outlier_cols must"):
        llm_int8.quantize(w, max_outlier_cols=0)
