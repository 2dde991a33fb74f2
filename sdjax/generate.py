"""The one denoising loop: text-to-image, img2img and inpainting over the pure model functions.

Follows diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline, and for SDXL models (base and
refiner) StableDiffusionXL{,Img2Img,Inpaint}Pipeline, step for step, so the same x_T gives the
same image. The denoising step (guided UNet call + sampler update) is compiled once per (shapes,
sampler, steps); prompt, seed, guidance scale, guidance rescale and SDXL's pooled embeds and
time ids (``sdjax.conditioning``) are traced values, so changing them never recompiles.

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

from . import conditioning, control as control_nets, nn, unet as unet_model, vae as vae_model
from .configs import SDXL_TIME_IDS
from .images import load_mask, load_rgb, to_pil
from .memory import release_if_grown

LOOPS = ("host", "scan")
OUTPUT_TYPES = ("pil", "np", "latent")


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


def check_pair(name, value, minimum=1, error=GenerationError):
    """``value`` as a tuple of two ints >= ``minimum`` (an (H, W) size or a (top, left) crop), else
    ``error`` naming ``name``."""
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum
                              for v in items):
        raise error(f"{name}={value!r}: must be two integers >= {minimum}")
    return tuple(int(v) for v in items)


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
    guidance_rescale: float = 0.0              # diffusers' rescale_noise_cfg factor, in [0, 1]
    # SDXL's ensemble of experts: fractions of the training schedule (see samplers.Sampler.plan)
    denoising_start: float | None = None       # continue init latents/image from here (the refiner)
    denoising_end: float | None = None         # stop here (the base; output_type "latent" for the refiner)
    # SDXL micro-conditioning (sdjax.conditioning.time_ids); None: diffusers' defaults
    original_size: tuple | None = None         # (height, width); default (height, width) of the image
    crops_coords_top_left: tuple | None = None  # (top, left); default (0, 0)
    target_size: tuple | None = None           # (height, width), base only; default (height, width)
    negative_original_size: tuple | None = None
    negative_crops_coords_top_left: tuple | None = None
    negative_target_size: tuple | None = None
    aesthetic_score: float | None = None       # refiner only; default 6.0
    negative_aesthetic_score: float | None = None  # refiner only; default 2.5

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
        set_("guidance_rescale", check_float("guidance_rescale", self.guidance_rescale, 0.0, 1.0))
        for name in ("denoising_start", "denoising_end"):
            v = getattr(self, name)
            if v is not None:
                v = check_float(name, v)
                if not 0.0 < v < 1.0:
                    raise GenerationError(f"{name}={v!r}: must be a fraction strictly between 0 and 1")
                set_(name, v)
        if self.denoising_start is not None and self.denoising_end is not None \
                and self.denoising_start >= self.denoising_end:
            raise GenerationError(f"denoising_start={self.denoising_start} must be below "
                                  f"denoising_end={self.denoising_end}")
        for name in conditioning.MICRO_CONDITIONING:
            v = getattr(self, name)
            if v is None:
                continue
            if name.endswith("aesthetic_score"):
                set_(name, check_float(name, v))
            else:
                set_(name, check_pair(name, v, minimum=0 if "crops" in name else 1))

    def micro_conditioning(self) -> dict:
        """The SDXL micro-conditioning fields that are set: {name: value}."""
        return {k: getattr(self, k) for k in conditioning.MICRO_CONDITIONING if getattr(self, k) is not None}

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


def rescale_noise_cfg(guided, cond, guidance_rescale):
    """diffusers' rescale_noise_cfg (Lin et al. 2023, section 3.4): the guided prediction scaled to
    the text-conditioned one's standard deviation (per sample, over all other axes), mixed in by
    ``guidance_rescale``."""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (jnp.std(cond, axis=axes, keepdims=True, ddof=1)
                         / jnp.std(guided, axis=axes, keepdims=True, ddof=1))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def _guided_step(unet_params, config, sampler, plan, state, context, guidance_scale, seed, extra, controlnets=()):
    """One model call: the UNet (and ControlNets) on (negative, positive) as one batch, guidance, sampler update.

    extra: {} for txt2img/img2img; {"cond": (B, h, w, 5)} mask + masked-image latents for a
    9-channel UNet; {"image": latents, "mask": m, "noise": n} for mask blending with an ordinary
    UNet (diffusers' init_latents_proper: the known region re-noised to the next call's level);
    "added_cond": SDXL's {"text_embeds": (2B, P), "time_ids": (2B, n)}, negative rows first;
    "guidance_rescale": () rescale_noise_cfg's factor (0: plain guidance); "control": the ControlNets'
    inputs (``control.inputs``) when ``controlnets`` (their configs) is not empty.
    """
    x_in, t = sampler.model_input(plan, state)
    x_in = x_in.astype(jnp.float32)
    residuals = {}
    if controlnets:
        residuals = control_nets.residuals(controlnets, extra["control"], jnp.concatenate([x_in, x_in]), t, context,
                                           extra.get("added_cond"), state.index)
    if "cond" in extra:
        x_in = jnp.concatenate([x_in, extra["cond"]], axis=-1)
    out = unet_model.apply(unet_params, config, jnp.concatenate([x_in, x_in]), t, context,
                           added_cond=extra.get("added_cond"), **residuals)
    uncond, cond = jnp.split(out.astype(jnp.float32), 2)
    guided = uncond + guidance_scale * (cond - uncond)
    if "guidance_rescale" in extra:
        r = extra["guidance_rescale"]
        guided = jnp.where(r > 0, rescale_noise_cfg(guided, cond, r), guided)
    index = state.index
    noise = step_noise(seed, index, guided.shape) if sampler.stochastic else None
    new = sampler.step(plan, state, guided, noise)
    if "mask" in extra:
        nxt = jnp.minimum(index + 1, plan.num_calls - 1)
        renoised = samplers.add_noise(plan, extra["image"], extra["noise"], nxt)
        known = jnp.where(index + 1 >= plan.num_calls, extra["image"], renoised)
        new = new.replace(x=(1 - extra["mask"]) * known + extra["mask"] * new.x)
    return new


denoise_step = jax.jit(_guided_step, static_argnames=("config", "sampler", "controlnets"))


@functools.partial(jax.jit, static_argnames=("config", "sampler", "controlnets"))
def denoise_loop(unet_params, config, sampler, plan, state, context, guidance_scale, seed, extra, controlnets=()):
    """All model calls in one program (``lax.fori_loop``)."""
    def body(i, st):
        return _guided_step(unet_params, config, sampler, plan, st, context, guidance_scale, seed, extra, controlnets)
    return jax.lax.fori_loop(0, plan.num_calls, body, state)


def on_device(tree):
    """``tree`` with its NumPy leaves placed on the default device (its device arrays as they are). A jitted
    function called with a NumPy leaf where the last call had a device array (a sweep's one replaced layer)
    misses JAX's C++ dispatch cache and takes the Python path: 8 ms a call, 21 s of an ``sdjax eval``."""
    return jax.tree.map(lambda a: jax.device_put(a) if isinstance(a, np.ndarray) else a, tree)


def denoise(unet_params, config, sampler, plan, state, context, guidance_scale, seed=0, extra=None, *,
            added_cond=None, guidance_rescale=0.0, loop="host", progress=False, desc=None, controlnets=()):
    """Run every model call of ``plan`` from ``state`` (``sampler.init``); returns the final state.

    ``context``: ``[negative contexts; positive contexts]`` stacked on the batch axis (2B rows);
    for an SDXL UNet ``added_cond`` ``{"text_embeds": (2B, P), "time_ids": (2B, n)}`` likewise
    (``sdjax.conditioning``). ``guidance_rescale``: diffusers' rescale_noise_cfg factor.
    ``loop="host"`` runs one compiled step per call (with a progress bar when ``progress``);
    ``"scan"`` compiles the whole loop as one program. ``seed`` draws a stochastic sampler's noise.
    ``controlnets``: the ControlNets' configs, their inputs in ``extra["control"]`` (``control.inputs``)."""
    unet_params = on_device(unet_params)
    g = jnp.asarray(guidance_scale, jnp.float32)
    seed = jnp.asarray(seed, jnp.uint32)
    extra = dict(extra or {}, guidance_rescale=jnp.asarray(guidance_rescale, jnp.float32))
    if added_cond is not None:
        extra["added_cond"] = {k: jnp.asarray(v) for k, v in added_cond.items()}
    if loop == "scan":
        return denoise_loop(unet_params, config, sampler, plan, state, context, g, seed, extra, controlnets)
    for i in tqdm(range(plan.num_calls), desc=desc, unit="step", disable=not progress):
        state = denoise_step(unet_params, config, sampler, plan, state, context, g, seed, extra, controlnets)
        if i == 0:   # the compiler's freed memory, when the first step compiled
            release_if_grown()
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
def unet_output(params, config, sample, timesteps, context, added_cond=None):
    """One UNet call as float32 (noise samples, calibration inputs); ``added_cond`` as ``denoise``'s."""
    return unet_model.apply(params, config, sample, timesteps, context, added_cond=added_cond).astype(jnp.float32)


def vae_scale_factor(vae_config):
    """Image pixels per latent pixel (``VAEConfig.scale_factor``)."""
    return vae_config.scale_factor


def _prompt_lists(prompt, negative_prompt):
    """(prompts, negatives); negatives None when no negative prompt is given."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if negative_prompt is None:
        negatives = None
    else:
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise GenerationError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts")
    if not prompts:
        raise GenerationError("prompt: no prompts given")
    bad = [p for p in prompts + (negatives or []) if not isinstance(p, str)]
    if bad:
        raise GenerationError(f"prompt: prompts must be strings; got {bad[0]!r}")
    return prompts, negatives


def vae_params(pipe, purpose):
    """The VAE params to ``"encode"`` or ``"decode"`` with. SDXL pipelines upcast a VAE whose config
    says ``force_upcast`` to float32 as diffusers' SDXL pipelines do: to encode init images always,
    to decode when the params are float16 (SDXL's VAE overflows in float16; a float16-safe VAE
    has force_upcast false). SD 1.x/2.x pipelines use the VAE as it is, as diffusers' do."""
    params, vcfg = pipe.params["vae"], pipe.configs["vae"]
    if pipe.architecture == "sd" or not vcfg.force_upcast:
        return params
    if purpose == "decode" and params["decoder"]["conv_in"]["bias"].dtype != jnp.float16:  # biases: never quantized
        return params
    up = lambda w: w if nn.is_quantized(w) or not jnp.issubdtype(w.dtype, jnp.floating) \
        else w.astype(jnp.float32)  # noqa: E731
    return jax.tree.map(up, params, is_leaf=nn.is_quantized)


def _check_sdxl_use(pipe, settings, from_image):
    """GenerationErrors for settings the pipeline's architecture does not take."""
    arch = pipe.architecture
    given = settings.micro_conditioning()
    if arch == "sd":
        if given:
            raise GenerationError(f"{next(iter(given))}: only SDXL models take micro-conditioning; {pipe.source} "
                                  "is an SD 1.x/2.x model")
        return
    if arch == "sdxl-refiner":
        if not from_image:
            raise GenerationError(f"{pipe.source} is an SDXL refiner (5 time ids: {_time_ids_text(5)}): it refines an "
                                  "init_image, or a base model's init_latents with denoising_start; text-to-image "
                                  "needs the SDXL base")
        wrong, takes = [k for k in conditioning.BASE_ONLY if k in given], "the SDXL base"
    else:
        wrong, takes = [k for k in conditioning.REFINER_ONLY if k in given], "the SDXL refiner"
    if wrong:
        n = 5 if arch == "sdxl-refiner" else 6
        raise GenerationError(f"{wrong[0]}: only {takes} takes it; {pipe.source} is "
                              f"{'an SDXL refiner' if n == 5 else 'an SDXL base'} ({n} time ids: {_time_ids_text(n)})")


def _time_ids_text(n):
    """What n SDXL time ids hold, e.g. "original size (height, width), crop top-left ..."."""
    return SDXL_TIME_IDS[n].split(": ", 1)[1]


def _check_control(pipe, control, mask, init_latents, settings):
    """GenerationErrors for ControlNet uses diffusers' ControlNet pipelines sdjax follows do not cover,
    ControlErrors for ControlNets that do not fit the UNet; then the control images, opened."""
    for name, given in (("mask", mask is not None), ("init_latents", init_latents is not None),
                        ("denoising_start", settings.denoising_start is not None)):
        if given:
            raise GenerationError(f"{name}: not implemented with a ControlNet (txt2img and img2img with an "
                                  "init_image are: diffusers' StableDiffusion[XL]ControlNet[Img2Img]Pipeline)")
    control_nets.check(control, pipe.configs["unet"], pipe.configs["vae"].latent_channels, pipe.source)
    return control_nets.open_images(control)


def _init_latents(init_latents, b, shape, f):
    """Scaled image latents given as NCHW (a base model's output_type="latent") -> NHWC (b, ...)."""
    a = np.asarray(init_latents, np.float32)
    want = (shape[3], shape[1], shape[2])
    if a.ndim != 4 or a.shape[1:] != want or a.shape[0] not in (1, b):
        raise GenerationError(f"init_latents: shape {a.shape}, expected ({b}, {want[0]}, {want[1]}, {want[2]}) "
                              f"(NCHW: batch, channels, height/{f}, width/{f})")
    if not np.isfinite(a).all():
        raise GenerationError("init_latents: holds NaN or Inf values")
    return jnp.asarray(np.broadcast_to(a.transpose(0, 2, 3, 1), shape))


def run(pipe, prompt, settings: GenerationSettings = GenerationSettings(), negative_prompt=None, latents=None,
        init_image=None, mask=None, output_type="pil", progress=True, init_latents=None, control=None):
    """See ``Pipeline.generate``; ``control``: a ``sdjax.control.Control`` (ControlNets and their inputs)."""
    prompts, negatives = _prompt_lists(prompt, negative_prompt)
    if output_type not in OUTPUT_TYPES:
        raise GenerationError(f"output_type={output_type!r}: must be one of {', '.join(map(repr, OUTPUT_TYPES))}")
    ucfg, vcfg = pipe.configs["unet"], pipe.configs["vae"]
    f = vcfg.scale_factor
    if init_image is not None and init_latents is not None:
        raise GenerationError("init_latents: give init_image or init_latents, not both")
    from_image = init_image is not None or init_latents is not None
    _check_sdxl_use(pipe, settings, from_image)
    size = ucfg.sample_size if isinstance(ucfg.sample_size, int) else 64
    if init_latents is not None and np.ndim(init_latents) == 4:
        size_h, size_w = np.shape(init_latents)[2:]
    else:
        size_h = size_w = size
    height, width = settings.height or size_h * f, settings.width or size_w * f
    opened = _check_control(pipe, control, mask, init_latents, settings) if control is not None else None
    if opened is not None:  # diffusers' ControlNet pipelines: the (init or control) image's size by default
        ch, cw = control_nets.default_size(opened, init_image, max(8, f))
        height, width = settings.height or ch, settings.width or cw
    for name, v in (("height", height), ("width", width)):
        if v % 8 or v % f or v <= 0:
            raise GenerationError(f"{name}={v}: must be a positive multiple of {max(8, f)}")
    inpaint_unet = ucfg.in_channels == 9
    if inpaint_unet and (mask is None or init_image is None):
        raise GenerationError(f"{pipe.source}: a 9-channel inpainting UNet needs init_image and mask"
                              + (" (not init_latents: it encodes the masked image)" if init_latents is not None
                                 else ""))
    if mask is not None and not from_image:
        raise GenerationError("mask: inpainting needs init_image too")
    strength = settings.strength
    if settings.denoising_start is not None:
        if not from_image:
            raise GenerationError("denoising_start: continues an init_image or init_latents (a base model's "
                                  "output_type='latent' with denoising_end); none given")
        if strength is not None:
            raise GenerationError("strength: not used with denoising_start (which sets where denoising starts)")
        strength = 1.0
    if strength is None:
        strength = 0.8 if from_image and mask is None else 1.0
    if not from_image and strength != 1.0:
        raise GenerationError("strength: only used with init_image")

    s = samplers.get(settings.sampler)
    try:
        plan = s.plan(settings.schedule(pipe.scheduler_config), settings.steps,
                      strength=strength if (from_image and mask is None) or (mask is not None and strength < 1.0)
                      else 1.0, denoising_start=settings.denoising_start, denoising_end=settings.denoising_end)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    if plan.num_calls < 1:
        raise GenerationError(f"strength={strength} with steps={settings.steps} leaves no denoising step")

    b = len(prompts)
    shape = (b, height // f, width // f, vcfg.latent_channels)
    control_inputs = None
    if control is not None:
        total = plan.num_calls  # diffusers' controlnet_keep counts the calls before a denoising_end cut
        if settings.denoising_end is not None:
            total = s.plan(settings.schedule(pipe.scheduler_config), settings.steps, strength=strength).num_calls
        control_inputs = control_nets.inputs(control, opened, b, (height, width), shape[1:3], plan.num_calls, total)
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
    added_cond = None
    if pipe.architecture == "sd":
        negatives = [""] * b if negatives is None else negatives
        context = jnp.concatenate([pipe.encode_prompt(negatives, clip_skip), pipe.encode_prompt(prompts, clip_skip)])
    else:
        context, text_embeds = conditioning.encode(pipe, prompts, negatives, clip_skip)
        ids = conditioning.time_ids(ucfg.time_ids_length(text_embeds.shape[-1]), height, width, settings, from_image)
        added_cond = {"text_embeds": text_embeds, "time_ids": jnp.asarray(np.repeat(ids, b, axis=0))}
    extra = {} if control_inputs is None else {"control": control_inputs}
    start_image = None  # the image latents to noise to the plan's start, or pure noise
    image_latents = None
    if init_latents is not None:
        image_latents = _init_latents(init_latents, b, shape, f)
    elif init_image is not None:
        img = jnp.asarray(load_rgb(init_image, (height, width)) * 2 - 1)[None].repeat(b, 0)  # [-1, 1]
        image_latents = encode_latents(vae_params(pipe, "encode"), vcfg, img)
    if mask is not None:
        m = jnp.asarray(load_mask(mask, (height, width)))[None].repeat(b, 0)
        m_lat = nn.upsample_nearest(m, shape[1:3])
        if inpaint_unet:
            masked = encode_latents(vae_params(pipe, "encode"), vcfg, img * (m < 0.5))  # masked -> 0 (grey)
            extra["cond"] = jnp.concatenate([m_lat, masked], axis=-1)
        else:
            extra.update(image=image_latents, mask=m_lat, noise=noise)
        if strength < 1.0 and latents is None:  # diffusers: given latents are always pure noise
            start_image = image_latents
    elif image_latents is not None:
        start_image = image_latents
    state = s.init(plan, noise, start_image)
    if settings.denoising_start is not None:  # diffusers: the image latents as they are, no noise added
        state = state.replace(x=image_latents)
    state = denoise(pipe.params["unet"], ucfg, s, plan, state, context, settings.guidance_scale, settings.seed,
                    extra, added_cond=added_cond, guidance_rescale=settings.guidance_rescale, loop=settings.loop,
                    progress=progress, desc=f"{settings.sampler} {settings.steps} steps",
                    controlnets=control.configs if control is not None else ())
    result = s.result(plan, state)
    if output_type == "latent":
        return np.asarray(result).transpose(0, 3, 1, 2)
    images = np.asarray(decode_images(vae_params(pipe, "decode"), vcfg, result))
    return to_pil(images) if output_type == "pil" else images
