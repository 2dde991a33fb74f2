"""W8A8 (int8 weights, int8 activations) export: ``sdjax.coreml.mil.activation_quant`` writes sdjax's
activation quantization as iOS17 ``clip`` -> ``quantize`` -> ``dequantize`` before the int8 weight.

Checked against what we did not write: the interpreter's ``quantize``/``dequantize`` against
coremltools' own value inference of those ops and hand-written codes (ties half to even, int8
clamping to -128); the exported layers and a tiny UNet and text encoder (read back from the saved
package, run by ``sdjax.coreml.interp``) against sdjax's W8A8 evaluation (``quant.int8``'s integer
path) of the same layers."""
import dataclasses
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.optimize import _utils as cu  # noqa: E402

import quant  # noqa: E402
import sdjax  # noqa: E402
from quant import calibrate, int8  # noqa: E402
from sdjax.coreml import export as cx  # noqa: E402
from sdjax.coreml import interp, mil, text_encoder, unet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

PSNRS = {}
EPS32 = float(np.finfo(np.float32).eps)


def _save_load(prog, tmp_path, name, precision="float32", target=None, pipeline=None):
    target = target or ct.target.iOS17
    if pipeline is None:
        model = text_encoder.convert(prog, precision, target)
    else:
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                           compute_precision=ct.precision.FLOAT32, pass_pipeline=pipeline, skip_model_load=True)
    path = tmp_path / f"{name}.mlpackage"
    model.save(str(path))
    return interp.load_program(path)


def _ops(prog, kind):
    return [op for op in prog.functions["main"].operations if op.op_type == kind]


# --- the interpreter's quantize / dequantize ------------------------------------------------------

def test_quantize_dequantize_match_coremltools_and_the_definition(tmp_path):
    """Ties round half to even, int8 clamps to [-128, 127] (not sdjax's -127), uint8 with a zero
    point, per-axis scales: the interpreter equals coremltools' value inference of the same ops and the
    codes written out by hand from the definition clip(round(x / scale) + zero_point)."""
    s = np.float32(0.5)
    x = np.array([0.25, 0.75, -1.25, 1.0, 2.25, -70.0, 63.5, 64.0, -63.75], np.float32).reshape(1, 9)
    # x / s = 0.5, 1.5, -2.5, 2, 4.5, -140, 127, 128, -127.5
    want_i8 = np.array([0, 2, -2, 2, 4, -128, 127, 127, -128], np.int8)
    want_u8 = np.array([128, 130, 126, 130, 132, 0, 255, 255, 0], np.uint8)  # zero point 128
    xa = np.linspace(-3, 3, 12, dtype=np.float32).reshape(1, 3, 4)
    sa = np.array([0.5, 0.03125, 0.25], np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape), mb.TensorSpec(shape=xa.shape)],
                opset_version=ct.target.iOS17)
    def prog(a, b):
        qi = mb.quantize(input=a, scale=s, output_dtype="int8", name="qi")
        qu = mb.quantize(input=a, scale=s, zero_point=np.uint8(128), output_dtype="uint8", name="qu")
        qa = mb.quantize(input=b, scale=sa, axis=1, output_dtype="int8", name="qa")
        return (qi, qu, qa, mb.dequantize(input=qi, scale=s, name="di"),
                mb.dequantize(input=qu, scale=s, zero_point=np.uint8(128), name="du"),
                mb.dequantize(input=qa, scale=sa, axis=1, name="da"))

    p = _save_load(prog, tmp_path, "qdq")
    got = interp.run(p, {"a": x, "b": xa})  # int outputs come back int32 (the backend casts them)
    np.testing.assert_array_equal(got["qi"][0], want_i8)
    np.testing.assert_array_equal(got["qu"][0], want_u8)
    np.testing.assert_array_equal(got["di"][0], want_i8.astype(np.float32) * s)
    np.testing.assert_array_equal(got["du"][0], (want_u8.astype(np.float32) - 128) * s)

    # coremltools' own value inference of the ops (iOS17 quantize/dequantize call these)
    qa = cu.quantize_by_scale_and_zp(xa, cu.promote_rank_to_same_as_data(sa, xa, 1), None, "int8")
    refs = {"qi": cu.quantize_by_scale_and_zp(x, s, None, "int8"),
            "qu": cu.quantize_by_scale_and_zp(x, s, np.uint8(128), "uint8"), "qa": qa,
            "da": cu.dequantize_by_scale_and_zp(qa, sa, None, axis=1)}
    for name, ref in refs.items():
        np.testing.assert_array_equal(got[name], ref, err_msg=name)
    from coremltools.converters.mil.mil import types
    assert [types.builtin_to_string(op.outputs[0].dtype) for op in _ops(p, "quantize")] == ["int8", "uint8", "int8"]


