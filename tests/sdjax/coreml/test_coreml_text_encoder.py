"""Core ML export of the CLIP text encoder, checked by reading the saved .mlpackage back and
running it with sdjax.coreml.interp against sdjax.clip.apply."""
import dataclasses
import os

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402

import quant  # noqa: E402
import sdjax  # noqa: E402
from sdjax.coreml import interp, mil, text_encoder  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(scope="module")
def pipe():
    return sdjax.load(None)


@pytest.fixture(scope="module")
def ids(pipe):
    return np.asarray(pipe.tokenizer(["a photo of a cat"])).astype(np.int32)


def _quantized(pipe, rule):
    q = quant.apply_recipe(pipe.params, {"components": ["text_encoder"], "rules": [dict(pattern="*", **rule)]})
    return q["text_encoder"]


def _export_run(tmp_path, params, config, ids, name, **kw):
    path = tmp_path / f"{name}.mlpackage"
    text_encoder.export(params, config, path, **kw)
    prog = interp.load_program(path)
    return prog, interp.run(prog, {"input_ids": ids})


def _check(out, params, config, ids, min_db):
    last, _, pooled = sdjax.clip.apply(params, config, ids)
    assert out["last_hidden_state"].shape == last.shape
    assert out["pooled_outputs"].shape == pooled.shape
    got = (mil.psnr(last, out["last_hidden_state"]), mil.psnr(pooled, out["pooled_outputs"]))
    assert min(got) >= min_db, got
    return got


def _linears(params, config):
    """{constexpr op name: sdjax weight} for every linear layer of the encoder."""
    out = {}
    for i in range(config.num_hidden_layers):
        layer = params["encoder"]["layers"][str(i)]
        for m in PROJ:
            out[f"l{i}_{m}_w"] = layer["self_attn"][m]["weight"]
        for m in ("fc1", "fc2"):
            out[f"l{i}_{m}_w"] = layer["mlp"][m]["weight"]
    return out


@pytest.mark.parametrize("attention", ["split_einsum_v2", "original"])
def test_float32_matches_sdjax(tmp_path, pipe, ids, attention):
    p, c = pipe.params["text_encoder"], pipe.configs["text_encoder"]
    prog, out = _export_run(tmp_path, p, c, ids, attention, attention=attention)
    f = prog.functions["main"]
    assert list(f.inputs) == ["input_ids"] and [v.name for v in f.outputs] == ["last_hidden_state", "pooled_outputs"]
    from coremltools.converters.mil.mil import types
    assert f.inputs["input_ids"].dtype == types.fp32  # the Swift package feeds Float32 ids
    ops = {op.op_type for op in f.operations}
    assert ("einsum" in ops) == (attention == "split_einsum_v2") and "conv" in ops
    _check(out, p, c, ids, 60)


def test_float16_matches_sdjax(tmp_path, pipe, ids):
    p, c = pipe.params["text_encoder"], pipe.configs["text_encoder"]
    prog, out = _export_run(tmp_path, p, c, ids, "fp16", compute_precision="float16")
    consts = [np.asarray(op.val.val) for op in prog.functions["main"].operations if op.op_type == "const"]
    assert all(v.dtype != np.float32 for v in consts)  # every float weight stored as fp16
    _check(out, p, c, ids, 35)


