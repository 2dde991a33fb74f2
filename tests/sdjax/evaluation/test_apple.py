"""Apple's mixed-bit pre-analysis as Apple runs it (sdjax.evaluation.apple, apple_sweep), checked against
what we did not write: diffusers' pipelines run with Apple's arguments, diffusers' module order, and SD 1.5's
UNet as diffusers builds it."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import sdjax
from quant import calibrate, metrics, mixed_bit
from sdjax import configs
from sdjax.evaluation import sweep
from sdjax.evaluation.apple import (APPLE_PROMPTS, SD15_UNET_CONV_LINEAR, AppleReading, apple_min_size, cycled,
                                    module_order)
from sdjax.evaluation.apple_sweep import AppleSweep

PROMPTS = ["a red circle", "a small blue cat", "a photo of the green square"]


def _diffusers_layers(unet):
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize("style", ["sd1", "sd2", "sdxl"])
def test_module_order_is_diffusers_named_modules_order(pipeline_dirs, style):
    """Apple's candidates are visited (and its stable sort breaks ties) in named_modules() order."""
    folder, ref = pipeline_dirs(style)
    names = calibrate.layer_names(sdjax.load(folder, progress=False).params["unet"])
    assert module_order(names) == _diffusers_layers(ref.unet)


def test_module_order_of_the_embedded_model_and_sd15_size():
    """The embedded model's layers in diffusers' order, and SD 1.5's conv/linear weight count (the size
    Apple's 1e5 candidate threshold was set for) as diffusers builds SD 1.5's UNet."""
    from diffusers import UNet2DConditionModel
    cfg = json.load(open(os.path.join(sdjax.reference_model_path(), "unet", "config.json")))
    with torch.device("meta"):
        emb = UNet2DConditionModel.from_config(cfg)
        sd15 = UNet2DConditionModel.from_config(configs.to_dict(configs.preset("sd15")["unet"]))
    pipe = sdjax.load(None, progress=False)
    assert module_order(calibrate.layer_names(pipe.params["unet"])) == _diffusers_layers(emb)
    sizes = [m.weight.numel() for n, m in sd15.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sum(sizes) == SD15_UNET_CONV_LINEAR
    assert sum(s > mixed_bit.APPLE_MIN_SIZE for s in sizes) == len(sizes) - 2   # all but conv_in and conv_out
    total = sum(np.prod(m.weight.shape) for m in emb.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert apple_min_size(pipe.params["unet"]) == pytest.approx(1e5 * total / SD15_UNET_CONV_LINEAR)


def _pndm(pipe, ref):
    """The same pipeline with SD 1.x's scheduler (PNDM, skip_prk_steps), on both sides."""
    from diffusers import PNDMScheduler
    ref.scheduler = PNDMScheduler.from_config(ref.scheduler.config, skip_prk_steps=True, set_alpha_to_one=False)
    return dataclasses.replace(pipe, scheduler_config=dict(ref.scheduler.config)), ref


@pytest.mark.parametrize("style,scheduler", [("sd1", "own"), ("sd1", "pndm"), ("sdxl", "own")])
def test_apple_reading_is_diffusers_pipeline_with_apples_arguments(pipeline_dirs, style, scheduler):
    """Apple's run_pipe: pipe(8 prompts, negative_prompt=[""] * 8, num_inference_steps=1,
    output_type="latent") with the pipeline's own scheduler and default guidance, the same x_T."""
    folder, ref = pipeline_dirs(style)
    pipe = sdjax.load(folder, progress=False)
    if scheduler == "pndm":
        import copy
        ref = copy.copy(ref)
        pipe, ref = _pndm(pipe, ref)
    prompts = cycled(PROMPTS)
    assert len(prompts) == APPLE_PROMPTS and prompts[3] == PROMPTS[0]
    reading = AppleReading(pipe, prompts)
    s = pipe.configs["unet"].sample_size * pipe.vae_scale_factor
    with torch.no_grad():
        want = ref(prompts, negative_prompt=[""] * len(prompts), num_inference_steps=1, height=s, width=s,
                   latents=torch.from_numpy(reading.xT.transpose(0, 3, 1, 2).copy()), output_type="latent").images
    want = want.numpy().transpose(0, 2, 3, 1)
    assert metrics.psnr_db(want, reading.reference) >= 70
    # identical latents: Apple's guards make the PSNR finite, about 20 log10(peak / 1e-10)
    same = metrics.apple_psnr_per_sample(reading.reference, reading.latents(pipe.params))
    assert all(180 < p < 260 for p in same)


def test_apple_sweep_candidates_baselines_and_recipes(tmp_path):
    """Apple's pre-analysis on the embedded model's three largest layers at two widths: candidates in
    module order, measured on Apple's reading (means of 8 values rounded to 0.1 dB), its per-tensor int8
    baseline below the float16 one, and recipes that are Apple's rule on these sweeps, named by Apple's
    bits."""
    pipe = sdjax.load(None, progress=False)
    settings = sweep.Settings(prompts=("a large red circle in the center on a white background",), steps=2)
    state = sweep.State(str(tmp_path))
    sel = sweep.selection(pipe, ["a small green triangle at the top right on a white background"], settings, state,
                          progress=False)
    A = AppleSweep(sel, state, progress=False, min_size=60000, nbits=(2, 8))
    numel = {n: k for n, k in calibrate.layer_numel(pipe.params["unet"]).items() if k > 60000}
    assert A.layers == module_order(numel) and A.numel == numel and len(numel) == 3
    assert sel.apple.prompts == tuple([sel.s.prompts[0]] * 8)
    base = A.baselines()
    assert 60 < base["linear8"] < base["original"] - 10 < 140
    single = A.single()
    for b in (2, 8):
        for n in A.layers:
            assert abs(single[b][n] * 80 - round(single[b][n] * 80)) < 1e-6 and single[b][n] > 60
        assert all(single[8][n] > single[2][n] for n in A.layers)
    recipes = A.recipes()
    cumul = A.cumulative(single)
    want = mixed_bit.apple_recipes(cumul, base["original"], base["linear8"], num=7)
    assert [r for _, r, _ in recipes] == [dict(x) for i, x in enumerate(want) if x not in want[:i]]
    for name, r, bits in recipes:
        assert name == f"apple-mbp-{bits:.2f}" and bits == pytest.approx(
            sum(r[n] * numel[n] for n in numel) / sum(numel.values()))
    # measured again from the state file, nothing recomputed
    B = AppleSweep(sel, state, progress=False, min_size=60000, nbits=(2, 8))
    B.measure = lambda a: (_ for _ in ()).throw(AssertionError("recomputed"))
    assert B.recipes() == recipes


@pytest.mark.slow  # kept out of CI for time (the CI suite must stay under 30 min); run with -m slow
def test_a_scheduler_no_sampler_mirrors_leaves_apples_reading_out(tmp_path):
    """A checkpoint whose own scheduler sdjax does not mirror is still evaluated (every other reading);
    Apple's reading is left out and apple-mbp is refused with the reason."""
    pipe = sdjax.load(None, progress=False)
    pipe = dataclasses.replace(pipe, scheduler_config=dict(pipe.scheduler_config, _class_name="KDPM2DiscreteScheduler"))
    settings = sweep.Settings(prompts=("a large red circle in the center on a white background",), steps=2)
    ev = sweep.Evaluator(pipe, settings, progress=False)
    assert ev.apple is None and "KDPM2DiscreteScheduler" in ev.apple_unavailable
    m, bad = ev.metrics(ev.outputs(pipe.params))
    assert bad is None and "apple_latent_psnr_db" not in m and m["latent_psnr_1step_db"] == np.inf
    with pytest.raises(sweep.EvalError, match="apple-mbp: Apple's reading needs the checkpoint's own scheduler: "
                                              "scheduler_config names scheduler 'KDPM2DiscreteScheduler'"):
        AppleSweep(ev, sweep.State(str(tmp_path)), progress=False)
