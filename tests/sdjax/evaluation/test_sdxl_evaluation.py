"""Quantization and evaluation on SDXL, checked against diffusers on tiny random SDXL pipelines: the
evaluator's generations and noise predictions, the calibration run's inputs to the added
conditioning (what GPTQ sees), the Fisher pass through the UNet and both text encoders (float64
torch autograd), Apple's mixed-bit recipe JSON on diffusers' SDXL layer names, and ``sdjax eval``
on a tiny SDXL folder."""
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

import quant
import sdjax
from quant import gptq
from sdjax.cli import main
from sdjax.nn import is_quantized
from sdjax.evaluation import calibration, fisher as sensitivity, sweep
from sdjax.evaluation.evaluator import Evaluator, Settings
from sdjax.params import CheckpointError, sdjax_to_torch
from tiny_models import psnr, rel_err

PROMPTS = ["a red circle", "a small blue cat"]
PSNR_MIN = 70.0


@pytest.fixture(scope="module")
def xl(pipeline_dirs):
    folder, ref = pipeline_dirs("sdxl")
    return folder, ref, sdjax.load(folder, progress=False)


def _size(pipe):
    return pipe.configs["unet"].sample_size * pipe.vae_scale_factor


def _time_ids(pipe, rows):
    """diffusers' text-to-image add_time_ids at the UNet's default size: (H, W, 0, 0, H, W)."""
    s = _size(pipe)
    return torch.tensor([[s, s, 0, 0, s, s]] * rows, dtype=torch.float32)


# --- the evaluator -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluator(xl):
    _, _, pipe = xl
    return Evaluator(pipe, Settings(prompts=tuple(PROMPTS), seeds=(0, 1), steps=2, sampler="euler", n_one_step=2,
                                    batch=4), progress=False)


def test_evaluator_generations_are_diffusers_xl_pipelines(xl, evaluator):
    """The float reference the report compares every recipe with is StableDiffusionXLPipeline's
    output for the same x_T: final images, and sdjax's one-step latents (a 1-step plan of the sampler)."""
    _, ref, pipe = xl
    ev, s = evaluator, _size(pipe)
    pairs = ev.s.pairs
    prompts = [p for p, _ in pairs]
    x_t = torch.from_numpy(ev.xT.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        images = ref(prompts, negative_prompt=[""] * len(prompts), num_inference_steps=2, guidance_scale=7.5,
                     height=s, width=s, latents=x_t, output_type="np").images
        one = ref(prompts[:2], negative_prompt=["", ""], num_inference_steps=1, guidance_scale=7.5, height=s,
                  width=s, latents=x_t[:2], output_type="latent").images
    assert psnr(ev.reference["images"], images) >= PSNR_MIN, psnr(ev.reference["images"], images)
    assert rel_err(ev.reference["one_step_latents"], one.numpy().transpose(0, 2, 3, 1)) <= 1e-4


def test_evaluator_noise_predictions_are_diffusers_unets(xl, evaluator):
    """The noise-prediction samples: diffusers' UNet conditioned on the prompt, its pooled embeds
    and the text-to-image time ids."""
    _, ref, pipe = xl
    ev = evaluator
    x, t = ev.noise_inputs
    prompts = [p for p, _ in ev.s.pairs]
    with torch.no_grad():
        pe, _, ppe, _ = ref.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        want = ref.unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t.astype(np.int64)), pe,
                        added_cond_kwargs={"text_embeds": ppe, "time_ids": _time_ids(pipe, len(prompts))}).sample
    assert rel_err(ev.reference["eps"], want.numpy().transpose(0, 2, 3, 1)) <= 1e-4


def test_evaluator_measures_text_encoder_2_recipes(xl, evaluator):
    """A recipe on text_encoder_2 alone changes the generations (its states and pooled embeds reach
    the UNet through the evaluator's own encoding of the quantized params)."""
    _, _, pipe = xl
    q = quant.apply_recipe(pipe.params, {"components": ["text_encoder_2"],
                                         "rules": [{"pattern": "*", "method": "palettize", "nbits": 2}]})
    assert q["unet"] is pipe.params["unet"]
    m, nonfinite = evaluator.metrics(evaluator.outputs(q))
    assert nonfinite is None and 0 < m["latent_psnr_1step_db"] < 60 and np.isfinite(m["ssim"])


