"""End-to-end parity: for the same x_T, prompt, negative prompt, guidance, sampler and steps,
sdjax's float image equals diffusers' pipelines' output_type="np" image (PSNR >= 70 dB)."""
import numpy as np
import pytest
import torch

import sdjax
from sdjax import generate as gen
from tiny_models import DIFFUSERS_SCHEDULERS, nchw, psnr

PSNR_MIN = 70.0
PROMPTS = ["a red circle", "the small blue square"]
NEGATIVE = ["green", ""]


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


def _test_images(h, w, seed=0):
    from PIL import Image
    g = np.random.default_rng(seed)
    img = (g.random((h // 4, w // 4, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(img).resize((w, h), Image.NEAREST)
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 8: w // 2] = 255
    return img, Image.fromarray(m, "L")


def _mean_latents(monkeypatch, module):
    """diffusers samples the VAE's latent distribution; sdjax takes its mean. Same for both here."""
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "euler_a"])
def test_img2img_matches_diffusers(pipeline_dirs, monkeypatch, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod
    folder, ref = pipeline_dirs("sd1")
    pipe = sdjax.load(folder, progress=False)
    h, w, steps, seed, strength = 32, 32, 10, 5, 0.6
    img, _ = _test_images(h, w)
    noise = _latents(pipe, 2, h, w, seed=1)
    _mean_latents(monkeypatch, mod)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise))
    _inject_step_noise(monkeypatch, sampler, seed, (2, h // 2, w // 2, 4))
    i2i = StableDiffusionImg2ImgPipeline(**ref.components)
    i2i.scheduler = _scheduler(folder, sampler)
    with torch.no_grad():
        want = i2i(PROMPTS, image=img, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=steps,
                   guidance_scale=5.0, output_type="np").images
    got = pipe.generate(PROMPTS, negative_prompt=NEGATIVE, steps=steps, guidance_scale=5.0, sampler=sampler,
                        seed=seed, init_image=img, strength=strength, latents=noise, output_type="np",
                        progress=False)
    assert psnr(got, want) >= PSNR_MIN, psnr(got, want)


@pytest.mark.parametrize("style,sampler", [("inpaint", "ddim"), ("inpaint", "euler"), ("inpaint", "dpmpp_2m"),
                                           ("sd1", "ddim"), ("sd1", "dpmpp_2m")])
def test_inpainting_matches_diffusers(pipeline_dirs, monkeypatch, style, sampler):
    """9-channel inpainting UNets, and mask blending with an ordinary UNet."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as mod
    folder, ref = pipeline_dirs(style)
    pipe = sdjax.load(folder, progress=False)
    h, w, steps, seed = 32, 32, 8, 2
    img, mask = _test_images(h, w, seed=3)
    x_t = _latents(pipe, 2, h, w, seed=4)
    _mean_latents(monkeypatch, mod)
    inp = StableDiffusionInpaintPipeline(**ref.components)
    inp.scheduler = _scheduler(folder, sampler)
    with torch.no_grad():
        want = inp(PROMPTS, image=img, mask_image=mask, negative_prompt=NEGATIVE, num_inference_steps=steps,
                   guidance_scale=5.0, height=h, width=w, latents=torch.from_numpy(x_t), output_type="np").images
    got = pipe.generate(PROMPTS, negative_prompt=NEGATIVE, steps=steps, guidance_scale=5.0, sampler=sampler,
                        seed=seed, init_image=img, mask=mask, latents=x_t, output_type="np", progress=False)
    assert psnr(got, want) >= PSNR_MIN, psnr(got, want)


def test_guidance_seed_and_prompt_do_not_recompile(pipeline_dirs):
    folder, _ = pipeline_dirs("sd1")
    pipe = sdjax.load(folder, progress=False)
    kw = dict(steps=3, sampler="euler_a", height=32, width=32, output_type="np", progress=False)
    a = pipe.generate("a red circle", guidance_scale=7.0, seed=1, **kw)
    n = gen.denoise_step._cache_size()
    b = pipe.generate("the blue square", guidance_scale=3.0, seed=2, **kw)
    assert gen.denoise_step._cache_size() == n
    assert not np.array_equal(a, b)
    c = pipe.generate("a red circle", guidance_scale=7.0, seed=1, **kw)
    np.testing.assert_array_equal(a, c)  # deterministic from its seed


def test_scan_loop_equals_host_loop(pipeline_dirs):
    folder, _ = pipeline_dirs("sd2")
    pipe = sdjax.load(folder, progress=False)
    kw = dict(steps=4, sampler="heun", height=32, width=32, output_type="np", progress=False, seed=7)
    np.testing.assert_allclose(pipe.generate("a cat", loop="scan", **kw), pipe.generate("a cat", loop="host", **kw),
                               atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="k_euler"), "unknown sampler 'k_euler'; valid: ddim, plms"),
    (dict(height=36), "height=36: must be a positive multiple of 8"),
    (dict(steps=0), "steps=0"),
    (dict(strength=1.5, init_image=np.zeros((32, 32, 3), np.float32)), r"strength=1.5: must be in \[0, 1\]"),
    (dict(init_image=np.zeros((16, 32, 3), np.float32)), "init image: is 16x32"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), r"latents: shape \(1, 4, 8, 8\), expected \(1, 4, 16, 16\)"),
    (dict(mask=np.zeros((32, 32))), "mask: inpainting needs init_image"),
])
def test_bad_arguments_are_named(pipeline_dirs, kwargs, match):
    folder, _ = pipeline_dirs("sd1")
    pipe = sdjax.load(folder, progress=False)
    with pytest.raises(gen.GenerationError if "init image" not in match else Exception, match=match):
        pipe.generate("a cat", **dict(dict(height=32, width=32, steps=2, progress=False), **kwargs))


def test_on_device_places_numpy_leaves_and_keeps_device_arrays():
    """denoise places a tree's NumPy leaves once (a sweep's replaced layer), so its jitted steps see device
    arrays wherever the NumPy leaf sits; device arrays pass through as the same objects."""
    import jax
    kept = jax.numpy.ones((2, 3))
    tree = {"a": {"weight": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": {"weight": kept}, "n": None}
    out = gen.on_device(tree)
    assert isinstance(out["a"]["weight"], jax.Array) and not isinstance(out["a"]["weight"], np.ndarray)
    np.testing.assert_array_equal(np.asarray(out["a"]["weight"]), tree["a"]["weight"])
    assert out["b"]["weight"] is kept and out["n"] is None
