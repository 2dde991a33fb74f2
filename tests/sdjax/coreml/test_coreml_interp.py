"""sdjax.coreml.interp against independent NumPy/JAX computations, on programs read back from
saved .mlpackage files (what Core ML would load), since Core ML itself cannot run on Linux."""
import copy
import math

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sdjax.coreml import interp  # noqa: E402

FP32 = types.fp32
# what the exporter uses for compute_precision=FLOAT16 (see sdjax/coreml/interp.py)
FP16_PASSES = ["common::add_fp16_cast", "common::const_elimination", "common::cast_optimization",
               "common::dead_code_elimination"]


def _save_and_load(prog, tmp_path, name, target, precision=None, pipeline=None):
    """Convert ``prog`` as the exporter will, save it, read it back from disk.

    ct.convert runs its passes on the Program in place (a second convert of the same object
    sees the first one's casts and fusions), hence the copy."""
    model = ct.convert(
        copy.deepcopy(prog), convert_to="mlprogram", minimum_deployment_target=target,
        compute_precision=precision or ct.precision.FLOAT32,
        pass_pipeline=pipeline if pipeline is not None else ct.PassPipeline.EMPTY)
    path = tmp_path / f"{name}.mlpackage"
    model.save(str(path))
    return interp.load_program(path)


def _close(got, want, tol=1e-5):
    want = np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)


def _ops(program):
    return [op.op_type for op in program.functions["main"].operations if op.op_type != "const"]


def test_elementwise_and_activations(tmp_path):
    rng = np.random.default_rng(0)
    shape = (2, 3, 4, 5)
    xv = rng.standard_normal(shape).astype(np.float32)
    yv = (rng.random(shape) + 0.5).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape, dtype=FP32) for _ in range(2)], opset_version=ct.target.iOS16)
    def prog(x, y):
        return (
            mb.add(x=x, y=y, name="o_add"), mb.sub(x=x, y=np.float32(0.25), name="o_sub"),
            mb.mul(x=x, y=y, name="o_mul"), mb.real_div(x=x, y=y, name="o_div"),
            mb.pow(x=y, y=np.float32(1.5), name="o_pow"), mb.sqrt(x=y, name="o_sqrt"),
            mb.rsqrt(x=y, epsilon=np.float32(0.1), name="o_rsqrt"),
            mb.maximum(x=x, y=np.zeros((1, 3, 1, 1), np.float32), name="o_max"),
            mb.minimum(x=x, y=y, name="o_min"), mb.sigmoid(x=x, name="o_sigmoid"),
            mb.silu(x=x, name="o_silu"), mb.tanh(x=x, name="o_tanh"), mb.relu(x=x, name="o_relu"),
            mb.gelu(x=x, mode="EXACT", name="o_gelu"),
            mb.gelu(x=x, mode="TANH_APPROXIMATION", name="o_gelu_tanh"),
            mb.gelu(x=x, mode="SIGMOID_APPROXIMATION", name="o_gelu_sigmoid"),
            mb.softmax(x=x, axis=1, name="o_softmax"), mb.exp(x=x, name="o_exp"),
            mb.log(x=y, name="o_log"), mb.abs(x=x, name="o_abs"), mb.erf(x=x, name="o_erf"),
            mb.reduce_max(x=x, axes=[1, 3], keep_dims=True, name="o_rmax"), mb.reduce_min(x=x, axes=[0], name="o_rmin"),
            mb.sin(x=x, name="o_sin"), mb.cos(x=x, name="o_cos"),
        )

    p = _save_and_load(prog, tmp_path, "elementwise", ct.target.iOS16)
    out = interp.run(p, {"x": xv, "y": yv})
    x, y = jnp.asarray(xv), jnp.asarray(yv)
    want = {
        "o_add": x + y, "o_sub": x - 0.25, "o_mul": x * y, "o_div": x / y, "o_pow": y ** 1.5,
        "o_sqrt": jnp.sqrt(y), "o_rsqrt": 1 / jnp.sqrt(y + 0.1), "o_max": jnp.maximum(x, 0),
        "o_min": jnp.minimum(x, y), "o_sigmoid": jax.nn.sigmoid(x), "o_silu": jax.nn.silu(x),
        "o_tanh": jnp.tanh(x), "o_relu": jax.nn.relu(x),
        "o_gelu": jax.nn.gelu(x, approximate=False), "o_gelu_tanh": jax.nn.gelu(x, approximate=True),
        "o_gelu_sigmoid": x * jax.nn.sigmoid(1.702 * x), "o_softmax": jax.nn.softmax(x, axis=1),
        "o_exp": jnp.exp(x), "o_log": jnp.log(y), "o_abs": jnp.abs(x), "o_erf": jax.scipy.special.erf(x),
        "o_rmax": x.max((1, 3), keepdims=True), "o_rmin": x.min(0), "o_sin": jnp.sin(x), "o_cos": jnp.cos(x),
    }
    assert list(out) == list(want)
    for k, v in want.items():
        assert out[k].dtype == np.float32, k
        _close(out[k], v)


