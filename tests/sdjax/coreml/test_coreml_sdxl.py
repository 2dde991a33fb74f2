"""Core ML export of SDXL in apple/ml-stable-diffusion's XL interface, on the tiny diffusers SDXL base
and refiner (tests/tiny_models.py): every package read back from disk and run by sdjax.coreml.interp
against sdjax on the same inputs, >= 60 dB at float32 and >= 35 dB at float16, with both attention
implementations; the resource layout StableDiffusionXL+Resources.swift loads; quantized weights;
`sdjax export-coreml --refiner`."""
import json
import os
import re

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import quant  # noqa: E402
import sdjax  # noqa: E402
from sdjax.cli import main  # noqa: E402
from sdjax.nn import method_of  # noqa: E402
from sdjax.coreml import export as cx, interp, mil, text_encoder as cte, unet as cunet, vae as cvae  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
FLOOR = {"float32": 60, "float16": 35}
MEASURED = {}
PROMPT = "a red circle on a white background"
XL_PACKAGES = {"TextEncoder.mlpackage", "TextEncoder2.mlpackage", "Unet.mlpackage", "UnetRefiner.mlpackage",
               "VAEDecoder.mlpackage", "VAEEncoder.mlpackage"}


@pytest.fixture(scope="module")
def base(pipeline_dirs):
    return sdjax.load(pipeline_dirs("sdxl")[0], progress=False)


@pytest.fixture(scope="module")
def refiner(pipeline_dirs):
    return sdjax.load(pipeline_dirs("sdxl-refiner")[0], progress=False)


def _io(path):
    fn = interp.load_program(path).functions["main"]
    return ({k: tuple(int(d) for d in v.shape) for k, v in fn.inputs.items()},
            {o.name: tuple(int(d) for d in o.shape) for o in fn.outputs})


def _text(out, name, pipe, comp, tok):
    """The package's (hidden_embeds, pooled_outputs) and sdjax's (hidden_states[-2], pooled)."""
    ids = np.asarray(tok([PROMPT]))
    o = interp.run(interp.load_program(out / name), {"input_ids": ids.astype(np.float32)})
    _, hidden, pooled = sdjax.clip.apply(pipe.params[comp], pipe.configs[comp], ids)
    return (o["hidden_embeds"], o["pooled_outputs"]), (np.asarray(hidden[-2]), np.asarray(pooled))


def _unet_inputs(pipe, seed=0):
    """Swift's XL inputs for a batch of 2 (negative, positive): time_ids as StableDiffusionXLPipeline.swift
    builds them (base: original size, crop, target size; refiner: an aesthetic score last)."""
    uc = pipe.configs["unet"]
    p = pipe.configs["text_encoder_2"].projection_dim
    n = uc.time_ids_length(p)
    h, w = cvae.default_latent_shape(pipe.configs["vae"])
    rng = np.random.default_rng(seed)
    size = h * pipe.vae_scale_factor
    ids = np.array([[size, size, 0, 0, size, size]] * 2, np.float32)[:, :n]
    if n == 5:
        ids[:, 4] = [2.5, 6.0]  # negativeAestheticScore, aestheticScore
    else:
        ids[0, :2] = [96, 112]   # different rows: each sample's own time ids must reach it
    return {"sample": rng.standard_normal((2, uc.in_channels, h, w)).astype(np.float32),
            "timestep": np.array([999.0, 999.0], np.float32),
            "context": rng.standard_normal((2, 77, uc.cross_attention_dim)).astype(np.float32),
            "time_ids": ids, "text_embeds": rng.standard_normal((2, p)).astype(np.float32)}


def _unet_feed(x):
    """``_unet_inputs`` as the package's inputs (the context as ``(B, D, 1, L)``)."""
    return {"sample": x["sample"], "timestep": x["timestep"],
            "encoder_hidden_states": np.ascontiguousarray(x["context"].transpose(0, 2, 1)[:, :, None]),
            "time_ids": x["time_ids"], "text_embeds": x["text_embeds"]}


def _unet(path, pipe, x):
    o = interp.run(interp.load_program(path), _unet_feed(x))
    ref = sdjax.unet.apply(pipe.params["unet"], pipe.configs["unet"], x["sample"].transpose(0, 2, 3, 1),
                           x["timestep"], x["context"],
                           added_cond={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]})
    return o["noise_pred"], np.asarray(ref).transpose(0, 3, 1, 2)


