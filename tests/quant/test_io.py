"""Quantized folders: save/load rebuilds every weight type bit for bit, the loaded pipeline
generates the same image as the in-memory one, float components stay diffusers files, and a file
with missing or foreign metadata is refused by name."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

import quant
import sdjax
from quant import io as qio
from quant.int8 import Int8Weight
from quant.llm_int8 import LLMInt8Weight
from quant.palettize import PalettizedWeight
from quant.recipes import layers
from sdjax import nn
from sdjax.params import CheckpointError
from sdjax.safetensors_io import Reader, write

RECIPE = {"name": "every-method", "components": ["unet", "text_encoder", "vae"], "weight_threshold": 0, "rules": [
    {"pattern": "*attn1.to_[qk]", "method": "palettize", "nbits": 4, "group_size": 16},
    {"pattern": "*attn1.to_v", "method": "palettize", "nbits": 3, "per_channel_scale": True},
    {"pattern": "*attn2.to_[qkv]", "method": "palettize", "nbits": 1},
    {"pattern": "mid_block.resnets.0.*", "kind": "conv", "method": "int8-w8a8"},
    {"pattern": "mid_block.resnets.1.*", "kind": "conv", "method": "int8-w8a8", "path": "simulated"},
    {"pattern": "*", "kind": "conv", "component": "unet", "method": "int8"},
    {"pattern": "*mlp*", "method": "llm-int8", "threshold": 4.0, "path": "simulated", "max_outlier_cols": 8},
    {"pattern": "*ff*", "method": "llm-int8"},
    {"pattern": "decoder.*", "method": "palettize", "nbits": 2}]}


def calibration(unet_params):
    rng = np.random.default_rng(0)
    out = {}
    for n, w in layers(unet_params).items():
        if n.startswith("mid_block.resnets.0"):
            out[n] = np.float32(0.03)
        elif n.startswith("mid_block.resnets.1"):
            out[n] = rng.uniform(0.01, 0.05, w.shape[-2]).astype(np.float32)
    return {"unet": out}


@pytest.fixture(scope="module")
def source(pipeline_dirs):
    folder, _ = pipeline_dirs("sd1")
    return folder


@pytest.fixture(scope="module")
def pipe(source):
    return sdjax.load(source, progress=False)


@pytest.fixture(scope="module")
def qpipe(pipe):
    return pipe.quantize(RECIPE, calibration(pipe.params["unet"]))


@pytest.fixture(scope="module")
def saved(qpipe, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("q") / "model")
    qio.save(qpipe, out, progress=False)
    return out


def is_q(x):
    return hasattr(x, "dequantize")


def assert_same_params(a, b):
    assert jax.tree.structure(a, is_leaf=is_q) == jax.tree.structure(b, is_leaf=is_q)
    for x, y in zip(jax.tree.leaves(a, is_leaf=is_q), jax.tree.leaves(b, is_leaf=is_q)):
        assert type(x) is type(y)
        # the treedef carries the static fields (shape, nbits, group_size, path, threshold...)
        assert jax.tree.structure(x) == jax.tree.structure(y)
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            assert u.dtype == v.dtype and u.shape == v.shape
            assert np.array_equal(np.asarray(u), np.asarray(v))


def test_recipe_covers_every_method(qpipe):
    seen = set()
    for comp in ("unet", "text_encoder", "vae"):
        for w in layers(qpipe.params[comp]).values():
            seen.add(qio.label(w))
    assert {"palettize 4b g16", "palettize 3b +scale", "palettize 1b", "palettize 2b", "int8", "int8-w8a8",
            "int8-w8a8 ch", "llm-int8"} <= seen


def test_round_trip_is_bit_exact(qpipe, saved):
    loaded = sdjax.load(saved, progress=False)
    assert_same_params(qpipe.params, loaded.params)
    assert loaded.configs == qpipe.configs
    assert loaded.scheduler_config == qpipe.scheduler_config
    assert loaded.quantization["recipe"] == quant.parse_recipe(RECIPE).to_json()
    w = layers(loaded.params["unet"])["mid_block.resnets.1.conv1"]
    assert isinstance(w, Int8Weight) and w.path == "simulated" and w.act_scale.shape == (64,)
    w = layers(loaded.params["text_encoder"])["encoder.layers.0.mlp.fc1"]
    assert isinstance(w, LLMInt8Weight) and (w.threshold, w.path, w.max_outlier_cols) == (4.0, "simulated", 8)
    # float leaves follow the requested dtype; quantized weights keep their stored dtypes
    half = sdjax.load(saved, dtype="bfloat16", progress=False)
    fl = nn.flatten(half.params["unet"])
    assert fl["conv_in.bias"].dtype == np.dtype("bfloat16")
    p = fl["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert isinstance(p, PalettizedWeight) and p.lut.dtype == np.float16


def test_file_layout_and_metadata(qpipe, saved, source):
    assert sorted(os.listdir(saved)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    for comp in ("unet", "text_encoder", "vae"):
        assert sorted(os.listdir(os.path.join(saved, comp))) == ["config.json", qio.WEIGHTS_NAME]
    assert sorted(os.listdir(os.path.join(saved, "tokenizer"))) == sorted(os.listdir(os.path.join(source, "tokenizer")))
    index = json.load(open(os.path.join(saved, "model_index.json")))
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["_sdjax_quantized"]["format_version"] == 1
    with Reader(os.path.join(saved, "unet", qio.WEIGHTS_NAME)) as r:
        meta, keys = r.metadata, set(r.keys())
        assert r.dtype("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight.indices") == np.uint8
        assert r.shape("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight.lut") == (4, 16)
        assert r.shape("conv_in.weight.int8") == (3, 3, 4, 32)  # sdjax layout (HWIO)
        assert r.dtype("conv_in.weight.w_scale") == np.float32
        assert r.shape("mid_block.resnets.0.conv1.weight.act_scale") == ()
    assert meta["format"] == "sdjax-quantized" and meta["sdjax_format_version"] == "1"
    assert meta["sdjax_version"] == sdjax.__version__ and meta["component"] == "unet"
    assert json.loads(meta["recipe"])["name"] == "every-method"
    lay = json.loads(meta["layers"])
    assert lay["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == {
        "method": "palettize", "shape": [64, 64], "nbits": 4, "group_size": 16}
    assert lay["mid_block.resnets.1.conv1.weight"] == {"method": "int8-w8a8", "path": "simulated"}
    assert lay["up_blocks.1.attentions.0.proj_in.weight"]["method"] == "int8"
    assert lay["time_embedding.linear_1.weight"] == {"method": "float", "dtype": "float32"}
    assert "conv_in.bias" in keys and "conv_in.weight" not in keys
    assert set(lay) == {n + ".weight" for n in layers(qpipe.params["unet"])}


def test_loaded_pipeline_generates_the_same_image(qpipe, saved):
    loaded = sdjax.load(saved, progress=False)
    kw = dict(steps=2, seed=3, output_type="np", progress=False, height=32, width=32)
    a = qpipe.generate("a red circle", **kw)
    b = loaded.generate("a red circle", **kw)
    assert a.shape == (1, 32, 32, 3) and np.array_equal(a, b)


def test_float_components_stay_diffusers_files(pipe, source, tmp_path):
    q = pipe.quantize("palette-2bit")
    out = q.save(str(tmp_path / "m"))
    assert sorted(os.listdir(os.path.join(out, "unet"))) == ["config.json", qio.WEIGHTS_NAME]
    assert os.path.exists(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    assert os.path.exists(os.path.join(out, "text_encoder", "model.safetensors"))
    from diffusers import AutoencoderKL
    import torch
    got = AutoencoderKL.from_pretrained(out, subfolder="vae").state_dict()
    want = AutoencoderKL.from_pretrained(source, subfolder="vae").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    loaded = sdjax.load(out, progress=False)
    assert_same_params(q.params, loaded.params)
    assert loaded.quantization["recipe"]["name"] == "palette-2bit"
    with pytest.raises(CheckpointError, match="already exists"):
        q.save(out)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def copy_with(saved, tmp_path, edit_meta=None, drop=None, rename=None):
    d = str(tmp_path / "bad")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(saved, d)
    path = os.path.join(d, "unet", qio.WEIGHTS_NAME)
    with Reader(path) as r:
        meta = dict(r.metadata)
        tensors = {k: r.get(k) for k in r.keys() if k != drop}
    if rename:
        tensors[rename[1]] = tensors.pop(rename[0])
    if edit_meta:
        meta = edit_meta(meta)
    write(path, tensors, meta)
    return d, path


@pytest.mark.parametrize("edit, message", [
    (lambda m: {}, "not an sdjax quantized weights file"),
    (lambda m: {"format": "pt"}, "not an sdjax quantized weights file"),
    (lambda m: dict(m, sdjax_format_version="2"), "format version '2'.*reads version 1"),
    (lambda m: dict(m, sdjax_format_version="x"), "format version 'x'"),
    (lambda m: dict(m, layers="{oops"), "corrupt sdjax metadata: 'layers'"),
    (lambda m: {k: v for k, v in m.items() if k != "recipe"}, "corrupt sdjax metadata: 'recipe'"),
    (lambda m: dict(m, layers=json.dumps(dict(json.loads(m["layers"]), **{"conv_in.weight": {"method": "fp4"}}))),
     "layer 'conv_in.weight' has method 'fp4'"),
    (lambda m: dict(m, component="vae"), "holds the 'vae' component"),
    (lambda m: dict(m, layers=m["layers"].replace('"nbits":4', '"nbits":8')),
     "palettized weight '.*attn1.to_[qk].weight': indices .* do not fit shape"),
])
def test_bad_metadata_is_refused_by_name(saved, tmp_path, edit, message):
    d, path = copy_with(saved, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        sdjax.load(d, progress=False)
    assert path in str(e.value)


def test_missing_and_extra_tensors(saved, tmp_path):
    key = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    d, path = copy_with(saved, tmp_path, drop=key + ".lut")
    with pytest.raises(CheckpointError, match=f"{path}: palettize weight '{key}' has no tensor {key}.lut"):
        sdjax.load(d, progress=False)
    d, path = copy_with(saved, tmp_path, drop="conv_in.bias")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): conv_in.bias"):
        sdjax.load(d, progress=False)
    d, path = copy_with(saved, tmp_path, rename=("conv_in.bias", "conv_in.bias.extra"))
    with pytest.raises(CheckpointError, match="missing keys"):
        sdjax.load(d, progress=False)
    d, path = copy_with(saved, tmp_path, rename=(key + ".lut", key + ".lutt"))
    with pytest.raises(CheckpointError, match="has no tensor"):
        sdjax.load(d, progress=False)
    with pytest.raises(CheckpointError, match="one component of an sdjax quantized folder"):
        sdjax.load(os.path.join(saved, "unet", qio.WEIGHTS_NAME), progress=False)


def test_truncated_quantized_file(saved, tmp_path):
    d = str(tmp_path / "trunc")
    shutil.copytree(saved, d)
    path = os.path.join(d, "unet", qio.WEIGHTS_NAME)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(CheckpointError, match=f"{path}: truncated"):
        sdjax.load(d, progress=False)
