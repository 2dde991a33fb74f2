"""Apple's activation-quantization layer lists (quant.apple_layers): Apple's threshold rule and its two
overrides as activation_quantization.py states them, reading into recipes `sdjax quantize -r` applies,
writing back, and the bad inputs (unknown layers, W8A8 without calibration, unusable scales)."""
import json
import os

import numpy as np
import pytest

import quant
import sdjax
from quant import apple_layers as al
from quant import calibrate
from quant.int8 import Int8Weight
from quant.recipes import RecipeError, layers


@pytest.fixture(scope="module")
def unet(pipeline_dirs):
    folder, _ = pipeline_dirs("sd1")
    return sdjax.load(folder, progress=False).params["unet"]


def _apple_file(names, psnr):
    """Apple's --layerwise-sensitivity output for ``names`` (every UNet Conv2d of Apple's UNet is a diffusers
    conv or linear module), with a made-up einsum entry per self-attention."""
    attn = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith("attn1.to_q")})
    return {"conv": {n: psnr(n) for n in names}, "einsum": {a + ".einsum": 35.0 for a in attn},
            "model_version": "stabilityai/stable-diffusion-2-1-base"}


def test_apple_rule_and_overrides():
    d = {"conv": {"down_blocks.0.resnets.0.conv1": 45.0, "down_blocks.0.resnets.0.conv2": 39.9,
                  "up_blocks.1.resnets.0.conv1": 20.0, "up_blocks.1.upsamplers.0.conv": 10.0,
                  "up_blocks.1.resnets.0.conv2": 12.0, "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": 80.0},
         "einsum": {"mid_block.attentions.0.transformer_blocks.0.attn1.einsum": 29.0}}
    w8a8, w8a16, skipped_einsum = al.select(d)            # Apple's defaults: 40 / 30 dB, overrides on
    assert w8a8 == ["down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv1", "up_blocks.1.upsamplers.0.conv"]
    assert w8a16 == ["down_blocks.0.resnets.0.conv2", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
                     "up_blocks.1.resnets.0.conv2"]
    assert skipped_einsum == ["mid_block.attentions.0.transformer_blocks.0.attn1.einsum"]
    w8a8, w8a16, _ = al.select(d, conv_psnr=39.0, overrides=False)
    assert w8a16 == ["up_blocks.1.resnets.0.conv1", "up_blocks.1.resnets.0.conv2", "up_blocks.1.upsamplers.0.conv"]


def test_read_apple_file_into_a_recipe(unet, tmp_path):
    names = calibrate.layer_names(unet)
    d = _apple_file(names, lambda n: 50.0 if "resnets" in n else 30.0)
    path = tmp_path / "sd_quantization_recipe.json"
    path.write_text(json.dumps(d))
    recipe = quant.parse_recipe(str(path))
    assert recipe.needs_calibration and recipe.source == "apple-activation-quantization"
    plan = quant.plan(unet, recipe)["unet"]
    w8a8, _, _ = al.select(d)
    assert sorted(n for n, a in plan.items() if a.method == "int8-w8a8") == w8a8
    assert all(plan[n].method == "int8" for n in names if n not in w8a8)
    assert any("to_out" in n for n in names) and all(plan[n].method == "int8" for n in names if "to_out" in n)
    # written back: an sdjax selection in Apple's format reads back as the same split
    sel = al.selection_layers(w8a8[:3], [n for n in names if n not in w8a8[:3]], "tiny")
    out = al.write(tmp_path / "sel.json", sel)
    again = al.select(out)
    assert again[0] == sorted(w8a8[:3]) and json.load(open(out))["sdjax_selection"] is True
    # Apple's script thresholds the values with its own --conv-psnr: any value between 0 and 100 gives it
    assert al.select(out, conv_psnr=1.0)[0] == al.select(out, conv_psnr=99.0)[0] == sorted(w8a8[:3])


def test_unknown_layers_name_it_and_nothing_is_written(unet, tmp_path):
    names = calibrate.layer_names(unet)
    d = _apple_file(names[:5] + ["down_blocks.9.resnets.0.conv1"], lambda n: 50.0)
    with pytest.raises(al.AppleLayersError, match=r"conv layer 'down_blocks.9.resnets.0.conv1' is not a conv/linear"):
        al.to_recipe(d, layer_names=names)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(RecipeError, match=r"pattern 'down_blocks.9.resnets.0.conv1'.*matches no conv/linear layer"):
        quant.plan(unet, str(path))
    bad_einsum = dict(_apple_file(names[:2], lambda n: 50.0), einsum={"up_blocks.7.attentions.0.einsum": 1.0})
    with pytest.raises(al.AppleLayersError, match=r"einsum 'up_blocks.7.attentions.0.einsum'.*no attention"):
        al.check_names(bad_einsum, names)
    for bad, msg in [({"conv": {"a": "x"}, "einsum": {}}, r"conv\['a'\] = 'x': expected a PSNR"),
                     ({"conv": {}, "einsum": {}}, "'conv' names no layer"),
                     ({"conv": {"a*": 1.0}, "einsum": {}}, "is not a layer name"),
                     ({"conv": {"a": 1.0}, "einsum": {}, "extra": 1}, r"unknown key\(s\) \['extra'\]")]:
        with pytest.raises(al.AppleLayersError, match=msg):
            al.write(tmp_path / "never.json", bad)
    assert not os.path.exists(tmp_path / "never.json") and os.listdir(tmp_path) == ["bad.json"]


def test_w8a8_needs_calibration_and_usable_scales(unet):
    name = "mid_block.resnets.0.conv1"
    recipe = al.to_recipe({"conv": {name: 50.0}, "einsum": {}})
    with pytest.raises(RecipeError, match="int8-w8a8 needs activation scales"):
        quant.apply_recipe(unet, recipe)
    for bad in (0.0, -0.5, float("nan"), float("inf"), np.array([0.1] * 63 + [0.0], np.float32)):
        with pytest.raises(RecipeError, match=rf"layer '{name}'.*act_scale must be finite and > 0"):
            quant.apply_recipe(unet, recipe, {name: bad})
    q = layers(quant.apply_recipe(unet, recipe, {name: 0.05}))[name]
    assert isinstance(q, Int8Weight) and q.method == "int8-w8a8"