def _vae(out, pipe, seed=0):
    """Decoder (z = latents / 0.13025, as Swift divides for XL) and encoder (Swift multiplies by 0.13025)."""
    vc = pipe.configs["vae"]
    h, w = cvae.default_latent_shape(vc)
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((1, vc.latent_channels, h, w)).astype(np.float32)
    o = interp.run(interp.load_program(out / "VAEDecoder.mlpackage"), {"z": latents / cvae.SWIFT_XL_SCALING_FACTOR})
    ref = sdjax.vae.decode(pipe.params["vae"], vc, latents.transpose(0, 2, 3, 1) / vc.scaling_factor)
    got = {"vae decoder": (o["image"], np.asarray(ref).transpose(0, 3, 1, 2))}
    f = pipe.vae_scale_factor
    image = np.tanh(rng.standard_normal((1, 3, h * f, w * f))).astype(np.float32)
    o = interp.run(interp.load_program(out / "VAEEncoder.mlpackage"), {"x": image})
    mean, logvar = sdjax.vae.encode(pipe.params["vae"], vc, image.transpose(0, 2, 3, 1))
    r = vc.scaling_factor / cvae.SWIFT_XL_SCALING_FACTOR
    moments = np.concatenate([np.asarray(mean) * r, np.clip(np.asarray(logvar), -30, 20) + 2 * np.log(r)], -1)
    got["vae encoder"] = (o["latent"], moments.transpose(0, 3, 1, 2))
    return got


def _record(tag, pairs, floor):
    for k, (got, want) in pairs.items():
        assert got.shape == want.shape, (k, got.shape, want.shape)
        MEASURED[f"{tag} {k}"] = p = mil.psnr(want, got)
        assert p >= floor, (tag, k, p)


def _float_types(path):
    """The float dtypes of every op output of the package's program."""
    from coremltools.converters.mil.mil import types
    fn = interp.load_program(path).functions["main"]
    return {types.builtin_to_string(v.dtype) for op in fn.operations for v in op.outputs
            if types.is_tensor(v.sym_type) and types.is_float(v.dtype)}


@pytest.mark.parametrize("attention", ["split_einsum_v2", pytest.param("original", marks=pytest.mark.slow)])  # CI time
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_every_component_matches_sdjax(base, refiner, tmp_path, precision, attention):
    """Base + refiner in one folder: both text encoders, both UNets, the VAE (float32 whatever the
    precision: SDXL's VAE config says force_upcast)."""
    out = tmp_path / "cm"
    m = cx.export_pipeline(base, out, cx.Settings(compute_precision=precision, attention=attention),
                           progress=False, log=lambda *a: None, refiner=refiner)
    assert set(m["packages"]) == XL_PACKAGES
    tag = f"{precision} {attention}"
    got = {}
    got["text_encoder hidden_embeds"], got["text_encoder pooled"] = zip(
        *_text(out, "TextEncoder.mlpackage", base, "text_encoder", base.tokenizer))
    got["text_encoder_2 hidden_embeds"], got["text_encoder_2 pooled"] = zip(
        *_text(out, "TextEncoder2.mlpackage", base, "text_encoder_2", base.tokenizer_2))
    got["unet"] = _unet(out / "Unet.mlpackage", base, _unet_inputs(base))
    got["refiner unet"] = _unet(out / "UnetRefiner.mlpackage", refiner, _unet_inputs(refiner, seed=1))
    _record(tag, got, FLOOR[precision])
    # the VAE: float32 packages (force_upcast), so the float32 floor applies at either precision
    assert base.configs["vae"].force_upcast
    for n in ("VAEDecoder.mlpackage", "VAEEncoder.mlpackage"):
        assert m["packages"][n]["compute_precision"] == "float32" and _float_types(out / n) == {"fp32"}, n
    assert m["packages"]["Unet.mlpackage"]["compute_precision"] == precision
    for n in ("TextEncoder2.mlpackage", "Unet.mlpackage", "UnetRefiner.mlpackage"):
        ops = {op.op_type for op in interp.load_program(out / n).functions["main"].operations}
        assert ("einsum" in ops) == (attention == "split_einsum_v2"), n
    if precision == "float16":
        assert "fp16" in _float_types(out / "Unet.mlpackage")
    _record(tag, _vae(out, base), FLOOR["float32"])


