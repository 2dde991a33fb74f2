"""GPTQ palettization, checked against plain float64 NumPy statements written here: the OBQ rounding
re-inverting the remaining rows' Hessian at every step (the published formula, not the Cholesky or
Schur-complement forms quant.gptq uses), the output error ||X (W - Q)||^2 from X itself, and X^T X
of im2col patches built with explicit loops. Then the recipe, cache, save/load and CLI plumbing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quant
import sdjax
from quant import gptq, palettize
from quant import io as qio
from quant.palettize import PalettizedWeight
from quant.recipes import RecipeError, layers
from sdjax import nn


# --- independent statements -----------------------------------------------------------------

def correlated_inputs(rng, n, d, mix=0.8):
    """X = Z @ A with a dense, non-diagonal A: inputs whose features are correlated (as neighbouring
    pixels and channels are), so H = X^T X is far from diagonal."""
    a = np.eye(d) + mix * rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ a


def grid(pw):
    """(out, K) float64: the value index k of output channel j stands for, lut[group(j), k] * scale[j]."""
    lut = np.asarray(pw.lut, np.float64)
    out = pw.shape[-1]
    group = np.zeros(out, int) if pw.group_size is None else np.arange(out) // pw.group_size
    scale = np.ones(out) if pw.scale is None else np.asarray(pw.scale, np.float64)
    return lut[group] * scale[:, None]


def nearest(row, table):
    """For each output channel j, the value of table[j] nearest to row[j]."""
    return table[np.arange(len(row)), np.argmin(np.abs(table - row[:, None]), axis=1)]


def obq_values(w, h, pw, damp, order):
    """OBQ/GPTQ (Frantar & Alistarh 2022, eq. 2-3) as published: take row i in ``order``, round it to the
    nearest grid value, and give the rows F not yet rounded the optimal compensation
    ``delta W_F = -(w_i - q_i) [H_F^-1]_{:, i} / [H_F^-1]_{ii}``, with ``H_F^-1`` re-inverted from the
    damped H restricted to F at every step. Returns the chosen values (d, out)."""
    d = h.shape[0]
    w = np.asarray(w).astype(np.float16).astype(np.float64).reshape(d, -1)
    h = np.asarray(h, np.float64) + damp * np.mean(np.diag(h)) * np.eye(d)
    table = grid(pw)
    q = np.zeros_like(w)
    left = list(range(d))
    for i in order:
        hinv = np.linalg.inv(h[np.ix_(left, left)])
        k = left.index(i)
        q[i] = nearest(w[i], table)
        w[left] -= np.outer(hinv[:, k] / hinv[k, k], w[i] - q[i])
        left.remove(i)
    return q


def chosen_values(pw):
    """The grid value pw stores for every weight, (d, out) float64 (its indices looked up in ``grid``)."""
    out = pw.shape[-1]
    idx = np.asarray(pw.indices()).reshape(-1, out)
    return np.take_along_axis(grid(pw).T, idx, axis=0)


def im2col_loops(x, kh, kw, stride, pad):
    """(rows, kh*kw*cin) patches of NHWC ``x``, features in (dy, dx, c) order, by explicit loops."""
    (top, bottom), (left, right) = pad
    n, hgt, wid, c = x.shape
    xp = np.zeros((n, hgt + top + bottom, wid + left + right, c))
    xp[:, top:top + hgt, left:left + wid] = x
    oh, ow = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
    rows = []
    for b in range(n):
        for oy in range(oh):
            for ox in range(ow):
                rows.append([xp[b, oy * stride + dy, ox * stride + dx, ch]
                             for dy in range(kh) for dx in range(kw) for ch in range(c)])
    return np.array(rows)


def weight_and_hessian(shape, seed=0, n=256):
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape[:-1]))
    x = correlated_inputs(rng, n, d)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return w, x.T @ x / n, x


# --- the algorithm ---------------------------------------------------------------------------

CONFIGS = [
    ((37, 16), {}),                                                  # per tensor, act_order (default)
    ((37, 16), dict(act_order=False)),
    ((37, 16), dict(group_size=4)),
    ((3, 3, 4, 8), dict(per_channel_scale=True)),                   # a conv: d = kh*kw*cin = 36
    ((37, 16), dict(block_size=5)),                                 # blocks of 5 over 37 rows
    ((3, 3, 4, 8), dict(block_size=7, group_size=4, per_channel_scale=True, act_order=False)),
]


@pytest.mark.parametrize("nbits", [2, 4, 6])
@pytest.mark.parametrize("shape, kwargs", CONFIGS)
def test_palettize_equals_the_row_by_row_statement(shape, kwargs, nbits):
    w, h, _ = weight_and_hessian(shape, seed=nbits)
    pw = gptq.palettize(w, h, nbits, **kwargs)
    act_order = kwargs.get("act_order", True)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
    np.testing.assert_array_equal(np.asarray(pw.indices()),
                                  gptq.reference_indices(w, h, pw, order=None if not act_order else order))
    # and both equal OBQ re-inverting H over the remaining rows at every step
    np.testing.assert_array_equal(chosen_values(pw), obq_values(w, h, pw, gptq.DEFAULT_DAMP, order))
    if act_order:  # the order matters: another one picks other indices somewhere
        assert not np.array_equal(np.asarray(pw.indices()),
                                  gptq.reference_indices(w, h, pw, order=np.arange(h.shape[0])))


def test_damp_is_relative_to_the_mean_diagonal():
    w, h, _ = weight_and_hessian((20, 8), seed=3)
    for damp in (0.0, 0.3):
        pw = gptq.palettize(w, h, 3, damp=damp)
        order = np.argsort(-np.diag(h), kind="stable")
        np.testing.assert_array_equal(chosen_values(pw), obq_values(w, h, pw, damp, order))
        # H is only known up to scale (a mean or a sum over rows): the result does not depend on it
        scaled = gptq.palettize(w, 1e3 * h, 3, damp=damp)
        np.testing.assert_array_equal(np.asarray(scaled.packed), np.asarray(pw.packed))


def test_diagonal_hessian_is_plain_rounding_on_the_weighted_lut():
    """Uncorrelated inputs: no row can compensate another, so GPTQ is nearest rounding on its LUT."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((24, 12)) * 0.05).astype(np.float32)
    diag = rng.uniform(0.1, 3.0, 24)
    imp = np.broadcast_to(diag[:, None], w.shape)
    for damp in (0.0, 0.01):
        pw = gptq.palettize(w, np.diag(diag), 4, damp=damp, block_size=5)
        km = palettize.kmeans(w, 4, importance=imp)
        np.testing.assert_array_equal(np.asarray(pw.packed), np.asarray(km.packed))