# --- single layers --------------------------------------------------------------------------------

N_IN, N_OUT, C_IN = 24, 16, 8
LIN_X, CONV_X = (1, N_IN, 1, 7), (1, C_IN, 6, 6)


def _layer_case(granularity, seed=0):
    """W8A8 linear and conv weights calibrated on 70% of the inputs' range, so that some codes clip
    (and Core ML's -128 would show). No exact ties x / s = k + 1/2: XLA on CPU divides as x * (1 / s),
    which can miss a tie by one ulp where Core ML's quantize (and NumPy) divide exactly; ties are
    tested on the quantize op itself."""
    rng = np.random.default_rng(seed)
    xl = (rng.standard_normal(LIN_X) * np.geomspace(0.1, 3, N_IN)[None, :, None, None]).astype(np.float32)
    xc = rng.standard_normal(CONV_X).astype(np.float32)
    lw = rng.standard_normal((N_IN, N_OUT)).astype(np.float32)
    cw = rng.standard_normal((3, 3, C_IN, N_OUT)).astype(np.float32)
    scales = []
    for x in (xl, xc):
        m = np.abs(x).max(axis=(0, 2, 3)) if granularity == "channel" else np.abs(x).max()
        scales.append(np.asarray(m * 0.7 / 127, np.float32))
    ql, qc = int8.quantize(lw, act_scale=scales[0]), int8.quantize(cw, act_scale=scales[1])
    return xl, xc, ql, qc


def _sdjax_layers(xl, xc, ql, qc):
    yl = ql.linear(jnp.asarray(xl[:, :, 0, :].transpose(0, 2, 1)))
    yc = qc.conv2d(jnp.asarray(xc.transpose(0, 2, 3, 1)), 2, [(1, 1), (0, 1)])
    return np.asarray(yl).transpose(0, 2, 1)[:, :, None, :], np.asarray(yc).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_w8a8_layers_are_sdjax_w8a8(tmp_path, granularity, precision):
    """A linear layer (1x1 conv) and a strided, asymmetrically padded 3x3 conv: the package computes
    sdjax's integer W8A8 path, codes and all; the scale stored is sdjax's act_scale bit for bit."""
    xl, xc, ql, qc = _layer_case(granularity)

    @mb.program(input_specs=[mb.TensorSpec(shape=LIN_X), mb.TensorSpec(shape=CONV_X)],
                opset_version=ct.target.iOS17)
    def prog(x, y):
        return (mil.linear_as_conv(x, ql, None, "lin", dtype=precision),
                mil.conv2d(y, {"weight": qc}, "cv", dtype=precision, stride=2, pad=[1, 1, 0, 1]))

    p = _save_load(prog, tmp_path, f"{granularity}_{precision}", precision)
    out = list(interp.run(p, {"x": xl, "y": xc}).values())
    refs = _sdjax_layers(xl, xc, ql, qc)
    got = [mil.psnr(r, o) for r, o in zip(refs, out)]
    PSNRS[f"layers {granularity} {precision}"] = got
    assert min(got) >= (100 if precision == "float32" else 50), got
    qs = _ops(p, "quantize")
    assert len(qs) == 2 and all(len(_ops(p, k)) == 2 for k in ("clip", "dequantize"))
    if precision == "float32":
        stored = [float(q.scale.val) for q in qs] if granularity == "tensor" else \
            [np.asarray(op.y.val).reshape(-1) for op in _ops(p, "real_div")]
        for got_s, w in zip(stored, (ql, qc)):
            np.testing.assert_array_equal(np.asarray(got_s, np.float32), np.asarray(w.act_scale))


