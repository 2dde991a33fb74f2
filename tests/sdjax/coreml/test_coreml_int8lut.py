"""Core ML export of palettized weights with int8 LUT entries (issue 23 point 3): iOS18
``constexpr_lut_to_dense`` with sdjax's int8 LUT followed by ``constexpr_blockwise_shift_scale`` with
its per-LUT scale (or, with a per-channel scale, their float16 product per output channel).

Programs are converted and saved as the exporters do, read back from the .mlpackage, and checked:
the stored tables against sdjax's bits (``interp.constexpr_values``), the layers against float64
NumPy statements of ``w.dequantize()``'s function, and a tiny UNet against sdjax's evaluation."""
import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import types  # noqa: E402

import quant  # noqa: E402
from quant import apply as recipes  # noqa: E402  (quantize_weight)
from sdjax.coreml import export as cx  # noqa: E402
from sdjax.coreml import interp, mil, unet  # noqa: E402
import test_coreml_unet as unet_tests  # noqa: E402
import test_coreml_weights as wt  # noqa: E402

pipe, inputs = unet_tests.pipe, unet_tests.inputs
pytestmark = pytest.mark.filterwarnings("ignore")

N_IN, N_OUT, C_IN, K = wt.N_IN, wt.N_OUT, wt.C_IN, wt.K
VARIANTS = {
    "w4": {"nbits": 4},                                                        # one int8 LUT
    "w2_grouped": {"nbits": 2, "group_size": 4},                               # 4 int8 LUTs
    "w6_grouped_scale": {"nbits": 6, "group_size": 8, "per_channel_scale": True},  # 2 LUTs + scale
}