@pytest.mark.parametrize("attention", ["split_einsum_v2", "original"])
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_causal_mask_stored_once(tmp_path, pipe, ids, attention, precision):
    """One causal-mask const shared by every head of every layer, in the saved package (it was one per
    head per layer: 12 here, 144 copies, 1.7 MB at SD 1.5 size); what the package computes is unchanged."""
    p, c = pipe.params["text_encoder"], pipe.configs["text_encoder"]
    assert c.num_hidden_layers * c.num_attention_heads > 1
    prog, out = _export_run(tmp_path, p, c, ids, "mask", attention=attention, compute_precision=precision)
    n = ids.shape[1]
    causal = np.where(np.tril(np.ones((n, n), bool)), 0.0, text_encoder.MASK_VALUE)
    masks = [op for op in prog.functions["main"].operations
             if op.op_type == "const" and np.asarray(op.val.val).size == n * n]
    assert len(masks) == 1
    layout = causal.T[None, :, None, :] if attention == "split_einsum_v2" else causal[None, None]  # (keys, queries)
    np.testing.assert_array_equal(np.asarray(masks[0].val.val).astype(np.float32), layout)
    uses = masks[0].outputs[0].child_ops  # every head of every layer adds the one mask
    assert len(uses) == c.num_hidden_layers * (c.num_attention_heads if attention == "split_einsum_v2" else 1)
    assert {op.op_type for op in uses} == {"add"}
    _check(out, p, c, ids, 60 if precision == "float32" else 35)


def test_attention_shares_each_mask_slice():
    """With query chunks each distinct slice of the mask is one const, shared by the heads."""
    s, heads = 77, 4
    mask = np.where(np.tril(np.ones((s, s), bool)), 0, -1e4).astype(np.float32).T

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8, 1, s)) for _ in range(3)], opset_version=ct.target.iOS16)
    def prog(q, k, v):  # chunks of 32, 32 and 13 queries
        return mil.attention(q, k, v, heads, mask=mask, mode="split_einsum_v2", name="y", query_chunk=32)
    consts = [op for op in prog.functions["main"].operations
              if op.op_type == "const" and np.asarray(op.val.val).ndim == 4]
    assert sorted(np.asarray(op.val.val).shape[-1] for op in consts) == [13, 32, 32]
    assert all(len(op.outputs[0].child_ops) == heads for op in consts)


def _export_quantized(tmp_path, pipe, ids, rule, name, precision):
    """Quantize the text encoder's linear layers by ``rule``, export, check the outputs against sdjax
    (>= 60 dB float32, >= 35 dB float16); returns (stored constexprs by name, sdjax's weights by name),
    after checking that every quantized linear layer became exactly one constexpr."""
    c = pipe.configs["text_encoder"]
    q = _quantized(pipe, rule)
    prog, out = _export_run(tmp_path, q, c, ids, name, compute_precision=precision)
    _check(out, q, c, ids, 60 if precision == "float32" else 35)
    stored = interp.constexpr_values(prog)
    weights = _linears(q, c)
    assert set(stored) == set(weights)
    return stored, weights


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_palettized(tmp_path, pipe, ids, precision):
    stored, weights = _export_quantized(tmp_path, pipe, ids, {"method": "palettize", "nbits": 4}, "pal", precision)
    for name, w in weights.items():
        s = stored[name]
        lut = np.asarray(w.lut)[0]
        if precision == "float16":
            np.testing.assert_array_equal(s["lut"].view(np.uint16), lut.view(np.uint16))
        else:  # float32 tables: the same values (fp16 -> fp32 is exact)
            assert s["lut"].dtype == np.float32
            np.testing.assert_array_equal(s["lut"], lut.astype(np.float32))
        n_in, n_out = w.shape
        np.testing.assert_array_equal(s["shape"], [n_out, n_in, 1, 1])
        bits = np.unpackbits(s["indices"], bitorder="little")[: w.nbits * w.size].reshape(-1, w.nbits)
        idx = (bits.astype(np.int64) @ (1 << np.arange(w.nbits))).reshape(n_out, n_in)
        np.testing.assert_array_equal(idx, mil.lut_indices(w).T)  # sdjax's indices, transposed to OIHW


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_int8(tmp_path, pipe, ids, precision):
    stored, weights = _export_quantized(tmp_path, pipe, ids, {"method": "int8"}, "int8", precision)
    for name, w in weights.items():
        s = stored[name]
        np.testing.assert_array_equal(s["quantized_data"], np.asarray(w.data).T[:, :, None, None])
        assert s["quantized_data"].dtype == np.int8 and int(s["axis"]) == 0
        np.testing.assert_array_equal(s["zero_point"], 0)
        np.testing.assert_array_equal(s["scale"], np.asarray(w.scale).astype(precision))


