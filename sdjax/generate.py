"""Text-to-image, img2img and inpainting over the pure model functions and a sampler.

Follows diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline step for step, so the same x_T
gives the same image. The denoising step (guided UNet call + sampler update) is compiled once
per (shapes, sampler, steps); prompt, seed and guidance scale are traced values, so changing
them never recompiles.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import samplers

from . import nn, unet as unet_model, vae as vae_model
from .images import load_mask, load_rgb, to_pil
from .memory import release_freed_memory


class GenerationError(ValueError):
    """Bad arguments to generate (names the argument and what was expected)."""


def initial_noise(seed, shape):
    """x_T drawn from ``seed`` (NHWC float32)."""
    return jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 0), shape, jnp.float32)


def step_noise(seed, index, shape):
    """The noise a stochastic sampler gets at model call ``index`` (NHWC float32): the call
    index folded into the run's key, so a step's noise does not depend on how the loop runs."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 1), index)
    return jax.random.normal(key, shape, jnp.float32)


def _guided_step(unet_params, config, sampler, plan, state, context, guidance_scale, seed, extra):
    """One model call: the UNet on (negative, positive) as one batch, guidance, sampler update.

    extra: {} for txt2img/img2img; {"cond": (B, h, w, 5)} mask + masked-image latents for a
    9-channel UNet; {"image": latents, "mask": m, "noise": n} for mask blending with an ordinary
    UNet (diffusers' init_latents_proper: the known region re-noised to the next call's level).
    """
    x_in, t = sampler.model_input(plan, state)
    x_in = x_in.astype(jnp.float32)
    if "cond" in extra:
        x_in = jnp.concatenate([x_in, extra["cond"]], axis=-1)
    out = unet_model.apply(unet_params, config, jnp.concatenate([x_in, x_in]), t, context)
    uncond, cond = jnp.split(out.astype(jnp.float32), 2)
    guided = uncond + guidance_scale * (cond - uncond)
    index = state.index
    noise = step_noise(seed, index, guided.shape) if sampler.stochastic else None
    new = sampler.step(plan, state, guided, noise)
    if "mask" in extra:
        nxt = jnp.minimum(index + 1, plan.num_calls - 1)
        renoised = samplers.add_noise(plan, extra["image"], extra["noise"], nxt)
        known = jnp.where(index + 1 >= plan.num_calls, extra["image"], renoised)
        new = new.replace(x=(1 - extra["mask"]) * known + extra["mask"] * new.x)
    return new


denoise_step = jax.jit(_guided_step, static_argnames=("config", "sampler"))


@functools.partial(jax.jit, static_argnames=("config", "sampler"))
def denoise_loop(unet_params, config, sampler, plan, state, context, guidance_scale, seed, extra):
    """All model calls in one program (``lax.fori_loop``)."""
    body = lambda i, st: _guided_step(unet_params, config, sampler, plan, st, context, guidance_scale, seed, extra)
    return jax.lax.fori_loop(0, plan.num_calls, body, state)


@functools.partial(jax.jit, static_argnums=1)
def _encode_latents(params, config, images):
    """images in [-1, 1] -> scaled latents: the distribution's mean (diffusers samples it)."""
    mean, _ = vae_model.encode(params, config, images)
    return mean.astype(jnp.float32) * config.scaling_factor


@functools.partial(jax.jit, static_argnums=1)
def _decode_images(params, config, latents):
    img = vae_model.decode(params, config, latents / config.scaling_factor)
    return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0, 1)


