"""Calibration runs: the model driven over calibration prompts, for the passes that learn from its inputs.

    settings = Calibration(prompts=("a cat", "a red circle"), steps=25)
    run = hessian_run(pipe, settings)       # run(params) for quant.gptq.collect / apply_recipe(hessian=run)
    run = generation_run(pipe, settings)    # run(params) for quant.calibrate.observe (W8A8 scales)
    x0 = self_generated_latents(pipe, settings)

Every run generates through the pipeline's one denoising loop (``Pipeline.generate``), so the
layers see what ``sdjax generate`` shows them. ``quant`` never drives the pipeline itself: it
takes these ``run(params)`` callbacks.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from samplers import schedule as sch
from sdjax import conditioning
from sdjax.generate import GenerationSettings, check_int, encode_latents, unet_output, vae_params

DEFAULT_TIMESTEPS = 8     # noised samples per prompt of a hessian run (and of the Fisher pass)
DEFAULT_BATCH = 8         # prompts per generation batch
# DDPMScheduler's defaults, for keys a scheduler config leaves out (the training scheduler)
_TRAIN_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                       trained_betas=None, prediction_type="epsilon")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A calibration run's settings: the prompts, how they are generated (batch ``b`` with x_T
    seed ``seed + b``), and the noised samples per prompt (``n_timesteps``) of a hessian run."""
    prompts: tuple
    steps: int = 25
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"
    negative_prompt: str = ""
    seed: int = 0
    batch: int = DEFAULT_BATCH
    n_timesteps: int = DEFAULT_TIMESTEPS

    def __post_init__(self):
        prompts = [self.prompts] if isinstance(self.prompts, str) else list(self.prompts or ())
        if not prompts:
            raise ValueError("prompts: a non-empty list of calibration prompts")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings; got {bad[0]!r}")
        object.__setattr__(self, "prompts", tuple(prompts))
        for name in ("batch", "n_timesteps"):
            check_int(name, getattr(self, name), error=ValueError)
        self.generation()  # checks steps, guidance, sampler and seed

    def generation(self, seed_offset=0):
        """The generation settings of batch ``seed_offset``."""
        return GenerationSettings(steps=self.steps, guidance_scale=self.guidance_scale, sampler=self.sampler,
                                  seed=self.seed + seed_offset)


def noise_schedule(scheduler_config):
    """(alphas_cumprod float64 (T,), prediction_type) of a diffusers scheduler config dict."""
    cfg = dict(_TRAIN_DEFAULTS)
    cfg.update({k: v for k, v in dict(scheduler_config or {}).items() if k in _TRAIN_DEFAULTS})
    if cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"scheduler_config: prediction_type {cfg['prediction_type']!r} is not supported "
                         "(epsilon, v_prediction, sample)")
    return np.asarray(sch.alphas_cumprod(cfg), np.float64), cfg["prediction_type"]


def calibration_samples(n_prompts, n_timesteps, latent_shape, seed=0, num_train_timesteps=1000):
    """The calibration samples' (prompt index, timestep, noise), all from ``seed``.

    Sample ``i * n_timesteps + k`` is prompt ``i`` at a timestep drawn uniformly from the k-th of
    ``n_timesteps`` equal strata of ``[0, num_train_timesteps)``. Returns int32 ``(N,)``, int32
    ``(N,)`` and float32 noise ``(N, *latent_shape)`` (NHWC), ``N = n_prompts * n_timesteps``.
    """
    n_prompts = check_int("n_prompts", n_prompts, error=ValueError)
    n_timesteps = check_int("n_timesteps", n_timesteps, error=ValueError)
    T = check_int("num_train_timesteps", num_train_timesteps, error=ValueError)
    rng = np.random.default_rng([int(seed), 0x5E5])
    strata = (np.arange(n_timesteps)[None] + rng.random((n_prompts, n_timesteps))) * (T / n_timesteps)
    t = np.clip(np.floor(strata), 0, T - 1).astype(np.int32).reshape(-1)
    noise = rng.standard_normal((n_prompts * n_timesteps, *latent_shape), dtype=np.float32)
    prompt = np.repeat(np.arange(n_prompts, dtype=np.int32), n_timesteps)
    return prompt, t, noise


def self_generated_latents(pipe, settings: Calibration, progress=False):
    """x0 latents (NHWC, scaled as the UNet sees them) of the model's own images for the settings'
    prompts: ``pipe.generate`` (batch ``b`` of ``settings.batch`` prompts with seed ``seed + b``),
    encoded back by the VAE (mean of the latent distribution times ``scaling_factor``)."""
    prompts, n = settings.prompts, settings.batch
    out = []
    starts = range(0, len(prompts), n)
    for b, start in enumerate(tqdm(starts, desc="self-generating x0", unit="batch", disable=not progress,
                                   leave=False)):
        images = pipe.generate(list(prompts[start:start + n]), negative_prompt=settings.negative_prompt,
                               settings=settings.generation(b), output_type="np", progress=False)
        out.append(np.asarray(encode_latents(vae_params(pipe, "encode"), pipe.configs["vae"], np.asarray(images) * 2 - 1)))
    return np.concatenate(out)


