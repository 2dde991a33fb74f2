"""k-diffusion samplers (Karras et al. 2022) on x = x0 + sigma * eps: Euler, Euler ancestral,
Heun and LMS. The model sees x / sqrt(sigma^2 + 1); init_noise_sigma is sigma_max (or
sqrt(sigma_max^2 + 1) for "leading" spacing, as diffusers)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from numpy.polynomial import polynomial as P

from . import schedule as sch
from .base import Sampler, clip_x0, combine, x0_coefficients

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
_KARRAS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_ON_OFF = (False, True)


def _sigmas(cfg, steps):
    """(timesteps (N,), sigmas (N + 1,) ending in the final sigma), float32-rounded like diffusers."""
    abar = sch.alphas_cumprod(cfg)
    t = sch.f32(sch.spaced_timesteps(cfg, steps))
    s = sch.interp_sigmas(t, abar)
    if cfg.get("use_karras_sigmas"):
        s = sch.karras_sigmas(s[-1], s[0], len(s))
        t = sch.sigma_to_t(s, abar)
    final = sch.sigmas_of(abar[0]) if cfg.get("final_sigmas_type") == "sigma_min" else 0.0
    return sch.f32(t), sch.f32(np.append(s, final))


def _init_sigma(cfg, sigmas):
    top = sigmas.max()
    return top if cfg["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(top ** 2 + 1)


def _x0(cfg, s):
    """x0 = a x + b out at sigma s, the model having seen x / sqrt(s^2 + 1)."""
    scale = 1 / np.sqrt(s ** 2 + 1)
    return x0_coefficients(cfg["prediction_type"], scale, s * scale, x_scale=scale)


def _common(cfg, t, s_in, start):
    return dict(timesteps=t[start:], input_scale=(1 / np.sqrt(s_in ** 2 + 1))[start:],
                noise_level=s_in[start:])


@dataclasses.dataclass(frozen=True)
class Euler(Sampler):
    """Euler (Karras et al. 2022, Algorithm 2 without churn), diffusers' EulerDiscreteScheduler.

    d = (x - x0) / sigma;  x' = x + d (sigma' - sigma).
    """
    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    defaults = dict(_COMMON, **_KARRAS, interpolation_type="linear", sigma_min=None, sigma_max=None,
                    timestep_type="discrete", rescale_betas_zero_snr=False, final_sigmas_type="zero")
    allowed = dict(use_karras_sigmas=_ON_OFF, final_sigmas_type=("zero", "sigma_min"))

    def _tables(self, cfg, steps, start):
        t, s = _sigmas(cfg, steps)
        x0_x, x0_out = _x0(cfg, s[:-1])
        coef = dict(x0_x=x0_x, x0_out=x0_out, sigma=s[:-1], dt=s[1:] - s[:-1])
        return dict(_common(cfg, t, s[:-1], start), init_noise_sigma=_init_sigma(cfg, s),
                    coef={k: v[start:] for k, v in coef.items()})

    def _update(self, plan, c, state, out, noise):
        x = state.x
        d = (x - (c["x0_x"] * x + c["x0_out"] * out)) / c["sigma"]
        return state.replace(x=x + d * c["dt"])


@dataclasses.dataclass(frozen=True)
class EulerAncestral(Sampler):
    """Euler ancestral, diffusers' EulerAncestralDiscreteScheduler: an Euler step down to
    sigma_down, then fresh noise of std sigma_up, sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2,
    sigma_down^2 = sigma'^2 - sigma_up^2:
    x' = x + (x - x0) / sigma * (sigma_down - sigma) + sigma_up * noise.
    """
    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    stochastic = True
    defaults = dict(_COMMON, rescale_betas_zero_snr=False)
    allowed = dict(prediction_type=("epsilon", "v_prediction"))

    def _tables(self, cfg, steps, start):
        t, s = _sigmas(cfg, steps)
        frm, to = s[:-1], s[1:]
        up = np.sqrt(to ** 2 * (frm ** 2 - to ** 2) / frm ** 2)
        down = np.sqrt(to ** 2 - up ** 2)
        x0_x, x0_out = _x0(cfg, frm)
        coef = dict(x0_x=x0_x, x0_out=x0_out, sigma=frm, dt=down - frm, up=up)
        return dict(_common(cfg, t, frm, start), init_noise_sigma=_init_sigma(cfg, s),
                    coef={k: v[start:] for k, v in coef.items()})

    def _update(self, plan, c, state, out, noise):
        x = state.x
        d = (x - (c["x0_x"] * x + c["x0_out"] * out)) / c["sigma"]
        return state.replace(x=x + d * c["dt"] + c["up"] * noise)


@dataclasses.dataclass(frozen=True)
class Heun(Sampler):
    """Heun (Karras et al. 2022, Algorithm 1 without churn), diffusers' HeunDiscreteScheduler.

    Two model calls per step sigma -> sigma' (the last step is a lone Euler step to 0):
    d = (x - x0(x, sigma)) / sigma,  x_e = x + d (sigma' - sigma);
    d' = (x_e - x0(x_e, sigma')) / sigma',  x' = x + (d + d') / 2 (sigma' - sigma).
    """
    name = "heun"
    diffusers_class = "HeunDiscreteScheduler"
    order = 2
    history = 1  # the first call's derivative
    defaults = dict(_COMMON, beta_start=0.00085, beta_end=0.012, **_KARRAS, clip_sample=False,
                    clip_sample_range=1.0)
    allowed = dict(use_karras_sigmas=_ON_OFF)

    def _tables(self, cfg, steps, start):
        t, s = _sigmas(cfg, steps)
        # per call: [s0, s1, s1, s2, s2, ..., s_{N-1}, s_{N-1}, 0] and [t0, t1, t1, ..., t_{N-1}]
        s2 = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]])
        t2 = np.concatenate([t[:1], np.repeat(t[1:], 2)])
        g = np.arange(start, len(t2))
        first = (g - start) % 2 == 0  # each run starts with a first-order call, as diffusers
        s_frm = np.where(first, s2[g], s2[g - 1])
        s_to = np.where(first, s2[np.minimum(g + 1, len(s2) - 1)], s2[g])
        s_at = np.where(first, s_frm, s_to)  # sigma the model output is read at
        x0_x, x0_out = _x0(cfg, s_at)
        coef = dict(x0_x=x0_x, x0_out=x0_out, sigma=s_at, dt=s_to - s_frm, first=first)
        return dict(_common(cfg, t2, s2[:-1], start), init_noise_sigma=_init_sigma(cfg, s2), coef=coef)

    def _update(self, plan, c, state, out, noise):
        x = state.x
        d = (x - clip_x0(plan, c["x0_x"] * x + c["x0_out"] * out)) / c["sigma"]
        first = c["first"] > 0
        return state.replace(
            x=jnp.where(first, x + d * c["dt"], state.saved + (state.history[0] + d) / 2 * c["dt"]),
            saved=jnp.where(first, x, state.saved),
            history=jnp.where(first, d[None], state.history))


def _lms_coefficients(s, j, order):
    """Integrals over [s_j, s_{j+1}] of the Lagrange basis polynomials on nodes s_j, ..., s_{j-order+1}
    (exact: the integrand is a polynomial; diffusers integrates it with scipy.quad)."""
    nodes = s[j - np.arange(order)]
    out = []
    for m in range(order):
        others = np.delete(nodes, m)
        basis = P.polyfromroots(others) / np.prod(nodes[m] - others)
        integral = P.polyint(basis)
        out.append(P.polyval(s[j + 1], integral) - P.polyval(s[j], integral))
    return out


@dataclasses.dataclass(frozen=True)
class LMS(Sampler):
    """Linear multistep (k-diffusion's sample_lms), diffusers' LMSDiscreteScheduler.

    d_j = (x - x0) / sigma_j;  x' = x + sum_m c_m d_{j-m}, m < min(j + 1, 4), where c_m integrates
    the Lagrange polynomial through sigma_j..sigma_{j-3} that is 1 at sigma_{j-m} over
    [sigma_j, sigma_{j+1}]. Like diffusers, the order follows the global step index while only
    this run's derivatives are summed (an img2img run starts with a lone first term).
    """
    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"
    history = 3
    defaults = dict(_COMMON, **_KARRAS)
    allowed = dict(use_karras_sigmas=_ON_OFF)

    def _tables(self, cfg, steps, start):
        t, s = _sigmas(cfg, steps)
        weights = np.zeros((len(t), 4))
        for j in range(start, len(t)):
            c = _lms_coefficients(s, j, min(j + 1, 4))[: j - start + 1]
            weights[j, : len(c)] = c
        x0_x, x0_out = _x0(cfg, s[:-1])
        coef = dict(x0_x=x0_x, x0_out=x0_out, sigma=s[:-1], weights=weights)
        return dict(_common(cfg, t, s[:-1], start), init_noise_sigma=_init_sigma(cfg, s),
                    coef={k: v[start:] for k, v in coef.items()})

    def _update(self, plan, c, state, out, noise):
        x = state.x
        d = (x - (c["x0_x"] * x + c["x0_out"] * out)) / c["sigma"]
        derivatives = jnp.concatenate([d[None], state.history])
        return state.replace(x=x + combine(c["weights"], derivatives), history=derivatives[:-1])
