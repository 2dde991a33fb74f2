"""The one denoising loop: text-to-image, img2img and inpainting over the pure model functions.

Follows diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline step for step, so the same x_T
gives the same image. The denoising step (guided UNet call + sampler update) is compiled once
per (shapes, sampler, steps); prompt, seed and guidance scale are traced values, so changing
them never recompiles.

``denoise`` is the loop itself, over prepared contexts and x_T: ``Pipeline.generate`` (``run``),
the evaluator, every calibration run and the self-generated latents all go through it, and
``decode_images`` / ``encode_latents`` are the one jitted VAE decode and encode.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import samplers

from . import nn, unet as unet_model, vae as vae_model
from .images import load_mask, load_rgb, to_pil
from .memory import release_freed_memory

LOOPS = ("host", "scan")
OUTPUT_TYPES = ("pil", "np")


class GenerationError(ValueError):
    """Bad arguments to generate (names the argument and what was expected)."""


def check_int(name, value, minimum=1, error=GenerationError):
    """``value`` as an int >= ``minimum`` (bools refused), else ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise error(f"{name}={value!r}: must be an integer >= {minimum}")
    return int(value)


def check_float(name, value, lo=-math.inf, hi=math.inf, error=GenerationError):
    """``value`` as a finite float in [lo, hi], else ``error`` naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise error(f"{name}={value!r}: must be a number") from None
    if isinstance(value, bool) or not math.isfinite(v):
        raise error(f"{name}={value!r}: must be a finite number")
    if not lo <= v <= hi:
        raise error(f"{name}={value!r}: must be in [{lo:g}, {hi:g}]")
    return v


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How to denoise: what ``Pipeline.generate`` takes besides prompts, x_T and images.

    Checked when made: a bad value raises GenerationError naming the field."""
    steps: int = 25
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"
    seed: int = 0
    height: int | None = None
    width: int | None = None
    clip_skip: int = 0
    strength: float | None = None              # img2img / inpainting; None: 0.8 img2img, 1.0 inpainting
    scheduler_overrides: tuple = ()            # ((key, value), ...) of scheduler config fields
    loop: str = "host"                         # "host": one compiled step a call (progress bar); "scan"

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("steps", check_int("steps", self.steps))
        set_("guidance_scale", check_float("guidance_scale", self.guidance_scale))
        if self.sampler not in samplers.NAMES:
            raise GenerationError(f"unknown sampler {self.sampler!r}; valid: {', '.join(samplers.NAMES)}")
        set_("seed", check_int("seed", self.seed, minimum=0))
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                set_(name, check_int(name, getattr(self, name)))
        set_("clip_skip", check_int("clip_skip", self.clip_skip, minimum=0))
        if self.strength is not None:
            set_("strength", check_float("strength", self.strength, 0.0, 1.0))
        overrides = self.scheduler_overrides
        if isinstance(overrides, dict):
            overrides = tuple(sorted(overrides.items()))
        set_("scheduler_overrides", tuple(overrides or ()))
        for key, value in self.scheduler_overrides:
            if isinstance(value, float) and not math.isfinite(value):
                raise GenerationError(f"scheduler_overrides: {key}={value!r} must be finite")
        if self.loop not in LOOPS:
            raise GenerationError(f"loop={self.loop!r}: must be one of {', '.join(LOOPS)}")

    def schedule(self, scheduler_config):
        """The sampler's noise schedule from a scheduler config dict with this run's overrides."""
        return samplers.Schedule.from_config(scheduler_config, **dict(self.scheduler_overrides))


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


def denoise(unet_params, config, sampler, plan, state, context, guidance_scale, seed=0, extra=None, *,
            loop="host", progress=False, desc=None):
    """Run every model call of ``plan`` from ``state`` (``sampler.init``); returns the final state.

    ``context``: ``[negative contexts; positive contexts]`` stacked on the batch axis (2B rows).
    ``loop="host"`` runs one compiled step per call (with a progress bar when ``progress``);
    ``"scan"`` compiles the whole loop as one program. ``seed`` draws a stochastic sampler's noise."""
    g = jnp.asarray(guidance_scale, jnp.float32)
    seed = jnp.asarray(seed, jnp.uint32)
    extra = {} if extra is None else extra
    if loop == "scan":
        return denoise_loop(unet_params, config, sampler, plan, state, context, g, seed, extra)
    for i in tqdm(range(plan.num_calls), desc=desc, unit="step", disable=not progress):
        state = denoise_step(unet_params, config, sampler, plan, state, context, g, seed, extra)
        if i == 0:
            release_freed_memory()
    return state


@functools.partial(jax.jit, static_argnames="config")
def encode_latents(params, config, images):
    """images in [-1, 1] (NHWC) -> scaled latents: the distribution's mean (diffusers samples it)."""
    mean, _ = vae_model.encode(params, config, images)
    return mean.astype(jnp.float32) * config.scaling_factor