@pytest.mark.parametrize("nbits", [2, 4])
def test_output_error_clearly_below_kmeans_on_correlated_inputs(nbits):
    ratios = []
    for seed in range(5):
        w, h, _ = weight_and_hessian((24, 16), seed=seed)
        pw = gptq.palettize(w, h, nbits)
        plain = palettize.kmeans(w, nbits)
        same_lut = palettize.kmeans(w, nbits, importance=np.broadcast_to(np.diag(h)[:, None], w.shape))
        e = gptq.output_error(w, pw, h)
        assert e < gptq.output_error(w, same_lut, h), seed  # the compensation, on GPTQ's own LUT
        ratios.append(e / gptq.output_error(w, plain, h))
    # measured 0.54-0.77 (2 bits) and 0.63-0.77 (4 bits)
    assert max(ratios) < 0.85 and np.mean(ratios) < 0.75, ratios


def test_output_error_is_the_summed_squared_output_error():
    rng = np.random.default_rng(2)
    x = correlated_inputs(rng, 50, 3 * 3 * 4)
    w = (rng.standard_normal((3, 3, 4, 6)) * 0.1).astype(np.float32)
    pw = palettize.kmeans(w, 3)
    diff = w.reshape(36, 6).astype(np.float64) - np.asarray(pw.dequantize(), np.float64).reshape(36, 6)
    want = np.sum((x @ diff) ** 2)
    assert gptq.output_error(w, pw, x.T @ x) == pytest.approx(want, rel=1e-10)
    q = np.asarray(pw.dequantize(), np.float32)  # a plain array is taken as the quantized value itself
    assert gptq.output_error(w, q, x.T @ x) == pytest.approx(want, rel=1e-10)
    assert gptq.output_error(w, w, x.T @ x) == 0


