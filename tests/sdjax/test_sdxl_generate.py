"""SDXL generation end to end against diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline on tiny
random models: prompt encoding (both text encoders, pooled embeds, force_zeros_for_empty_prompt),
micro-conditioning, guidance rescale, the base + refiner ensemble of experts (denoising_end /
denoising_start), the VAE's force_upcast, no recompiles for traced values, and bad input."""
import dataclasses

import numpy as np
import pytest
import torch

import sdjax
from sdjax import conditioning, generate as gen
from tiny_models import DIFFUSERS_SCHEDULERS, rel_err
import test_generate as sd_tests  # noqa: E402  (the SD parity helpers: PSNR, schedulers, injected noise)

PSNR_MIN = sd_tests.PSNR_MIN
PROMPTS, NEGATIVE = sd_tests.PROMPTS, sd_tests.NEGATIVE
H, W = 32, 32
LATENT = (2, H // 2, W // 2, 4)  # the tiny VAE halves each side


def _pipes(pipeline_dirs, style="sdxl"):
    folder, ref = pipeline_dirs(style)
    return folder, ref, sdjax.load(folder, progress=False)


def _xl(cls_name, ref, **kw):
    """A diffusers SDXL pipeline of class ``cls_name`` over ``ref``'s components."""
    import diffusers
    return getattr(diffusers, cls_name)(**ref.components, add_watermarker=False, **kw)


def _image_latents(pipe, seed):
    return sd_tests._latents(pipe, 2, H, W, seed=seed)


# --- prompt encoding ----------------------------------------------------------------------------

@pytest.mark.parametrize("style,negative,clip_skip", [("sdxl", None, 0), ("sdxl", NEGATIVE, 0),
                                                      ("sdxl", NEGATIVE, 1), ("sdxl-refiner", NEGATIVE, 0),
                                                      ("sdxl-refiner", None, 1)])
def test_encode_prompt_matches_diffusers(pipeline_dirs, style, negative, clip_skip):
    _, ref, pipe = _pipes(pipeline_dirs, style)
    with torch.no_grad():
        pe, npe, ppe, nppe = ref.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt=negative,
                                               clip_skip=clip_skip)
    context, pooled = conditioning.encode(pipe, PROMPTS, negative, clip_skip)
    assert context.shape[-1] == pipe.configs["unet"].cross_attention_dim
    assert rel_err(context, torch.cat([npe, pe]).numpy()) <= 1e-4
    assert rel_err(pooled, torch.cat([nppe, ppe]).numpy()) <= 1e-4
    if negative is None:  # the tiny models' model_index.json force zeros for an empty prompt
        assert not np.asarray(context[:2]).any() and not np.asarray(pooled[:2]).any()
    states, pooled_pos = pipe.encode_prompt_sdxl(PROMPTS, clip_skip)
    np.testing.assert_array_equal(states, context[2:])
    np.testing.assert_array_equal(pooled_pos, pooled[2:])


def test_force_zeros_off_encodes_the_empty_prompt(pipeline_dirs):
    _, ref, pipe = _pipes(pipeline_dirs)
    pipe = dataclasses.replace(pipe, model_index=dict(pipe.model_index, force_zeros_for_empty_prompt=False))
    assert not conditioning.force_zeros_for_empty_prompt(pipe)
    off = _xl("StableDiffusionXLPipeline", ref, force_zeros_for_empty_prompt=False)
    with torch.no_grad():
        _, npe, _, nppe = off.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    context, pooled = conditioning.encode(pipe, PROMPTS, None)
    assert np.asarray(context[:2]).any()
    assert rel_err(context[:2], npe.numpy()) <= 1e-4 and rel_err(pooled[:2], nppe.numpy()) <= 1e-4


# --- micro-conditioning ---------------------------------------------------------------------------