@functools.partial(jax.jit, static_argnames="config")
def decode_images(params, config, latents):
    """Scaled latents (NHWC) -> float32 images in [0, 1]."""
    img = vae_model.decode(params, config, latents / config.scaling_factor)
    return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0, 1)


@functools.partial(jax.jit, static_argnames="config")
def unet_output(params, config, sample, timesteps, context):
    """One UNet call as float32 (noise samples, calibration inputs)."""
    return unet_model.apply(params, config, sample, timesteps, context).astype(jnp.float32)


def vae_scale_factor(vae_config):
    """Image pixels per latent pixel (``VAEConfig.scale_factor``)."""
    return vae_config.scale_factor


def _prompt_lists(prompt, negative_prompt):
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if not prompts or len(negatives) != len(prompts):
        raise GenerationError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts")
    bad = [p for p in prompts + negatives if not isinstance(p, str)]
    if bad:
        raise GenerationError(f"prompt: prompts must be strings; got {bad[0]!r}")
    return prompts, negatives


def run(pipe, prompt, settings: GenerationSettings = GenerationSettings(), negative_prompt="", latents=None,
        init_image=None, mask=None, output_type="pil", progress=True):
    """See ``Pipeline.generate``."""
    prompts, negatives = _prompt_lists(prompt, negative_prompt)
    if output_type not in OUTPUT_TYPES:
        raise GenerationError(f"output_type={output_type!r}: must be 'pil' or 'np'")
    ucfg, vcfg = pipe.configs["unet"], pipe.configs["vae"]
    f = vcfg.scale_factor
    size = ucfg.sample_size if isinstance(ucfg.sample_size, int) else 64
    height, width = settings.height or size * f, settings.width or size * f
    for name, v in (("height", height), ("width", width)):
        if v % 8 or v % f or v <= 0:
            raise GenerationError(f"{name}={v}: must be a positive multiple of {max(8, f)}")
    inpaint_unet = ucfg.in_channels == 9
    if inpaint_unet and (mask is None or init_image is None):
        raise GenerationError(f"{pipe.source}: a 9-channel inpainting UNet needs init_image and mask")
    if mask is not None and init_image is None:
        raise GenerationError("mask: inpainting needs init_image too")
    strength = settings.strength
    if strength is None:
        strength = 0.8 if init_image is not None and mask is None else 1.0
    if init_image is None and strength != 1.0:
        raise GenerationError("strength: only used with init_image")

    s = samplers.get(settings.sampler)
    plan = s.plan(settings.schedule(pipe.scheduler_config), settings.steps,
                  strength=strength if (init_image is not None and mask is None)
                  or (mask is not None and strength < 1.0) else 1.0)
    if plan.num_calls < 1:
        raise GenerationError(f"strength={strength} with steps={settings.steps} leaves no denoising step")

    b = len(prompts)
    shape = (b, height // f, width // f, vcfg.latent_channels)
    if latents is not None:
        latents = np.asarray(latents, np.float32)
        want = (b, shape[3], shape[1], shape[2])
        if latents.shape != want:
            raise GenerationError(f"latents: shape {latents.shape}, expected {want} (NCHW: batch, "
                                  f"channels, height/{f}, width/{f})")
        if not np.isfinite(latents).all():
            raise GenerationError("latents: x_T holds NaN or Inf values")
        noise = jnp.asarray(latents.transpose(0, 2, 3, 1))
    else:
        noise = initial_noise(settings.seed, shape)

    clip_skip = settings.clip_skip
    context = jnp.concatenate([pipe.encode_prompt(negatives, clip_skip), pipe.encode_prompt(prompts, clip_skip)])
    extra = {}
    start_image = None  # the image latents to noise to the plan's start, or pure noise
    if init_image is not None:
        img = jnp.asarray(load_rgb(init_image, (height, width)) * 2 - 1)[None].repeat(b, 0)  # [-1, 1]
        if mask is not None:
            m = jnp.asarray(load_mask(mask, (height, width)))[None].repeat(b, 0)
            m_lat = nn.upsample_nearest(m, shape[1:3])
            if inpaint_unet:
                masked = encode_latents(pipe.params["vae"], vcfg, img * (m < 0.5))  # masked -> 0 (grey)
                extra["cond"] = jnp.concatenate([m_lat, masked], axis=-1)
            image_latents = encode_latents(pipe.params["vae"], vcfg, img)
            if not inpaint_unet:
                extra.update(image=image_latents, mask=m_lat, noise=noise)
            if strength < 1.0 and latents is None:  # diffusers: given latents are always pure noise
                start_image = image_latents
        else:
            start_image = encode_latents(pipe.params["vae"], vcfg, img)
    state = denoise(pipe.params["unet"], ucfg, s, plan, s.init(plan, noise, start_image), context,
                    settings.guidance_scale, settings.seed, extra, loop=settings.loop, progress=progress,
                    desc=f"{settings.sampler} {settings.steps} steps")
    images = np.asarray(decode_images(pipe.params["vae"], vcfg, s.result(plan, state)))
    return to_pil(images) if output_type == "pil" else images