@pytest.mark.parametrize("act_order", [True, False])
def test_rows_with_zero_input_are_rounded_plainly(act_order):
    w, _, x = weight_and_hessian((3, 3, 2, 8), seed=4)   # d = 18
    dead = [0, 5, 17]
    x[:, dead] = 0   # those input features never fire: H[i, i] = 0
    h = x.T @ x / len(x)
    pw = gptq.palettize(w, h, 4, act_order=act_order, block_size=4)
    idx = np.asarray(pw.indices()).reshape(18, 8)
    assert idx.max() < 16 and np.all(np.isfinite(np.asarray(pw.dequantize())))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else None
    np.testing.assert_array_equal(idx.reshape(w.shape), gptq.reference_indices(w, h, pw, order=order))
    w16 = w.astype(np.float16).astype(np.float64).reshape(18, 8)
    values = chosen_values(pw)
    for i in dead:  # nothing compensates into them: nearest rounding of the weight
        np.testing.assert_array_equal(values[i], nearest(w16[i], grid(pw)))
    # no input at all: plain k-means, LUT and indices
    pw0 = gptq.palettize(w, np.zeros((18, 18)), 4, act_order=act_order)
    km = palettize.kmeans(w, 4)
    np.testing.assert_array_equal(np.asarray(pw0.packed), np.asarray(km.packed))
    np.testing.assert_array_equal(np.asarray(pw0.lut), np.asarray(km.lut))


@pytest.mark.parametrize("shape, group_size, pcs", [((40, 12), None, False), ((3, 3, 4, 12), 4, False),
                                                    ((40, 12), None, True), ((3, 3, 4, 12), 3, True)])
def test_a_normal_palettized_weight_with_the_importance_weighted_kmeans_lut(shape, group_size, pcs):
    w, h, _ = weight_and_hessian(shape, seed=5)
    pw = gptq.palettize(w, h, 4, group_size=group_size, per_channel_scale=pcs)
    d = h.shape[0]
    imp = np.broadcast_to(np.diag(h)[:, None], (d, shape[-1])).reshape(shape)
    km = palettize.kmeans(w, 4, group_size, importance=imp, per_channel_scale=pcs)
    plain = palettize.kmeans(w, 4, group_size, per_channel_scale=pcs)
    assert isinstance(pw, PalettizedWeight)
    assert jax.tree.structure(pw) == jax.tree.structure(km)  # shape, nbits, group_size, scale or not
    np.testing.assert_array_equal(np.asarray(pw.lut), np.asarray(km.lut))
    assert pw.lut.dtype == jnp.float16 and pw.packed.dtype == jnp.uint8
    if pcs:
        np.testing.assert_array_equal(np.asarray(pw.scale), np.asarray(km.scale))
    else:
        assert pw.scale is None
    assert pw.nbytes == plain.nbytes == km.nbytes
    assert not np.array_equal(np.asarray(pw.packed), np.asarray(km.packed))  # GPTQ moved some indices
    # it runs like any palettized weight
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 4) if len(shape) == 4 else (3, 40)),
                    jnp.float32)
    f = nn.conv2d if len(shape) == 4 else nn.linear
    np.testing.assert_allclose(np.asarray(f(x, {"weight": pw})), np.asarray(f(x, {"weight": pw.dequantize()})),
                               rtol=1e-5, atol=1e-6)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("hessian, kwargs, match", [
    (np.eye(5), {}, r"hessian must be \(6, 6\) for a weight of shape \(6, 4\).*got shape \(5, 5\)"),
    (np.eye(6)[:, :5], {}, r"hessian must be \(6, 6\).*got shape \(6, 5\)"),
    (np.full((6, 6), np.nan), {}, "hessian must be finite"),
    (np.diag([1.0, 1, 1, np.inf, 1, 1]), {}, "hessian must be finite"),
    (np.diag([1.0, 1, -1, 1, 1, 1]), {}, "hessian must have a nonnegative diagonal"),
    (np.eye(6), dict(damp=-0.1), "damp must be a finite number >= 0; got -0.1"),
    (np.eye(6), dict(damp=float("nan")), "damp must be a finite number >= 0"),
    (np.eye(6), dict(damp="0.01"), "damp must be a finite number >= 0"),
    (np.eye(6), dict(block_size=0), "block_size must be a positive integer; got 0"),
    (np.eye(6), dict(block_size=2.5), "block_size must be a positive integer"),
    (np.eye(6), dict(block_size=True), "block_size must be a positive integer"),
    (np.eye(6), dict(nbits=5), r"nbits must be one of \(1, 2, 3, 4, 6, 8\), got 5"),
    (np.eye(6), dict(nbits="4"), "nbits must be one of"),
    (np.eye(6), dict(group_size=3), "group_size must be None or a positive integer dividing"),
])
def test_bad_arguments_raise_value_errors_naming_them(hessian, kwargs, match):
    w = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    kwargs = dict(dict(nbits=4), **kwargs)
    with pytest.raises(ValueError, match=match):
        gptq.palettize(w, hessian, **kwargs)