def test_time_ids_as_diffusers_builds_them():
    s = gen.GenerationSettings
    ids = conditioning.time_ids
    # base, text-to-image: defaults (height, width), crop (0, 0); negatives = positives
    np.testing.assert_array_equal(ids(6, 64, 96, s(), False), [[64, 96, 0, 0, 64, 96]] * 2)
    got = ids(6, 64, 96, s(original_size=(512, 256), crops_coords_top_left=(8, 4)), False)
    np.testing.assert_array_equal(got, [[512, 256, 8, 4, 64, 96]] * 2)
    got = ids(6, 64, 96, s(crops_coords_top_left=(8, 4), negative_original_size=(32, 32),
                           negative_target_size=(16, 16)), False)
    np.testing.assert_array_equal(got, [[32, 32, 0, 0, 16, 16], [64, 96, 8, 4, 64, 96]])
    # base, img2img / inpainting: the negative row takes the positive crop
    got = ids(6, 64, 96, s(crops_coords_top_left=(8, 4), negative_original_size=(32, 32)), True)
    np.testing.assert_array_equal(got, [[32, 32, 8, 4, 64, 96], [64, 96, 8, 4, 64, 96]])
    # refiner: aesthetic scores 6.0 / 2.5, negative crop (0, 0)
    got = ids(5, 64, 96, s(crops_coords_top_left=(8, 4)), True)
    np.testing.assert_array_equal(got, [[64, 96, 0, 0, 2.5], [64, 96, 8, 4, 6.0]])
    got = ids(5, 64, 96, s(aesthetic_score=7.5, negative_aesthetic_score=1.0, negative_original_size=(8, 8)), True)
    np.testing.assert_array_equal(got, [[8, 8, 0, 0, 1.0], [64, 96, 0, 0, 7.5]])


# --- generation parity -------------------------------------------------------------------------------

TXT2IMG = [  # (sampler, negative prompt, extra settings): every sampler, some with micro-conditioning
    ("ddim", NEGATIVE, {}), ("plms", None, {}), ("euler", NEGATIVE, dict(guidance_rescale=0.7)),
    ("euler_a", None, dict(original_size=(64, 80), crops_coords_top_left=(4, 8))),
    ("heun", NEGATIVE, dict(target_size=(48, 48), negative_original_size=(16, 24), negative_target_size=(32, 32))),
    ("lms", None, {}), ("dpmpp_2m", NEGATIVE, dict(guidance_rescale=0.5, original_size=(128, 128))),
    ("dpmpp_2m_karras", None, {}), ("unipc", NEGATIVE, {}), ("lcm", None, {}),
]


@pytest.mark.parametrize("sampler,negative,extra", TXT2IMG, ids=[t[0] for t in TXT2IMG])
def test_txt2img_matches_diffusers(pipeline_dirs, monkeypatch, sampler, negative, extra):
    folder, ref, pipe = _pipes(pipeline_dirs)
    steps, seed, b = 4, 3, 2
    if "negative_original_size" in extra:
        # one prompt: StableDiffusionXLPipeline repeats [negative; positive] time ids per prompt
        # after concatenating them, so with a batch its rows interleave (sdjax keeps them paired)
        b, negative = 1, negative[:1]
    prompts = PROMPTS[:b]
    x_t = _image_latents(pipe, 0)[:b]
    ref.scheduler = sd_tests._scheduler(folder, sampler)
    sd_tests._inject_step_noise(monkeypatch, sampler, seed, (b,) + LATENT[1:])
    with torch.no_grad():
        want = ref(prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=6.0, height=H,
                   width=W, latents=torch.from_numpy(x_t), output_type="np", **extra).images
    got = pipe.generate(prompts, negative_prompt=negative, steps=steps, guidance_scale=6.0, sampler=sampler,
                        seed=seed, height=H, width=W, latents=x_t, output_type="np", progress=False, **extra)
    assert got.shape == want.shape
    assert sd_tests.psnr(got, want) >= PSNR_MIN, sd_tests.psnr(got, want)


@pytest.mark.parametrize("style,sampler", [("sdxl", "euler"), ("sdxl", "dpmpp_2m"), ("sdxl", "euler_a"),
                                           ("sdxl-refiner", "ddim"), ("sdxl-refiner", "heun")])
