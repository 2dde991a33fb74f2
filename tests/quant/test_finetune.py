"""Fine-tuning palettized weights: each method's forward and gradients against a float64 NumPy
statement of its formula (DKM's gradient written out by hand, itself checked by finite
differences), round trips to the same bytes, re-snapping, a small optax fit, the tree helpers and
bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quant import finetune, int8, llm_int8
from quant.finetune import finalize, trainable, weight
from quant.palettize import PalettizedWeight, kmeans, unpack_bits_np

# (name, shape, nbits, kmeans options): output channels last, as PalettizedWeight stores them
CASES = [
    ("tensor", (40, 16), 4, {}),
    ("grouped", (40, 16), 2, {"group_size": 4}),
    ("scaled-conv", (3, 3, 4, 8), 3, {"per_channel_scale": True}),
    ("grouped-scaled-conv", (3, 3, 4, 8), 4, {"group_size": 2, "per_channel_scale": True}),
]
IDS = [c[0] for c in CASES]


def make(case, seed=0):
    """(float weights, their k-means PalettizedWeight)."""
    _, shape, nbits, opts = case
    w = (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)
    return w, kmeans(w, nbits, **opts)


# --- float64 NumPy statement of the methods --------------------------------------------------
# The weight as (rows, out); channel o uses LUT row col[o] (g = o // group_size, 0 for one LUT)
# and scale s[o] (1 without scales); x = w / s.
#   lut:  W[r, o] = s[o] * c[col[o], idx[r, o]]
#   dkm:  a_k = softmax_k(-(x - c_k)^2 / T),  W = s * sum_k a_k c_k
#   ste:  W = s * c[nearest(x)],  dW/dw = identity, dW/dc through the hard lookup

def layout(pw):
    out, groups = pw.shape[-1], pw.lut.shape[0]
    idx = unpack_bits_np(pw.packed, pw.nbits, pw.size).reshape(-1, out).astype(np.int64)
    col = np.zeros(out, np.int64) if groups == 1 else np.arange(out) // pw.group_size
    return idx, col


def f64(params, key, out=None):
    if key not in params:
        return np.ones(out)
    return np.asarray(params[key], np.float64)


def np_lookup(lut, s, idx, col):
    return lut[col[None, :], idx] * s


def np_segment_sum(values, idx, col, lut_shape):
    """sum of ``values`` (rows, out) over the weights using each LUT entry of each group."""
    g = np.zeros(lut_shape)
    np.add.at(g, (np.broadcast_to(col, idx.shape), idx), values)
    return g


def np_nearest(x, lut, col):
    return np.argmin(np.abs(x[..., None] - lut[col][None]), axis=-1)


def np_dkm(w, lut, s, col, temperature, g=None):
    """DKM's dense weight, and with ``g`` the gradient of sum(g * W) w.r.t. w, the LUT and s.

    With d_k = x - c_k, l_k = -d_k^2 / T and soft = sum_k a_k c_k:
      dsoft/dl_j = a_j (c_j - soft),  dl_j/dc_j = 2 d_j / T,  dl_j/dx = -2 d_j / T
      dsoft/dc_j = a_j + a_j (c_j - soft) 2 d_j / T,  dsoft/dx = sum_j a_j (c_j - soft)(-2 d_j / T)
      dW/dw = dsoft/dx,  dW/dc_j = s dsoft/dc_j,  dW/ds = soft - x dsoft/dx."""
    out = w.shape[-1]
    w2 = np.asarray(w, np.float64).reshape(-1, out)
    x = w2 / s
    c = lut[col]                                          # (out, K)
    d = x[..., None] - c                                  # (rows, out, K)
    logits = -d * d / temperature
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    soft = (a * c).sum(-1)
    dense = (soft * s).reshape(w.shape)
    if g is None:
        return dense
    g2 = np.asarray(g, np.float64).reshape(-1, out)
    dsoft_dl = a * (c - soft[..., None])
    dsoft_dc = a + dsoft_dl * 2 * d / temperature
    dsoft_dx = (dsoft_dl * (-2 * d / temperature)).sum(-1)
    g_lut = np.zeros(lut.shape)
    np.add.at(g_lut, col, ((g2 * s)[..., None] * dsoft_dc).sum(0))
    grads = {"w": (g2 * dsoft_dx).reshape(w.shape), "lut": g_lut, "scale": (g2 * (soft - x * dsoft_dx)).sum(0)}
    return dense, grads


def soft_temperature(pw, divide):
    """A temperature on the scale of the LUT's spacing (its mean gap squared / ``divide``)."""
    lut = np.sort(np.asarray(pw.lut, np.float64), -1)
    return float(np.mean(np.diff(lut, axis=-1)) ** 2 / divide)