def test_resource_layout_as_the_xl_swift_pipeline_reads_it(base, refiner, tmp_path):
    """StableDiffusionXL+Resources.swift's file names; TextEncoderXL.swift's outputs; Unet.swift's XL inputs
    (time_ids (2, 6) for the base, (2, 5) for the refiner); one vocab.json/merges.txt for both tokenizers."""
    out = tmp_path / "cm"
    cx.export_pipeline(base, out, cx.Settings(compute_precision="float32"), progress=False, log=lambda *a: None,
                       refiner=refiner)
    assert set(os.listdir(out)) == XL_PACKAGES | {"vocab.json", "merges.txt", "sdjax_export.json"}
    t1, t2 = base.configs["text_encoder"], base.configs["text_encoder_2"]
    assert _io(out / "TextEncoder.mlpackage") == (
        {"input_ids": (1, 77)}, {"hidden_embeds": (1, 77, t1.hidden_size), "pooled_outputs": (1, t1.hidden_size)})
    assert _io(out / "TextEncoder2.mlpackage") == (
        {"input_ids": (1, 77)}, {"hidden_embeds": (1, 77, t2.hidden_size), "pooled_outputs": (1, t2.projection_dim)})
    h, w = cvae.default_latent_shape(base.configs["vae"])
    for name, pipe, n in (("Unet.mlpackage", base, 6), ("UnetRefiner.mlpackage", refiner, 5)):
        uc = pipe.configs["unet"]
        ins, outs = _io(out / name)
        assert list(ins) == ["sample", "timestep", "encoder_hidden_states", "time_ids", "text_embeds"]  # Apple's order
        assert ins == {"sample": (2, uc.in_channels, h, w), "timestep": (2,),
                       "encoder_hidden_states": (2, uc.cross_attention_dim, 1, 77), "time_ids": (2, n),
                       "text_embeds": (2, t2.projection_dim)}
        assert outs == {"noise_pred": (2, uc.out_channels, h, w)}
    # base cross-attends to both encoders' states side by side; the refiner to text_encoder_2's alone
    assert base.configs["unet"].cross_attention_dim == t1.hidden_size + t2.hidden_size
    assert refiner.configs["unet"].cross_attention_dim == t2.hidden_size
    # the Swift BPETokenizer reads one vocab.json/merges.txt for both; tokenizer 2 pads with "!"
    from transformers import CLIPTokenizer
    import shutil
    for n in ("vocab.json", "merges.txt"):
        shutil.copyfile(out / n, tmp_path / n)
    swift_like = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for tok in (base.tokenizer, base.tokenizer_2):
        assert swift_like(PROMPT).input_ids == tok._tok(PROMPT).input_ids
    assert base.tokenizer_2._tok.pad_token == cx.XL_TOKENIZER_2_PAD
    manifest = json.load(open(out / "sdjax_export.json"))
    assert manifest["settings"]["refiner"]["model"] == refiner.source


def test_swift_conditioning_equals_sdjax_sdxl_prompt_encoding(base, tmp_path):
    """What StableDiffusionXLPipeline.swift makes of the two packages (hidden_embeds side by side, text
    encoder 2's pooled output) is sdjax's own SDXL prompt encoding."""
    out = tmp_path / "cm"
    os.makedirs(out)
    for comp, name in (("text_encoder", "TextEncoder.mlpackage"), ("text_encoder_2", "TextEncoder2.mlpackage")):
        cte.export(base.params[comp], base.configs[comp], out / name, xl=True)
    (h1, _), _ = _text(out, "TextEncoder.mlpackage", base, "text_encoder", base.tokenizer)
    (h2, pooled), _ = _text(out, "TextEncoder2.mlpackage", base, "text_encoder_2", base.tokenizer_2)
    states, want_pooled = base.encode_prompt_sdxl([PROMPT])
    _record("float32 swift conditioning", {"states": (np.concatenate([h1, h2], axis=2), np.asarray(states)),
                                           "pooled": (pooled, np.asarray(want_pooled))}, 60)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_refiner_alone(refiner, tmp_path, precision):
    """A refiner pipeline on its own: no TextEncoder (it has no text_encoder), its UNet as Unet.mlpackage
    (the Swift pipeline tells a refiner by time_ids' last dimension, 5)."""
    out = tmp_path / "cm"
    cx.export_pipeline(refiner, out, cx.Settings(compute_precision=precision), progress=False, log=lambda *a: None)
    assert set(os.listdir(out)) == {"TextEncoder2.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage",
                                    "VAEEncoder.mlpackage", "vocab.json", "merges.txt", "sdjax_export.json"}
    got = {}
    got["text_encoder_2 hidden_embeds"], got["text_encoder_2 pooled"] = zip(
        *_text(out, "TextEncoder2.mlpackage", refiner, "text_encoder_2", refiner.tokenizer_2))
    got["unet"] = _unet(out / "Unet.mlpackage", refiner, _unet_inputs(refiner))
    _record(f"refiner alone {precision}", got, FLOOR[precision])
    _record(f"refiner alone {precision}", _vae(out, refiner), FLOOR["float32"])