def test_conv_hessian_shape_is_named_in_input_rows():
    w = np.zeros((3, 3, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"hessian must be \(18, 18\) for a weight of shape \(3, 3, 2, 4\) "
                                         r"\(input rows kh\*kw\*cin = 18\); got shape \(2, 2\)"):
        gptq.palettize(w, np.eye(2), 4)


def test_a_hessian_that_is_not_x_transpose_x_is_named():
    w = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="hessian"):
        gptq.palettize(w, np.array([[1.0, 2.0], [2.0, 1.0]]), 2)  # eigenvalue -1: no X gives it
    with pytest.raises(ValueError, match="positive semidefinite"):
        gptq.palettize(w, np.array([[1.0, 2.0], [2.0, 1.0]]), 2, damp=0.0)


def test_a_factor_serves_every_width_and_checks_its_rows():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    h = x.T @ x
    w = rng.standard_normal((12, 8)).astype(np.float32)
    f = gptq.factorize(h)
    for nb in (2, 4):
        np.testing.assert_array_equal(np.asarray(gptq.palettize(w, f, nb).packed),
                                      np.asarray(gptq.palettize(w, h, nb).packed))
    with pytest.raises(ValueError, match="factor is for 12 input rows.*has 6"):
        gptq.palettize(w[:6], f, 2)
    h_asym = h.copy()
    h_asym[0, 1] += 1e-9 * h[0, 1]  # float32 sums are symmetric only up to rounding
    np.testing.assert_array_equal(np.asarray(gptq.palettize(w, h_asym, 4).packed),
                                  np.asarray(gptq.palettize(w, h, 4).packed))


# --- collecting H ----------------------------------------------------------------------------