def _with_params(pipe, params):
    """``pipe`` with ``params``: a pipeline's ``{"text_encoder", "unet", "vae"}`` or the UNet's alone."""
    full = dict(pipe.params, **params) if "unet" in params else dict(pipe.params, unet=params)
    return dataclasses.replace(pipe, params=full)


def generation_run(pipe, settings: Calibration):
    """``run(params)`` for ``quant.calibrate.observe`` (W8A8 activation scales) or
    ``quant.gptq.collect``: the guided generation of the prompts, in one batch with x_T seed
    ``settings.seed``."""
    def run(params):
        return _with_params(pipe, params).generate(list(settings.prompts), negative_prompt=settings.negative_prompt,
                                                   settings=settings.generation(), output_type="np", progress=False)
    return run


def noised_latents(pipe, settings: Calibration, x0):
    """The self-generated latents ``x0`` of ``settings.prompts`` noised at ``settings.n_timesteps``
    timesteps per prompt (``calibration_samples``, from ``settings.seed``) with the scheduler's alphas,
    and the prompts' conditioning as their generation had it (SDXL: pooled embeds and time ids too):
    ``(idx, t, xt, neg, pos)``, ``idx`` the prompt of each noised latent, ``neg`` / ``pos`` the negative
    and the prompts' conditions (``conditioning.prompt_conditions``)."""
    abar, _ = noise_schedule(pipe.scheduler_config)
    idx, t, noise = calibration_samples(len(settings.prompts), settings.n_timesteps, x0.shape[1:], settings.seed,
                                        len(abar))
    a = abar[t][:, None, None, None]
    xt = (np.sqrt(a) * x0[idx] + np.sqrt(1 - a) * noise).astype(np.float32)
    h, w = x0.shape[1] * pipe.vae_scale_factor, x0.shape[2] * pipe.vae_scale_factor
    neg, pos = conditioning.prompt_conditions(pipe, settings.prompts, settings.negative_prompt, h, w)
    return idx, t, xt, neg, pos


def hessian_run(pipe, settings: Calibration, progress=None):
    """``run(params)`` for ``quant.gptq.collect`` (or ``apply_recipe(hessian=run)``) that shows the
    UNet the inputs it serves: (1) the guided generation of the prompts, then (2) the generated
    images, encoded by the VAE, noised at ``n_timesteps`` timesteps per prompt drawn from equal
    strata of the training range (``calibration_samples``), each evaluated with the prompt's and
    the negative context as guidance does.

    Why (2): one sampler schedule visits ``steps`` timesteps only, so every layer that reads the
    timestep embedding (the time MLP, each resnet's ``time_emb_proj``) sees inputs spanning at most
    ``steps`` directions, and GPTQ would move rounding error freely into the rest; another schedule,
    step count or a one-step evaluation then reads it back (measured on the embedded model: uniform
    4-bit one-step latent PSNR 30.8-35.1 dB over calibration sets with (1) alone).

    ``params`` passed to ``run`` are a pipeline's ``{"text_encoder", "unet", "vae"}`` (as
    ``apply_recipe`` passes them) or the UNet's alone (``collect(pipe.params["unet"], run)``); only the
    UNet's probes see inputs from (2), the text encoder's and VAE's from (1)."""
    prompts, n_t, batch = settings.prompts, settings.n_timesteps, settings.batch
    ucfg = pipe.configs["unet"]

    def run(params):
        probed = _with_params(pipe, params)
        bar = tqdm(total=2 * len(prompts), desc="calibration", unit="prompt", leave=False,
                   disable=not (progress if progress is not None else len(prompts) > 8))
        # (1): the generation, its images encoded back (by the probed pipeline: a probed VAE encoder
        # sees its inputs here)
        x0 = self_generated_latents(probed, settings)
        bar.update(len(prompts))
        out = []
        idx, t, xt, neg, pos = noised_latents(probed, settings, x0)
        for start in range(0, len(t), batch):
            sel = slice(start, start + batch)
            n = len(t[sel])
            x2 = np.concatenate([xt[sel], xt[sel]])
            t2 = np.concatenate([t[sel], t[sel]]).astype(np.float32)
            context, added = conditioning.guided(neg, conditioning.rows(pos, idx[sel]))
            out.append(unet_output(probed.params["unet"], ucfg, x2, t2, context, added))
            bar.update(n / n_t)
        bar.close()
        return out
    return run


__all__ = ["Calibration", "DEFAULT_TIMESTEPS", "calibration_samples", "generation_run", "hessian_run",
           "noise_schedule", "noised_latents", "self_generated_latents"]