def test_per_attention_depths_and_no_first_block_attention(base):
    """The program has exactly the transformer blocks transformer_depths lists (SDXL: none in the first
    block), and an SDXL UNet needs text_embeds_dim."""
    uc = base.configs["unet"]
    p = base.configs["text_encoder_2"].projection_dim
    prog = cunet.build(base.params["unet"], uc, latent_shape=(16, 16), attention="original", text_embeds_dim=p)
    names = {op.name for op in prog.functions["main"].operations}
    down, mid, up = uc.transformer_depths
    want = {f"down{i}_attn{j}_tb{k}" for i, d in enumerate(down) for j, n in enumerate(d) for k in range(n)}
    want |= {f"mid_attn0_tb{k}" for k in range(mid)}
    want |= {f"up{i}_attn{j}_tb{k}" for i, d in enumerate(up) for j, n in enumerate(d) for k in range(n)}
    import re
    have = {n for n in names if re.fullmatch(r"(down\d+_attn\d+|mid_attn0|up\d+_attn\d+)_tb\d+", n)}
    assert have == want and not any(n.startswith("down0_attn") for n in names)
    assert max(mid, *(n for d in down for n in d)) >= 2  # the tiny base has 2-deep attentions
    with pytest.raises(ValueError, match="text_embeds_dim"):
        cunet.build(base.params["unet"], uc, latent_shape=(16, 16))


def test_palettized_unet_and_int8_text_encoder_2(base, tmp_path):
    """Quantized SDXL weights go through as for SD 1.x: a 6-bit palettized UNet (LUTs and indices
    stored as constexpr_lut_to_dense) and an int8 text_encoder_2, text_projection included."""
    recipe = {"components": ["unet", "text_encoder_2"], "weight_threshold": 0,
              "rules": [{"pattern": "*", "method": "palettize", "nbits": 6, "component": "unet"},
                        {"pattern": "*", "method": "int8", "component": "text_encoder_2"}]}
    q = base.quantize(recipe)
    path = tmp_path / "Unet.mlpackage"
    p = base.configs["text_encoder_2"].projection_dim
    h, w = cvae.default_latent_shape(base.configs["vae"])
    cunet.export(q.params["unet"], q.configs["unet"], path, latent_shape=(h, w), text_embeds_dim=p)
    stored = interp.constexpr_values(interp.load_program(path))
    n_lut = sum(method_of(w_) == "palettize" for w_ in quant.recipes.layers(q.params["unet"]).values())
    assert n_lut > 20 and sum(1 for v in stored.values() if "lut" in v) == n_lut
    _record("float32 palette-6bit", {"unet": _unet(path, q, _unet_inputs(q))}, 60)
    path = tmp_path / "TextEncoder2.mlpackage"
    cte.export(q.params["text_encoder_2"], q.configs["text_encoder_2"], path, xl=True)
    stored = interp.constexpr_values(interp.load_program(path))
    assert "text_projection_w" in stored and stored["text_projection_w"]["quantized_data"].dtype == np.int8
    got = dict(zip(("text_encoder_2 hidden_embeds", "text_encoder_2 pooled"),
                   zip(*_text(tmp_path, "TextEncoder2.mlpackage", q, "text_encoder_2", q.tokenizer_2))))
    _record("float32 int8", got, 60)