def test_img2img_matches_diffusers(pipeline_dirs, monkeypatch, style, sampler):
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as mod
    folder, ref, pipe = _pipes(pipeline_dirs, style)
    refiner = style == "sdxl-refiner"
    steps, seed, strength = 5, 5, 0.6
    img, _ = sd_tests._test_images(H, W)
    noise = _image_latents(pipe, 1)
    sd_tests._mean_latents(monkeypatch, mod)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise))
    sd_tests._inject_step_noise(monkeypatch, sampler, seed, LATENT)
    i2i = ref if refiner else _xl("StableDiffusionXLImg2ImgPipeline", ref)
    i2i.scheduler = sd_tests._scheduler(folder, sampler)
    extra = dict(aesthetic_score=7.0, negative_aesthetic_score=2.0, crops_coords_top_left=(2, 4)) if refiner \
        else dict(original_size=(40, 40), negative_original_size=(24, 24), guidance_rescale=0.3)
    with torch.no_grad():
        want = i2i(PROMPTS, image=img, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=steps,
                   guidance_scale=5.0, output_type="np", **extra).images
    got = pipe.generate(PROMPTS, negative_prompt=NEGATIVE, steps=steps, guidance_scale=5.0, sampler=sampler,
                        seed=seed, init_image=img, strength=strength, latents=noise, output_type="np",
                        progress=False, **extra)
    assert sd_tests.psnr(got, want) >= PSNR_MIN, sd_tests.psnr(got, want)


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler", 1.0), ("dpmpp_2m", 0.7)])
def test_inpainting_matches_diffusers(pipeline_dirs, monkeypatch, sampler, strength):
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as mod
    folder, ref, pipe = _pipes(pipeline_dirs)
    steps, seed = 5, 2
    img, mask = sd_tests._test_images(H, W, seed=3)
    x_t = _image_latents(pipe, 4)
    sd_tests._mean_latents(monkeypatch, mod)
    inp = _xl("StableDiffusionXLInpaintPipeline", ref)
    inp.scheduler = sd_tests._scheduler(folder, sampler)
    if strength < 1.0:  # sdjax draws x_T from the seed and noises the image with it; diffusers: randn_tensor
        x_t = None
        noise = np.asarray(gen.initial_noise(seed, LATENT)).transpose(0, 3, 1, 2).copy()
        monkeypatch.setattr(mod, "randn_tensor", lambda shape, **k: torch.from_numpy(noise))
    with torch.no_grad():
        want = inp(PROMPTS, image=img, mask_image=mask, negative_prompt=NEGATIVE, num_inference_steps=steps,
                   guidance_scale=5.0, height=H, width=W, strength=strength, output_type="np",
                   latents=None if x_t is None else torch.from_numpy(x_t)).images
    got = pipe.generate(PROMPTS, negative_prompt=NEGATIVE, steps=steps, guidance_scale=5.0, sampler=sampler,
                        seed=seed, init_image=img, mask=mask, strength=strength, output_type="np", progress=False,
                        latents=x_t)
    assert sd_tests.psnr(got, want) >= PSNR_MIN, sd_tests.psnr(got, want)


@pytest.mark.parametrize("sampler,cut", [("dpmpp_2m", 0.6), ("euler_a", 0.8)] + [  # the rest: slow (CI time)
    pytest.param(s, c, marks=pytest.mark.slow) for s, c in (("euler", 0.7), ("heun", 0.75), ("unipc", 0.7), ("ddim", 0.5))])
