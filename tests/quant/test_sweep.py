"""sdjax eval's engine (quant.evaluate, quant.sweep) on the embedded reference model: the simulated
path equals the quantized one, resuming recomputes nothing, bad folders and names are refused, NaN
is reported, mixed-bit families are built, and 4 host devices give the numbers of 1."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import quant
import sdjax
from quant import sweep
from quant.evaluate import Evaluator, Settings
from sdjax import shapes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ("a large red circle in the center on a white background",
           "a small blue square at the top left on a black background",
           "a large green triangle at the bottom right on a gray background")
SETTINGS = Settings(prompts=PROMPTS, seeds=(0, 1), steps=3, batch=4, n_one_step=4)


@pytest.fixture(scope="module")
def pipe():
    return sdjax.load(None, progress=False)


@pytest.fixture(scope="module")
def ev(pipe):
    return Evaluator(pipe, SETTINGS, progress=False)


def test_simulated_path_equals_the_quantized_weights(pipe, ev):
    """Weight-only types compute their dequantized weights' function: the fast (simulated) path
    of the sweep gives the metrics of the real quantized model."""
    q = quant.apply_recipe(pipe.params, "palette-4bit")
    assert sweep.weight_only(q)
    real, sim = ev.outputs(q), ev.outputs(sweep.dequantized(q))
    for k in real:  # the same weights; XLA fuses the dequantization into the layer: float rounding only
        np.testing.assert_allclose(sim[k], real[k], rtol=1e-4, atol=1e-4, err_msg=k)
    m_real, m_sim = ev.metrics(real)[0], ev.metrics(sim)[0]
    for k in ("noise_psnr_db", "latent_psnr_1step_db", "image_psnr_db", "ssim"):
        assert m_sim[k] == pytest.approx(m_real[k], abs=0.02), k
    w8a8 = quant.apply_recipe(pipe.params, {"rules": [{"pattern": "*", "kind": "linear", "method": "llm-int8"}]})
    assert not sweep.weight_only(w8a8)


def test_float_model_against_itself_is_perfect_and_quantized_is_worse(pipe, ev):
    m, bad = ev.metrics(ev.outputs(pipe.params))
    assert bad is None and m["latent_psnr_1step_db"] == np.inf and m["ssim"] == pytest.approx(1.0)
    m2, _ = ev.metrics(ev.outputs(sweep.dequantized(quant.apply_recipe(pipe.params, "palette-2bit"))))
    m4, _ = ev.metrics(ev.outputs(sweep.dequantized(quant.apply_recipe(pipe.params, "palette-4bit"))))
    for k in ("noise_psnr_db", "latent_psnr_1step_db", "image_psnr_db", "ssim"):
        assert np.isfinite(m2[k]) and m2[k] < m4[k], k  # more bits, closer to float


def _run(pipe, out, recipes, **kw):
    return sweep.run(pipe, recipes, str(out), SETTINGS, adherence=shapes.score, progress=False, **kw)


def test_sweep_writes_a_report_and_resumes_without_recomputing(pipe, tmp_path, monkeypatch):
    out = tmp_path / "ev"
    calls = []
    real = Evaluator.outputs

    def counting(self, params, desc=None):
        calls.append(desc)
        if desc == "palette-3bit":
            raise KeyboardInterrupt  # killed half way
        return real(self, params, desc)

    monkeypatch.setattr(Evaluator, "outputs", counting)
    with pytest.raises(KeyboardInterrupt):
        _run(pipe, out, ["palette-4bit", "palette-3bit"])
    assert calls == ["float model", "palette-4bit", "palette-3bit"]
    assert not [f for f in os.listdir(out / "state" / "recipes") if ".tmp" in f]
    calls.clear()
    monkeypatch.setattr(Evaluator, "outputs", lambda self, params, desc=None: (calls.append(desc), real(self, params, desc))[1])
    res = _run(pipe, out, ["palette-4bit", "palette-3bit"])
    assert calls == ["palette-3bit"]  # the float model and palette-4bit were loaded, not rerun
    names = [r["name"] for r in res["recipes"]]
    assert names == ["palette-4bit", "palette-3bit"]
    for f in ("report.md", "report.json"):
        assert (out / f).exists()
    saved = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in saved["recipes"]] == names
    r4 = res["recipes"][0]
    assert r4["path"] == "simulated" and r4["finite"] and 4.0 < r4["avg_bits"] < 5.0
    assert r4["bytes"]["unet"] < quant.size_bytes(pipe.params["unet"]) / 6
    assert set(r4["metrics"]["adherence"]) >= {"color", "shape", "all"}
    # a third run with one more recipe computes only that one
    calls.clear()
    res = _run(pipe, out, ["palette-4bit", "palette-3bit", "w8-int8"])
    assert calls == ["w8-int8"]


CALIBRATION = ("a small green triangle at the top right on a white background",
               "a large yellow circle at the bottom left on a black background")


def test_gptq_recipes_collect_statistics_once_and_beat_plain_kmeans(pipe, tmp_path, monkeypatch):
    """A GPTQ preset takes its layers' input statistics from a guided generation of the calibration
    prompts (kept in the state folder, reused on rerun), and its indices beat plain k-means' at the
    same bytes."""
    out = tmp_path / "ev"
    with pytest.raises(sweep.EvalError, match="calibration prompts"):
        _run(pipe, out, ["palette-4bit-gptq"])
    with pytest.raises(sweep.EvalError, match="must not be evaluation prompts.*red circle"):
        _run(pipe, out, ["palette-4bit-gptq"], calibration=[PROMPTS[0]])
    res = _run(pipe, out, ["palette-4bit", "palette-4bit-gptq"], calibration=CALIBRATION)
    plain, g = res["recipes"]
    assert g["family"] == "uniform palettize (GPTQ)" and g["recipe"]["rules"][0]["gptq"] is True
    assert g["bytes"]["unet"] == plain["bytes"]["unet"] and g["avg_bits"] == plain["avg_bits"]
    for k in ("latent_psnr_1step_db", "final_latent_psnr_db", "noise_psnr_db"):
        assert g["metrics"][k] > plain["metrics"][k] + 1.0, k
    saved = np.load(out / "state" / "hessians.npz")
    unet = pipe.params["unet"]
    assert set(saved.files) == set(quant.calibrate.layer_names(unet))
    # rerun: the statistics and both recipes come from the folder
    def no(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(quant.gptq, "collect", no)
    monkeypatch.setattr(Evaluator, "outputs", no)
    again = _run(pipe, out, ["palette-4bit", "palette-4bit-gptq"], calibration=CALIBRATION)
    assert [r["metrics"] for r in again["recipes"]] == [r["metrics"] for r in res["recipes"]]
    with pytest.raises(sweep.EvalError, match="other calibration settings \\(prompts differ\\)"):
        _run(pipe, out, ["palette-4bit-gptq"], calibration=CALIBRATION[:1])


def test_refuses_another_models_or_settings_folder(pipe, tmp_path):
    out = tmp_path / "ev"
    _run(pipe, out, ["w8-int8"])
    other = sdjax.load(None, progress=False)
    other.params["unet"]["conv_in"]["bias"] = other.params["unet"]["conv_in"]["bias"] + 1
    with pytest.raises(sweep.EvalError, match="another model"):
        _run(other, out, ["w8-int8"])
    with pytest.raises(sweep.EvalError, match="settings"):
        sweep.run(pipe, ["w8-int8"], str(out), Settings(prompts=PROMPTS[:1], steps=3), progress=False)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(sweep.EvalError, match="unknown recipe 'palette-5bit'.*palette-6bit.*mixed-apple"):
        sweep.resolve(["palette-6bit", "palette-5bit"])
    with pytest.raises(sweep.EvalError, match="nope.json"):
        sweep.resolve(["nope.json"])


def test_nan_output_is_reported_and_the_sweep_goes_on(pipe, tmp_path, monkeypatch):
    real = sweep.dequantized

    def poisoned(params, dtype=np.float32):
        out = real(params, dtype)
        if quant.size_bytes(params["unet"]) < quant.size_bytes(pipe.params["unet"]) / 10:  # the 2-bit one
            w = np.array(out["unet"]["conv_in"]["weight"])
            w[0, 0, 0, 0] = np.nan
            out["unet"]["conv_in"]["weight"] = w
        return out

    monkeypatch.setattr(sweep, "dequantized", poisoned)
    res = _run(pipe, tmp_path / "ev", ["palette-2bit", "w8-int8"])
    bad, good = res["recipes"]
    assert not bad["finite"] and "NaN" in bad["nonfinite"] and np.isnan(bad["metrics"]["latent_psnr_1step_db"])
    assert good["finite"] and np.isfinite(good["metrics"]["latent_psnr_1step_db"])
    assert "NaN" in (tmp_path / "ev" / "report.md").read_text()


_DEVICE_RUN = """
import json, sys, jax
import quant, sdjax
from quant import sweep
from quant.evaluate import Evaluator, Settings
pipe = sdjax.load(None, progress=False)
ev = Evaluator(pipe, Settings(prompts=%r, seeds=(0, 1), steps=2, batch=4, n_one_step=4), progress=False)
m, _ = ev.metrics(ev.outputs(sweep.dequantized(quant.apply_recipe(pipe.params, "palette-3bit"))))
lat = ev.reference["final_latents"]
print("RESULT " + json.dumps(dict(devices=len(jax.devices()), shards=len(ev._put(lat[:4]).addressable_shards),
                                  metrics=m, ref_sum=float(abs(lat).sum()))))