def vae_scale_factor(vae_config):
    """Image pixels per latent pixel: 2 per VAE level after the first (8 for SD)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def run(pipe, prompt, negative_prompt="", steps=25, guidance_scale=7.5, sampler="dpmpp_2m", seed=0,
        height=None, width=None, latents=None, output_type="pil", clip_skip=0, init_image=None,
        strength=None, mask=None, scheduler_overrides=None, loop="host", progress=True):
    """See ``Pipeline.generate``."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if not prompts or len(negatives) != len(prompts):
        raise GenerationError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise GenerationError(f"steps={steps!r}: must be an integer >= 1")
    if sampler not in samplers.NAMES:
        raise GenerationError(f"unknown sampler {sampler!r}; valid: {', '.join(samplers.NAMES)}")
    if output_type not in ("pil", "np"):
        raise GenerationError(f"output_type={output_type!r}: must be 'pil' or 'np'")
    if loop not in ("host", "scan"):
        raise GenerationError(f"loop={loop!r}: must be 'host' or 'scan'")
    ucfg, vcfg = pipe.configs["unet"], pipe.configs["vae"]
    f = vae_scale_factor(vcfg)
    size = ucfg.sample_size if isinstance(ucfg.sample_size, int) else 64
    height, width = height or size * f, width or size * f
    for name, v in (("height", height), ("width", width)):
        if v % 8 or v % f or v <= 0:
            raise GenerationError(f"{name}={v}: must be a positive multiple of {max(8, f)}")
    inpaint_unet = ucfg.in_channels == 9
    if inpaint_unet and (mask is None or init_image is None):
        raise GenerationError(f"{pipe.source}: a 9-channel inpainting UNet needs init_image and mask")
    if mask is not None and init_image is None:
        raise GenerationError("mask: inpainting needs init_image too")
    if strength is None:
        strength = 0.8 if init_image is not None and mask is None else 1.0
    if not 0.0 <= float(strength) <= 1.0:
        raise GenerationError(f"strength={strength}: must be in [0, 1]")
    if init_image is None and strength != 1.0:
        raise GenerationError("strength: only used with init_image")

    s = samplers.get(sampler)
    sched = samplers.Schedule.from_config(pipe.scheduler_config, **(scheduler_overrides or {}))
    plan = s.plan(sched, steps, strength=float(strength) if (init_image is not None and mask is None)
                  or (mask is not None and strength < 1.0) else 1.0)
    if plan.num_calls < 1:
        raise GenerationError(f"strength={strength} with steps={steps} leaves no denoising step")

    b = len(prompts)
    shape = (b, height // f, width // f, vcfg.latent_channels)
    if latents is not None:
        latents = np.asarray(latents, np.float32)
        want = (b, shape[3], shape[1], shape[2])
        if latents.shape != want:
            raise GenerationError(f"latents: shape {latents.shape}, expected {want} (NCHW: batch, "
                                  f"channels, height/{f}, width/{f})")
        noise = jnp.asarray(latents.transpose(0, 2, 3, 1))
    else:
        noise = initial_noise(seed, shape)

    context = jnp.concatenate([pipe.encode_prompt(negatives, clip_skip), pipe.encode_prompt(prompts, clip_skip)])
    extra = {}
    start_image = None  # the image latents to noise to the plan's start, or pure noise
    if init_image is not None:
        img = jnp.asarray(load_rgb(init_image, (height, width)) * 2 - 1)[None].repeat(b, 0)  # [-1, 1]
        if mask is not None:
            m = jnp.asarray(load_mask(mask, (height, width)))[None].repeat(b, 0)
            m_lat = nn.upsample_nearest(m, shape[1:3])
            if inpaint_unet:
                masked = _encode_latents(pipe.params["vae"], vcfg, img * (m < 0.5))  # masked -> 0 (grey)
                extra["cond"] = jnp.concatenate([m_lat, masked], axis=-1)
            image_latents = _encode_latents(pipe.params["vae"], vcfg, img)
            if not inpaint_unet:
                extra.update(image=image_latents, mask=m_lat, noise=noise)
            if strength < 1.0 and latents is None:  # diffusers: given latents are always pure noise
                start_image = image_latents
        else:
            start_image = _encode_latents(pipe.params["vae"], vcfg, img)
    state = s.init(plan, noise, start_image)

    g = jnp.asarray(guidance_scale, jnp.float32)
    seed_arr = jnp.asarray(seed, jnp.uint32)
    up = pipe.params["unet"]
    if loop == "scan":
        state = denoise_loop(up, ucfg, s, plan, state, context, g, seed_arr, extra)
    else:
        bar = tqdm(range(plan.num_calls), desc=f"{sampler} {steps} steps", unit="step", disable=not progress)
        for i in bar:
            state = denoise_step(up, ucfg, s, plan, state, context, g, seed_arr, extra)
            if i == 0:
                release_freed_memory()
    images = np.asarray(_decode_images(pipe.params["vae"], vcfg, s.result(plan, state)))
    return to_pil(images) if output_type == "pil" else images