def test_reductions_and_norms(tmp_path):
    rng = np.random.default_rng(1)
    shape = (2, 6, 3, 4)
    xv = (3 * rng.standard_normal(shape) + 1).astype(np.float32)
    gamma_c, beta_c = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    gamma_l, beta_l = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    mean, var = rng.standard_normal(6).astype(np.float32), (rng.random(6) + 0.5).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape, dtype=FP32)], opset_version=ct.target.iOS16)
    def prog(x):
        return (
            mb.reduce_mean(x=x, axes=[1], keep_dims=True, name="mean_c"),
            mb.reduce_sum(x=x, axes=[-1, 2], keep_dims=False, name="sum_hw"),
            mb.reduce_sum(x=x, name="sum_all"),
            mb.layer_norm(x=x, axes=[-1], gamma=gamma_l, beta=beta_l, epsilon=np.float32(1e-5), name="ln_last"),
            mb.layer_norm(x=x, axes=[1], epsilon=np.float32(1e-3), name="ln_channel"),
            mb.instance_norm(x=x, gamma=gamma_c, beta=beta_c, epsilon=np.float32(1e-4), name="inorm"),
            mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma_c, beta=beta_c, epsilon=np.float32(1e-3), name="bnorm"),
        )

    p = _save_and_load(prog, tmp_path, "norms", ct.target.iOS16)
    out = interp.run(p, {"x": xv})
    x = jnp.asarray(xv)

    def norm(v, axes, eps):
        m = v.mean(axes, keepdims=True)
        return (v - m) / jnp.sqrt(((v - m) ** 2).mean(axes, keepdims=True) + eps)

    c = (1, 6, 1, 1)
    _close(out["mean_c"], x.mean(1, keepdims=True))
    _close(out["sum_hw"], x.sum((2, 3)), 1e-4)
    _close(out["sum_all"], x.sum(), 1e-4)
    _close(out["ln_last"], norm(x, (3,), 1e-5) * gamma_l + beta_l)
    _close(out["ln_channel"], norm(x, (1,), 1e-3))
    _close(out["inorm"], norm(x, (2, 3), 1e-4) * gamma_c.reshape(c) + beta_c.reshape(c))
    _close(out["bnorm"], (x - mean.reshape(c)) / jnp.sqrt(var.reshape(c) + 1e-3) * gamma_c.reshape(c) + beta_c.reshape(c))


