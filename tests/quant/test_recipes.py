"""Recipes: presets and rules apply what they say layer by layer, first match wins, small layers
stay float, Apple's mixed-bit JSON, calibration for W8A8, and every error names its rule."""
import json

import jax
import numpy as np
import pytest

import quant
from quant import calibrate, int8, llm_int8, palettize
from quant.int8 import Int8Weight
from quant.llm_int8 import LLMInt8Weight
from quant.palettize import PalettizedWeight
from quant.recipes import RecipeError, layers
from sdjax import nn
import sdjax


@pytest.fixture(scope="module")
def pipe(pipeline_dirs):
    folder, _ = pipeline_dirs("sd1")
    return sdjax.load(folder, progress=False)


@pytest.fixture(scope="module")
def unet(pipe):
    return pipe.params["unet"]


def kinds(params):
    return {n: type(w) for n, w in layers(params).items()}


def size(w):
    return int(np.prod(w.shape))


def test_public_names():
    assert quant.palettize is palettize and quant.int8 is int8 and quant.llm_int8 is llm_int8
    assert callable(quant.apply_recipe) and callable(quant.size_bytes)
    for name in quant.PRESETS:
        assert quant.parse_recipe(name).name == name


def test_w8_int8conv_quantizes_big_convs_only(unet):
    q = quant.apply_recipe(unet, "w8-int8conv")
    src = layers(unet)
    for name, w in layers(q).items():
        conv, big = len(src[name].shape) == 4, size(src[name]) > 2048
        if conv and big:
            assert isinstance(w, Int8Weight) and w.act_scale is None, name
            data, scale = int8.absmax_quantize(src[name])
            assert np.array_equal(w.data, data) and np.array_equal(w.scale, scale)
        else:
            assert w is src[name], name
    # the boundary: 2048 elements is "small" (coremltools quantizes only weights with more)
    assert size(src["down_blocks.1.resnets.0.conv_shortcut"]) == 2048
    assert not hasattr(layers(q)["down_blocks.1.resnets.0.conv_shortcut"], "dequantize")
    # biases, norms untouched, and the input is not modified
    fq, fu = nn.flatten(q), nn.flatten(unet)
    assert fq.keys() == fu.keys()
    assert all(fq[k] is fu[k] for k in fu if not k.endswith(".weight") or "norm" in k)
    assert all(not hasattr(w, "dequantize") for w in layers(unet).values())


def test_llm_int8_preset_takes_linears(unet):
    q = quant.apply_recipe(unet, "llm-int8")
    src = layers(unet)
    n = 0
    for name, w in layers(q).items():
        if len(src[name].shape) == 2 and size(src[name]) > 2048:
            assert isinstance(w, LLMInt8Weight) and w.threshold == 6.0, name
            n += 1
        else:
            assert w is src[name]
    assert n > 10


def test_palette_presets(unet):
    src = layers(unet)
    q = layers(quant.apply_recipe(unet, "palette-2bit"))
    for name, w in q.items():
        if size(src[name]) > 2048:
            assert isinstance(w, PalettizedWeight) and w.nbits == 2 and w.group_size is None, name
        else:
            assert w is src[name]
    want = palettize.kmeans(np.asarray(src["mid_block.resnets.0.conv1"]), 2)
    got = q["mid_block.resnets.0.conv1"]
    assert np.array_equal(got.packed, want.packed) and np.array_equal(got.lut, want.lut)
    # grouped: one LUT per 64 output channels; 32-channel layers cannot be grouped and get one LUT
    g = layers(quant.apply_recipe(unet, "palette-2bit-g64"))
    assert g["mid_block.resnets.0.conv1"].group_size == 64 and g["mid_block.resnets.0.conv1"].num_groups == 1
    assert g["up_blocks.0.resnets.0.conv1"].group_size == 64
    assert g["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"].num_groups == 8  # 512 outputs
    assert g["down_blocks.0.resnets.0.conv1"].group_size is None  # 32 outputs


