"""A recipe's "finetune" settings: checked at parse time (every error names the key and what it must be),
round-tripped through to_json, the qat-* presets, and apply_recipe's finetune= callable (needed, called
with the palettized UNet and the settings, its result checked; int8 weights carried unchanged)."""
import json

import numpy as np
import pytest

import quant
from quant import recipes
from quant.int8 import Int8Weight
from quant.palettize import PalettizedWeight
from quant.recipes import QAT_DEFAULTS, QAT_LOW_BITS, RecipeError, qat_defaults, check_finetune, with_finetune
from sdjax import nn


def _params():
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {"down": {"conv": {"weight": w(3, 3, 16, 32), "bias": w(32)}},
            "attn": {"to_q": {"weight": w(64, 64)}, "to_k": {"weight": w(64, 64)}},
            "small": {"weight": w(8, 8)}}


P4 = {"pattern": "*", "method": "palettize", "nbits": 4}


def _recipe(finetune, rules=(P4,), **kw):
    return dict({"name": "r", "rules": list(rules), "finetune": finetune}, **kw)


def test_settings_parse_with_defaults_and_round_trip(tmp_path):
    r = quant.parse_recipe(_recipe({"method": "ste", "steps": 5, "lr": 1, "w_lr": 1e-4, "batch": 4, "seed": 3,
                                    "schedule": "cosine", "refine": True, "n_timesteps": 2}))
    assert r.needs_finetune and not quant.parse_recipe("palette-4bit").needs_finetune
    assert r.finetune == dict(QAT_DEFAULTS, method="ste", steps=5, lr=1.0, w_lr=1e-4, batch=4, seed=3,
                              schedule="cosine", refine=True, n_timesteps=2)
    assert isinstance(r.finetune["lr"], float)
    assert quant.parse_recipe(r.to_json()) == r
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(r.to_json()))
    assert quant.parse_recipe(str(path)) == r
    # left out: QAT_DEFAULTS; a recipe without the key has none in its JSON (older records unchanged)
    assert quant.parse_recipe(_recipe({})).finetune == QAT_DEFAULTS
    assert "finetune" not in quant.parse_recipe("palette-4bit").to_json()
    dkm = quant.parse_recipe(_recipe({"method": "dkm", "temperature": 1e-4}))
    assert dkm.finetune["temperature"] == 1e-4


def test_qat_presets_are_palette_presets_with_the_defaults():
    for name, base in (("qat-4bit", "palette-4bit"), ("qat-2bit", "palette-2bit"),
                       ("qat-4bit-g16-gptq", "palette-4bit-g16-gptq")):
        r, p = quant.parse_recipe(name), quant.parse_recipe(base)
        assert r.rules == p.rules and r.finetune == qat_defaults(p.rules[0].options["nbits"]) and r.name == name
    assert quant.parse_recipe("qat-4bit").finetune == QAT_DEFAULTS
    assert quant.parse_recipe("qat-2bit").finetune == dict(QAT_DEFAULTS, **QAT_LOW_BITS)
    assert {"qat-4bit", "qat-2bit"} <= set(quant.PRESETS)
    with pytest.raises(RecipeError, match="unknown preset 'qat-5bit'.*qat-"):
        quant.parse_recipe("qat-5bit")