@pytest.mark.parametrize("nbits", [4, 2])
def test_w4a8_layers_are_sdjax_w4a8(tmp_path, nbits):
    """Joint W4A8 (W2A8): a palettized weight with int8 LUT entries and an int8 activation scale exports
    as iOS18 ``constexpr_lut_to_dense`` (int8 LUT) + ``constexpr_blockwise_shift_scale`` behind the same
    activation ``clip -> quantize -> dequantize`` as W8A8; the package computes sdjax's W4A8 layers."""
    from quant import palettize
    xl, xc, _, _ = _layer_case("tensor", seed=nbits)
    rng = np.random.default_rng(nbits)
    ws = []
    for shape, x in (((N_IN, N_OUT), xl), ((3, 3, C_IN, N_OUT), xc)):
        w = palettize.int8_lut(palettize.kmeans(rng.standard_normal(shape).astype(np.float32), nbits))
        ws.append(palettize.with_act_scale(w, np.float32(np.abs(x).max() * 0.7 / 127)))
    ql, qc = ws

    @mb.program(input_specs=[mb.TensorSpec(shape=LIN_X), mb.TensorSpec(shape=CONV_X)],
                opset_version=ct.target.iOS18)
    def prog(x, y):
        return (mil.linear_as_conv(x, ql, None, "lin"),
                mil.conv2d(y, {"weight": qc}, "cv", stride=2, pad=[1, 1, 0, 1]))

    p = _save_load(prog, tmp_path, f"w{nbits}a8", target=ct.target.iOS18)
    out = list(interp.run(p, {"x": xl, "y": xc}).values())
    got = [mil.psnr(r, o) for r, o in zip(_sdjax_layers(xl, xc, ql, qc), out)]
    PSNRS[f"W{nbits}A8 layers float32"] = got
    assert min(got) >= 100, got
    assert len(_ops(p, "quantize")) == 2 and len(_ops(p, "constexpr_lut_to_dense")) == 2
    # and the activation quantization matters: without it the same weights give another function
    plain = [mil.psnr(r, o) for r, o in zip(_sdjax_layers(xl, xc, ql.replace(act_scale=None),
                                                          qc.replace(act_scale=None)), out)]
    assert max(plain) < min(got) - 20, (plain, got)


def test_core_ml_clamps_to_minus_128_without_the_clip(tmp_path):
    """Why activation_quant has its clip: an input below -127.5 scales becomes -128 in Core ML's
    quantize, -127 in sdjax; with the clip the package gives sdjax's -127."""
    s = np.float32(0.01)
    x = np.array([-1.3, -1.2749, 1.3], np.float32).reshape(1, 3, 1, 1)  # / s: -130, -127.49, 130

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(a):
        bare = mb.quantize(input=a, scale=s, output_dtype="int8", name="bare")
        return bare, mil.activation_quant(a, s, "aq")

    out = interp.run(_save_load(prog, tmp_path, "clamp"), {"a": x})
    np.testing.assert_array_equal(out["bare"].reshape(-1), [-128, -127, 127])
    want = np.asarray(int8.Int8Weight(jnp.zeros((3, 1), jnp.int8), jnp.ones(1), jnp.float32(s)).quantize_input(
        jnp.asarray(x.reshape(1, 3)))).reshape(-1)
    np.testing.assert_array_equal(want, [-127, -127, 127])
    np.testing.assert_array_equal(out["aq_adq"].reshape(-1), want * s)


# --- whole components -----------------------------------------------------------------------------

@flax.struct.dataclass
class _MaxProbe(calibrate.WeightProbe):
    """A calibration probe that keeps only each input channel's max |x| (what act_method "max" uses;
    calibrate.Probe's 16384-bin histograms cost ~40 s more on the tiny UNet, run eagerly)."""
    weight: object
    name: str = flax.struct.field(pytree_node=False)
    sink: dict = flax.struct.field(pytree_node=False)

    def _record(self, x):
        m = jnp.max(jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1]), axis=0)

        def keep(v, name=self.name):
            self.sink[name] = np.maximum(self.sink.get(name, 0), np.asarray(v))
        jax.debug.callback(keep, m)


