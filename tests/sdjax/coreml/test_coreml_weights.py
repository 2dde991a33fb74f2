"""sdjax.coreml.mil.weight's quantized forms: grouped LUTs, per-channel scales and int8 in iOS18
programs, the iOS16 forms below iOS18 and the error naming iOS18 for what only iOS18 can hold.

Every program is converted and saved as the exporters do (``text_encoder.convert``), read back
from the .mlpackage, and checked against sdjax's own tables and ``w.dequantize()``."""
import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

import quant  # noqa: E402
from quant import apply as recipes  # noqa: E402  (quantize_weight)
from sdjax.coreml import interp, mil, text_encoder, unet  # noqa: E402
import test_coreml_unet as unet_tests  # noqa: E402

# the UNet exporter's tests' fixtures (the embedded tiny model, its inputs) and helpers
pipe, inputs = unet_tests.pipe, unet_tests.inputs
_export_run, _reference = unet_tests._export_run, unet_tests._reference

pytestmark = pytest.mark.filterwarnings("ignore")

EPS32 = float(np.finfo(np.float32).eps)
N_IN, N_OUT, C_IN, K = 24, 16, 8, 3          # linear (in, out); conv HWIO (K, K, C_IN, N_OUT)
LIN_X, CONV_X = (1, N_IN, 1, 5), (1, C_IN, 6, 6)

# name -> (method, options): quant.recipes' option names (METHODS["palettize"])
VARIANTS = {
    "grouped": ("palettize", {"nbits": 4, "group_size": 4}),                              # 4 LUTs
    "scale_1lut": ("palettize", {"nbits": 4, "per_channel_scale": True}),                 # 1 LUT + scale
    "scale_grouped": ("palettize", {"nbits": 3, "group_size": 8, "per_channel_scale": True}),  # 2 LUTs + scale
    "per_tensor": ("palettize", {"nbits": 6}),                                            # iOS18 form at iOS18
    "int8": ("int8", {}),
}


def _weights(variant):
    """(linear weight, conv weight), sdjax-quantized; biases."""
    method, opts = VARIANTS[variant]
    rng = np.random.default_rng(sorted(VARIANTS).index(variant))
    # unequal channel magnitudes, so a per-channel scale that is missing or misplaced shows
    lw = rng.standard_normal((N_IN, N_OUT)) * np.geomspace(0.05, 2.0, N_OUT)
    cw = rng.standard_normal((K, K, C_IN, N_OUT)) * np.geomspace(2.0, 0.05, N_OUT)
    q = [recipes.quantize_weight(w.astype(np.float32), method, opts) for w in (lw, cw)]
    return q, [rng.standard_normal(N_OUT).astype(np.float32) for _ in range(2)]


def _program(lin_w, conv_w, biases, dtype, target):
    @mb.program(input_specs=[mb.TensorSpec(shape=LIN_X), mb.TensorSpec(shape=CONV_X)],
                opset_version=text_encoder.opset(target))
    def prog(x, xc):
        y = mil.linear_as_conv(x, lin_w, biases[0], name="lin", dtype=dtype)
        yc = mil.conv2d(xc, {"weight": conv_w, "bias": biases[1]}, "cv", dtype)
        return y, yc
    return prog


def _save_load(prog, tmp_path, name, precision, target):
    path = tmp_path / f"{name}.mlpackage"
    text_encoder.convert(prog, precision, target).save(str(path))
    return interp.load_program(path)


def _ref_linear(x, w, b):
    """float64 ``x @ W + b`` on (1, in, 1, S) and a bound on float32 rounding of the same sums."""
    x64 = x[0, :, 0, :].astype(np.float64)             # (in, S)
    y = np.einsum("is,io->os", x64, w) + b[:, None]
    bound = np.einsum("is,io->os", np.abs(x64), np.abs(w)) + np.abs(b)[:, None]
    return y[None, :, None, :], bound[None, :, None, :]


def _ref_conv(x, w, b):
    """float64 'same' 3x3 conv of NCHW ``x`` by HWIO ``w`` (+ bias) and the rounding bound."""
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (1, 1), (1, 1)])
    h, wd = x.shape[2:]
    y = np.zeros((x.shape[0], w.shape[3], h, wd))
    bound = np.zeros_like(y)
    for i in range(K):
        for j in range(K):
            patch = xp[:, :, i:i + h, j:j + wd]
            y += np.einsum("nchw,co->nohw", patch, w[i, j])
            bound += np.einsum("nchw,co->nohw", np.abs(patch), np.abs(w[i, j]))
    return y + b[None, :, None, None], bound + np.abs(b)[None, :, None, None]