@pytest.mark.parametrize("settings, message", [
    ({"steps": 0}, "finetune steps must be an integer >= 1; got 0"),
    ({"steps": 2.5}, "finetune steps must be an integer >= 1; got 2.5"),
    ({"steps": True}, "finetune steps must be an integer >= 1; got True"),
    ({"lr": 0}, r"finetune lr must be a learning rate, a number in \(0, 1\]; got 0"),
    ({"lr": 1.5}, r"finetune lr must be .* got 1.5"),
    ({"lr": float("nan")}, "finetune lr must be"),
    ({"lr": "fast"}, "finetune lr must be"),
    ({"w_lr": -1}, "finetune w_lr must be"),
    ({"method": "kmeans"}, "finetune method must be one of lut, dkm, ste; got 'kmeans'"),
    ({"method": "dkm"}, "finetune method 'dkm' needs a temperature"),
    ({"method": "dkm", "temperature": 0}, "finetune temperature must be a number > 0"),
    ({"method": "lut", "temperature": 1e-3}, "finetune temperature applies to method 'dkm' only.*'lut' takes none"),
    ({"loss": "l1"}, "finetune loss must be one of guided, eps"),
    ({"schedule": "step"}, "finetune schedule must be one of constant, cosine"),
    ({"refine": "yes"}, "finetune refine must be true or false"),
    ({"method": "lut", "refine": True}, "finetune refine re-clusters .* method 'lut' trains none"),
    ({"w_init": "zeros"}, "finetune w_init must be one of float, quantized; got 'zeros'"),
    ({"train_bias": 1}, "finetune train_bias must be true or false; got 1"),
    ({"remat": "yes"}, "finetune remat must be true, false or auto; got 'yes'"),
    ({"batch": 0}, "finetune batch must be an integer >= 1"),
    ({"n_timesteps": -1}, "finetune n_timesteps must be an integer >= 1"),
    ({"seed": -1}, "finetune seed must be an integer >= 0"),
    ({"stesp": 3, "lr": 1e-3}, r"unknown finetune key\(s\) \['stesp'\] \(its keys: method, steps, lr"),
    ("lut", "'finetune' must be an object of fine-tuning settings"),
])
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(RecipeError, match="recipe 'r': " + message):
        quant.parse_recipe(_recipe(settings))


def test_recipes_without_palettized_unet_weights_are_refused():
    for rules in ([{"pattern": "*", "method": "int8"}], [dict(P4, component="vae"), {"pattern": "*", "method": "int8"}]):
        with pytest.raises(RecipeError, match="finetune trains palettized weights; recipe 'r' has none"):
            quant.parse_recipe(_recipe({}, rules, components=["unet", "vae"]))
    with pytest.raises(RecipeError, match="finetune trains the UNet's palettized weights.*\\['vae'\\] only"):
        quant.parse_recipe(_recipe({}, components=["vae"]))
    with pytest.raises(RecipeError, match="finetune trains the UNet"):
        quant.parse_recipe("qat-4bit", components="vae")
    with pytest.raises(RecipeError, match="finetune trains palettized weights; recipe 'w8-int8' has none"):
        with_finetune("w8-int8", {})
    # adding and removing settings
    r = with_finetune("palette-2bit", {"steps": 7})
    assert r.finetune == dict(QAT_DEFAULTS, steps=7) and r.rules == quant.parse_recipe("palette-2bit").rules
    assert with_finetune(r, None).finetune is None
    with pytest.raises(RecipeError, match="--finetune: finetune steps must be"):
        with_finetune("palette-2bit", {"steps": 0}, where="--finetune")
    assert check_finetune({}) == QAT_DEFAULTS and check_finetune({}) is not QAT_DEFAULTS


