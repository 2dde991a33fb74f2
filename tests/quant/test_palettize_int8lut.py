"""int8 LUT entries and int8 activations on palettized weights (W4A8, W6A8, W2A8; issue 23 point 3).

The LUT quantization is checked against coremltools' own (``optimize._utils.compute_qparams_by_dtype``,
what its joint palettization + quantization and ``optimize.torch``'s ``lut_dtype`` call per LUT), the
weight and the layer's output against float64 NumPy statements of what they mean, and the recipe
options, calibration, cache and file codec around them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quant
import sdjax
from quant import io as qio
from quant import palettize
from quant.palettize import PalettizedWeight, int8_lut, quantize_lut_int8, with_act_scale
from quant.recipes import RecipeError, layers
from sdjax import nn
from sdjax.params import CheckpointError

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import types as mil_types  # noqa: E402
from coremltools.optimize import _utils as ct_utils  # noqa: E402

LAYER = "mid_block.resnets.0.conv1"


@pytest.fixture(scope="module")
def unet(pipeline_dirs):
    folder, _ = pipeline_dirs("sd1")
    return sdjax.load(folder, progress=False).params["unet"]


def _weight(rng, shape, scale_out=True):
    w = rng.standard_normal(shape)
    if scale_out:  # unequal output channels, so a per-channel or per-group scale that is misplaced shows
        w = w * np.geomspace(0.05, 2.0, shape[-1])
    return w.astype(np.float32)


def test_lut_quantization_is_coremltools(rng=np.random.default_rng(0)):
    luts = [np.sort(rng.standard_normal((3, 16)), 1).astype(np.float16),
            (rng.standard_normal((1, 64)) * 0.01).astype(np.float16),
            np.float16([[-1.0, -0.5, 0.0, 0.25]]),                       # exact multiples and a tie
            np.float16([[0.0, 0.0, 0.0, 0.0], [-3.0, 1.0, 2.0, 0.5]])]  # an all-zero LUT
    for lut in luts:
        q, s = quantize_lut_int8(lut)
        assert q.dtype == np.int8 and s.dtype == np.float16 and s.shape == (lut.shape[0],)
        for g in range(lut.shape[0]):
            if not np.any(lut[g]):  # coremltools divides by zero here; sdjax: scale 1, entries 0
                assert s[g] == 1 and not np.any(q[g])
                continue
            want_q, want_s, zp = ct_utils.compute_qparams_by_dtype(lut[g], mil_types.int8, "LINEAR_SYMMETRIC", [0])
            assert zp is None and want_q.dtype == np.int8
            np.testing.assert_array_equal(q[g], want_q)
            assert np.asarray(want_s).astype(np.float16).view(np.uint16) == s[g:g + 1].view(np.uint16)
            # the published formula in float64: scale max|lut| / 127 (to float16); entries within half a step,
            # plus what float16 arithmetic adds (the scale's rounding, up to 127 * 2**-12 steps, and the
            # quotient's, 2**-5 steps at |q| >= 64)
            m = np.abs(lut[g].astype(np.float64)).max()
            assert s[g] == np.float16(m / 127)
            assert np.all(np.abs(q[g] * np.float64(s[g]) - lut[g]) <= (0.5 + 127 * 2 ** -12 + 2 ** -5) * s[g])
            assert np.abs(q[g]).max() == 127 and q[g].min() >= -127
    with pytest.raises(ValueError, match="scale overflows"):
        quantize_lut_int8(np.float16([[60000.0, -1.0]]))


@pytest.mark.parametrize("group_size,pcs", [(None, False), (4, False), (8, True), (None, True)])
def test_int8_lut_dequantize_is_entry_times_scale(group_size, pcs, rng=np.random.default_rng(1)):
    w = _weight(rng, (3, 3, 8, 16))
    pw = palettize.kmeans(w, 4, group_size, per_channel_scale=pcs)
    q = int8_lut(pw)
    assert q.lut_dtype == "int8" and pw.lut_dtype == "float16" and int8_lut(q) is q
    np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(pw.packed))  # the indices are kept
    lut_q, lut_s = quantize_lut_int8(np.asarray(pw.lut))
    np.testing.assert_array_equal(np.asarray(q.lut), lut_q)
    # float64: entry q[g, idx] times the LUT's scale, times the per-channel scale rounded to float16 with it
    g = np.arange(16) // (16 // q.num_groups)
    idx = np.asarray(pw.indices()).reshape(-1, 16)
    s = lut_s.astype(np.float64)[g]
    if pcs:
        s = (s * np.asarray(pw.scale, np.float64)).astype(np.float16).astype(np.float64)
    want = (lut_q.astype(np.float64)[g[None, :], idx] * s).reshape(w.shape)
    np.testing.assert_array_equal(np.asarray(q.dequantize(), np.float64), want)  # exact in float32
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float16)), want.astype(np.float16))
    assert q.nbytes == pw.nbytes - pw.lut.size + 2 * q.num_groups
    # the cost: an int8 grid under each LUT, at most half a step from the float16 entries
    step = np.float64(lut_s.max()) * (1 if not pcs else float(np.max(pw.scale)))
    assert np.abs(want - np.asarray(pw.dequantize(), np.float64)).max() <= 0.6 * step


def _fake_quant(x, s):
    return np.clip(np.round(x / s), -127, 127) * s


def test_int8_activations_are_fake_quantized_inputs(rng=np.random.default_rng(2)):
    wl, wc = _weight(rng, (24, 16)), _weight(rng, (3, 3, 8, 16))
    ql, qc = (with_act_scale(int8_lut(palettize.kmeans(w, 4)), 0.03) for w in (wl, wc))
    assert float(ql.act_scale) == np.float32(0.03) and ql.method == "palettize"
    x = rng.standard_normal((2, 5, 24)).astype(np.float32) * 2  # some |x| beyond 127 * 0.03: clipped
    xc = rng.standard_normal((1, 6, 6, 8)).astype(np.float32) * 2
    s = np.float64(np.float32(0.03))
    xq = _fake_quant(x.astype(np.float64), s)
    want = xq @ np.asarray(ql.dequantize(), np.float64)
    got = np.asarray(nn.linear(jnp.asarray(x), {"weight": ql}), np.float64)
    bound = np.abs(xq) @ np.abs(np.asarray(ql.dequantize(), np.float64)) * 25 * np.finfo(np.float32).eps
    assert np.all(np.abs(got - want) <= bound)
    # the conv: the same fake-quantized input against the dequantized weight (float64, 'same' padding)
    xcq = np.pad(_fake_quant(xc.astype(np.float64), s), [(0, 0), (1, 1), (1, 1), (0, 0)])
    wd = np.asarray(qc.dequantize(), np.float64)
    want = sum(np.einsum("nhwc,co->nhwo", xcq[:, i:i + 6, j:j + 6], wd[i, j]) for i in range(3) for j in range(3))
    got = np.asarray(nn.conv2d(jnp.asarray(xc), {"weight": qc}), np.float64)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # without an activation scale the layer is the float layer of the dequantized weight, bit for bit
    plain = int8_lut(palettize.kmeans(wl, 4))
    np.testing.assert_array_equal(nn.linear(jnp.asarray(x), {"weight": plain}),
                                  nn.linear(jnp.asarray(x), {"weight": plain.dequantize()}))
    for bad, what in ((np.zeros(()), "finite and > 0"), (np.float32(np.nan), "finite and > 0"),
                      (np.full(24, 0.1), "per-tensor")):
        with pytest.raises(ValueError, match=what):
            with_act_scale(plain, bad)


def test_recipe_options_presets_and_errors():
    r = quant.parse_recipe("palette-4bit-int8lut-a8")
    o = r.rules[0].options
    assert (o["nbits"], o["lut_dtype"], o["activations"], o["act_method"]) == (4, "int8", "int8", "max")
    assert r.needs_calibration and quant.parse_recipe(r.to_json()) == r
    assert not quant.parse_recipe("palette-6bit-int8lut").needs_calibration
    assert "lut_dtype" not in quant.parse_recipe("palette-4bit").to_json()["rules"][0]  # old recipes unchanged
    for preset in ("palette-2bit-int8lut", "palette-6bit-int8lut-a8"):
        assert preset in quant.PRESETS and quant.parse_recipe(preset)
    rule = {"pattern": "*", "method": "palettize", "nbits": 4}
    for extra, msg in (({"lut_dtype": "int4"}, r"rule 1 \(pattern '\*'\): lut_dtype must be one of"),
                       ({"activations": "int4"}, "activations must be 'float' or 'int8'"),
                       ({"activations": "int8", "granularity": "channel"}, "granularity must be 'tensor' for palettize"),
                       ({"activations": "int8", "act_method": "mean"}, "act_method must be")):
        with pytest.raises(RecipeError, match=msg):
            quant.parse_recipe({"rules": [dict(rule, **extra)]})
    with pytest.raises(RecipeError, match="finetune trains float16 LUTs"):
        quant.parse_recipe("qat-4bit-int8lut")


def test_apply_recipe_calibrates_palettized_activations(unet):
    recipe = {"rules": [{"pattern": "mid_block.resnets.*", "kind": "conv", "method": "palettize", "nbits": 4,
                         "lut_dtype": "int8", "activations": "int8", "act_method": "percentile", "percentile": 99.0}]}
    names = [n for n, a in quant.plan(unet, recipe)["unet"].items() if a.method == "palettize"]
    assert len(names) == 4
    with pytest.raises(RecipeError, match="rule 1 .*palettize with int8 activations needs activation scales"):
        quant.apply_recipe(unet, recipe)
    with pytest.raises(RecipeError, match=rf"rule 1 .*{names[0]}.*per-tensor"):
        quant.apply_recipe(unet, recipe, {n: np.full(64, 0.1, np.float32) for n in names})
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 64)) * 3

    def run(p):  # drives the four layers
        r = p["mid_block"]["resnets"]
        return [nn.conv2d(x * (i + 1), r[str(i // 2)][f"conv{i % 2 + 1}"]) for i in range(4)]
    want = quant.calibrate.act_scales(quant.calibrate.observe(unet, run, names), "percentile", "tensor", 99.0)
    cache = {}
    q = layers(quant.apply_recipe(unet, recipe, run, cache=cache))
    for n in names:  # the scales of the same machinery as int8-w8a8's, the weight as the rule says
        assert isinstance(q[n], PalettizedWeight) and q[n].lut_dtype == "int8" and q[n].nbits == 4
        assert np.asarray(q[n].act_scale).shape == () and np.float32(q[n].act_scale) == want[n]
    # the cache holds the weight without its activation scale, shared with the weight-only recipe
    wo = dict(recipe["rules"][0], activations="float")
    wo.pop("act_method"), wo.pop("percentile")
    q2 = layers(quant.apply_recipe(unet, {"rules": [wo]}, cache=cache))
    assert q2[names[0]].act_scale is None and q2[names[0]].lut is q[names[0]].lut
    # an int8-LUT recipe reuses a float16 one's LUTs from the cache: the same as quantizing anew
    f16 = dict(wo, lut_dtype="float16")
    cache2 = {}
    quant.apply_recipe(unet, {"rules": [f16]}, cache=cache2)
    q3 = layers(quant.apply_recipe(unet, {"rules": [wo]}, cache=cache2))
    for n in names:
        np.testing.assert_array_equal(q3[n].lut, q2[n].lut)
        np.testing.assert_array_equal(q3[n].lut_scale, q2[n].lut_scale)


def test_file_codec_round_trip_and_errors(unet, tmp_path):
    recipe = {"rules": [{"pattern": LAYER, "method": "palettize", "nbits": 4, "group_size": 16,
                         "lut_dtype": "int8", "activations": "int8"},
                        {"pattern": "mid_block.resnets.0.conv2", "method": "palettize", "nbits": 2}]}
    q = quant.apply_recipe(unet, recipe, {LAYER: np.float32(0.07)})
    path = tmp_path / "u.safetensors"
    qio.save_component(str(path), "unet", q, recipe, progress=False)
    flat = nn.flatten(q)
    with qio.Reader(str(path)) as r:
        tensors = {k: r.get(k) for k in r.keys()}
        meta = dict(r.metadata)
    w = flat[LAYER + ".weight"]
    assert qio.label(w) == "palettize 4b g16 int8lut a8"
    got = qio.decode(LAYER + ".weight", {"method": "palettize", "shape": list(w.shape), "nbits": 4,
                                         "group_size": 16}, tensors.get, "u")
    for f in ("packed", "lut", "lut_scale", "act_scale"):
        a, b = np.asarray(getattr(got, f)), np.asarray(getattr(w, f))
        assert a.dtype == b.dtype and np.array_equal(a, b), f
    old = flat["mid_block.resnets.0.conv2.weight"]  # a float16-LUT weight reads as before
    got_old = qio.decode("mid_block.resnets.0.conv2.weight", {"method": "palettize", "shape": list(old.shape),
                                                              "nbits": 2, "group_size": None}, tensors.get, "u")
    assert got_old.lut_scale is None and got_old.act_scale is None and got_old.lut.dtype == jnp.float16
    info = {"method": "palettize", "shape": list(w.shape), "nbits": 4, "group_size": 16}
    key = LAYER + ".weight"
    for drop, msg in ((key + ".lut_scale", "an int8 LUT .* comes with one scale per LUT"),):
        with pytest.raises(CheckpointError, match=msg):
            qio.decode(key, info, lambda n: None if n == drop else tensors.get(n), "u")
    bad = dict(tensors, **{key + ".act_scale": np.float32(-1.0)})
    with pytest.raises(CheckpointError, match=r"u: palettized weight .*act_scale must be one finite scale > 0"):
        qio.decode(key, info, bad.get, "u")
    assert "int8" in meta["recipe"]


def test_eval_treats_int8_activations_as_not_weight_only(rng=np.random.default_rng(3)):
    """``sdjax eval`` may swap weight-only types for their dequantized weights; a palettized weight with an
    activation scale must keep its fake-quantized inputs, so it is not weight-only."""
    from sdjax.evaluation import families, sweep
    pw = int8_lut(palettize.kmeans(_weight(rng, (24, 16)), 4))
    assert sweep.weight_only({"a": {"weight": pw}})
    assert not sweep.weight_only({"a": {"weight": with_act_scale(pw, 0.1)}})
    assert families.family("palette-4bit-int8lut-a8") == "uniform palettize (int8 LUT, int8 activations)"
    assert families.family("palette-4bit-int8lut") == "uniform palettize (int8 LUT)"