def test_chunked_unet_takes_the_xl_inputs(base, tmp_path):
    """--chunk-unet on SDXL: chunk 1 takes time_ids and text_embeds (the added embedding is computed
    there and handed on in chunk_temb); chunk 2, fed as ManagedMLModel.swift feeds it, ends the UNet."""
    p = base.configs["text_encoder_2"].projection_dim
    h, w = cvae.default_latent_shape(base.configs["vae"])
    paths = [tmp_path / n for n in cunet.REFINER_CHUNK_NAMES]
    cunet.export_chunks(base.params["unet"], base.configs["unet"], paths, latent_shape=(h, w), text_embeds_dim=p)
    x = _unet_inputs(base)
    feeds = {"sample": x["sample"], "timestep": x["timestep"], "time_ids": x["time_ids"],
             "text_embeds": x["text_embeds"],
             "encoder_hidden_states": np.ascontiguousarray(x["context"].transpose(0, 2, 1)[:, :, None])}
    p1, p2 = (interp.load_program(pth) for pth in paths)
    assert set(p1.functions["main"].inputs) == set(feeds)
    out1 = interp.run(p1, feeds)
    merged = {**feeds, **out1}
    out2 = interp.run(p2, {k: merged[k] for k in p2.functions["main"].inputs})
    ref = sdjax.unet.apply(base.params["unet"], base.configs["unet"], x["sample"].transpose(0, 2, 3, 1),
                           x["timestep"], x["context"],
                           added_cond={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]})
    _record("float32 chunked", {"unet": (out2["noise_pred"], np.asarray(ref).transpose(0, 3, 1, 2))}, 60)


def test_cli_writes_the_xl_layout_with_a_refiner(pipeline_dirs, tmp_path, capsys):
    out = tmp_path / "cm"
    rc = main(["export-coreml", "--model", pipeline_dirs("sdxl")[0], "--refiner", pipeline_dirs("sdxl-refiner")[0],
               "-o", str(out), "-q", "--attention", "original"])
    assert rc == 0, capsys.readouterr().err
    assert set(os.listdir(out)) == XL_PACKAGES | {"vocab.json", "merges.txt", "sdjax_export.json"}
    m = json.load(open(out / "sdjax_export.json"))
    assert m["settings"]["compute_precision"] == "float16" and m["settings"]["attention"] == "original"
    assert {n: r["compute_precision"] for n, r in m["packages"].items()} == {
        n: ("float32" if n.startswith("VAE") else "float16") for n in XL_PACKAGES}
    assert _io(out / "UnetRefiner.mlpackage")[0]["time_ids"] == (2, 5)
    # a refiner needs an SDXL base
    rc = main(["export-coreml", "--model", pipeline_dirs("sdxl-refiner")[0], "--refiner",
               pipeline_dirs("sdxl-refiner")[0], "-o", str(tmp_path / "bad"), "-q"])
    assert rc == 2 and "SDXL base" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad")


def test_print_measured():
    print("\nCore ML SDXL, PSNR vs sdjax (dB):", {k: round(v, 1) for k, v in MEASURED.items()})


def test_fp16_rounds_give_the_one_round_program(base, tmp_path, monkeypatch):
    """A big program's fp16 conversion runs in rounds (cte.fp16_pass_names); forced to many rounds on
    the tiny SDXL UNet it must write the program the single round writes, op for op, and the
    interpreter must give the same output bits."""
    uc = base.configs["unet"]
    p = base.configs["text_encoder_2"].projection_dim
    one_round = cte.fp16_pass_names(5000, ops_per_round=10 ** 9)
    assert one_round == cte.FP16_PASSES
    n_ops = len(cunet.build(base.params["unet"], uc, text_embeds_dim=p).functions["main"].operations)
    assert n_ops > 100
    rounds = cte.fp16_pass_names(n_ops, ops_per_round=n_ops // 7)
    assert sum(n.startswith("sdjax::") for n in rounds) >= 7 and rounds[-3:] == cte.FP16_PASSES[1:]
    paths = {}
    for label, per in (("one", 10 ** 9), ("rounds", n_ops // 7)):
        monkeypatch.setattr(cte, "OPS_PER_FP16_ROUND", per)
        paths[label] = cunet.export(base.params["unet"], uc, tmp_path / f"{label}.mlpackage",
                                    compute_precision="float16", text_embeds_dim=p)
    progs = {k: interp.load_program(v) for k, v in paths.items()}
    # the Builder numbers generated names process-wide (``_0``, ``_1``, ...): compare names without numbers
    ops = {k: [(op.op_type, re.sub(r"_\d+", "", op.name), [v.sym_type.__name__ + str(v.shape) for v in op.outputs])
               for op in g.functions["main"].operations] for k, g in progs.items()}
    assert ops["rounds"] == ops["one"]
    feed = _unet_feed(_unet_inputs(base))
    outs = {k: interp.run(g, feed)["noise_pred"] for k, g in progs.items()}
    np.testing.assert_array_equal(outs["rounds"], outs["one"])