def test_matmul_linear_einsum(tmp_path):
    rng = np.random.default_rng(2)
    xv = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    yv = rng.standard_normal((3, 6, 5)).astype(np.float32)
    w, b = rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    # split_einsum attention (per head): q [B, C, 1, Q], k [B, K, 1, C], weights [B, K, 1, Q],
    # v [B, C, 1, K]. MIL's einsum accepts only "nchw,nwhu->nchu" up to renaming, so Apple's
    # "bchq,bkhc->bkhq" and "bkhq,bchk->bchq" are written with the operands swapped.
    qv = rng.standard_normal((2, 8, 1, 10)).astype(np.float32)
    kv = rng.standard_normal((2, 12, 1, 8)).astype(np.float32)
    wv = rng.standard_normal((2, 12, 1, 10)).astype(np.float32)
    vv = rng.standard_normal((2, 8, 1, 12)).astype(np.float32)

    specs = [mb.TensorSpec(shape=s.shape, dtype=FP32) for s in (xv, yv, qv, kv, wv, vv)]

    @mb.program(input_specs=specs, opset_version=ct.target.iOS16)
    def prog(x, y, q, k, aw, v):
        return (
            mb.matmul(x=x, y=y, transpose_y=True, name="mm_ty"),
            mb.matmul(x=x, y=x, transpose_x=True, name="mm_tx"),
            mb.linear(x=x, weight=w, bias=b, name="lin"),
            mb.linear(x=x, weight=w, name="lin_nobias"),
            mb.einsum(values=(k, q), equation="bkhc,bchq->bkhq", name="scores"),
            mb.einsum(values=(v, aw), equation="bchk,bkhq->bchq", name="attn"),
        )

    with pytest.raises(AssertionError):
        @mb.program(input_specs=[mb.TensorSpec(shape=qv.shape, dtype=FP32), mb.TensorSpec(shape=kv.shape, dtype=FP32)],
                    opset_version=ct.target.iOS16)
        def apple_order(q, k):
            return mb.einsum(values=(q, k), equation="bchq,bkhc->bkhq")

    p = _save_and_load(prog, tmp_path, "linalg", ct.target.iOS16)
    assert _ops(p) == ["matmul", "matmul", "linear", "linear", "einsum", "einsum"]
    out = interp.run(p, {"x": xv, "y": yv, "q": qv, "k": kv, "aw": wv, "v": vv})
    x = jnp.asarray(xv)
    _close(out["mm_ty"], x @ jnp.swapaxes(yv, -1, -2))
    _close(out["mm_tx"], jnp.swapaxes(x, -1, -2) @ x)
    _close(out["lin"], x @ w.T + b)
    _close(out["lin_nobias"], x @ w.T)
    _close(out["scores"], jnp.einsum("bchq,bkhc->bkhq", qv, kv))
    _close(out["attn"], jnp.einsum("bkhq,bchk->bchq", wv, vv))