def _calibrated_scales(params, run, names, granularity):
    """{layer: act_scale} from the layers' inputs under ``run`` (quant.calibrate.act_scales's "max")."""
    sink = {}
    calibrate.run_probed(params, run, list(names), lambda w, n: _MaxProbe(w, n, sink))
    return {n: np.float32(sink[n].max() / 127) if granularity[n] == "tensor" else (sink[n] / 127).astype(np.float32)
            for n in names}


A = "down_blocks.0.attentions.0."
TB = A + "transformer_blocks.0."
UNET_LAYERS = {  # every layer kind of the UNet, per input channel for the transformer's linears
    **{TB + f"attn{i}.{m}": "channel" for i in (1, 2) for m in ("to_q", "to_k", "to_v", "to_out.0")},
    TB + "ff.net.0.proj": "channel", TB + "ff.net.2": "tensor",
    A + "proj_in": "tensor",                                  # 1x1 conv (use_linear_projection false)
    "down_blocks.0.downsamplers.0.conv": "tensor",            # stride 2
    "down_blocks.1.resnets.0.conv1": "tensor", "down_blocks.1.resnets.0.conv_shortcut": "tensor",
    "down_blocks.1.resnets.0.time_emb_proj": "tensor", "time_embedding.linear_1": "tensor",
    "up_blocks.0.resnets.0.conv1": "tensor",
    "up_blocks.0.resnets.0.conv_shortcut": "tensor",          # reads the skip concat
    "up_blocks.0.upsamplers.0.conv": "tensor",
}


@pytest.fixture(scope="module")
def pipe():
    return sdjax.load(None, progress=False)


def _w8a8(params, scales, component):
    recipe = {"name": "w8a8-kinds", "components": [component], "weight_threshold": 0,
              "rules": [{"pattern": n, "method": "int8-w8a8"} for n in scales]}
    return quant.apply_recipe(params, recipe, calibration=scales, component=component)


def test_w8a8_unet_export_is_sdjax_w8a8(tmp_path, pipe):
    """The tiny UNet with W8A8 on every layer kind (3x3, strided, upsampler, 1x1 shortcut and proj_in
    convs, attention q/k/v/out on self and cross attention, feed-forward, time embedding), calibrated
    on its inputs: the exported package, read back and interpreted, is sdjax's W8A8 UNet."""
    cfg = pipe.configs["unet"]
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, cfg.in_channels, 16, 16)).astype(np.float32)
    t = np.array([981.0, 17.0], np.float32)
    ctx = rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)

    def run(p):  # eager: compiling the whole UNet (with int8 convs) costs more than running it
        return sdjax.unet.apply(p, cfg, np.transpose(sample, (0, 2, 3, 1)), t, ctx)

    scales = _calibrated_scales(pipe.params["unet"], run, UNET_LAYERS, UNET_LAYERS)
    for same in (("attn1.to_q", "attn1.to_k", "attn1.to_v"), ("attn2.to_k", "attn2.to_v")):  # one input each
        for n in same[1:]:
            np.testing.assert_array_equal(scales[TB + n], scales[TB + same[0]])
    q = _w8a8(pipe.params["unet"], scales, "unet")
    ref = np.asarray(run(q)).transpose(0, 3, 1, 2)
    path = tmp_path / "unet_w8a8.mlpackage"
    unet.export(q, cfg, path, latent_shape=(16, 16), minimum_deployment_target=ct.target.iOS17)
    prog = interp.load_program(path)
    out = interp.run(prog, {"sample": sample, "timestep": t,
                            "encoder_hidden_states": np.ascontiguousarray(np.transpose(ctx, (0, 2, 1))[:, :, None, :])})
    PSNRS["unet w8a8"] = p = mil.psnr(ref, out["noise_pred"])
    PSNRS["unet w8a8 vs float (what W8A8 costs)"] = mil.psnr(np.asarray(run(pipe.params["unet"])).transpose(0, 3, 1, 2),
                                                             ref)
    assert p >= 60, p
    assert len(_ops(prog, "quantize")) == len(UNET_LAYERS)
    n_chan = sum(g == "channel" for g in UNET_LAYERS.values())
    assert len(_ops(prog, "real_div")) >= n_chan
    tensor_scales = sorted(float(s) for n, s in scales.items() if UNET_LAYERS[n] == "tensor")
    stored = sorted(float(op.scale.val) for op in _ops(prog, "quantize") if float(op.scale.val) != 1.0)
    assert stored == tensor_scales