def test_base_and_refiner_ensemble_matches_diffusers(pipeline_dirs, monkeypatch, sampler, cut):
    """The base stops at denoising_end and hands its latents to the refiner, which starts at the
    same point (denoising_start), both as diffusers cuts the discrete schedule."""
    import diffusers
    folder, ref, base = _pipes(pipeline_dirs)
    r_folder, r_ref, refiner = _pipes(pipeline_dirs, "sdxl-refiner")
    steps, seed = 8, 4
    x_t = _image_latents(base, 6)
    # DDIM's clip_sample (on by default over SDXL's Euler config) clamps the tiny random model's
    # x0 at +-1, which turns float32 rounding into ~76 dB; the clamp's parity is txt2img's to test
    overrides = {"clip_sample": False} if sampler == "ddim" else {}
    for pipe_ref, f in ((ref, folder), (r_ref, r_folder)):
        cls, kw = DIFFUSERS_SCHEDULERS[sampler]
        pipe_ref.scheduler = getattr(diffusers, cls).from_pretrained(f, subfolder="scheduler", **kw, **overrides)
    kw = dict(negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=5.0)
    sd_tests._inject_step_noise(monkeypatch, sampler, seed, LATENT)
    with torch.no_grad():
        lat_want = ref(PROMPTS, height=H, width=W, latents=torch.from_numpy(x_t), denoising_end=cut,
                       output_type="latent", **kw).images
    sd_tests._inject_step_noise(monkeypatch, sampler, seed, LATENT)  # the refiner's calls count from 0
    with torch.no_grad():
        want = r_ref(PROMPTS, image=lat_want, denoising_start=cut, output_type="np", aesthetic_score=5.0, **kw).images
    s = dict(negative_prompt=NEGATIVE, steps=steps, guidance_scale=5.0, sampler=sampler, seed=seed, progress=False,
             scheduler_overrides=overrides)
    lat = base.generate(PROMPTS, height=H, width=W, latents=x_t, denoising_end=cut, output_type="latent", **s)
    assert lat.shape == tuple(lat_want.shape) and lat.dtype == np.float32
    assert rel_err(lat, lat_want.numpy()) <= 1e-4
    got = refiner.generate(PROMPTS, init_latents=lat, denoising_start=cut, output_type="np", aesthetic_score=5.0, **s)
    assert sd_tests.psnr(got, want) >= PSNR_MIN, sd_tests.psnr(got, want)


@pytest.mark.parametrize("sampler", ["euler", "heun", "plms", "dpmpp_2m"])
def test_denoising_cut_is_diffusers_discrete_threshold(pipeline_dirs, sampler):
    """The plan's calls are the scheduler timesteps diffusers' SDXL pipelines keep."""
    import samplers
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
        StableDiffusionXLImg2ImgPipeline)
    folder, _, pipe = _pipes(pipeline_dirs)
    sched = sd_tests._scheduler(folder, sampler)
    s, schedule = samplers.get(sampler), samplers.Schedule.from_config(pipe.scheduler_config)
    for steps, cut in ((10, 0.8), (7, 0.55), (25, 0.3)):
        sched.set_timesteps(steps)
        every = sched.timesteps.numpy()
        cutoff = int(round(1000 - cut * 1000))
        end = s.plan(schedule, steps, denoising_end=cut)
        np.testing.assert_array_equal(end.timesteps, every[every >= cutoff].astype(np.float32))
        start = s.plan(schedule, steps, denoising_start=cut)
        fake = type("P", (), {"scheduler": sched})()
        want, n = StableDiffusionXLImg2ImgPipeline.get_timesteps(fake, steps, 1.0, "cpu", denoising_start=cut)
        np.testing.assert_array_equal(start.timesteps, want.numpy().astype(np.float32))
        assert start.num_calls == n


def test_guidance_rescale_matches_diffusers_for_sd(pipeline_dirs):
    folder, ref = pipeline_dirs("sd1")
    pipe = sdjax.load(folder, progress=False)
    ref.scheduler = sd_tests._scheduler(folder, "euler")
    x_t = sd_tests._latents(pipe, 2, H, W)
    with torch.no_grad():
        want = ref(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=6.0, height=H, width=W,
                   latents=torch.from_numpy(x_t), output_type="np", guidance_rescale=0.7).images
    got = pipe.generate(PROMPTS, negative_prompt=NEGATIVE, steps=4, guidance_scale=6.0, sampler="euler", height=H,
                        width=W, latents=x_t, output_type="np", progress=False, guidance_rescale=0.7)
    plain = pipe.generate(PROMPTS, negative_prompt=NEGATIVE, steps=4, guidance_scale=6.0, sampler="euler", height=H,
                          width=W, latents=x_t, output_type="np", progress=False)
    assert sd_tests.psnr(got, want) >= PSNR_MIN and sd_tests.psnr(got, plain) < PSNR_MIN