def test_first_match_wins_and_filters(unet):
    recipe = {"name": "t", "weight_threshold": 0, "rules": [
        {"pattern": "*attn1.to_q", "method": "palettize", "nbits": 2},
        {"pattern": "*.to_[qk]", "method": "int8"},
        {"regex": r"mid_block\..*", "kind": "conv", "method": "palettize", "nbits": 1, "group_size": 32},
        {"pattern": "mid_block.*", "method": "float"},
        {"pattern": "*", "kind": "linear", "method": "llm-int8", "threshold": 3.5}]}
    q = layers(quant.apply_recipe(unet, recipe))
    for name, w in q.items():
        if name.endswith("attn1.to_q"):
            assert isinstance(w, PalettizedWeight) and w.nbits == 2, name
        elif name.endswith((".to_q", ".to_k")):
            assert isinstance(w, Int8Weight), name
        elif name.startswith("mid_block.") and w.ndim == 4:
            assert isinstance(w, PalettizedWeight) and w.nbits == 1 and w.group_size == 32, name
        elif name.startswith("mid_block."):
            assert not hasattr(w, "dequantize"), name
        elif w.ndim == 2:
            assert isinstance(w, LLMInt8Weight) and w.threshold == 3.5, name
        else:
            assert not hasattr(w, "dequantize"), name
    p = quant.plan(unet, recipe)["unet"]
    assert p["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].rule.index == 1
    assert p["conv_in"].note == "no rule"
    # a rule whose layers all went to earlier rules matches layers: no error, and it takes nothing
    q = layers(quant.apply_recipe(unet, {"rules": [{"pattern": "*", "method": "int8"},
                                                   {"pattern": "*.to_q", "method": "palettize", "nbits": 2}]}))
    assert not any(isinstance(w, PalettizedWeight) for w in q.values())
    # one component's params under a recipe for several: the other components' rules are skipped
    r = {"components": ["unet", "vae"], "rules": [{"pattern": "decoder.*", "component": "vae", "method": "int8"},
                                                  {"pattern": "mid_block.*", "component": "unet", "method": "int8"}]}
    q = layers(quant.apply_recipe(unet, r, component="unet"))
    assert isinstance(q["mid_block.resnets.0.conv1"], Int8Weight)


def test_small_layers_stay_float_unless_named(unet):
    small = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # 32x32 = 1024 weights
    q = layers(quant.apply_recipe(unet, {"rules": [{"pattern": "*.to_q", "method": "int8"}]}))
    assert not hasattr(q[small], "dequantize")
    assert isinstance(q["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"], Int8Weight)  # 4096
    assert "small (1024 <= 2048" in quant.plan(unet, {"rules": [{"pattern": "*.to_q", "method": "int8"}]})["unet"][small].note
    # named exactly: quantized whatever its size
    q = layers(quant.apply_recipe(unet, {"rules": [{"pattern": small, "method": "int8"},
                                                   {"pattern": "*.to_q", "method": "int8"}]}))
    assert isinstance(q[small], Int8Weight)
    assert not hasattr(q["down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"], "dequantize")
    # a rule's (or the recipe's) own threshold
    for recipe in ({"rules": [{"pattern": "*.to_q", "method": "int8", "weight_threshold": 0}]},
                   {"weight_threshold": 1000, "rules": [{"pattern": "*.to_q", "method": "int8"}]}):
        assert isinstance(layers(quant.apply_recipe(unet, recipe))[small], Int8Weight)


def test_components_and_pipeline_params(pipe):
    recipe = {"components": ["unet", "text_encoder", "vae"], "weight_threshold": 0, "rules": [
        {"pattern": "*", "component": "vae", "kind": "conv", "method": "int8"},
        {"pattern": "*", "component": ["text_encoder", "unet"], "kind": "linear", "method": "palettize", "nbits": 2}]}
    q = quant.apply_recipe(pipe.params, recipe)
    assert set(q) == set(pipe.params)
    te = layers(q["text_encoder"])
    assert all(isinstance(w, PalettizedWeight) for w in te.values())
    assert "embeddings.token_embedding.weight" not in {n + ".weight" for n in te}
    assert not hasattr(nn.flatten(q["text_encoder"])["embeddings.token_embedding.weight"], "dequantize")
    v = layers(q["vae"])
    assert all(isinstance(w, Int8Weight) == (w.ndim == 4) for w in v.values())
    assert isinstance(v["quant_conv"], Int8Weight)  # 64 weights, threshold 0
    u = layers(q["unet"])
    assert all(isinstance(w, PalettizedWeight) == (w.ndim == 2) for w in u.values())
    # default component: unet only; the other components are the same objects
    q = quant.apply_recipe(pipe.params, "palette-2bit")
    assert q["vae"] is pipe.params["vae"] and q["text_encoder"] is pipe.params["text_encoder"]
    assert any(isinstance(w, PalettizedWeight) for w in layers(q["unet"]).values())
    # one component's params, named
    q = quant.apply_recipe(pipe.params["vae"], {"components": "vae", "rules": [{"pattern": "decoder.*", "method": "int8"}]})
    assert isinstance(layers(q)["decoder.conv_in"], Int8Weight) and not hasattr(layers(q)["encoder.conv_in"], "dequantize")
    # --components replaces the recipe's
    r = quant.parse_recipe("w8-int8", components="vae")
    assert r.components == ("vae",)
    q = quant.apply_recipe(pipe.params, r)
    assert q["unet"] is pipe.params["unet"] and isinstance(layers(q["vae"])["decoder.conv_in"], Int8Weight)


def test_size_bytes(unet):
    q = quant.apply_recipe(unet, {"rules": [{"pattern": "*", "kind": "conv", "method": "palettize", "nbits": 2},
                                            {"pattern": "*", "method": "int8"}]})
    float_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(unet))
    assert quant.size_bytes(unet) == float_bytes
    want = 0
    for w in nn.flatten(q).values():
        if isinstance(w, PalettizedWeight):
            want += w.packed.size + w.lut.size * 2
        elif isinstance(w, Int8Weight):
            want += w.data.size + w.scale.size * 4
        else:
            want += w.size * w.dtype.itemsize
    assert quant.size_bytes(q) == want < float_bytes