def _model():
    rng = np.random.default_rng(7)
    params = {"fc": {"weight": rng.standard_normal((6, 5)).astype(np.float32),
                     "bias": rng.standard_normal(5).astype(np.float32)},
              "down": {"weight": (rng.standard_normal((3, 3, 5, 4)) * 0.3).astype(np.float32)},
              "proj": {"weight": rng.standard_normal((1, 1, 4, 3)).astype(np.float32)},
              "unused": {"weight": rng.standard_normal((4, 4)).astype(np.float32)},
              "token_embedding": {"weight": rng.standard_normal((10, 6)).astype(np.float32)}}
    pad = ((1, 0), (1, 2))  # asymmetric: a swapped or mirrored padding would change the patches

    def model(p, x):
        h = jnp.tanh(nn.linear(x, p["fc"]))
        h = jnp.tanh(nn.conv2d(h, p["down"], stride=2, padding=pad))
        return nn.conv2d(h, p["proj"])

    def inputs(x):
        """The inputs each layer receives, float64 NumPy: (fc rows, down patches, proj rows)."""
        p = params
        a = x.reshape(-1, 6).astype(np.float64)
        h = np.tanh(a @ p["fc"]["weight"] + p["fc"]["bias"]).reshape(*x.shape[:3], 5)
        cols = im2col_loops(h, 3, 3, 2, pad)
        oh, ow = (x.shape[1] + 1 - 3) // 2 + 1, (x.shape[2] + 3 - 3) // 2 + 1
        h2 = np.tanh(cols @ p["down"]["weight"].reshape(45, 4))
        assert h2.shape[0] == x.shape[0] * oh * ow
        return {"fc": a, "down": cols, "proj": h2}
    return params, model, inputs


def _xs():
    rng = np.random.default_rng(8)
    return rng.standard_normal((2, 7, 6, 6)).astype(np.float32), rng.standard_normal((1, 5, 9, 6)).astype(np.float32)


def test_collect_is_x_transpose_x_over_rows_of_every_call():
    params, model, inputs = _model()
    x1, x2 = _xs()
    jitted = jax.jit(model)
    for run in (lambda p: model(p, x1), lambda p: jitted(p, x1)):  # eager: callbacks op by op; and under jit
        h = gptq.collect(params, run)
        assert set(h) == {"fc", "down", "proj"}  # "unused" never ran; the embedding is not a layer
        for name, x in inputs(x1).items():
            assert h[name].dtype == np.float64 and h[name].shape == (x.shape[1],) * 2
            np.testing.assert_allclose(h[name], x.T @ x / len(x), rtol=2e-5, atol=1e-6, err_msg=name)
    # two calls of different sizes: one mean over all their rows
    h = gptq.collect(params, lambda p: [jitted(p, x1), jitted(p, x2)], names=["down", "proj"])
    assert set(h) == {"down", "proj"}
    a, b = inputs(x1), inputs(x2)
    for name in ("down", "proj"):
        x = np.concatenate([a[name], b[name]])
        np.testing.assert_allclose(h[name], x.T @ x / len(x), rtol=2e-5, atol=1e-6, err_msg=name)
    # a single name; the probes leave the output unchanged
    out = []
    h = gptq.collect(params, lambda p: out.append(jitted(p, x1)) or out[-1], names="proj")
    assert list(h) == ["proj"]
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(jitted(params, x1)))


def test_collect_leaves_no_statistics_behind_in_jit_caches():
    import gc
    params, model, _ = _model()
    x1, _ = _xs()
    jitted = jax.jit(model)
    h = gptq.collect(params, lambda p: jitted(p, x1))
    assert h
    del h
    gc.collect()
    held = [v for o in gc.get_objects() if type(o) is gptq._Sink for v in o.sums.values()]
    assert not held


def test_collect_refuses_unknown_names():
    params, model, _ = _model()
    x1, _ = _xs()
    with pytest.raises(ValueError, match=r"names contains layers that are not conv/linear weights of params: "
                                         r"\['nope', 'token_embedding'\]"):
        gptq.collect(params, lambda p: model(p, x1), names=["fc", "nope", "token_embedding"])


# --- recipes ---------------------------------------------------------------------------------

# two 32 -> 256 linears (d = 32: GPTQ's d x d algebra stays cheap)
GPTQ_RULE = {"pattern": "down_blocks.0.attentions.*.ff.net.0.proj", "method": "palettize", "nbits": 4, "gptq": True}
RECIPE = {"name": "gptq-test", "rules": [GPTQ_RULE]}
NAMES = [f"down_blocks.0.attentions.{i}.transformer_blocks.0.ff.net.0.proj" for i in (0, 1)]