# --- compile once, VAE upcast --------------------------------------------------------------------------

def test_prompt_seed_guidance_and_micro_conditioning_do_not_recompile(pipeline_dirs):
    _, _, base = _pipes(pipeline_dirs)
    _, _, refiner = _pipes(pipeline_dirs, "sdxl-refiner")
    kw = dict(steps=3, sampler="euler_a", height=H, width=W, output_type="np", progress=False)
    a = base.generate("a red circle", guidance_scale=7.0, seed=1, **kw)
    n = gen.denoise_step._cache_size()
    b = base.generate("the blue square", negative_prompt="green", guidance_scale=3.0, seed=2, guidance_rescale=0.7,
                      original_size=(512, 512), crops_coords_top_left=(16, 0), target_size=(64, 64), **kw)
    c = base.generate("a red circle", guidance_scale=7.0, seed=1, original_size=(1024, 768), **kw)
    assert gen.denoise_step._cache_size() == n
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    np.testing.assert_array_equal(a, base.generate("a red circle", guidance_scale=7.0, seed=1, **kw))
    img = (a[0] * 255).round().astype(np.uint8)
    r1 = refiner.generate("a cat", init_image=img, strength=0.5, **kw)
    n = gen.denoise_step._cache_size()
    r2 = refiner.generate("a dog", init_image=img, strength=0.5, aesthetic_score=9.0, negative_aesthetic_score=0.0,
                          **kw)
    assert gen.denoise_step._cache_size() == n and not np.array_equal(r1, r2)