def test_w8a8_text_encoder_export_is_sdjax_w8a8(tmp_path, pipe):
    """Every linear of the tiny text encoder's first layer W8A8 (q/k/v/out_proj per channel, fc1/fc2 per
    tensor): the package is sdjax's W8A8 encoder."""
    cfg = pipe.configs["text_encoder"]
    ids = np.asarray(pipe.tokenizer(["a photo of a cat"])).astype(np.int32)
    names = {f"encoder.layers.0.self_attn.{m}": "channel" for m in ("q_proj", "k_proj", "v_proj", "out_proj")}
    names.update({f"encoder.layers.0.mlp.{m}": "tensor" for m in ("fc1", "fc2")})

    def run(p):
        return sdjax.clip.apply(p, cfg, ids)[0]

    q = _w8a8(pipe.params["text_encoder"], _calibrated_scales(pipe.params["text_encoder"], run, names, names),
              "text_encoder")
    last, _, pooled = sdjax.clip.apply(q, cfg, ids)
    path = tmp_path / "te_w8a8.mlpackage"
    text_encoder.export(q, cfg, path, minimum_deployment_target=ct.target.iOS17)
    out = interp.run(interp.load_program(path), {"input_ids": ids})
    PSNRS["text encoder w8a8"] = got = (mil.psnr(last, out["last_hidden_state"]), mil.psnr(pooled, out["pooled_outputs"]))
    assert min(got) >= 60, got


# --- scale sharing: what coremltools' passes do to the graphs sdjax emits -----------------------

C, S = 8, 6


def _toy_weights():
    """Per-tensor W8A8 weights for q/k/v (one input, three scales), a layer after a concat, one after
    a residual add, one after another quantized layer, and a per-input-channel one after the concat."""
    rng = np.random.default_rng(3)
    w = {n: rng.standard_normal((cin, C)).astype(np.float32)
         for n, cin in (("q", C), ("k", C), ("v", C), ("cat", 2 * C), ("add", C), ("next", C), ("catc", 2 * C))}
    scales = {"q": 0.011, "k": 0.013, "v": 0.017, "cat": 0.019, "add": 0.023, "next": 0.029,
              "catc": np.geomspace(0.005, 0.05, 2 * C)}
    return {n: int8.quantize(w[n], act_scale=np.asarray(scales[n], np.float32)) for n in w}


def _toy_program(ws):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, C, 1, S)), mb.TensorSpec(shape=(1, C, 1, S))],
                opset_version=ct.target.iOS17)
    def prog(x, y):
        q, k, v = (mil.linear_as_conv(x, ws[n], None, n) for n in ("q", "k", "v"))
        cat = mb.concat(values=[x, y], axis=1, name="xy")
        add = mb.add(x=x, y=y, name="x_plus_y")
        return (k, v, mil.linear_as_conv(cat, ws["cat"], None, "cat"), mil.linear_as_conv(add, ws["add"], None, "add"),
                mil.linear_as_conv(q, ws["next"], None, "next"), mil.linear_as_conv(cat, ws["catc"], None, "catc"))
    return prog


def _toy_reference(ws, x, y):
    """sdjax's W8A8 (quant.int8's integer path) of the same layers, on (1, S, C) rows."""
    def lin(n, a):
        return np.asarray(ws[n].linear(jnp.asarray(a[:, :, 0, :].transpose(0, 2, 1)))).transpose(0, 2, 1)[:, :, None]
    q = lin("q", x)
    cat = np.concatenate([x, y], axis=1)
    return [lin("k", x), lin("v", x), lin("cat", cat), lin("add", x + y), lin("next", q), lin("catc", cat)]


