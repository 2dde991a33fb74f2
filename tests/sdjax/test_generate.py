"""End-to-end parity: for the same x_T, prompt, negative prompt, guidance, sampler and steps,
sdjax's float image equals diffusers' pipelines' output_type="np" image (PSNR >= 70 dB)."""
import numpy as np
import pytest
import torch

import sdjax
from sdjax import generate as gen
from tiny_models import nchw, nhwc

PSNR_MIN = 70.0
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}), "lcm": ("LCMScheduler", {}),
}
PROMPTS = ["a red circle", "the small blue square"]
NEGATIVE = ["green", ""]


def psnr(a, b):
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _scheduler(folder, name):
    """The diffusers scheduler ``name`` over the checkpoint's own saved scheduler config."""
    import diffusers
    cls, kw = DIFFUSERS_SCHEDULERS[name]
    return getattr(diffusers, cls).from_pretrained(folder, subfolder="scheduler", **kw)


def _inject_step_noise(monkeypatch, name, seed, shape_nhwc):
    """Stochastic schedulers draw their noise with randn_tensor: hand them sdjax's."""
    import importlib
    import diffusers
    cls, _ = DIFFUSERS_SCHEDULERS[name]
    module = importlib.import_module(getattr(diffusers, cls).__module__)
    calls = []

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        k = len(calls)
        calls.append(shape)
        return torch.from_numpy(nchw(gen.step_noise(seed, k, shape_nhwc)).copy()).to(dtype or torch.float32)
    if hasattr(module, "randn_tensor"):  # deterministic schedulers draw no noise
        monkeypatch.setattr(module, "randn_tensor", fake)
    return calls


def _latents(pipe, batch, h, w, seed=0):
    f = pipe.vae_scale_factor
    g = np.random.default_rng(seed)
    return g.standard_normal((batch, 4, h // f, w // f)).astype(np.float32)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", list(DIFFUSERS_SCHEDULERS))
def test_txt2img_matches_diffusers(pipeline_dirs, monkeypatch, style, sampler):
    folder, ref = pipeline_dirs(style)
    pipe = sdjax.load(folder, progress=False)
    steps, h, w, seed = 8, 32, 48, 3
    x_t = _latents(pipe, 2, h, w)
    ref.scheduler = _scheduler(folder, sampler)
    _inject_step_noise(monkeypatch, sampler, seed, (2, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor, 4))
    with torch.no_grad():
        want = ref(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=6.0,
                   height=h, width=w, latents=torch.from_numpy(x_t), output_type="np").images
    got = pipe.generate(PROMPTS, negative_prompt=NEGATIVE, steps=steps, guidance_scale=6.0, sampler=sampler,
                        seed=seed, height=h, width=w, latents=x_t, output_type="np", progress=False)
    assert got.shape == want.shape
    assert psnr(got, want) >= PSNR_MIN, psnr(got, want)
