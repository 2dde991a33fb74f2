"""Both sides of the sampler parity tests: diffusers' schedulers driven the way the Stable
Diffusion pipelines drive them, and samplers' plans run under jit + lax.scan, with the same
toy model, the same x_T and the same injected step noise."""
from __future__ import annotations

import contextlib
import functools
import importlib

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

import samplers
from tiny_models import DIFFUSERS_SCHEDULERS

diffusers.utils.logging.set_verbosity_error()

# Stable Diffusion 1.5's scheduler_config.json (a PNDMScheduler config, as shipped)
SD_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
DIFFUSERS = DIFFUSERS_SCHEDULERS
SHAPE = (1, 4, 8, 8)
TOLERANCE = 1e-5


def toy_model(x, t, np_=jnp):
    """A deterministic stand-in for the UNet, nonlinear in x and t."""
    return 0.1 * x * np_.cos(t / 100) + 0.05 * np_.sin(x + t / 300)


def inputs(seed=0, calls=64):
    """x_T, clean image latents, and one noise array per model call."""
    g = np.random.default_rng(seed)
    f = lambda *s: g.standard_normal(s).astype(np.float32)  # noqa: E731
    return f(*SHAPE), f(*SHAPE), f(calls, *SHAPE)


@contextlib.contextmanager
def injected_noise(scheduler, noises, counter):
    """Make the scheduler module's randn_tensor return noises[counter[0]] (the current call)."""
    module = importlib.import_module(type(scheduler).__module__)
    original = getattr(module, "randn_tensor", None)
    module.randn_tensor = lambda shape, **kw: torch.from_numpy(noises[counter[0]]).to(kw.get("dtype") or torch.float32)
    try:
        yield
    finally:
        if original is not None:
            module.randn_tensor = original


def diffusers_run(name, config, steps, x_T, noises, strength=1.0, image=None, eta=0.0, noised_image=None):
    """Latents after every call and the timesteps fed to the model, as StableDiffusion(Img2Img)Pipeline
    runs them; noised_image[i] = scheduler.add_noise(image, x_T, timesteps[i + 1]) after call i
    (inpainting's known region) when image is given."""
    cls, kw = DIFFUSERS[name]
    scheduler = getattr(diffusers, cls).from_config(config, **kw)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    x_T = torch.from_numpy(x_T)
    if strength < 1:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):  # PNDM has none
            scheduler.set_begin_index(t_start * scheduler.order)
        x = scheduler.add_noise(torch.from_numpy(image), x_T, timesteps[:1])
    else:
        x = x_T * scheduler.init_noise_sigma
    extra = {"eta": eta} if name == "ddim" else {}
    counter, trajectory, fed, blended = [0], [], [], []
    with injected_noise(scheduler, noises, counter):
        for i, t in enumerate(timesteps):
            counter[0] = i
            out = toy_model(scheduler.scale_model_input(x, t), t.to(torch.float32), torch)
            x = scheduler.step(out, t, x, **extra).prev_sample
            trajectory.append(x.numpy().copy())
            fed.append(float(t))
            if image is not None and i + 1 < len(timesteps):
                blended.append(scheduler.add_noise(torch.from_numpy(image), x_T, timesteps[i + 1:i + 2]).numpy())
    return np.stack(trajectory), np.array(fed), (np.stack(blended) if blended else None)


@functools.partial(jax.jit, static_argnums=0)
def scan_run(sampler, plan, x_T, noises, image=None):
    """The whole loop as one jitted lax.scan: (latents after every call, timesteps fed)."""
    state = sampler.init(plan, x_T, image)

    def body(state, noise):
        x_in, t = sampler.model_input(plan, state)
        state = sampler.step(plan, state, toy_model(x_in, t), noise)
        return state, (state.x, t)
    state, (trajectory, fed) = jax.lax.scan(body, state, noises[:plan.num_calls])
    return trajectory, fed


def sdjax_run(name, config, steps, x_T, noises, strength=1.0, image=None, **options):
    sampler = samplers.get(name, **options)
    plan = sampler.plan(samplers.Schedule.from_config(config), steps, strength)
    trajectory, fed = scan_run(sampler, plan, x_T, noises, None if strength == 1 else image)
    return np.asarray(trajectory), np.asarray(fed), plan


def stepwise_error(ours, ref):
    """max over calls of max|ours - ref| / max|ref| (each call's latents on their own scale)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(ours, ref))