"""


def _device_run(n):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", _DEVICE_RUN % (PROMPTS[:2],)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[-1][7:])


@pytest.mark.slow  # two eval runs in subprocesses, ~50 s on 2 cores: kept out of CI's 15-minute budget
def test_four_host_devices_give_the_numbers_of_one():
    one, four = _device_run(1), _device_run(4)
    assert (one["devices"], one["shards"]) == (1, 1) and (four["devices"], four["shards"]) == (4, 4)
    assert four["ref_sum"] == pytest.approx(one["ref_sum"], rel=1e-5)
    for k in ("noise_psnr_db", "latent_psnr_1step_db", "final_latent_psnr_db", "image_psnr_db", "ssim"):
        assert four["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-4, abs=1e-4), k


@pytest.mark.slow  # ~30 s on 2 cores; the allocators themselves are tested on synthetic models in CI
def test_mixed_bit_families_end_to_end(pipe, tmp_path, monkeypatch):
    """Apple's recipes and ours at the same sizes, on the larger layers and three widths (fast):
    both families are built, evaluated, compared, and written as recipe files quantize reads."""
    out = tmp_path / "ev"
    res = _run(pipe, out, ["mixed-apple", "mixed-sdjax"], candidate_min=40000, mixed_nbits=(1, 2, 4))
    s = res["sensitivity"]
    assert s["nbits"] == [1, 2, 4] and len(s["layers"]) == len(s["psnr_db"]) > 3
    assert all(np.all(np.diff(row) > 0) for row in s["psnr_db"])  # more bits, closer to float, per layer
    assert set(s["spearman"]) == {"1", "2", "4"} and all(-1 <= v <= 1 for v in s["spearman"].values())
    apple = [r for r in res["recipes"] if r["family"] == "mixed (Apple)"]
    ours = [r for r in res["recipes"] if r["family"] == "mixed (sdjax)"]
    assert apple and len(ours) >= len(apple)
    for a in apple:  # ours at the same stored size is at least as good end to end
        o = next(r for r in ours if r["name"] == "mixed-sdjax-" + a["name"][len("mixed-apple-"):])
        assert abs(o["avg_bits"] - a["avg_bits"]) < 0.1
        assert o["metrics"]["latent_psnr_1step_db"] >= a["metrics"]["latent_psnr_1step_db"] - 0.5
    assert res["targets"] and {t["name"] for t in res["targets"]} >= {"sdjax allocator vs Apple's at the same bits"}
    name = apple[0]["name"]
    recipe = quant.parse_recipe(str(out / "recipes" / f"{name}.json"))
    assert recipe.name == name
    flat = json.loads((out / "recipes" / f"{name}.apple.json").read_text())
    assert quant.recipes.is_apple_recipe(flat) and set(flat) == set(s["layers"])
    # rerun: sweeps, Fisher, recipes and their metrics all come from the folder
    def no(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(sweep.Sensitivity, "measure", no)
    monkeypatch.setattr(Evaluator, "outputs", no)
    monkeypatch.setattr(quant.sensitivity, "fisher", no)
    again = _run(pipe, out, ["mixed-apple", "mixed-sdjax"], candidate_min=40000, mixed_nbits=(1, 2, 4))
    assert [r["metrics"] for r in again["recipes"]] == [r["metrics"] for r in res["recipes"]]


@pytest.mark.slow  # ~40 s on 2 cores
def test_mixed_gptq_family_end_to_end(pipe, tmp_path):
    """Our allocator over GPTQ layers: a recipe at each Apple size and the smallest keeping uniform
    6-bit's one-step PSNR, written as sdjax recipes with gptq rules that quantize reads back."""
    out = tmp_path / "ev"
    res = _run(pipe, out, ["palette-6bit", "mixed-sdjax", "mixed-gptq"], candidate_min=40000, mixed_nbits=(2, 4, 6),
               calibration=CALIBRATION, fisher=False)
    g = res["sensitivity_gptq"]
    assert g["nbits"] == [2, 4, 6] and g["layers"] == res["sensitivity"]["layers"]
    plain, ours = np.asarray(res["sensitivity"]["psnr_db"]), np.asarray(g["psnr_db"])
    assert np.mean(ours > plain) > 0.8  # GPTQ beats k-means layer by layer (almost always)
    gq = [r for r in res["recipes"] if r["family"] == "mixed (sdjax, GPTQ)"]
    sd = [r for r in res["recipes"] if r["family"] == "mixed (sdjax)"]
    # at Apple's sizes up to GPTQ_MAX_BITS (the last of each family: its quality-target recipe)
    sizes = [r["name"][len("mixed-sdjax-"):] for r in sd[:-1] if float(r["name"][len("mixed-sdjax-"):]) <= sweep.GPTQ_MAX_BITS]
    assert sizes and [r["name"][len("mixed-gptq-"):] for r in gq[:-1]] == sizes
    for a in gq[:-1]:
        b = next(r for r in sd if r["name"] == "mixed-sdjax-" + a["name"][len("mixed-gptq-"):])
        assert a["metrics"]["latent_psnr_1step_db"] >= b["metrics"]["latent_psnr_1step_db"] - 0.5
    u6 = next(r for r in res["recipes"] if r["name"] == "palette-6bit")["metrics"]["latent_psnr_1step_db"]
    assert gq[-1]["metrics"]["latent_psnr_1step_db"] >= u6 - 0.5  # the quality-target recipe
    assert gq[-1]["avg_bits_candidates"] <= sd[-1]["avg_bits_candidates"] + 0.05
    assert gq[-1]["avg_bits_candidates"] < gq[-1]["avg_bits"]  # the small layers stay float (16 bits)
    recipe = quant.parse_recipe(str(out / "recipes" / f"{gq[0]['name']}.json"))
    assert recipe.needs_hessian and all(r.options["gptq"] for r in recipe.rules)
    assert not (out / "recipes" / f"{gq[0]['name']}.apple.json").exists()