def _weights(variant):
    rng = np.random.default_rng(10 + sorted(VARIANTS).index(variant))
    lw = rng.standard_normal((N_IN, N_OUT)) * np.geomspace(0.05, 2.0, N_OUT)
    cw = rng.standard_normal((K, K, C_IN, N_OUT)) * np.geomspace(2.0, 0.05, N_OUT)
    opts = dict(quant.recipes.METHODS["palettize"], **VARIANTS[variant], lut_dtype="int8")
    q = [recipes.quantize_weight(w.astype(np.float32), "palettize", opts) for w in (lw, cw)]
    assert all(w.lut_dtype == "int8" for w in q)
    return q, [rng.standard_normal(N_OUT).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("tables", ["float32", "float16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int8_lut_form_stores_sdjax_tables_and_computes_dequantize(tmp_path, variant, tables):
    (lw, cw), biases = _weights(variant)
    target = ct.target.iOS18
    p = wt._save_load(wt._program(lw, cw, biases, tables, target), tmp_path, f"{variant}_{tables}", tables, target)
    stored = interp.constexpr_values(p)
    ops = {name: (op_type, op) for op_type, name, op in wt._constexprs(p)}
    assert set(ops) == {"lin_w", "cv_w", "lin_w_scale", "cv_w_scale"}
    fdt = np.dtype(tables)
    bits = {np.dtype(np.float16): np.uint16, np.dtype(np.float32): np.uint32}[fdt]
    for w, name, perm, dense in ((lw, "lin_w", (1, 0), (N_OUT, N_IN, 1, 1)),
                                 (cw, "cv_w", (3, 2, 0, 1), (N_OUT, C_IN, K, K))):
        op_type, op = ops[name]
        assert op_type == "constexpr_lut_to_dense" and types.builtin_to_string(op.indices.dtype) == f"uint{w.nbits}"
        s = stored[name]
        idx = np.transpose(mil.lut_indices(w), perm).reshape(dense)
        np.testing.assert_array_equal(s["indices"].astype(np.int64), idx)
        g = w.num_groups
        assert s["lut"].dtype == np.int8 and s["lut"].shape == (g, 1, 1, 1, 2 ** w.nbits, 1)
        np.testing.assert_array_equal(s["lut"].reshape(g, -1), np.asarray(w.lut))  # sdjax's int8 entries
        assert ops[name + "_scale"][0] == "constexpr_blockwise_shift_scale"
        sc = stored[name + "_scale"]
        assert sc.get("offset") is None and sc["scale"].dtype == fdt
        group = np.arange(N_OUT) // (N_OUT // g)
        # the shift_scale's data: the int8 lookup, entry by entry
        np.testing.assert_array_equal(sc["data"], np.asarray(w.lut)[group[:, None, None, None], idx])
        if w.scale is None:  # one scale per LUT, on the output-channel axis
            assert sc["scale"].shape == (g, 1, 1, 1)
            want = np.asarray(w.lut_scale).astype(fdt)
        else:  # the per-LUT scale times the per-channel one, as float16: w.channel_scale()
            assert sc["scale"].shape == (N_OUT, 1, 1, 1)
            want = (np.asarray(w.lut_scale, np.float64)[group] * np.asarray(w.scale, np.float64)) \
                .astype(np.float16).astype(fdt)
        np.testing.assert_array_equal(sc["scale"].reshape(-1).view(bits), want.view(bits))

    rng = np.random.default_rng(200)
    x, xc = rng.standard_normal(wt.LIN_X).astype(np.float32), rng.standard_normal(wt.CONV_X).astype(np.float32)
    bl, bc = (b.astype(fdt) for b in biases)
    # float32 evaluation: the int8 entries times the (float16-valued) scale are exact in float32, so the
    # weights are w.dequantize() bit for bit in both programs
    out = interp.run(p, {"x": x, "xc": xc}, dtype=np.float32)
    wt._assert_near(out["lin"], wt._ref_linear(x, np.asarray(lw.dequantize(), np.float64), bl), N_IN + 1)
    wt._assert_near(out["cv"], wt._ref_conv(xc, np.asarray(cw.dequantize(), np.float64), bc), C_IN * K * K + 1)


@pytest.mark.parametrize("target", ["iOS16", "iOS17"])
def test_int8_lut_below_ios18_names_weight_and_ios18(target):
    (lw, cw), biases = _weights("w4")
    with pytest.raises(NotImplementedError, match=rf"'lin_w'.*int8 LUT entries.*iOS18 \(macOS15\).*opset is {target}"):
        wt._program(lw, cw, biases, "float32", getattr(ct.target, target))
    params = {"unet": {"mid_block": {"resnets": {"0": {"conv1": {"weight": cw}}}}}}
    with pytest.raises(cx.ExportError, match=rf"unet.mid_block.resnets.0.conv1 is palettized with int8 LUT entries"
                                             rf".*iOS18.*not {target}"):
        cx.check_exportable(params, target)


INT8LUT_RECIPE = {"name": "w4-int8lut", "rules": [
    {"pattern": "*attn*", "method": "palettize", "nbits": 6, "lut_dtype": "int8"},
    {"pattern": "*", "method": "palettize", "nbits": 4, "group_size": 8, "indivisible": "per_tensor",
     "lut_dtype": "int8"}]}


@pytest.mark.slow  # 2.5 min on 2 shared cores; measured 142.3 dB
def test_unet_int8_lut_ios18_matches_sdjax(tmp_path, pipe, inputs):
    q = quant.apply_recipe(pipe.params["unet"], INT8LUT_RECIPE, component="unet")
    cfg = pipe.configs["unet"]
    path = tmp_path / "unet16.mlpackage"
    with pytest.raises(NotImplementedError, match=r"int8 LUT entries.*iOS18 \(macOS15\)"):
        unet.export(q, cfg, path, minimum_deployment_target=ct.target.iOS17, latent_shape=(16, 16))
    assert not path.exists()
    prog, out = unet_tests._export_run(tmp_path, q, cfg, inputs, "unet_int8lut", compute_precision="float32",
                                       minimum_deployment_target=ct.target.iOS18)
    stored = interp.constexpr_values(prog)
    luts = [v["lut"] for v in stored.values() if "lut" in v]
    assert len(luts) > 10 and all(lut.dtype == np.int8 for lut in luts)
    p = mil.psnr(unet_tests._reference(q, cfg, inputs), out["noise_pred"])
    print(f"\nCore ML UNet ({INT8LUT_RECIPE['name']}, iOS18, fp32) vs sdjax: {p:.1f} dB")
    assert p >= 60, p