@pytest.fixture(scope="module")
def pipe(pipeline_dirs):
    folder, _ = pipeline_dirs("sd1")
    return sdjax.load(folder, progress=False)


@pytest.fixture(scope="module")
def unet(pipe):
    return pipe.params["unet"]


def _run(seed=0):
    """run(params) driving the GPTQ layers of RECIPE on correlated inputs (a whole UNet call costs a
    compile), with unet or pipeline params."""
    x = jnp.asarray(correlated_inputs(np.random.default_rng(seed), 300, 32).reshape(3, 100, 32), jnp.float32)

    def run(p):
        a = (p["unet"] if "unet" in p else p)["down_blocks"]["0"]["attentions"]
        return [nn.linear(x * (i + 1), a[str(i)]["transformer_blocks"]["0"]["ff"]["net"]["0"]["proj"])
                for i in range(2)]
    return run


def test_gptq_option_and_presets_parse():
    r = quant.parse_recipe(RECIPE)
    assert r.rules[0].options["gptq"] is True and r.needs_hessian and not r.needs_importance
    assert not quant.parse_recipe("palette-4bit").needs_hessian
    assert quant.parse_recipe({"rules": [dict(GPTQ_RULE, gptq=False)]}).needs_hessian is False
    assert quant.parse_recipe(r.to_json()) == r
    p = quant.parse_recipe("palette-4bit-gptq")
    assert p.needs_hessian and p.components == ("unet",)
    assert p.rules[0].options == dict(quant.parse_recipe("palette-4bit").rules[0].options, gptq=True)
    g = quant.parse_recipe("palette-4bit-g16-gptq").rules[0].options
    assert g["nbits"] == 4 and g["group_size"] == 16 and g["indivisible"] == "per_tensor" and g["gptq"] is True
    assert "palette-4bit-gptq" in quant.PRESETS
    with pytest.raises(RecipeError, match=r"unknown preset 'palette-5bit-gptq'"):
        quant.parse_recipe("palette-5bit-gptq")
    with pytest.raises(RecipeError, match=r"unknown preset 'palette-4bit-gptq-g16'"):
        quant.parse_recipe("palette-4bit-gptq-g16")


@pytest.mark.parametrize("rule, message", [
    (dict(GPTQ_RULE, gptq="yes"), r"rule 1 \(pattern 'down_blocks.0.attentions.\*.ff.net.0.proj'\): gptq must be "
                                  r"true or false; got 'yes'"),
    (dict(GPTQ_RULE, gptq=1), r"rule 1 .*gptq must be true or false; got 1"),
    (dict(GPTQ_RULE, sensitive=True), r"rule 1 .*gptq and sensitive cannot be combined"),
    ({"pattern": "*", "method": "int8", "gptq": True}, r"rule 1 .*unknown option\(s\) \['gptq'\] for method 'int8'"),
])
def test_bad_gptq_rules_name_the_rule(rule, message):
    with pytest.raises(RecipeError, match=message):
        quant.parse_recipe({"rules": [rule]})


def test_apply_needs_a_hessian_for_every_gptq_layer(unet):
    with pytest.raises(RecipeError, match=r"rule 1 \(pattern 'down_blocks.0.attentions.\*.ff.net.0.proj', method "
                                          r"'palettize'\): GPTQ palettization needs each layer's input statistics: "
                                          r"pass hessian="):
        quant.apply_recipe(unet, RECIPE)
    h = gptq.collect(unet, _run(), NAMES)
    del h[NAMES[1]]
    with pytest.raises(RecipeError, match=r"rule 1 .*no hessian for 1 GPTQ layer\(s\) of unet .*"
                                          r"down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj$"):
        quant.apply_recipe(unet, RECIPE, hessian=h)
    with pytest.raises(RecipeError, match=r"hessian must be a dict .* or a function; got list"):
        quant.apply_recipe(unet, RECIPE, hessian=[h])
    h[NAMES[1]] = np.eye(3)
    with pytest.raises(RecipeError, match=r"rule 1 .*unet layer 'down_blocks.0.attentions.1.transformer_blocks.0."
                                          r"ff.net.0.proj' \(32, 256\): hessian must be \(32, 32\)"):
        quant.apply_recipe(unet, RECIPE, hessian=h)