def assert_same_weight(a, b):
    assert (a.shape, a.nbits, a.group_size) == (b.shape, b.nbits, b.group_size)
    np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))
    assert a.lut.dtype == b.lut.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(a.lut), np.asarray(b.lut))
    assert (a.scale is None) == (b.scale is None)
    if a.scale is not None:
        assert a.scale.dtype == b.scale.dtype
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    assert a.nbytes == b.nbytes


# --- untouched params: the weight's own dequantization, and the same bytes back ----------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("method", finetune.METHODS)
def test_untouched_params_give_the_dequantized_weight_and_the_same_bytes(case, method):
    _, pw = make(case)
    params, frozen = trainable(pw, method)
    assert all(v.dtype == jnp.float32 for v in params.values())
    expected = {"lut"} | ({"scale"} if pw.scale is not None else set()) | ({"w"} if method != "lut" else set())
    assert set(params) == expected
    ref = np.asarray(pw.dequantize(jnp.float32))
    # a temperature far below the squared gap between entries: every assignment is one-hot
    temperature = soft_temperature(pw, 1e4) if method == "dkm" else None
    got = np.asarray(jax.jit(weight, static_argnums=2)(params, frozen, method, temperature))
    assert got.shape == pw.shape and got.dtype == np.float32
    if method == "dkm":
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7)
    else:
        np.testing.assert_array_equal(got, ref)
    assert_same_weight(finalize(params, frozen), pw)
    if method != "lut":
        assert_same_weight(finalize(params, frozen, refine=True), pw)


def test_dkm_tends_to_the_hard_quantization_as_the_temperature_falls():
    w, pw = make(CASES[3])
    params, frozen = trainable(pw, "dkm", init=w)  # float weights: between the entries
    hard = np.asarray(weight(params, frozen, "ste"))
    errors = [np.abs(np.asarray(weight(params, frozen, "dkm", soft_temperature(pw, d))) - hard).mean()
              for d in (1, 10, 100, 1e6)]
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-7 * np.abs(hard).mean()


# --- the forward and gradients against the NumPy statement -----------------------------------

def perturbed(params, seed, amount=0.1):
    """params with the LUT and scales moved off their float16 values (so nothing is trivially exact)."""
    rng = np.random.default_rng(seed)
    return {k: (v if k == "w" else v * (1 + amount * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)))
            for k, v in params.items()}