def _stored_scales(prog):
    """The activation scales in a package: per-tensor quantize scales and per-channel divisors (the
    default pipeline's ``divide_to_multiply`` makes a division by a const a ``mul`` by its reciprocal,
    named ``_inversed_...``)."""
    per_tensor = sorted(float(op.scale.val) for op in _ops(prog, "quantize") if float(op.scale.val) != 1.0)
    per_channel = [np.asarray(op.y.val, np.float32).reshape(-1) for op in _ops(prog, "real_div")]
    per_channel += [np.float32(1) / np.asarray(op.y.val, np.float32).reshape(-1) for op in _ops(prog, "mul")
                    if op.name.startswith("_inversed_")]
    return per_tensor, per_channel


@pytest.mark.parametrize("pipeline", ["DEFAULT", "EMPTY", "fp16"])
def test_no_scale_is_shared_by_the_conversion(tmp_path, pipeline):
    """One tensor read by three layers with three scales, a concat and a residual add feeding quantized
    layers, two quantized layers in a row: after ct.convert with coremltools' default pass pipeline
    (Apple's converter's), sdjax's float32 one (EMPTY) or its float16 one, read back from the package,
    every layer keeps the scale sdjax wrote (float16-rounded in a float16 package) and the package
    computes sdjax's W8A8 of each layer: no pass merges, shares or moves activation scales in the
    graphs sdjax emits (its quantization passes match dequantize -> quantize pairs, dequantize ->
    add/sub -> quantize and dequantize -> reshape -> quantize, none of which sdjax writes)."""
    ws = _toy_weights()
    rng = np.random.default_rng(4)
    x, y = (rng.standard_normal((1, C, 1, S)).astype(np.float32) for _ in range(2))
    if pipeline == "fp16":
        prog = _save_load(_toy_program(ws), tmp_path, "toy16", "float16")
    else:
        prog = _save_load(_toy_program(ws), tmp_path, "toy", pipeline=getattr(ct.PassPipeline, pipeline))
    per_tensor, per_channel = _stored_scales(prog)
    rnd = np.float16 if pipeline == "fp16" else np.float32
    want = sorted(float(np.asarray(w.act_scale, rnd)) for w in ws.values() if np.ndim(w.act_scale) == 0)
    assert per_tensor == want
    assert len(per_channel) == 1
    # exact, but for the default pipeline's reciprocal (x * (1 / a): one rounding more)
    np.testing.assert_allclose(per_channel[0], np.asarray(ws["catc"].act_scale, rnd),
                               rtol=0 if pipeline != "DEFAULT" else 2.5 * EPS32)
    assert len(_ops(prog, "quantize")) == len(ws)
    out = list(interp.run(prog, {"x": x, "y": y}).values())
    got = [mil.psnr(r, o) for r, o in zip(_toy_reference(ws, x, y), out)]
    PSNRS[f"toy graph {pipeline}"] = got
    assert min(got) >= (100 if pipeline != "fp16" else 45), got


def test_the_quantization_passes_run_on_their_own_patterns(tmp_path):
    """The control for the test above: under the default pipeline, coremltools' passes do rewrite the
    patterns they target (a dequantize -> quantize pair with equal scales is removed; the inputs of a
    quantized add get one scale normalized to 1), and reading the package back shows it."""
    s, sx, sy, sz = np.float32(0.02), np.float32(0.03), np.float32(0.05), np.float32(0.07)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, C, 1, S)), mb.TensorSpec(shape=(1, C, 1, S))],
                opset_version=ct.target.iOS17)
    def prog(x, y):
        a = mb.dequantize(input=mb.quantize(input=x, scale=s, output_dtype="int8"), scale=s)
        a = mb.dequantize(input=mb.quantize(input=a, scale=s, output_dtype="int8"), scale=s, name="pair")
        dx = mb.dequantize(input=mb.quantize(input=x, scale=sx, output_dtype="int8"), scale=sx)
        dy = mb.dequantize(input=mb.quantize(input=y, scale=sy, output_dtype="int8"), scale=sy)
        z = mb.quantize(input=mb.add(x=dx, y=dy), scale=sz, output_dtype="int8")
        return a, mb.dequantize(input=z, scale=sz, name="sum")

    written = _ops(prog, "quantize")
    assert len(written) == 5
    p = _save_load(prog, tmp_path, "control", pipeline=ct.PassPipeline.DEFAULT)
    assert len(_ops(p, "quantize")) == 4  # dequantize_quantize_pair_elimination
    dq_scales = sorted(float(op.scale.val) for op in _ops(p, "dequantize"))
    assert dq_scales != sorted(float(v) for v in (s, sx, sy, sz)) and 1.0 in dq_scales  # scale normalization