def test_callable_and_dict_hessians_give_the_same_weights(pipe, unet):
    run = _run()
    h = gptq.collect(unet, run, NAMES)
    assert sorted(h) == sorted(NAMES)
    by_dict = layers(quant.apply_recipe(unet, RECIPE, hessian=h))
    by_run = layers(quant.apply_recipe(unet, RECIPE, hessian=run))
    src = layers(unet)
    for name, w in by_dict.items():
        if name not in NAMES:
            assert w is src[name], name
            continue
        assert isinstance(w, PalettizedWeight) and isinstance(by_run[name], PalettizedWeight)
        np.testing.assert_array_equal(np.asarray(w.packed), np.asarray(by_run[name].packed))
        np.testing.assert_array_equal(np.asarray(w.lut), np.asarray(by_run[name].lut))
        ref = gptq.palettize(np.asarray(src[name]), h[name], 4)
        np.testing.assert_array_equal(np.asarray(w.packed), np.asarray(ref.packed))
    # pipeline params: the run gets pipeline-shaped params; the dict may be nested by component
    nested = quant.apply_recipe(pipe.params, RECIPE, hessian={"unet": h})
    via_pipe = pipe.quantize(RECIPE, hessian=run)
    assert via_pipe.quantization["recipe"]["rules"][0]["gptq"] is True
    for name in NAMES:
        np.testing.assert_array_equal(np.asarray(layers(nested["unet"])[name].packed), np.asarray(by_dict[name].packed))
        np.testing.assert_array_equal(np.asarray(layers(via_pipe.params["unet"])[name].packed),
                                      np.asarray(by_dict[name].packed))
    # GPTQ lowers the output error on the data it was calibrated on, layer by layer
    plain = layers(quant.apply_recipe(unet, {"rules": [dict(GPTQ_RULE, gptq=False)]}))
    for name in NAMES:
        w = np.asarray(src[name])
        assert gptq.output_error(w, by_dict[name], h[name]) < gptq.output_error(w, plain[name], h[name]), name


def test_a_callable_hessian_is_collected_a_group_at_a_time_under_the_budget(unet, monkeypatch):
    """A full-size UNet's statistics do not fit in memory at once: with a callable, apply_recipe
    collects at most HESSIAN_BUDGET bytes of them per calibration run and frees each after use."""
    run, calls = _run(), []

    def counting(p):
        calls.append(1)
        return run(p)
    whole = layers(quant.apply_recipe(unet, RECIPE, hessian=counting))
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(quant.apply, "HESSIAN_BUDGET", 8 * 32 * 32)  # one 32-row layer's statistics
    seen = []
    real = gptq.collect
    monkeypatch.setattr(gptq, "collect", lambda params, r, names: (seen.append(list(names)), real(params, r, names))[1])
    grouped = layers(quant.apply_recipe(unet, RECIPE, hessian=counting))
    assert len(calls) == len(NAMES) == 2 and seen == [[n] for n in NAMES]
    for name in NAMES:
        np.testing.assert_array_equal(np.asarray(grouped[name].packed), np.asarray(whole[name].packed))