def test_dkm_numpy_gradient_matches_finite_differences():
    """The hand-written NumPy gradient is itself checked against central differences of the
    NumPy forward, so the comparison with jax.grad below stands on the formula alone."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 4)) * 0.3
    lut = np.sort(rng.standard_normal((2, 4)), -1)
    s = rng.uniform(0.5, 2.0, 4)
    col = np.array([0, 0, 1, 1])
    g = rng.standard_normal(w.shape)
    temperature = 0.05
    _, grads = np_dkm(w, lut, s, col, temperature, g)
    eps = 1e-6
    for name, base in (("w", w), ("lut", lut), ("scale", s)):
        for flat in range(base.size):
            args = {"w": w, "lut": lut, "scale": s}
            hi, lo = base.copy().reshape(-1), base.copy().reshape(-1)
            hi[flat] += eps
            lo[flat] -= eps
            f = []
            for v in (hi, lo):
                a = dict(args, **{name: v.reshape(base.shape)})
                f.append(np.sum(g * np_dkm(a["w"], a["lut"], a["scale"], col, temperature)))
            fd = (f[0] - f[1]) / (2 * eps)
            assert abs(fd - grads[name].reshape(-1)[flat]) < 1e-6 * max(1.0, abs(fd))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dkm_forward_and_gradients_equal_the_numpy_statement(case):
    w, pw = make(case)
    params, frozen = trainable(pw, "dkm", init=w)
    params = perturbed(params, 1, 0.05)
    _, col = layout(pw)
    out = pw.shape[-1]
    temperature = soft_temperature(pw, 4)  # soft: several entries share each weight
    g = np.random.default_rng(2).standard_normal(pw.shape).astype(np.float32)
    lut, s = f64(params, "lut"), f64(params, "scale", out)
    ref, ref_grads = np_dkm(np.asarray(params["w"], np.float64), lut, s, col, temperature, g)
    got = np.asarray(weight(params, frozen, "dkm", temperature))
    assert np.abs(got - ref).max() < 1e-6 * np.abs(ref).max()
    grads = jax.grad(lambda p: jnp.sum(g * weight(p, frozen, "dkm", temperature)))(params)
    assert set(grads) == set(params)
    for k in grads:
        err = np.abs(np.asarray(grads[k], np.float64) - ref_grads[k]).max()
        assert err < 2e-4 * np.abs(ref_grads[k]).max(), (k, err)
    # the soft assignment is really soft here, so the w-gradient is not the identity
    assert np.abs(ref_grads["w"] - g).max() > 0.1 * np.abs(g).max()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lut_gradient_is_the_segment_sum_of_the_upstream_gradient(case):
    _, pw = make(case)
    params, frozen = trainable(pw, "lut")
    params = perturbed(params, 4)
    idx, col = layout(pw)
    out = pw.shape[-1]
    lut, s = f64(params, "lut"), f64(params, "scale", out)
    ref = np_lookup(lut, s, idx, col).astype(np.float32).reshape(pw.shape)  # one float32 product
    np.testing.assert_array_equal(np.asarray(weight(params, frozen, "lut")), ref)
    g = np.random.default_rng(5).standard_normal(pw.shape)
    grads = jax.grad(lambda p: jnp.sum(jnp.asarray(g, jnp.float32) * weight(p, frozen, "lut")))(params)
    g2 = g.reshape(-1, out)
    np.testing.assert_allclose(np.asarray(grads["lut"]), np_segment_sum(g2 * s, idx, col, lut.shape),
                               rtol=1e-5, atol=1e-5)
    if "scale" in params:
        np.testing.assert_allclose(np.asarray(grads["scale"]), (g2 * lut[col[None, :], idx]).sum(0),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ste_forward_is_the_hard_quantization_and_its_gradients_are_straight_through(case):
    w, pw = make(case, seed=6)
    params, frozen = trainable(pw, "ste", init=w)
    params = perturbed(params, 7, 0.05)
    _, col = layout(pw)
    out = pw.shape[-1]
    lut, s = f64(params, "lut"), f64(params, "scale", out)
    w2 = np.asarray(params["w"], np.float64).reshape(-1, out)
    idx = np_nearest(w2 / s, lut, col)
    assert (idx != layout(pw)[0]).any()  # the perturbed LUT moved some assignments
    ref = np_lookup(lut, s, idx, col).astype(np.float32).reshape(pw.shape)
    np.testing.assert_array_equal(np.asarray(jax.jit(weight, static_argnums=2)(params, frozen, "ste")), ref)
    g = np.random.default_rng(8).standard_normal(pw.shape).astype(np.float32)
    grads = jax.grad(lambda p: jnp.sum(g * weight(p, frozen, "ste")))(params)
    np.testing.assert_array_equal(np.asarray(grads["w"]), g)  # identity
    g2 = g.reshape(-1, out).astype(np.float64)
    np.testing.assert_allclose(np.asarray(grads["lut"]), np_segment_sum(g2 * s, idx, col, lut.shape),
                               rtol=1e-5, atol=1e-5)
    if "scale" in params:
        np.testing.assert_allclose(np.asarray(grads["scale"]), (g2 * lut[col[None, :], idx]).sum(0),
                                   rtol=1e-5, atol=1e-5)


def test_annealed_temperature_can_be_traced():
    w, pw = make(CASES[1])
    params, frozen = trainable(pw, "dkm", init=w)
    t = soft_temperature(pw, 4)
    jitted = jax.jit(lambda p, t: weight(p, frozen, "dkm", t))
    np.testing.assert_allclose(np.asarray(jitted(params, jnp.float32(t))),
                               np.asarray(weight(params, frozen, "dkm", t)), rtol=1e-6, atol=1e-8)


# --- finalize: re-snapping the float weights ----------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("refine", [False, True])
def test_finalize_snaps_to_the_nearest_float16_entry(case, refine):
    w, pw = make(case, seed=9)
    params, frozen = trainable(pw, "dkm", init=w * 1.1)
    params = perturbed(params, 10, 0.05)
    _, col = layout(pw)
    out = pw.shape[-1]
    fin = finalize(params, frozen, refine=refine)
    assert (fin.shape, fin.nbits, fin.group_size, fin.nbytes) == (pw.shape, pw.nbits, pw.group_size, pw.nbytes)
    assert len(fin.packed) == len(pw.packed) and fin.lut.shape == pw.lut.shape and fin.lut.dtype == jnp.float16
    lut16 = np.asarray(params["lut"], np.float32).astype(np.float16).astype(np.float64)
    s = np.ones(out)
    if pw.scale is not None:
        s = np.asarray(params["scale"], np.float32).astype(np.float16).astype(np.float64)
    if pw.scale is not None:
        np.testing.assert_array_equal(np.asarray(fin.scale, np.float64), s)
    x = np.asarray(params["w"], np.float64).reshape(-1, out) / s
    idx = np_nearest(x, lut16, col)
    if refine:  # one Lloyd step: each entry the s^2-weighted mean of its weights, unused ones kept
        mass = np.broadcast_to(s * s, x.shape)
        total = np_segment_sum(mass, idx, col, lut16.shape)
        sums = np_segment_sum(mass * x, idx, col, lut16.shape)
        lut16 = np.where(total > 0, sums / np.where(total > 0, total, 1), lut16).astype(np.float16).astype(np.float64)
        idx = np_nearest(x, lut16, col)
    np.testing.assert_array_equal(np.asarray(fin.lut, np.float64), lut16)
    np.testing.assert_array_equal(layout(fin)[0], idx)


def test_equal_entries_snap_to_the_lowest_index():
    lut = np.array([[0.5, -0.25, 0.5, 0.25]], np.float16)
    packed = jnp.asarray(np.array([0b11100010], np.uint8))  # indices 2, 0, 2, 3 (LSB first)
    pw = PalettizedWeight(packed=packed, lut=jnp.asarray(lut), shape=(4, 1), nbits=2)
    params, frozen = trainable(pw, "ste")
    assert list(layout(pw)[0][:, 0]) == [2, 0, 2, 3]
    assert list(layout(finalize(params, frozen))[0][:, 0]) == [0, 0, 0, 3]  # same values
    np.testing.assert_array_equal(np.asarray(weight(params, frozen, "ste")), np.asarray(pw.dequantize()))
    params["w"] = jnp.asarray([[0.6], [0.45], [0.3], [-0.1]], jnp.float32)  # above, below, between the equal ones
    assert list(layout(finalize(params, frozen))[0][:, 0]) == [0, 0, 3, 1]
    np.testing.assert_array_equal(np.asarray(weight(params, frozen, "ste"))[:, 0], [0.5, 0.5, 0.25, -0.25])


# --- a small optax fit ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[IDS[1], IDS[3]])
@pytest.mark.parametrize("method", finetune.METHODS)
def test_a_few_adam_steps_fit_a_target_and_finalize_keeps_the_bytes(case, method):
    _, shape, nbits, opts = case
    rng = np.random.default_rng(11)
    target = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    src = 1.3 * target + 0.01 * rng.standard_normal(shape).astype(np.float32)  # what was palettized
    pw = kmeans(src, nbits, **opts)
    params, frozen = trainable(pw, method, init=None if method == "lut" else jnp.asarray(src))
    temperature = soft_temperature(pw, 16) if method == "dkm" else None

    def loss(p):
        return jnp.mean((weight(p, frozen, method, temperature) - target) ** 2)
    # the float weights move by about lr per Adam step whatever their gradient: keep theirs small
    opt = optax.multi_transform({"w": optax.adam(5e-4), "palette": optax.adam(5e-3)},
                                {k: "w" if k == "w" else "palette" for k in params})
    state = opt.init(params)

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(loss)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value
    first = float(loss(params))
    for _ in range(30):
        params, state, _ = step(params, state)
    assert float(loss(params)) < 0.8 * first
    fin = finalize(params, frozen)
    assert isinstance(fin, PalettizedWeight)
    assert (fin.shape, fin.nbits, fin.group_size, fin.nbytes) == (pw.shape, pw.nbits, pw.group_size, pw.nbytes)
    assert len(fin.packed) == len(pw.packed) and fin.lut.shape == pw.lut.shape
    assert (fin.scale is None) == (pw.scale is None)
    if method == "lut":
        np.testing.assert_array_equal(np.asarray(fin.packed), np.asarray(pw.packed))
    before = np.mean((np.asarray(pw.dequantize()) - target) ** 2)
    after = np.mean((np.asarray(fin.dequantize()) - target) ** 2)
    assert after < 0.85 * before


# --- over a params tree --------------------------------------------------------------------------

def tree_of_weights():
    w, pw = make(CASES[1])
    wc, pwc = make(CASES[3], seed=1)
    tree = {"a": {"weight": pw, "bias": jnp.ones(16)},
            "b": {"c": {"weight": pwc}, "norm": {"scale": jnp.ones(8)}},
            "q": {"weight": int8.quantize(jnp.asarray(w))},
            "l": {"weight": llm_int8.quantize(jnp.asarray(w))}}
    return tree, {"a.weight": w, "b.c.weight": wc}


@pytest.mark.parametrize("method", finetune.METHODS)
def test_tree_helpers_train_only_palettized_leaves(method):
    tree, floats = tree_of_weights()
    train, frozen = finetune.trainable_tree(tree, method, require=["a.weight", "b"])
    assert set(train) == {"a.weight", "b.c.weight"}
    assert frozen["a"]["bias"] is tree["a"]["bias"] and frozen["q"]["weight"] is tree["q"]["weight"]
    assert isinstance(frozen["b"]["c"]["weight"], finetune.Frozen)
    temperature = soft_temperature(tree["a"]["weight"], 1e5) if method == "dkm" else None
    dense = jax.jit(finetune.weights_tree, static_argnums=2)(train, frozen, method, temperature)
    for path, (outer, inner) in {"a.weight": ("a", None), "b.c.weight": ("b", "c")}.items():
        got = dense[outer]["weight"] if inner is None else dense[outer][inner]["weight"]
        pw = tree[outer]["weight"] if inner is None else tree[outer][inner]["weight"]
        np.testing.assert_allclose(np.asarray(got), np.asarray(pw.dequantize()), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(dense["q"]["weight"].data), np.asarray(tree["q"]["weight"].data))
    assert isinstance(dense["l"]["weight"], llm_int8.LLMInt8Weight)
    grads = jax.grad(lambda t: sum(jnp.sum(v) for v in jax.tree.leaves(finetune.weights_tree(t, frozen, method,
                                                                                             temperature)["a"])))(train)
    assert set(grads) == set(train) and float(jnp.abs(grads["b.c.weight"]["lut"]).max()) == 0.0
    out = finetune.finalize_tree(train, frozen)
    assert_same_weight(out["a"]["weight"], tree["a"]["weight"])
    assert_same_weight(out["b"]["c"]["weight"], tree["b"]["c"]["weight"])
    assert out["l"]["weight"] is tree["l"]["weight"]
    if method != "lut":  # init from the float weights
        train, frozen = finetune.trainable_tree(tree, method, init=floats)
        np.testing.assert_array_equal(np.asarray(train["a.weight"]["w"]), floats["a.weight"])


@pytest.mark.parametrize("require, named", [
    (["q.weight"], ["q.weight", "Int8Weight", "'int8'"]),
    (["l.weight"], ["l.weight", "LLMInt8Weight", "'llm-int8'"]),
    (["a.bias"], ["a.bias", "float array"]),
    (["a.weight", "nope.weight"], ["nope.weight", "no such layer"]),
    ("q", ["q: holds", "q.weight (Int8Weight"]),
    (["b.norm"], ["b.norm", "no palettized weight"]),
    (["q.weight", "l.weight"], ["q.weight", "l.weight"]),  # every problem at once
])
def test_tree_refuses_to_train_what_cannot_be_trained(require, named):
    tree, _ = tree_of_weights()
    with pytest.raises(ValueError) as e:
        finetune.trainable_tree(tree, "lut", require=require)
    for n in named:
        assert n in str(e.value)


def test_bad_input_is_named():
    w, pw = make(CASES[0])
    params, frozen = trainable(pw, "lut")
    dparams, dfrozen = trainable(pw, "dkm")
    with pytest.raises(ValueError, match="valid methods: lut, dkm, ste"):
        trainable(pw, "kmeans")
    with pytest.raises(ValueError, match="valid methods"):
        weight(params, frozen, "gptq")
    with pytest.raises(ValueError, match="valid methods"):
        finetune.trainable_tree({"a": pw}, "dkm2")
    for t in (0.0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="temperature"):
            weight(dparams, dfrozen, "dkm", t)
    with pytest.raises(ValueError, match="temperature"):
        weight(dparams, dfrozen, "dkm")
    with pytest.raises(ValueError, match="temperature"):
        finetune.weights_tree({"a": dparams}, {"a": dfrozen}, "dkm", 0.0)
    with pytest.raises(ValueError, match="made for \"lut\""):
        weight(params, frozen, "ste")
    with pytest.raises(ValueError, match="stale"):
        weight(dparams, dfrozen, "lut")
    with pytest.raises(ValueError, match="Int8Weight"):
        trainable(int8.quantize(jnp.asarray(w)), "lut")
    with pytest.raises(ValueError, match="init"):
        trainable(pw, "lut", init=w)
    with pytest.raises(ValueError, match="shape"):
        trainable(pw, "ste", init=w[:-1])
    with pytest.raises(ValueError, match="refine"):
        finalize(params, frozen, refine=True)
    with pytest.raises(ValueError, match="float16"):
        finalize({"lut": params["lut"] * 1e6}, frozen)
    with pytest.raises(ValueError, match="do not match"):
        finetune.weights_tree({}, {"a": frozen}, "lut")
    with pytest.raises(ValueError, match="not palettized"):
        finetune.trainable_tree({"a": pw, "b": jnp.ones(3)}, "ste", init={"b": jnp.ones(3)})


@pytest.mark.parametrize("nbits", [2, 4, 6])
def test_nearest_is_the_argmin_at_every_lut_size(nbits):
    """``_nearest`` (a count of midpoints up to 16 entries, a binary search above) against NumPy's
    argmin, with equal entries (ties to the lowest index) and shuffled LUTs."""
    rng = np.random.default_rng(nbits)
    k = 1 << nbits
    lut = np.sort(rng.standard_normal((2, k))).astype(np.float32)
    lut[0, 1] = lut[0, 0]                                    # equal entries
    x = rng.standard_normal((30, 8)).astype(np.float32)
    x[0, :4] = lut[0, 0]                                      # on the equal entries: the lowest index
    lut = lut[:, rng.permutation(k)]
    col = np.arange(8) // 4
    got = np.asarray(finetune._nearest(jnp.asarray(x), jnp.asarray(lut), 4))
    np.testing.assert_array_equal(got, np_nearest(x, lut, col))


@pytest.mark.parametrize("method", ["lut", "ste"])
def test_lazy_weights_tree_expands_the_same_weights(method):
    """``weights_tree(..., lazy=True)``: ``TrainingWeight`` leaves that dequantize to the dense
    ``weights_tree``'s values and give the same gradients through a layer."""
    from sdjax import nn
    tree, _ = tree_of_weights()
    train, frozen = finetune.trainable_tree(tree, method)
    dense = finetune.weights_tree(train, frozen, method)
    lazy = finetune.weights_tree(train, frozen, method, lazy=True)
    w = lazy["a"]["weight"]
    assert isinstance(w, finetune.TrainingWeight) and nn.is_quantized(w) and w.shape == dense["a"]["weight"].shape
    np.testing.assert_array_equal(np.asarray(w.dequantize()), np.asarray(dense["a"]["weight"]))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, w.shape[0]), dtype=np.float32))

    def loss(t, lazy):
        return jnp.sum(jnp.square(nn.linear(x, finetune.weights_tree(t, frozen, method, lazy=lazy)["a"])))
    a, b = jax.grad(loss)(train, False), jax.jit(jax.grad(loss), static_argnums=1)(train, True)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=1e-6, atol=1e-7)