def test_float16_vae_decodes_in_float32_when_force_upcast(pipeline_dirs):
    folder, _, _ = _pipes(pipeline_dirs)
    pipe = sdjax.load(folder, dtype="float16", progress=False)
    assert pipe.configs["vae"].force_upcast
    dtypes = lambda p: {a.dtype for a in __import__("jax").tree.leaves(p)}  # noqa: E731
    assert dtypes(gen.vae_params(pipe, "decode")) == {np.dtype("float32")}
    assert dtypes(gen.vae_params(pipe, "encode")) == {np.dtype("float32")}
    safe = dataclasses.replace(pipe, configs=dict(pipe.configs, vae=dataclasses.replace(pipe.configs["vae"],
                                                                                    force_upcast=False)))
    assert dtypes(gen.vae_params(safe, "decode")) == {np.dtype("float16")}
    sd = sdjax.load(pipeline_dirs("sd1")[0], dtype="float16", progress=False)  # diffusers' SD pipelines never upcast
    assert dtypes(gen.vae_params(sd, "decode")) == {np.dtype("float16")}
    x_t = _image_latents(pipe, 0)
    lat = pipe.generate(PROMPTS, steps=2, sampler="euler", latents=x_t, height=H, width=W, output_type="latent",
                        progress=False)
    got = pipe.generate(PROMPTS, steps=2, sampler="euler", latents=x_t, height=H, width=W, output_type="np",
                        progress=False)
    want = np.asarray(gen.decode_images(gen.vae_params(pipe, "decode"), pipe.configs["vae"], lat.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all()


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("style,kwargs,match", [
    ("sdxl-refiner", {}, r"is an SDXL refiner \(5 time ids: original size .* aesthetic score\): it refines"),
    ("sd1", dict(original_size=(64, 64)), "original_size: only SDXL models take micro-conditioning"),
    ("sd1", dict(crops_coords_top_left=(0, 0)), "crops_coords_top_left: only SDXL models"),
    ("sdxl", dict(aesthetic_score=6.0), r"aesthetic_score: only the SDXL refiner takes it; .* SDXL base \(6 time ids"),
    ("sdxl-refiner", dict(target_size=(32, 32), init_image=np.zeros((H, W, 3), np.float32)),
     r"target_size: only the SDXL base takes it; .* SDXL refiner \(5 time ids"),
    ("sdxl", dict(original_size=(64,)), r"original_size=\(64,\): must be two integers >= 1"),
    ("sdxl", dict(original_size=(0, 64)), "original_size=.*must be two integers >= 1"),
    ("sdxl", dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left=.*must be two integers >= 0"),
    ("sdxl", dict(negative_target_size="64"), "negative_target_size='64': must be two integers"),
    ("sdxl", dict(aesthetic_score=float("nan")), "aesthetic_score=nan: must be a finite number"),
    ("sdxl", dict(guidance_rescale=1.5), r"guidance_rescale=1.5: must be in \[0, 1\]"),
    ("sdxl", dict(denoising_end=1.0), "denoising_end=1.0: must be a fraction strictly between 0 and 1"),
    ("sdxl", dict(denoising_start=0.8, denoising_end=0.5), "denoising_start=0.8 must be below denoising_end=0.5"),
    ("sdxl", dict(denoising_start=0.5), "denoising_start: continues an init_image or init_latents"),
    ("sdxl", dict(denoising_start=0.5, strength=0.5, init_latents=np.zeros((1, 4, 16, 16), np.float32)),
     "strength: not used with denoising_start"),
    ("sdxl", dict(init_latents=np.zeros((1, 4, 8, 8), np.float32), height=H, width=W),
     r"init_latents: shape \(1, 4, 8, 8\), expected \(1, 4, 16, 16\)"),
    ("sdxl", dict(denoising_end=0.01, steps=2), "denoising_end 0.01 with 2 steps leaves no denoising step"),
    ("sdxl", dict(output_type="latents"), "output_type='latents': must be one of 'pil', 'np', 'latent'"),
])
def test_bad_arguments_are_named(pipeline_dirs, style, kwargs, match):
    folder = pipeline_dirs(style)[0]
    pipe = sdjax.load(folder, progress=False)
    with pytest.raises(gen.GenerationError, match=match):
        pipe.generate("a cat", **dict(dict(height=H, width=W, steps=2, progress=False), **kwargs))


def test_one_text_encoders_states_for_the_base_unet_are_named(pipeline_dirs):
    _, _, pipe = _pipes(pipeline_dirs)
    params = {k: v for k, v in pipe.params.items() if k != "text_encoder"}
    one = dataclasses.replace(pipe, params=params)
    with pytest.raises(ValueError, match=r"text encoders give 48 features \(text_encoder_2 48\), the UNet "
                                         r"cross-attends to 80: SDXL's base concatenates"):
        one.encode_prompt_sdxl(["a cat"])
    context, pooled = conditioning.encode(pipe, ["a cat"])
    ids = np.zeros((2, 6), np.float32)
    import samplers
    s = samplers.get("euler")
    plan = s.plan(samplers.Schedule.from_config(pipe.scheduler_config), 2)
    state = s.init(plan, np.zeros((1, 16, 16, 4), np.float32))
    run = lambda ctx, cond: gen.denoise(pipe.params["unet"], pipe.configs["unet"], s, plan, state, ctx, 5.0,  # noqa
                                        added_cond=cond)
    with pytest.raises(ValueError, match="encoder_hidden_states has last dimension 48: expected 80"):
        run(context[..., 32:], {"text_embeds": pooled, "time_ids": ids})
    with pytest.raises(ValueError, match=r"time_ids has 5 values per sample: this UNet expects 6 \(SDXL base"):
        run(context, {"text_embeds": pooled, "time_ids": ids[:, :5]})
    with pytest.raises(ValueError, match="needs added_cond"):
        run(context, None)