def test_apply_recipe_hands_the_palettized_unet_to_finetune():
    params = _params()
    recipe = _recipe({"steps": 3}, [{"pattern": "attn.*", "method": "palettize", "nbits": 2},
                                    {"pattern": "*", "kind": "conv", "method": "int8"}])
    with pytest.raises(RecipeError, match="recipe 'r' fine-tunes its palettized UNet weights.*pass finetune="):
        quant.apply_recipe(params, recipe)
    with pytest.raises(RecipeError, match="finetune must be a function"):
        quant.apply_recipe(params, recipe, finetune="lut")
    calls = []

    def tune(unet, settings):   # moves every LUT entry a little; the rest as it came
        calls.append((unet, settings))
        flat = nn.flatten(unet)
        out = {p: w.replace(lut=(np.asarray(w.lut, np.float32) + 0.01).astype(np.float16))
               if isinstance(w, PalettizedWeight) else w for p, w in flat.items()}
        return nn.unflatten(out)

    q = quant.apply_recipe(params, recipe, finetune=tune)
    plain = quant.apply_recipe(params, dict(recipe, finetune=None))
    assert len(calls) == 1 and calls[0][1] == dict(QAT_DEFAULTS, steps=3)
    fq, fp, seen = nn.flatten(q), nn.flatten(plain), nn.flatten(calls[0][0])
    assert isinstance(seen["attn.to_q.weight"], PalettizedWeight) and isinstance(seen["down.conv.weight"], Int8Weight)
    np.testing.assert_array_equal(np.asarray(fq["attn.to_q.weight"].lut),
                                  (np.asarray(fp["attn.to_q.weight"].lut, np.float32) + 0.01).astype(np.float16))
    np.testing.assert_array_equal(np.asarray(fq["attn.to_q.weight"].packed), np.asarray(fp["attn.to_q.weight"].packed))
    assert fq["down.conv.weight"] is seen["down.conv.weight"]   # int8: carried, not trained
    # a pipeline's params: only the UNet goes through finetune=
    pipe_params = {"unet": params, "vae": {"conv": {"weight": params["down"]["conv"]["weight"]}}}
    calls.clear()
    out = quant.apply_recipe(pipe_params, recipe, finetune=tune)
    assert len(calls) == 1 and out["vae"] is pipe_params["vae"]
    # a recipe without "finetune" ignores finetune=
    calls.clear()
    quant.apply_recipe(params, "palette-4bit", finetune=tune)
    assert not calls


def test_what_finetune_returns_is_checked():
    params, recipe = _params(), _recipe({}, [{"pattern": "attn.*", "method": "palettize", "nbits": 2}])

    def refuses(unet, settings):
        raise ValueError("calibration prompts must not be evaluation prompts")
    with pytest.raises(RecipeError, match="recipe 'r': fine-tuning: calibration prompts must not"):
        quant.apply_recipe(params, recipe, finetune=refuses)

    def regroups(unet, settings):
        flat = nn.flatten(unet)
        w = flat["attn.to_q.weight"]
        flat["attn.to_q.weight"] = quant.palettize.kmeans(np.asarray(w.dequantize()), 4)
        return nn.unflatten(flat)
    with pytest.raises(RecipeError, match="changed the layout of attn.to_q.weight"):
        quant.apply_recipe(params, recipe, finetune=regroups)
    with pytest.raises(RecipeError, match="another structure"):
        quant.apply_recipe(params, recipe, finetune=lambda unet, s: {"attn": unet["attn"]})
    # palettize rules that leave every layer float (small layers): nothing to train, said before any work
    small = _recipe({}, [{"pattern": "smal*", "method": "palettize", "nbits": 2, "weight_threshold": 64}])
    with pytest.raises(RecipeError, match="has none on this UNet"):
        quant.apply_recipe(params, small, finetune=lambda u, s: u)
    with pytest.raises(RecipeError, match="finetune trains the UNet, and these params are the vae's"):
        quant.apply_recipe(params, dict(recipe, components=["unet", "vae"]), component="vae",
                           finetune=lambda u, s: u)


def test_loss_and_schedule_names_are_qats():
    """quant cannot import the evaluation layer, so the names it checks are written twice: kept equal here."""
    from sdjax.evaluation import qat
    assert set(recipes.FINETUNE_SCHEDULES) == set(qat.SCHEDULES)
    assert set(recipes.FINETUNE_W_INITS) == set(qat.W_INITS)
    import inspect
    params = inspect.signature(qat.finetune).parameters
    assert set(recipes.FINETUNE_KEYS) <= set(params), set(recipes.FINETUNE_KEYS) - set(params)
    assert params["loss"].default in recipes.FINETUNE_LOSSES