def test_w8a8_calibration_forms(pipe):
    params = pipe.params["unet"]
    recipe = {"rules": [{"pattern": "mid_block.resnets.*", "kind": "conv", "method": "int8-w8a8", "path": "simulated"}]}
    names = [n for n in quant.plan(params, recipe)["unet"] if quant.plan(params, recipe)["unet"][n].method == "int8-w8a8"]
    assert names == ["mid_block.resnets.0.conv1", "mid_block.resnets.0.conv2",
                     "mid_block.resnets.1.conv1", "mid_block.resnets.1.conv2"]
    with pytest.raises(RecipeError, match=r"rule 1 .*int8-w8a8 needs activation scales"):
        quant.apply_recipe(params, recipe)
    with pytest.raises(RecipeError, match=r"no activation scales for 1 .*mid_block.resnets.1.conv2"):
        quant.apply_recipe(params, recipe, {n: 0.1 for n in names[:3]})
    # a dict of scales: scalar and per input channel
    scales = {n: np.float32(0.05 * (i + 1)) for i, n in enumerate(names)}
    scales[names[0]] = np.full(64, 0.02, np.float32)
    q = layers(quant.apply_recipe(params, recipe, scales))
    for n in names:
        assert isinstance(q[n], Int8Weight) and q[n].path == "simulated"
        assert np.array_equal(q[n].act_scale, np.asarray(scales[n], np.float32))

    # statistics from a run, and the run itself
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 64)) * 3

    def run(p):  # drives just the four layers (a whole UNet call costs a compile)
        r = p["mid_block"]["resnets"]
        return [nn.conv2d(x * (i + 1), r[str(i // 2)][f"conv{i % 2 + 1}"]) for i in range(4)]
    stats = calibrate.observe(params, run, names)
    want = calibrate.act_scales(stats, "percentile", "channel", 99.0)
    rec2 = {"rules": [dict(recipe["rules"][0], act_method="percentile", granularity="channel", percentile=99.0)]}
    for calib in (stats, run):
        q = layers(quant.apply_recipe(params, rec2, calib))
        for n in names:
            assert np.array_equal(q[n].act_scale, want[n]), n
    # a pipeline with W8A8 in two components needs the nested form
    both = {"components": ["unet", "vae"], "rules": [
        {"pattern": "mid_block.resnets.0.conv1", "method": "int8-w8a8", "component": "unet"},
        {"pattern": "decoder.conv_in", "method": "int8-w8a8", "component": "vae"}]}
    with pytest.raises(RecipeError, match="component: {layer: scale}"):
        quant.apply_recipe(pipe.params, both, {"mid_block.resnets.0.conv1": 0.1, "decoder.conv_in": 0.1})
    q = quant.apply_recipe(pipe.params, both, {"unet": {"mid_block.resnets.0.conv1": 0.1},
                                               "vae": {"decoder.conv_in": 0.2}})
    assert float(layers(q["vae"])["decoder.conv_in"].act_scale) == np.float32(0.2)


def test_apple_mixed_bit_recipe(unet, tmp_path):
    small = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    flat = {"mid_block.resnets.0.conv1": 4, "up_blocks.0.resnets.0.conv1": 2, "mid_block.resnets.1.conv2": 16,
            "down_blocks.1.resnets.0.conv2": 32, small: 6}
    r = quant.parse_recipe(flat)
    assert r.source == "apple-mixed-bit" and r.components == ("unet",)
    q = layers(quant.apply_recipe(unet, flat))
    assert q["mid_block.resnets.0.conv1"].nbits == 4 and q["mid_block.resnets.0.conv1"].group_size is None
    assert q["up_blocks.0.resnets.0.conv1"].nbits == 2
    assert q[small].nbits == 6  # named: palettized though small
    quantized = {n for n, w in q.items() if hasattr(w, "dequantize")}
    assert quantized == {"mid_block.resnets.0.conv1", "up_blocks.0.resnets.0.conv1", small}  # 16/32/unnamed: float
    # the whole pre-analysis file, from disk
    path = tmp_path / "pre.json"
    path.write_text(json.dumps({"model_version": "x", "baselines": {}, "recipes": {
        "recipe_3.00_bit_mixedpalette": flat, "recipe_2.00_bit_mixedpalette": {"mid_block.resnets.0.conv1": 2}}}))
    with pytest.raises(RecipeError, match="select one of: recipe_3.00_bit_mixedpalette, recipe_2.00"):
        quant.parse_recipe(str(path))
    r = quant.parse_recipe(str(path), select="recipe_2.00_bit_mixedpalette")
    assert r.name == "recipe_2.00_bit_mixedpalette"
    assert layers(quant.apply_recipe(unet, r))["mid_block.resnets.0.conv1"].nbits == 2
    with pytest.raises(RecipeError, match="no recipe 'nope'"):
        quant.parse_recipe(str(path), select="nope")
    with pytest.raises(RecipeError, match=r"entry 1 \('mid_block.resnets.0.conv1'\): unsupported nbits 5"):
        quant.parse_recipe({"mid_block.resnets.0.conv1": 5})
    with pytest.raises(RecipeError, match=r"pattern 'mid_block.nope'.*matches no conv/linear layer of unet"):
        quant.apply_recipe(unet, {"mid_block.nope": 4})


def test_recipe_json_round_trip(unet, tmp_path):
    recipe = {"name": "rt", "weight_threshold": 100, "rules": [
        {"pattern": "*.to_q.weight", "method": "palettize", "nbits": 3, "per_channel_scale": True},
        {"regex": ".*conv[12]", "kind": "conv", "method": "llm-int8", "path": "simulated"}]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    r = quant.parse_recipe(str(path))
    assert r.name == "rt" and r.rules[0].pattern == "*.to_q"
    assert quant.parse_recipe(r.to_json()) == r
    a, b = quant.plan(unet, r), quant.plan(unet, r.to_json())
    assert {n: x.method for n, x in a["unet"].items()} == {n: x.method for n, x in b["unet"].items()}
    q = layers(quant.apply_recipe(unet, str(path)))
    assert q["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].scale is not None


@pytest.mark.parametrize("recipe, message", [
    ({"rules": [{"pattern": "*.to_zz", "method": "int8"}]}, r"rule 1 \(pattern '\*.to_zz'.*matches no conv/linear layer of unet"),
    ({"rules": [{"pattern": "*", "method": "int8"}, {"pattern": "*", "kind": "linear", "component": "vae", "method": "int8"}]},
     r"rule 2 .*component\(s\) \['vae'\] are not among the recipe's components"),
    ({"rules": [{"pattern": "*", "method": "int4"}]}, r"rule 1 \(pattern '\*'\): unknown method 'int4'"),
    ({"rules": [{"pattern": "*", "method": "palettize", "nbits": 5}]}, r"rule 1 \(pattern '\*'\): nbits must be one of .*got 5"),
    ({"rules": [{"pattern": "*", "method": "palettize"}]}, r"rule 1 .*needs 'nbits'"),
    ({"rules": [{"pattern": "*", "method": "palettize", "nbits": 4, "nbit": 4}]}, r"rule 1 .*unknown option\(s\) \['nbit'\]"),
    ({"rules": [{"pattern": "x", "method": "int8", "threshold": 4}]}, r"rule 1 .*unknown option\(s\) \['threshold'\] for method 'int8'"),
    ({"rules": [{"pattern": "mid_block.*", "method": "int8"}, {"pattern": "*conv1", "method": "palettize", "nbits": 2, "group_size": 48}]},
     r"rule 2 \(pattern '\*conv1', method 'palettize'\): group_size 48 does not divide the 32 output channels of unet layer 'down_blocks.0.resnets.0.conv1'"),
    ({"rules": [{"pattern": "*", "regex": ".*", "method": "int8"}]}, r"rule 1: give exactly one of 'pattern'"),
    ({"rules": [{"regex": "(", "method": "int8"}]}, r"rule 1 \(regex '\('\): not a valid regular expression"),
    ({"rules": [{"pattern": "*", "method": "int8", "kind": "attention"}]}, r"kind must be 'conv' or 'linear'"),
    ({"rules": [{"pattern": "*", "method": "llm-int8", "threshold": -1}]}, r"rule 1 .*threshold must be a number > 0"),
    ({"rules": []}, r"'rules' must be a non-empty list"),
    ({"rulez": []}, r"not a recipe"),
    ({"components": ["unet", "clip"], "rules": [{"pattern": "*", "method": "int8"}]}, r"unknown component\(s\) \['clip'\]"),
    ("palette-5bit", r"unknown preset 'palette-5bit'"),
    ("no-such-preset", r"unknown preset 'no-such-preset'; presets: w8-int8conv"),
    ("missing/recipe.json", r"missing/recipe.json: recipe file not found"),
])
def test_errors_name_the_rule(unet, recipe, message):
    with pytest.raises(RecipeError, match=message):
        quant.apply_recipe(unet, recipe)


def test_bad_json_file(tmp_path, unet):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(RecipeError, match="bad.json: cannot read the recipe as JSON"):
        quant.apply_recipe(unet, str(p))


def test_cache_reuses_weights_quantized_the_same_way(unet):
    cache = {}
    a = quant.apply_recipe(unet, "palette-4bit", cache=cache)
    n = len(cache)
    assert n == len([w for w in layers(a).values() if isinstance(w, PalettizedWeight)]) > 0
    # an Apple recipe naming one layer at 4 bits gets the very object the preset made
    name, w = next((k, v) for k, v in layers(a).items() if isinstance(v, PalettizedWeight))
    b = quant.apply_recipe(unet, {name: 4}, cache=cache)
    assert layers(b)[name] is w and len(cache) == n
    c = quant.apply_recipe(unet, "palette-3bit", cache=cache)
    assert len(cache) == 2 * n
    plain = quant.apply_recipe(unet, "palette-3bit")
    for k, v in layers(plain).items():
        if isinstance(v, PalettizedWeight):
            np.testing.assert_array_equal(layers(c)[k].dequantize(np.float32), v.dequantize(np.float32))
    # sensitive rules depend on importances, not only on the key: never cached
    imp = {k: np.ones(v.shape, np.float32) for k, v in layers(unet).items()}
    quant.apply_recipe(unet, {"rules": [{"pattern": "*", "method": "palettize", "nbits": 2, "sensitive": True}]},
                       importance=imp, cache=cache)
    assert len(cache) == 2 * n


def test_coremltools_clustering_rule_is_apples_fake_palettize():
    """"clustering": "coremltools" palettizes as Apple's pre-analysis (quant.palettize.coremltools_kmeans);
    it is per-tensor k-means only, and an unknown clustering is named."""
    pytest.importorskip("sklearn")
    from quant import palettize
    params = {"a": {"weight": np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)},  # sklearn
              "b": {"weight": np.random.default_rng(1).standard_normal((3, 3, 32, 40)).astype(np.float32)}}  # 1-D
    rule = {"pattern": "*", "method": "palettize", "nbits": 4, "clustering": "coremltools"}
    q = quant.apply_recipe(params, {"rules": [rule]}, component="unet")
    for n in ("a", "b"):
        want = palettize.coremltools_kmeans(params[n]["weight"], 4).dequantize(np.float32)
        np.testing.assert_array_equal(np.asarray(q[n]["weight"].dequantize(np.float32)), np.asarray(want))
    with pytest.raises(quant.RecipeError, match="clustering must be 'exact' or 'coremltools'"):
        quant.parse_recipe({"rules": [dict(rule, clustering="sklearn")]})
    with pytest.raises(quant.RecipeError, match="clustering 'coremltools' is plain per-tensor k-means"):
        quant.parse_recipe({"rules": [dict(rule, group_size=8)]})


def test_coremltools_clustering_of_large_tensors_shares_plain_kmeans_cache_entries():
    """coremltools clusters tensors of COREMLTOOLS_KMEANS1D_MIN weights or more by exact 1-D k-means,
    which is plain k-means: one cache entry serves both (Apple's sweep and sdjax's cluster such a layer
    once); smaller tensors (scikit-learn's k-means++) keep their own entries."""
    pytest.importorskip("sklearn")
    from quant import palettize
    rng = np.random.default_rng(2)
    params = {"small": {"weight": rng.standard_normal((64, 48)).astype(np.float32)},
              "large": {"weight": rng.standard_normal((3, 3, 32, 40)).astype(np.float32)}}
    assert params["small"]["weight"].size < palettize.COREMLTOOLS_KMEANS1D_MIN <= params["large"]["weight"].size
    apple = {"rules": [{"pattern": "*", "method": "palettize", "nbits": 4, "clustering": "coremltools"}]}
    plain = {"rules": [{"pattern": "*", "method": "palettize", "nbits": 4}]}
    cache = {}
    a = quant.apply_recipe(params, apple, component="unet", cache=cache)
    assert len(cache) == 2
    p = quant.apply_recipe(params, plain, component="unet", cache=cache)
    assert len(cache) == 3                       # only the small tensor clustered again
    assert p["large"]["weight"] is a["large"]["weight"]
    fresh = quant.apply_recipe(params, plain, component="unet")   # and the shared entry is what k-means gives
    for n in ("small", "large"):
        np.testing.assert_array_equal(np.asarray(p[n]["weight"].dequantize(np.float32)),
                                      np.asarray(fresh[n]["weight"].dequantize(np.float32)))