def test_conv(tmp_path):
    rng = np.random.default_rng(3)
    xv = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    cases = {  # name: (weight shape, mb.conv kwargs, jax kwargs)
        "c_custom": ((6, 4, 3, 3), dict(pad_type="custom", pad=[1, 1, 1, 1]), dict(padding=[(1, 1), (1, 1)])),
        "c_custom_asym": ((6, 4, 3, 2), dict(pad_type="custom", pad=[0, 2, 1, 0], strides=[2, 1]),
                          dict(padding=[(0, 2), (1, 0)], window_strides=(2, 1))),
        "c_same_s2": ((5, 4, 3, 3), dict(pad_type="same", strides=[2, 2]), dict(padding="SAME", window_strides=(2, 2))),
        "c_same_lower": ((5, 4, 4, 4), dict(pad_type="same_lower"), dict(padding="SAME_LOWER")),
        "c_dilated": ((3, 4, 3, 3), dict(pad_type="valid", dilations=[2, 1]), dict(padding="VALID", rhs_dilation=(2, 1))),
        "c_groups": ((6, 2, 3, 3), dict(pad_type="custom", pad=[1, 1, 1, 1], groups=2),
                     dict(padding=[(1, 1), (1, 1)], feature_group_count=2)),
        "c_depthwise": ((8, 1, 3, 3), dict(pad_type="same", groups=4), dict(padding="SAME", feature_group_count=4)),
        "c_1x1": ((7, 4, 1, 1), dict(), dict(padding="VALID")),
    }
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, (s, _, _) in cases.items()}
    biases = {k: rng.standard_normal(s[0]).astype(np.float32) for k, (s, _, _) in cases.items()}

    @mb.program(input_specs=[mb.TensorSpec(shape=xv.shape, dtype=FP32)], opset_version=ct.target.iOS16)
    def prog(x):
        return tuple(mb.conv(x=x, weight=weights[k], bias=biases[k], name=k, **kw) for k, (_, kw, _) in cases.items())

    p = _save_and_load(prog, tmp_path, "conv", ct.target.iOS16)
    out = interp.run(p, {"x": xv})
    for k, (_, _, jkw) in cases.items():
        ref = jax.lax.conv_general_dilated(
            xv, weights[k], window_strides=jkw.pop("window_strides", (1, 1)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"), precision="highest", **jkw)
        _close(out[k], ref + biases[k].reshape(1, -1, 1, 1), 1e-4)


def test_shape_and_indexing_ops(tmp_path):
    rng = np.random.default_rng(4)
    xv = rng.standard_normal((2, 6, 4, 3)).astype(np.float32)
    table = rng.standard_normal((10, 5)).astype(np.float32)
    ids = np.array([[3, 0, 9, 3], [1, 1, 2, 8]], np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=xv.shape, dtype=FP32), mb.TensorSpec(shape=ids.shape, dtype=types.int32)],
                opset_version=ct.target.iOS16)
    def prog(x, i):
        s0, s1, s2 = mb.split(x=x, split_sizes=[1, 2, 3], axis=1, name="split_sizes")
        h0, h1 = mb.split(x=x, num_splits=2, axis=-2, name="split_num")
        sbi = mb.slice_by_index(x=x, begin=[0, 1, 0, -1], end=[1, 6, 4, 0], stride=[1, 2, 1, 1],
                                begin_mask=[False, False, True, False], end_mask=[True, False, True, False],
                                squeeze_mask=[False, False, False, True], name="sbi")
        x2, x3 = mb.mul(x=x, y=np.float32(2)), mb.mul(x=x, y=np.float32(3))
        return (
            mb.reshape(x=x, shape=[0, 3, -1, 0], name="reshape"),
            mb.transpose(x=x, perm=[0, 3, 1, 2], name="transpose"),
            mb.concat(values=(x, x2), axis=1, name="concat"),
            mb.concat(values=(x, x2, x3), axis=2, interleave=True, name="concat_il"),
            s0, s1, s2, h0, h1,
            sbi,
            mb.slice_by_index(x=x, begin=[1, 5, 3, 0], end=[2, 0, 0, 3], stride=[1, -2, -1, 1], name="sbi_neg"),
            mb.slice_by_size(x=x, begin=[1, 2, 0, 1], size=[1, -1, 2, 2], name="sbs"),
            mb.gather(x=table, indices=i, axis=0, name="embed"),
            mb.gather(x=x, indices=np.array([2, 0], np.int32), axis=-1, name="gather_last"),
            mb.expand_dims(x=sbi, axes=[0, -2], name="expand"),
            mb.squeeze(x=mb.expand_dims(x=x, axes=[2]), axes=[2], name="squeeze"),
            mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=3, name="up"),
        )

    p = _save_and_load(prog, tmp_path, "shapes", ct.target.iOS16)
    out = interp.run(p, {"x": xv, "i": ids})
    x = xv
    want = {
        "reshape": x.reshape(2, 3, 8, 3), "transpose": x.transpose(0, 3, 1, 2),
        "concat": np.concatenate([x, 2 * x], 1),
        "concat_il": np.stack([x, 2 * x, 3 * x], 3).reshape(2, 6, 12, 3),
        "split_sizes_0": x[:, :1], "split_sizes_1": x[:, 1:3], "split_sizes_2": x[:, 3:],
        "split_num_0": x[:, :, :2], "split_num_1": x[:, :, 2:],
        "sbi": x[:, 1:6:2, :, -1], "sbi_neg": x[1:2, 5:0:-2, 3:0:-1, 0:3],
        "sbs": x[1:2, 2:, 0:2, 1:3], "embed": table[ids], "gather_last": x[..., [2, 0]],
        "expand": x[None, :, 1:6:2, None, :, -1], "squeeze": x, "up": x.repeat(2, 2).repeat(3, 3),
    }
    assert set(out) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(out[k], v, err_msg=k)  # pure data movement: exact


