"""Samplers that work on the discrete DDPM chain x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps:
DDIM, PLMS (PNDM without Runge-Kutta warm-up) and LCM. The model sees x unscaled."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from . import schedule as sch
from .base import Sampler, clip_x0, combine, eps_coefficients, x0_coefficients

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
              trained_betas=None)


def _vp(alpha_bar):
    """(signal, noise) scales of the DDPM latent at cumulative alpha ``alpha_bar``."""
    return np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)


@dataclasses.dataclass(frozen=True)
class DDIM(Sampler):
    """DDIM (Song et al. 2021), diffusers' DDIMScheduler.

    Per step t -> t' = t - T // steps (diffusers' stride whatever the spacing):
    x0 = clip((x - sqrt(1-a_t) eps) / sqrt(a_t)); std = eta * sqrt((1-a_t')/(1-a_t) (1 - a_t/a_t'));
    x' = sqrt(a_t') x0 + sqrt(1 - a_t' - std^2) eps + std * noise, with a_t' = 1 (or abar_0 when
    set_alpha_to_one is false) past the end of the chain.
    """
    eta: float = 0.0
    name = "ddim"
    diffusers_class = "DDIMScheduler"
    defaults = dict(_BETAS, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                    prediction_type="epsilon", thresholding=False, clip_sample_range=1.0,
                    timestep_spacing="leading", rescale_betas_zero_snr=False)

    def __post_init__(self):
        if not self.eta >= 0:
            raise ValueError(f"ddim: eta must be >= 0, got {self.eta!r}")

    @property
    def stochastic(self):
        return self.eta > 0

    def _tables(self, cfg, steps, start):
        abar = sch.alphas_cumprod(cfg)
        final = 1.0 if cfg["set_alpha_to_one"] else abar[0]
        t = sch.spaced_timesteps(cfg, steps).round().astype(np.int64)
        prev = t - cfg["num_train_timesteps"] // steps
        a_t, a_prev = abar[t], np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * np.sqrt(var)
        x0_x, x0_out = x0_coefficients(cfg["prediction_type"], *_vp(a_t))
        eps_x, eps_out = eps_coefficients(cfg["prediction_type"], *_vp(a_t))
        coef = dict(x0_x=x0_x, x0_out=x0_out, eps_x=eps_x, eps_out=eps_out, to_x0=np.sqrt(a_prev),
                    to_eps=np.sqrt(np.maximum(1 - a_prev - std ** 2, 0)), noise=std)
        return dict(timesteps=t[start:], signal=np.sqrt(a_t)[start:], noise_level=np.sqrt(1 - a_t)[start:],
                    coef={k: v[start:] for k, v in coef.items()})

    def _update(self, plan, c, state, out, noise):
        x = state.x
        x0 = clip_x0(plan, c["x0_x"] * x + c["x0_out"] * out)
        eps = c["eps_x"] * x + c["eps_out"] * out
        x = c["to_x0"] * x0 + c["to_eps"] * eps
        if noise is not None and self.stochastic:
            x = x + c["noise"] * noise
        return state.replace(x=x)


# Adams-Bashforth weights of PLMS by call counter, over [newest output, older outputs...]
_PLMS_WEIGHTS = ([1, 0, 0, 0], [1 / 2, 1 / 2, 0, 0], [3 / 2, -1 / 2, 0, 0],
                 [23 / 12, -16 / 12, 5 / 12, 0], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


@dataclasses.dataclass(frozen=True)
class PLMS(Sampler):
    """PLMS (Liu et al. 2022, pseudo linear multistep), diffusers' PNDMScheduler with skip_prk_steps.

    The transfer x_t -> x_t' of the DDIM ODE for a noise estimate e is
    x' = sqrt(a_t'/a_t) x - (a_t' - a_t) e / (a_t sqrt(1-a_t') + sqrt(a_t (1-a_t) a_t')).
    Calls run at [t_{N-1}, t_{N-2}, t_{N-2}, t_{N-3}, ..., t_0] (steps + 1 calls): call 0 is an
    Euler step from t_{N-1}; call 1 redoes it from the same x with the mean of both outputs
    (a Heun step, t_{N-2} + stride -> t_{N-2}); later calls use Adams-Bashforth of orders 2, 3, 4
    over the outputs of calls 0, 2, 3, ... (call 1's output is not kept, as diffusers).
    """
    name = "plms"
    diffusers_class = "PNDMScheduler"
    history = 3
    defaults = dict(_BETAS, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon",
                    timestep_spacing="leading", steps_offset=0)
    pinned = dict(skip_prk_steps=True)
    allowed = dict(prediction_type=("epsilon", "v_prediction"), skip_prk_steps=(True,))

    def _tables(self, cfg, steps, start):
        abar = sch.alphas_cumprod(cfg)
        final = 1.0 if cfg["set_alpha_to_one"] else abar[0]
        stride = cfg["num_train_timesteps"] // steps
        up = sch.spaced_timesteps(cfg, steps)[::-1].round().astype(np.int64)  # ascending
        calls = np.concatenate([up[:-1], up[-2:-1], up[-1:]])[::-1][start:]
        n = len(calls)
        counter = np.arange(n)
        t = np.where(counter == 1, calls + stride, calls)
        prev = np.where(counter == 1, calls, calls - stride)
        a_t, a_prev = abar[t], np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
        e_x, e_m = eps_coefficients(cfg["prediction_type"], *_vp(a_t))
        denom = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
        coef = dict(weights=np.array([_PLMS_WEIGHTS[min(c, 4)] for c in counter]),
                    eps_x=e_x, eps_m=e_m, keep=np.sqrt(a_prev / a_t), step=-(a_prev - a_t) / denom,
                    save=counter == 0, use_saved=counter == 1, push=counter != 1)
        a_call = abar[calls]
        return dict(timesteps=calls, signal=np.sqrt(a_call), noise_level=np.sqrt(1 - a_call), coef=coef)

    def _update(self, plan, c, state, out, noise):
        outputs = jnp.concatenate([out[None], state.history])
        m = combine(c["weights"], outputs)
        sample = jnp.where(c["use_saved"] > 0, state.saved, state.x)
        eps = c["eps_x"] * sample + c["eps_m"] * m
        x = c["keep"] * sample + c["step"] * eps
        return state.replace(
            x=x, saved=jnp.where(c["save"] > 0, state.x, state.saved),
            history=jnp.where(c["push"] > 0, outputs[:-1], state.history))


@dataclasses.dataclass(frozen=True)
class LCM(Sampler):
    """Latent consistency model sampling (Luo et al. 2023), diffusers' LCMScheduler.

    Timesteps are every (len // steps)-th of the original_inference_steps skipping schedule
    (T // original_steps) k - 1 (timestep_spacing and steps_offset are not used, as diffusers).
    x0 = clip(prediction); denoised = c_out x0 + c_skip x with the consistency boundary scalings
    at s = t * timestep_scaling, c_skip = 0.25 / (s^2 + 0.25), c_out = s / sqrt(s^2 + 0.25);
    x' = sqrt(a_t') denoised + sqrt(1 - a_t') noise, and x' = denoised at the last step.
    """
    name = "lcm"
    diffusers_class = "LCMScheduler"
    stochastic = True
    defaults = dict(_BETAS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
                    set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
                    timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False)

    def _tables(self, cfg, steps, start):
        abar = sch.alphas_cumprod(cfg)
        original = int(cfg["original_inference_steps"])
        origin = np.arange(1, original + 1) * (cfg["num_train_timesteps"] // original) - 1
        if len(origin) // steps < 1:
            raise ValueError(f"lcm: steps ({steps}) cannot exceed original_inference_steps ({original})")
        t = origin[::-1][np.floor(np.linspace(0, len(origin), steps, endpoint=False)).astype(np.int64)]
        last = np.arange(steps) == steps - 1
        prev = np.where(last, t, np.roll(t, -1))
        a_t, a_prev = abar[t], abar[prev]
        s = t * float(cfg["timestep_scaling"])
        x0_x, x0_out = x0_coefficients(cfg["prediction_type"], *_vp(a_t))
        coef = dict(x0_x=x0_x, x0_out=x0_out, skip=0.25 / (s ** 2 + 0.25), out=s / np.sqrt(s ** 2 + 0.25),
                    keep=np.where(last, 1.0, np.sqrt(a_prev)), noise=np.where(last, 0.0, np.sqrt(1 - a_prev)))
        return dict(timesteps=t[start:], signal=np.sqrt(a_t)[start:], noise_level=np.sqrt(1 - a_t)[start:],
                    coef={k: v[start:] for k, v in coef.items()})

    def _update(self, plan, c, state, out, noise):
        x0 = clip_x0(plan, c["x0_x"] * state.x + c["x0_out"] * out)
        denoised = c["out"] * x0 + c["skip"] * state.x
        return state.replace(x=c["keep"] * denoised + c["noise"] * noise)