# --- calibration and GPTQ ------------------------------------------------------------------------------

def test_calibration_run_shows_gptq_the_added_conditioning(xl):
    """The hessian run's UNet calls carry the prompts' pooled embeds and time ids: the input
    statistics GPTQ collects at add_embedding.linear_1 are diffusers' [text_embeds, add_time_proj(time_ids)]
    rows of the guided calls (the negative row once per prompt, each prompt's row once)."""
    _, ref, pipe = xl
    settings = calibration.Calibration(tuple(PROMPTS), steps=2, sampler="euler", n_timesteps=2)
    H = gptq.collect(pipe.params["unet"], calibration.hessian_run(pipe, settings, progress=False),
                     names=["add_embedding.linear_1"])["add_embedding.linear_1"]
    with torch.no_grad():
        pe, npe, ppe, nppe = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                               negative_prompt=["", ""])
        embeds = torch.cat([nppe[:1], ppe])
        times = ref.unet.add_time_proj(_time_ids(pipe, 3).flatten()).reshape(3, -1)
    x = torch.cat([embeds, times], 1).double().numpy()
    want = (2 * np.outer(x[0], x[0]) + np.outer(x[1], x[1]) + np.outer(x[2], x[2])) / 4
    assert rel_err(H, want) <= 1e-4


@pytest.mark.slow  # kept out of CI for time (the CI suite must stay under 30 min); run with -m slow
def test_gptq_recipe_on_sdxl(xl):
    _, _, pipe = xl
    settings = calibration.Calibration(tuple(PROMPTS), steps=2, sampler="euler", n_timesteps=2)
    q = quant.apply_recipe(pipe.params, "palette-4bit-gptq", hessian=calibration.hessian_run(pipe, settings))
    layers = quant.recipes.layers(q["unet"])
    for name in ("add_embedding.linear_1", "time_embedding.linear_1", "down_blocks.1.attentions.0.proj_in"):
        assert is_quantized(layers[name]) and layers[name].nbits == 4, name
    float_img = pipe.generate(PROMPTS, steps=2, seed=0, output_type="np", progress=False)
    qpipe = dataclasses.replace(pipe, params=q)
    got = qpipe.generate(PROMPTS, steps=2, seed=0, output_type="np", progress=False)
    assert 15 < psnr(got, float_img) < 80


# --- Fisher sensitivities --------------------------------------------------------------------------------