def test_fp16_program_honours_casts(tmp_path):
    rng = np.random.default_rng(5)
    xv = rng.standard_normal((4, 16)).astype(np.float32)
    w1, w2 = (rng.standard_normal((32, 16)) / 4).astype(np.float32), (rng.standard_normal((8, 32)) / 6).astype(np.float32)

    lut = rng.standard_normal(16).astype(np.float16) / 6
    idx = rng.integers(0, 16, (8, 32))

    def build(lut):
        """fp16 LUTs need a cast in the fp32-typed Builder program, and a linear's weight must
        be const or constexpr, so only the fp16 pipeline (which removes the cast) accepts it."""
        @mb.program(input_specs=[mb.TensorSpec(shape=xv.shape, dtype=FP32)], opset_version=ct.target.iOS16)
        def prog(x):
            h = mb.gelu(x=mb.linear(x=x, weight=w1, name="l1"), name="act")
            w3 = mb.constexpr_lut_to_dense(lut=lut, indices=_pack_lsb_first(idx.ravel(), 4),
                                           shape=np.array([8, 32], np.uint32), name="w3")
            if lut.dtype == np.float16:
                w3 = mb.cast(x=w3, dtype="fp32")
            h = mb.add(x=mb.linear(x=h, weight=w2, name="l2"), y=mb.linear(x=h, weight=w3, name="l3"), name="l23")
            y = mb.softmax(x=h, axis=-1, name="y")
            big = mb.mul(x=mb.mul(x=x, y=np.float32(300), name="m300"), y=np.float32(300), name="big")
            return y, big  # 9e4 * x: past fp16's 65504 where |x| > 0.73
        return prog

    prog = build(lut)
    # EMPTY would insert no casts at all: the fp16 pass has to be asked for by name, and
    # without const_elimination + cast_optimization the weights stay fp32 behind runtime casts
    fp16 = ct.PassPipeline(pass_names=FP16_PASSES, pipeline_name="fp16")
    p = _save_and_load(prog, tmp_path, "fp16", ct.target.iOS16, ct.precision.FLOAT16, fp16)
    # the fp16 LUT feeds the fp16 linear directly: its cast to fp32 and back is gone
    assert _ops(p) == ["cast", "linear", "gelu", "constexpr_lut_to_dense", "linear", "linear", "add",
                       "softmax", "cast", "mul", "mul", "cast"]
    consts = [np.asarray(op.val.val) for op in p.functions["main"].operations if op.op_type == "const"]
    floats = [c for c in consts if c.dtype.kind == "f"]
    assert {c.shape for c in floats} >= {(32, 16), (8, 32)} and all(c.dtype == np.float16 for c in floats)
    p_empty = _save_and_load(build(lut.astype(np.float32)), tmp_path, "fp16_empty", ct.target.iOS16, ct.precision.FLOAT16)
    assert "cast" not in _ops(p_empty)

    h = jax.nn.gelu(xv @ w1.T, approximate=False)
    ref = jax.nn.softmax(h @ w2.T + h @ lut[idx].astype(np.float32).T, -1)
    out = interp.run(p, {"x": xv})
    assert out["y"].dtype == np.float32  # the program casts back at the end
    _close(out["y"], ref, 3e-3)
    assert np.abs(out["y"] - ref).max() > 1e-6  # rounded to fp16 on the way
    assert np.isinf(out["big"][np.abs(xv) > 0.75]).all()  # fp16 overflow, as on device
    out32 = interp.run(p, {"x": xv}, dtype=np.float32)  # casts ignored: only the weights' rounding left
    assert np.isfinite(out32["big"]).all()
    forced = interp.run(p_empty, {"x": xv}, dtype=np.float16)  # fp32 program evaluated in fp16
    assert np.isinf(forced["big"][np.abs(xv) > 0.75]).all()
    _close(forced["y"], ref, 3e-3)

    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
               compute_precision=ct.precision.FLOAT16, pass_pipeline=ct.PassPipeline(pass_names=FP16_PASSES))
    assert "cast" in _ops(prog)  # converted in place: why _save_and_load converts a copy


def _pack_lsb_first(values, nbits):
    """The iOS16 LUT index layout, written independently of the interpreter."""
    out = bytearray(math.ceil(len(values) * nbits / 8))
    for n, v in enumerate(int(v) for v in values):
        for bit in range(nbits):
            if v >> bit & 1:
                pos = n * nbits + bit
                out[pos // 8] |= 1 << (pos % 8)
    return np.frombuffer(bytes(out), np.uint8)


def test_palettized_ios16(tmp_path):
    rng = np.random.default_rng(6)
    lut4 = rng.standard_normal(16).astype(np.float32)
    idx4 = rng.integers(0, 16, (8, 6))
    lut2 = rng.standard_normal(4).astype(np.float16)
    idx2 = rng.integers(0, 4, (5, 3))  # 15 two-bit indices: the last byte is part padding
    packed4, packed2 = _pack_lsb_first(idx4.ravel(), 4), _pack_lsb_first(idx2.ravel(), 2)
    xv = rng.standard_normal((3, 6)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=xv.shape, dtype=FP32), mb.TensorSpec(shape=(5, 3), dtype=FP32)],
                opset_version=ct.target.iOS16)
    def prog(x, z):
        w4 = mb.constexpr_lut_to_dense(lut=lut4, indices=packed4, shape=np.array([8, 6], np.uint32), name="w4")
        w2 = mb.constexpr_lut_to_dense(lut=lut2, indices=packed2, shape=np.array([5, 3], np.uint32), name="w2")
        return mb.linear(x=x, weight=w4, name="y"), mb.add(x=z, y=mb.cast(x=w2, dtype="fp32"), name="dense2")

    p = _save_and_load(prog, tmp_path, "lut16", ct.target.iOS16)
    stored = interp.constexpr_values(p)
    assert set(stored) == {"w4", "w2"}
    np.testing.assert_array_equal(stored["w4"]["lut"].view(np.uint32), lut4.view(np.uint32))
    np.testing.assert_array_equal(stored["w2"]["lut"].view(np.uint16), lut2.view(np.uint16))
    np.testing.assert_array_equal(stored["w4"]["indices"], packed4)
    np.testing.assert_array_equal(stored["w2"]["indices"], packed2)
    np.testing.assert_array_equal(stored["w4"]["shape"], [8, 6])
    bits = np.unpackbits(stored["w4"]["indices"], bitorder="little")[: 4 * idx4.size].reshape(-1, 4)
    np.testing.assert_array_equal(bits @ (1 << np.arange(4)), idx4.ravel())

    out = interp.run(p, {"x": xv, "z": np.zeros((5, 3), np.float32)})
    np.testing.assert_array_equal(out["dense2"], lut2[idx2].astype(np.float32))
    _close(out["y"], xv @ lut4[idx4].T)