def test_pooled_position_first_max_legacy_and_eos(tmp_path, pipe):
    """argmax semantics with ties, for both of sdjax.clip.apply's pooling rules."""
    p, c = pipe.params["text_encoder"], pipe.configs["text_encoder"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, c.vocab_size - 1, (1, 77)).astype(np.int32)
    ids[0, [20, 40, 60]] = c.vocab_size - 1  # ties: the first one counts
    legacy = dataclasses.replace(c, eos_token_id=2)
    for name, cfg, want in (("legacy", legacy, 20), ("eos", c, 20)):
        _, out = _export_run(tmp_path, p, cfg, ids, name)
        last = out["last_hidden_state"]
        np.testing.assert_array_equal(out["pooled_outputs"], last[:, want])
        _check(out, p, cfg, ids, 60)
    ids[0, [20, 40, 60]] = 5  # no EOS at all: position 0, as argmax of all-False
    _, out = _export_run(tmp_path, p, c, ids, "noeos")
    np.testing.assert_array_equal(out["pooled_outputs"], out["last_hidden_state"][:, 0])


@pytest.mark.parametrize("mode", ["split_einsum_v2", "original"])
def test_attention_chunks_keep_tail(tmp_path, mode):
    b, c, heads, s = 1, 8, 2, 77
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((b, c, 1, s)).astype(np.float32) for _ in range(3))
    mask = np.where(np.tril(np.ones((s, s), bool)), 0, -1e4).astype(np.float32).T  # (keys, queries)
    spec = [mb.TensorSpec(shape=(b, c, 1, s)) for _ in range(3)]

    @mb.program(input_specs=spec, opset_version=ct.target.iOS16)
    def prog(q, k, v):  # 32-query chunks: 32 + 32 + a tail of 13
        return mil.attention(q, k, v, heads, mask=mask, mode=mode, name="y", query_chunk=32)

    if mode == "split_einsum_v2":
        assert sum(op.op_type == "softmax" for op in prog.functions["main"].operations) == heads * 3
    model = text_encoder.convert(prog)
    text_encoder.save_atomically(model, tmp_path / "attn.mlpackage")
    got = interp.run(interp.load_program(tmp_path / "attn.mlpackage"), {"q": q, "k": k, "v": v})["y"]
    hd = c // heads
    qh, kh, vh = (a.reshape(heads, hd, s) for a in (q, k, v))
    sc = np.einsum("hcq,hck->hqk", qh, kh) / np.sqrt(hd) + mask.T
    w = np.exp(sc - sc.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    want = np.einsum("hqk,hck->hcq", w, vh).reshape(b, c, 1, s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_existing_path_refused_and_no_temp_left(tmp_path, pipe):
    p, c = pipe.params["text_encoder"], pipe.configs["text_encoder"]
    path = tmp_path / "te.mlpackage"
    text_encoder.export(p, c, path)
    before = os.path.getmtime(path / "Manifest.json")
    with pytest.raises(FileExistsError):
        text_encoder.export(p, c, path)
    assert os.path.getmtime(path / "Manifest.json") == before
    text_encoder.export(p, c, path, overwrite=True)
    interp.load_program(path)
    assert sorted(os.listdir(tmp_path)) == ["te.mlpackage"]  # no temporary directory left


def test_unsupported_weights_raise(pipe):
    q = _quantized(pipe, {"method": "palettize", "nbits": 4})
    w = q["encoder"]["layers"]["0"]["mlp"]["fc1"]["weight"]
    grouped = w.replace(lut=np.concatenate([np.asarray(w.lut)] * 2), group_size=w.shape[1] // 2)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS16)
    def ok(x):  # the supported per-tensor form builds
        mil.conv1x1_weight(w, "w_ok")
        return x

    with pytest.raises(NotImplementedError, match="w_grouped.*supported so far"):
        @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS16)
        def bad(x):
            mil.conv1x1_weight(grouped, "w_grouped")
            return x