def test_cache_reuses_a_gptq_weight_only_for_the_same_hessian(unet):
    h = gptq.collect(unet, _run(), NAMES)
    cache = {}
    a = layers(quant.apply_recipe(unet, RECIPE, hessian=h, cache=cache))
    assert len(cache) == 2
    b = layers(quant.apply_recipe(unet, RECIPE, hessian={k: v.copy() for k, v in h.items()}, cache=cache))
    assert all(b[n] is a[n] for n in NAMES) and len(cache) == 2
    # other calibration data: new weights, the ones an uncached call makes
    h2 = gptq.collect(unet, _run(seed=1), NAMES)
    c = layers(quant.apply_recipe(unet, RECIPE, hessian=h2, cache=cache))
    assert len(cache) == 4 and all(c[n] is not a[n] for n in NAMES)
    fresh = layers(quant.apply_recipe(unet, RECIPE, hessian=h2))
    for n in NAMES:
        np.testing.assert_array_equal(np.asarray(c[n].packed), np.asarray(fresh[n].packed))
    assert any(not np.array_equal(np.asarray(c[n].packed), np.asarray(a[n].packed)) for n in NAMES)
    # plain k-means of the same layers is another key: never a GPTQ weight
    p = layers(quant.apply_recipe(unet, {"rules": [dict(GPTQ_RULE, gptq=False)]}, cache=cache))
    assert len(cache) == 6 and all(p[n] is not a[n] and p[n] is not c[n] for n in NAMES)


def test_gptq_pipeline_saves_and_loads_bit_exactly(pipe, tmp_path):
    q = pipe.quantize(RECIPE, hessian=_run())
    out = str(tmp_path / "gptq")
    qio.save(q, out, progress=False)
    back = sdjax.load(out, progress=False)
    assert back.quantization["recipe"]["rules"][0]["gptq"] is True
    assert back.quantization["recipe"]["name"] == "gptq-test"
    want, got = layers(q.params["unet"]), layers(back.params["unet"])
    for name in NAMES:
        w, g = want[name], got[name]
        assert isinstance(g, PalettizedWeight) and jax.tree.structure(g) == jax.tree.structure(w)
        for u, v in zip(jax.tree.leaves(w), jax.tree.leaves(g)):
            assert u.dtype == v.dtype
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # the loaded recipe, parsed again, still asks for a hessian
    assert quant.parse_recipe(back.quantization["recipe"]).needs_hessian


@pytest.mark.slow  # ~20 s on 2 cores (compiles a generation, the VAE encoder and a UNet call); the sweep's GPTQ test uses it in CI
def test_calibration_run_shows_the_unet_the_schedule_and_stratified_timesteps(pipe):
    """The time MLP's first layer reads only the timestep, so its collected H is an exact function of
    the timesteps the run evaluated: every step of the guided generation (negative and positive
    context: two rows each) and every noised sample (two rows each), the samples' timesteps being
    sensitivity.calibration_samples' (one per stratum of [0, 1000))."""
    import samplers
    from sdjax.evaluation.calibration import Calibration, calibration_samples, hessian_run
    prompts = ["a red circle", "a blue square", "a green triangle"]
    steps, n_t, seed = 2, 3, 5
    run = hessian_run(pipe, Calibration(prompts, steps=steps, n_timesteps=n_t, seed=seed, batch=2), progress=False)
    # pipeline params, as apply_recipe passes them (unet-only params work the same way)
    h = gptq.collect(pipe.params, run, ["unet.time_embedding.linear_1"])["unet.time_embedding.linear_1"]
    plan = samplers.get("dpmpp_2m").plan(samplers.Schedule.from_config(pipe.scheduler_config), steps)
    _, t_noised, _ = calibration_samples(len(prompts), n_t, (4, 4, 4), seed)
    assert len(set(t_noised.tolist()) - set(np.asarray(plan.timesteps).tolist())) >= n_t  # beyond the schedule
    t_all = np.concatenate([np.repeat(np.asarray(plan.timesteps, np.float32), 2 * len(prompts)),
                            np.repeat(t_noised.astype(np.float32), 2)])
    cfg = pipe.configs["unet"]
    e = np.asarray(nn.timestep_embedding(jnp.asarray(t_all), cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                         cfg.freq_shift), np.float64)
    np.testing.assert_allclose(h, e.T @ e / len(e), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="non-empty list of calibration prompts"):
        hessian_run(pipe, Calibration([]))