def _assert_near(got, ref_bound, terms):
    """|got - ref| within float32 rounding of the sums: ``terms`` * eps * sum|x*w| (+ |b|)."""
    ref, bound = ref_bound
    assert got.shape == ref.shape
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= terms * EPS32 * bound), float((err / bound).max() / EPS32)


def _dense(w, tables):
    """``w.dequantize()`` in float64; an int8 weight's float32 scales written as fp16 tables are
    rounded to fp16 first (a LUT's fp16 values and scales are sdjax's own, so nothing changes)."""
    if tables == np.float16 and type(w).__name__ == "Int8Weight":
        w = w.replace(scale=np.asarray(w.scale).astype(np.float16).astype(np.float32))
    return np.asarray(w.dequantize(), np.float64)


def _constexprs(program):
    return [(op.op_type, op.name, op) for op in program.functions["main"].operations
            if op.op_type.startswith("constexpr_")]


@pytest.mark.parametrize("tables", ["float32", "float16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ios18_forms_store_sdjax_tables_and_compute_dequantize(tmp_path, variant, tables):
    (lw, cw), biases = _weights(variant)
    target = ct.target.iOS18
    p = _save_load(_program(lw, cw, biases, tables, target), tmp_path, f"{variant}_{tables}", tables, target)
    stored = interp.constexpr_values(p)
    ops = {name: (op_type, op) for op_type, name, op in _constexprs(p)}
    fdt = np.dtype(tables)
    bits = {np.dtype(np.float16): np.uint16, np.dtype(np.float32): np.uint32}[fdt]

    for w, name, perm, dense in ((lw, "lin_w", (1, 0), (N_OUT, N_IN, 1, 1)),
                                 (cw, "cv_w", (3, 2, 0, 1), (N_OUT, C_IN, K, K))):
        if variant == "int8":
            assert ops[name][0] == "constexpr_blockwise_shift_scale" and set(ops) == {"lin_w", "cv_w"}
            s = stored[name]
            assert s["data"].dtype == np.int8 and s.get("offset") is None
            np.testing.assert_array_equal(s["data"], np.transpose(np.asarray(w.data), perm).reshape(dense))
            want = np.asarray(w.scale, np.float32).astype(fdt).reshape(N_OUT, 1, 1, 1)
            assert s["scale"].dtype == fdt
            np.testing.assert_array_equal(s["scale"].view(bits), want.view(bits))
            continue
        op_type, op = ops[name]
        assert op_type == "constexpr_lut_to_dense" and "shape" not in op.inputs  # the iOS18 signature
        assert types.builtin_to_string(op.indices.dtype) == f"uint{w.nbits}"
        s = stored[name]
        idx = np.transpose(mil.lut_indices(w), perm).reshape(dense)
        np.testing.assert_array_equal(s["indices"].astype(np.int64), idx)
        assert s["lut"].shape == (w.num_groups, 1, 1, 1, 2 ** w.nbits, 1)
        assert s["lut"].dtype == fdt
        want_lut = np.asarray(w.lut).astype(fdt).reshape(s["lut"].shape)  # fp16: sdjax's bits
        np.testing.assert_array_equal(s["lut"].view(bits), want_lut.view(bits))
        if w.scale is None:
            assert name + "_scale" not in ops
        else:
            assert ops[name + "_scale"][0] == "constexpr_blockwise_shift_scale"
            sc = stored[name + "_scale"]
            assert sc["scale"].shape == (N_OUT, 1, 1, 1) and sc["scale"].dtype == fdt
            want = np.asarray(w.scale).astype(fdt).reshape(N_OUT, 1, 1, 1)
            np.testing.assert_array_equal(sc["scale"].view(bits), want.view(bits))
            assert sc.get("offset") is None
            np.testing.assert_array_equal(sc["data"], want_lut[(np.arange(N_OUT) // (N_OUT // w.num_groups))
                                                               [:, None, None, None], 0, 0, 0, idx, 0])
        expected = {"lin_w", "cv_w"} | ({"lin_w_scale", "cv_w_scale"} if w.scale is not None else set())
        assert set(ops) == expected

    rng = np.random.default_rng(100)
    x, xc = rng.standard_normal(LIN_X).astype(np.float32), rng.standard_normal(CONV_X).astype(np.float32)
    bl, bc = (b.astype(fdt) for b in biases)  # the fp16 pipeline stores float consts as fp16
    ref_lin = _ref_linear(x, _dense(lw, fdt), bl)
    ref_conv = _ref_conv(xc, _dense(cw, fdt), bc)
    # float32 evaluation: fp16 tables hold sdjax's fp16 values, and their product with the fp16
    # scale is exact in float32, so the weights are w.dequantize() bit for bit in both programs
    out = interp.run(p, {"x": x, "xc": xc}, dtype=np.float32)
    _assert_near(out["lin"], ref_lin, N_IN + 1)
    _assert_near(out["cv"], ref_conv, C_IN * K * K + 1)
    if tables == "float16":  # as Core ML runs it: fp16 activations and fp16 weight products
        out = interp.run(p, {"x": x, "xc": xc})
        assert mil.psnr(ref_lin[0], out["lin"]) > 45 and mil.psnr(ref_conv[0], out["cv"]) > 45


@pytest.mark.parametrize("variant", ["grouped", "scale_1lut", "scale_grouped"])
@pytest.mark.parametrize("target", ["iOS16", "iOS17"])
def test_grouped_or_scaled_lut_below_ios18_names_weight_and_ios18(variant, target):
    (lw, cw), biases = _weights(variant)
    what = {"grouped": "4 LUT groups", "scale_1lut": "with per-channel scale",
            "scale_grouped": "2 LUT groups and per-channel scale"}[variant]
    with pytest.raises(NotImplementedError, match=rf"'lin_w'.*{what}.*iOS18 \(macOS15\).*opset is {target}"):
        _program(lw, cw, biases, "float32", getattr(ct.target, target))


@pytest.mark.parametrize("target", ["iOS16", "iOS17"])
def test_per_tensor_lut_and_int8_keep_ios16_forms_below_ios18(tmp_path, target):
    target = getattr(ct.target, target)
    (plw, pcw), pb = _weights("per_tensor")
    (ilw, icw), ib = _weights("int8")
    p = _save_load(_program(plw, icw, [pb[0], ib[1]], "float32", target), tmp_path, "ios16", "float32", target)
    ops = {name: (op_type, op) for op_type, name, op in _constexprs(p)}
    assert ops["lin_w"][0] == "constexpr_lut_to_dense" and "shape" in ops["lin_w"][1].inputs
    assert ops["cv_w"][0] == "constexpr_affine_dequantize" and int(interp.constexpr_values(p)["cv_w"]["axis"]) == 0
    rng = np.random.default_rng(101)
    x, xc = rng.standard_normal(LIN_X).astype(np.float32), rng.standard_normal(CONV_X).astype(np.float32)
    out = interp.run(p, {"x": x, "xc": xc})
    _assert_near(out["lin"], _ref_linear(x, np.asarray(plw.dequantize(), np.float64), pb[0]), N_IN + 1)
    _assert_near(out["cv"], _ref_conv(xc, np.asarray(icw.dequantize(), np.float64), ib[1]), C_IN * K * K + 1)


# every UNet layer above the size threshold: attention projections int8, the rest 4-bit k-means with
# one LUT per 8 output channels (one LUT where 8 does not divide them) and per-channel scales
UNET_RECIPE = {"name": "g8-pcs", "rules": [
    {"pattern": "*attn*.to_[qkv]", "method": "int8"},
    {"pattern": "*", "method": "palettize", "nbits": 4, "group_size": 8, "per_channel_scale": True,
     "indivisible": "per_tensor"}]}


@pytest.fixture(scope="module")
def qunet(pipe):
    return quant.apply_recipe(pipe.params["unet"], UNET_RECIPE, component="unet")


def test_unet_grouped_scaled_ios18_matches_sdjax(tmp_path, pipe, inputs, qunet):
    cfg = pipe.configs["unet"]
    prog, out = _export_run(tmp_path, qunet, cfg, inputs, "unet_g8pcs", compute_precision="float32",
                            minimum_deployment_target=ct.target.iOS18)
    kinds = [op.op_type for op in prog.functions["main"].operations if op.op_type.startswith("constexpr_")]
    assert kinds.count("constexpr_lut_to_dense") > 10 and kinds.count("constexpr_blockwise_shift_scale") > 10
    stored = interp.constexpr_values(prog).values()
    assert any(v["lut"].shape[0] > 1 for v in stored if "lut" in v)  # grouped LUTs made it into the package
    assert any(v["data"].dtype == np.int8 for v in stored if "data" in v)  # and int8 weights
    p = mil.psnr(_reference(qunet, cfg, inputs), out["noise_pred"])
    print(f"\nCore ML UNet ({UNET_RECIPE['name']}, iOS18, fp32) vs sdjax: {p:.1f} dB")
    assert p >= 60, p


def test_unet_grouped_scaled_ios16_raises_naming_ios18(tmp_path, pipe, qunet):
    path = tmp_path / "unet16.mlpackage"
    with pytest.raises(NotImplementedError, match=r"LUT groups.*iOS18 \(macOS15\)"):
        unet.export(qunet, pipe.configs["unet"], path, minimum_deployment_target=ct.target.iOS16,
                    latent_shape=(16, 16))
    assert not path.exists()