def test_palettized_ios18(tmp_path):
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 16, (8, 6)).astype(np.uint8)
    lut = rng.standard_normal((2, 1, 16, 1)).astype(np.float16)   # one 4-bit LUT per 4 rows
    vidx = rng.integers(0, 4, (3, 4)).astype(np.uint8)
    vlut = rng.standard_normal((1, 1, 4, 2)).astype(np.float32)   # 2-bit, 2-vectors along axis 0

    @mb.program(input_specs=[mb.TensorSpec(shape=(8, 6), dtype=FP32), mb.TensorSpec(shape=(6, 4), dtype=FP32)],
                opset_version=ct.target.iOS18)
    def prog(z, zv):
        w = mb.constexpr_lut_to_dense(indices=idx.astype(types.np_uint4_dtype), lut=lut, name="w_grouped")
        v = mb.constexpr_lut_to_dense(indices=vidx.astype(types.np_uint2_dtype), lut=vlut, vector_axis=0, name="w_vector")
        return mb.add(x=z, y=mb.cast(x=w, dtype="fp32"), name="dense"), mb.add(x=zv, y=v, name="dense_vec")

    p = _save_and_load(prog, tmp_path, "lut18", ct.target.iOS18)
    stored = interp.constexpr_values(p)
    np.testing.assert_array_equal(stored["w_grouped"]["indices"], idx)
    np.testing.assert_array_equal(stored["w_grouped"]["lut"].view(np.uint16), lut.view(np.uint16))
    np.testing.assert_array_equal(stored["w_vector"]["indices"], vidx)
    np.testing.assert_array_equal(stored["w_vector"]["lut"].view(np.uint32), vlut.view(np.uint32))

    out = interp.run(p, {"z": np.zeros((8, 6), np.float32), "zv": np.zeros((6, 4), np.float32)})
    want = np.stack([lut[r // 4, 0, idx[r], 0] for r in range(8)]).astype(np.float32)
    np.testing.assert_array_equal(out["dense"], want)
    want_v = np.zeros((6, 4), np.float32)
    for r in range(3):
        for c in range(4):
            want_v[2 * r:2 * r + 2, c] = vlut[0, 0, vidx[r, c]]
    np.testing.assert_array_equal(out["dense_vec"], want_v)


def test_int8_weights(tmp_path):
    rng = np.random.default_rng(8)
    q = rng.integers(-128, 128, (6, 4)).astype(np.int8)
    scale = (rng.random(6) / 50 + 1e-3).astype(np.float32)
    zp = rng.integers(-5, 5, 6).astype(np.int8)
    bq = rng.integers(-128, 128, (4, 6)).astype(np.int8)
    bscale = (rng.random((2, 3)) / 50).astype(np.float16)  # blocks of 2x2
    boff = rng.integers(-3, 3, (2, 3)).astype(np.int8)
    xv = rng.standard_normal((3, 4)).astype(np.float32)
    bias16 = rng.standard_normal(6).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=xv.shape, dtype=FP32)], opset_version=ct.target.iOS16)
    def prog16(x):
        w = mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=scale, axis=0, name="w_int8")
        b = mb.constexpr_cast(source_val=bias16, output_dtype="fp32", name="b_fp16")
        return mb.linear(x=x, weight=w, bias=b, name="y")

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 6), dtype=FP32)], opset_version=ct.target.iOS18)
    def prog18(z):
        w = mb.constexpr_blockwise_shift_scale(data=bq, scale=bscale, offset=boff, name="w_block")
        return mb.add(x=z, y=mb.cast(x=w, dtype="fp32"), name="dense")

    p16 = _save_and_load(prog16, tmp_path, "int8_16", ct.target.iOS16)
    s = interp.constexpr_values(p16)["w_int8"]
    np.testing.assert_array_equal(s["quantized_data"], q)
    np.testing.assert_array_equal(s["zero_point"], zp)
    np.testing.assert_array_equal(s["scale"], scale)
    assert int(s["axis"]) == 0
    np.testing.assert_array_equal(interp.constexpr_values(p16)["b_fp16"]["source_val"], bias16)
    _close(interp.run(p16, {"x": xv})["y"], xv @ ((q.astype(np.float32) - zp[:, None]) * scale[:, None]).T + bias16)

    p18 = _save_and_load(prog18, tmp_path, "int8_18", ct.target.iOS18)
    s = interp.constexpr_values(p18)["w_block"]
    np.testing.assert_array_equal(s["data"], bq)
    np.testing.assert_array_equal(s["scale"].view(np.uint16), bscale.view(np.uint16))
    np.testing.assert_array_equal(s["offset"], boff)
    rep = lambda a: a.repeat(2, 0).repeat(2, 1)  # noqa: E731
    want = ((bq.astype(np.float32) - rep(boff)) * rep(bscale).astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(interp.run(p18, {"z": np.zeros((4, 6), np.float32)})["dense"], want.astype(np.float32))


@pytest.mark.filterwarnings("ignore:Output, 'abs.x'")
def test_empty_pipeline_keeps_program_but_backend_passes_still_run(tmp_path):
    w = np.ones((3, 2), np.float32)
    xv = np.array([[-1.5, 2.0], [0.5, -0.25], [3.0, 1.0], [-2.0, -4.0]], np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 2), dtype=FP32)], opset_version=ct.target.iOS16)
    def prog(x):
        y = mb.add(x=mb.matmul(x=x, y=w.T.copy(), name="mm"), y=np.ones(3, np.float32), name="plus_bias")
        a = mb.sqrt(x=mb.pow(x=x, y=np.float32(2), name="sq"), name="abs.x")  # |x|, in intent
        s = mb.mul(x=x, y=mb.sigmoid(x=x, name="sig"), name="swish")
        return y, a, s

    p = _save_and_load(prog, tmp_path, "kept", ct.target.iOS16)
    # the default pipeline would have fused matmul + add into linear; the backend passes
    # (not switchable off) still turn sqrt(pow(x, 2)) into identity and sigmoid * x into silu,
    # and rewrite names to identifiers
    assert [(op.op_type, op.name) for op in p.functions["main"].operations if op.op_type != "const"] == [
        ("matmul", "mm"), ("add", "plus_bias"), ("identity", "abs_x"), ("silu", "swish")]
    out = interp.run(p, {"x": xv})
    assert list(out) == ["plus_bias", "abs_x", "swish"]
    np.testing.assert_array_equal(out["abs_x"], xv)  # not |x|: what the stored program computes
    _close(out["swish"], jax.nn.silu(xv))
    _close(out["plus_bias"], xv @ w.T + 1)


def test_unknown_op_and_bad_inputs_raise(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 2), dtype=FP32)], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.cumsum(x=mb.relu(x=x), axis=0, name="out")

    p = _save_and_load(prog, tmp_path, "unknown", ct.target.iOS16)
    with pytest.raises(NotImplementedError, match=r"'cumsum'.*supported:.*conv"):
        interp.run(tmp_path / "unknown.mlpackage", {"x": np.zeros((4, 2), np.float32)})
    with pytest.raises(KeyError, match="missing"):
        interp.run(p, {})
    with pytest.raises(RuntimeError, match="shape"):
        interp.run(p, {"x": np.zeros((4, 3), np.float32)})