def _torch_fisher_sdxl(ref, pipe, lat, seed, n_t):
    """The mean squared per-sample gradient of the denoising loss in float64 torch, from the diffusers
    modules: prompt states of both encoders (penultimate layer), text_encoder_2's text_embeds and
    text-to-image time ids. {prefix.parameter name: array} for "unet.", "te." and "te2."."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unet = copy.deepcopy(ref.unet).double()
        te, te2 = copy.deepcopy(ref.text_encoder).double(), copy.deepcopy(ref.text_encoder_2).double()
        tok = lambda t: t(PROMPTS, padding="max_length", max_length=77, truncation=True,  # noqa: E731
                          return_tensors="pt").input_ids
        ids, ids2 = tok(ref.tokenizer), tok(ref.tokenizer_2)
        abar = ref.scheduler.alphas_cumprod.double()
        idx, t, noise = calibration.calibration_samples(len(PROMPTS), n_t, lat.shape[2:] + lat.shape[1:2], seed)
        params = [(f"{pre}.{n}", p) for pre, m in (("unet", unet), ("te", te), ("te2", te2))
                  for n, p in m.named_parameters() if n.endswith(".weight")]
        acc = {n: np.zeros(p.shape) for n, p in params}
        time_ids = _time_ids(pipe, 1).double()
        for i in range(len(t)):
            x0 = torch.from_numpy(lat[idx[i]:idx[i] + 1]).double()
            eps = torch.from_numpy(noise[i:i + 1].transpose(0, 3, 1, 2).copy()).double()
            a = abar[int(t[i])]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            h1 = te(ids[idx[i]:idx[i] + 1], output_hidden_states=True).hidden_states[-2]
            out2 = te2(ids2[idx[i]:idx[i] + 1], output_hidden_states=True)
            ctx = torch.cat([h1, out2.hidden_states[-2]], -1)
            pred = unet(xt, torch.tensor([int(t[i])]), ctx,
                        added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": time_ids}).sample
            loss = torch.mean((pred - eps) ** 2)
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            for (n, _), g in zip(params, grads):
                if g is not None:
                    acc[n] += g.numpy() ** 2
        return {n: a / len(t) for n, a in acc.items()}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torch_fisher(xl):
    _, ref, pipe = xl
    c, s = pipe.configs["unet"].in_channels, pipe.configs["unet"].sample_size
    lat = np.random.default_rng(1).standard_normal((len(PROMPTS), c, s, s)).astype(np.float32)
    return lat, _torch_fisher_sdxl(ref, pipe, lat, seed=3, n_t=2)


@pytest.mark.parametrize("component,prefix", [("unet", "unet."), pytest.param("text_encoder", "te.", marks=pytest.mark.slow),
                                              pytest.param("text_encoder_2", "te2.", marks=pytest.mark.slow)])  # CI time
def test_fisher_matches_torch_autograd_float64(xl, torch_fisher, component, prefix):
    _, _, pipe = xl
    lat, want = torch_fisher
    imp = sensitivity.fisher(pipe, PROMPTS, latents=lat, n_timesteps=2, seed=3, component=component, progress=False)
    assert set(imp) == set(quant.calibrate.layer_names(pipe.params[component]))
    nonzero = 0
    for name, got in imp.items():
        key = f"{prefix}{name}.weight"  # transformers may nest the encoder in "text_model."
        ref = want[key] if key in want else want[f"{prefix}text_model.{name}.weight"]
        got = sdjax_to_torch(name + ".weight", got.astype(np.float64))
        assert got.shape == ref.shape, name
        if not np.abs(ref).max():  # text_encoder's last layer: SDXL reads the penultimate states
            assert not np.abs(got).max(), name
            continue
        nonzero += 1
        assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-3, name
    assert nonzero >= len(imp) // 2


def test_fisher_of_a_missing_component_is_named(pipeline_dirs):
    folder, _ = pipeline_dirs("sdxl-refiner")
    pipe = sdjax.load(folder, progress=False)
    with pytest.raises(ValueError, match="component 'text_encoder': .* has none .*unet, text_encoder_2"):
        sensitivity.fisher(pipe, PROMPTS, component="text_encoder", progress=False)


# --- Apple's mixed-bit recipe -----------------------------------------------------------------------------

def test_apple_pre_analysis_json_for_sdxl_is_read_as_is(xl, tmp_path):
    """A pre-analysis file as Apple's mixed_bit_compression_pre_analysis.py writes it for SDXL: layer
    names from the diffusers UNet's named_modules (nn.Linear / nn.Conv2d, those above its size
    threshold as candidates), recipes {name: nbits} with 16 for layers kept in float16."""
    _, ref, pipe = xl
    modules = [(n, m.weight.numel()) for n, m in ref.unet.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    big = [n for n, size in modules if size > 1000]
    nbits = {n: [1, 2, 4, 6, 8, 16][i % 6] for i, n in enumerate(big)}
    nbits["add_embedding.linear_1"] = 4  # SDXL's added conditioning
    doc = {"model_version": "stabilityai/stable-diffusion-xl-base-1.0", "single_layer": {}, "cumulative": {},
           "baselines": {"original": 80.0, "linear_8bit": 40.0, "recipe_4.50_bit_mixedpalette": 30.1},
           "recipes": {"recipe_4.50_bit_mixedpalette": nbits, "recipe_3.41_bit_mixedpalette": {big[0]: 2}}}
    path = tmp_path / "stabilityai-stable-diffusion-xl-base-1.0_palettization_recipe.json"
    path.write_text(json.dumps(doc))
    recipe = quant.recipes.parse(str(path), select="recipe_4.50_bit_mixedpalette")
    q = quant.apply_recipe(pipe.params, recipe)
    layers = quant.recipes.layers(q["unet"])
    for name, n in nbits.items():
        w = layers[name]
        if n == 16:
            assert not is_quantized(w), name
        else:
            assert is_quantized(w) and w.nbits == n, name
    assert q["text_encoder"] is pipe.params["text_encoder"] and q["text_encoder_2"] is pipe.params["text_encoder_2"]


# --- sdjax eval ------------------------------------------------------------------------------------------

@pytest.mark.slow  # kept out of CI for time (the CI suite must stay under 30 min); run with -m slow
def test_mixed_bit_families_with_fisher_on_sdxl(xl, tmp_path):
    """The report's mixed-bit machinery on SDXL layer names: per-layer sweeps (k-means and GPTQ), the
    calibration run, the Fisher estimate, recipes at Apple's sizes and at uniform 6-bit's quality."""
    _, _, pipe = xl
    settings = Settings(prompts=tuple(PROMPTS), seeds=(0,), steps=2, sampler="euler", batch=2, n_one_step=2)
    res = sweep.run(pipe, ["palette-4bit", "mixed-sdjax", "mixed-gptq"], str(tmp_path / "ev"), settings,
                    calibration=("a green square", "a yellow dog"), candidate_min=36000, mixed_nbits=(4, 6),
                    progress=False)
    layers = res["sensitivity"]["layers"]
    assert len(layers) == 14 and "up_blocks.0.upsamplers.0.conv" in layers
    assert res["sensitivity_gptq"]["layers"] == layers and set(res["sensitivity"]["spearman"]) == {"4", "6"}
    families = {r.family for r in res.recipes}
    assert {"mixed (sdjax)", "mixed (sdjax, GPTQ)"} <= families, families
    for r in res.recipes:
        assert r.finite and not np.isnan(r.metrics["latent_psnr_1step_db"]), r.name  # inf: equal to float
    assert set(res["float"]["bytes"]) == {"unet", "text_encoder", "text_encoder_2", "vae"}


def test_sdjax_eval_on_a_tiny_sdxl_folder(xl, tmp_path, capsys):
    """The command a user runs on an SDXL folder: uniform k-means and GPTQ recipes (the calibration
    run on its own prompts), the report and its figures. (The default recipes add the mixed-bit
    families: see the test above for their machinery on SDXL.)"""
    folder, _, _ = xl
    prompts, cal = tmp_path / "prompts.txt", tmp_path / "cal.txt"
    prompts.write_text("a red circle\na small blue cat\n")
    cal.write_text("a green square\na yellow dog\n")
    out = tmp_path / "ev"
    rc = main(["eval", "--model", str(folder), "--recipes", "palette-4bit,palette-4bit-gptq", "--prompts",
               str(prompts), "--calibration-prompts", str(cal), "--seeds", "0", "--steps", "2", "--batch", "2",
               "-o", str(out), "-q"])
    text, err = capsys.readouterr()
    assert rc == 0, err
    assert "palette-4bit-gptq" in text and "report.md" in text
    saved = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in saved["recipes"]] == ["palette-4bit", "palette-4bit-gptq"]
    assert set(saved["float"]["bytes"]) == {"unet", "text_encoder", "text_encoder_2", "vae"}
    for r in saved["recipes"]:
        assert np.isfinite(r["metrics"]["latent_psnr_1step_db"]) and np.isfinite(r["metrics"]["ssim"]), r["name"]
    for f in ("report.md", "quality_vs_bits.png", "sizes.png", "grid.png"):
        assert (out / f).exists(), f


def test_fisher_of_an_encoder_without_its_tokenizer_is_named(xl):
    _, _, pipe = xl
    with pytest.raises(CheckpointError, match="text_encoder_2 has no tokenizer_2"):
        sensitivity.fisher(dataclasses.replace(pipe, tokenizer_2=None), PROMPTS, component="text_encoder_2",
                           latents=np.zeros((2, 4, 16, 16), np.float32), progress=False)