def test_apples_concat_sharing_is_a_calibration_choice_of_coremltools():
    """Where Apple's "sharing of scales across concat inputs" comes from: coremltools' activation
    calibration (linear_quantize_activations) gives a concat's inputs and output one range, chaining
    concats that share a tensor; sdjax writes its own scales and does not run it."""
    from coremltools.optimize.coreml.experimental import _post_training_quantization as ptq
    stats = {n: {"rmin": -m, "rmax": m} for n, m in (("a", 1.0), ("b", 3.0), ("ab", 3.0), ("c", 5.0),
                                                      ("ac", 5.0), ("d", 9.0))}
    ptq._adjust_concat_surrounding_activation_stats([["a", "b", "ab"], ["a", "c", "ac"]], stats)
    assert {n: stats[n]["rmax"] for n in stats} == {"a": 5.0, "b": 5.0, "ab": 5.0, "c": 5.0, "ac": 5.0, "d": 9.0}


# --- refusals -------------------------------------------------------------------------------------

def _w8a8_weight(act_scale=0.05):
    w = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)
    qw = int8.quantize(w, act_scale=0.05)
    return qw.replace(act_scale=jnp.asarray(act_scale, jnp.float32))


def test_below_ios17_is_refused_naming_the_layer_and_nothing_is_written(tmp_path, pipe):
    qp = dict(pipe.params)
    qp["unet"] = _w8a8(pipe.params["unet"], {"mid_block.resnets.0.conv1": np.float32(0.02)}, "unet")
    qpipe = dataclasses.replace(pipe, params=qp)
    out = tmp_path / "cm"
    for target in ("iOS16", "macOS13"):
        with pytest.raises(cx.ExportError, match=r"unet\.mid_block\.resnets\.0\.conv1 .*iOS17"):
            cx.export_pipeline(qpipe, out, cx.Settings(minimum_deployment_target=target), progress=False,
                               log=lambda *a: None)
        assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")
    # the builder refuses too, should the up-front check be bypassed
    with pytest.raises(NotImplementedError, match="mid_res0_conv1.*iOS17"):
        unet.build(qp["unet"], pipe.configs["unet"], batch=1, latent_shape=(16, 16), context_len=77,
                   target=ct.target.iOS16)
    recipe = quant.parse_recipe("w8a8-int8conv")
    with pytest.raises(cx.ExportError, match="int8-w8a8.*iOS17.*not iOS16"):
        cx.check_recipe(recipe, "w8a8-int8conv", "iOS16")
    with pytest.raises(cx.ExportError, match="calibration.*sdjax quantize.*iOS17"):
        cx.check_recipe(recipe, "w8a8-int8conv", "iOS17")


@pytest.mark.parametrize("bad", [0.0, -0.1, np.nan, np.inf])
def test_bad_activation_scales_are_refused_by_layer(bad):
    params = {"unet": {"mid_block": {"proj": {"weight": _w8a8_weight(bad)}}}}
    with pytest.raises(cx.ExportError, match=r"unet\.mid_block\.proj: activation scales must be finite and > 0"):
        cx.check_exportable(params, "iOS18")
    cx.check_exportable({"unet": {"mid_block": {"proj": {"weight": _w8a8_weight()}}}}, "iOS17")


def test_print_psnrs():
    for k, v in PSNRS.items():
        print(f"{k}: {v}")
