"""Exponential-integrator multistep solvers in log-SNR time: DPM-Solver++(2M) and UniPC.

With sigma the k-diffusion sigma of a step, alpha = 1 / sqrt(sigma^2 + 1), s = sigma * alpha
(so x = alpha x0 + s eps) and lambda = log(alpha / s). Both work on the data prediction
m = x0(x, model output), keep past m's, and the model sees x unscaled (init_noise_sigma = 1).
The host turns each update into weights over [x, m_new, past m's]; the traced step is a
weighted sum.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from . import schedule as sch
from .base import Sampler, combine, x0_coefficients

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
               lower_order_final=True, use_karras_sigmas=False, use_exponential_sigmas=False,
               use_beta_sigmas=False, use_flow_sigmas=False, timestep_spacing="linspace", steps_offset=0,
               final_sigmas_type="zero", rescale_betas_zero_snr=False, use_dynamic_shifting=False)
_ON_OFF = (False, True)


def _sigmas(cfg, steps, *, unipc):
    """(timesteps (N,), sigmas (N + 1,)) as DPMSolverMultistep (unipc=False) or UniPCMultistep
    build them; they differ only with Karras sigmas (rounding of timesteps, the sigma_min end)."""
    abar = sch.alphas_cumprod(cfg)
    t = sch.spaced_timesteps(cfg, steps, plus_one=True)
    full = sch.sigmas_of(abar)
    final = 0.0
    if cfg["use_karras_sigmas"]:  # Karras sigmas over the whole training range
        s = sch.karras_sigmas(full[0], full[-1], steps)
        t = sch.sigma_to_t(s, abar)
        if unipc or cfg["beta_schedule"] != "squaredcos_cap_v2":
            t = t.round()
        if cfg["final_sigmas_type"] == "sigma_min":
            final = s[-1] if unipc else full[0]
    else:
        s = sch.interp_sigmas(t, abar)
        if cfg["final_sigmas_type"] == "sigma_min":
            final = full[0]
    return t, sch.f32(np.append(s, final))


def _vp(sigmas):
    """(alpha, s, lambda) of k-diffusion sigmas (lambda = +inf at sigma = 0)."""
    alpha = 1 / np.sqrt(sigmas ** 2 + 1)
    s = sigmas * alpha
    with np.errstate(divide="ignore"):
        return alpha, s, np.log(alpha) - np.log(s)


def _tables_out(cfg, t, sig, start, coef):
    alpha, s, _ = _vp(sig[:-1])
    x0_x, x0_out = x0_coefficients(cfg["prediction_type"], alpha, s)
    coef = dict(coef, x0_x=x0_x, x0_out=x0_out)
    return dict(timesteps=t[start:], signal=alpha[start:], noise_level=s[start:],
                coef={k: np.asarray(v)[start:] for k, v in coef.items()})


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022), diffusers' DPMSolverMultistepScheduler with
    algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint".

    h = lambda' - lambda, r = (lambda - lambda_prev) / h, D = m + (m - m_prev) / (2 r):
    x' = (s' / s) x - alpha' (exp(-h) - 1) D. First order (D = m) at the first call of a run and
    at the last step (lower_order_final); the last step to sigma = 0 returns m.
    """
    karras: bool = False
    diffusers_class = "DPMSolverMultistepScheduler"
    history = 1
    defaults = dict(_COMMON, algorithm_type="dpmsolver++", solver_type="midpoint", euler_at_final=False,
                    use_lu_lambdas=False, lambda_min_clipped=-math.inf, variance_type=None)
    allowed = dict(use_karras_sigmas=_ON_OFF, lower_order_final=_ON_OFF, euler_at_final=_ON_OFF,
                   final_sigmas_type=("zero", "sigma_min"), solver_order=(2,),
                   algorithm_type=("dpmsolver++",))

    @property
    def name(self):
        return "dpmpp_2m_karras" if self.karras else "dpmpp_2m"

    @property
    def pinned(self):
        return dict(solver_order=2, algorithm_type="dpmsolver++", **({"use_karras_sigmas": True} if self.karras else {}))

    def _tables(self, cfg, steps, start):
        t, sig = _sigmas(cfg, steps, unipc=False)
        n = len(t)
        alpha, s, lam = _vp(sig)
        j = np.arange(n)
        last_first_order = (j == n - 1) & (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                                           or cfg["final_sigmas_type"] == "zero")
        second = (j > start) & ~last_first_order
        with np.errstate(divide="ignore", invalid="ignore"):
            h = lam[1:] - lam[:-1]
            b = -alpha[1:] * np.expm1(-h)  # weight of D
            half_over_r = np.where(second, 0.5 * h / (lam[:-1] - lam[np.maximum(j - 1, 0)]), 0.0)
        coef = dict(x=s[1:] / s[:-1], m=np.stack([b * (1 + half_over_r), -b * half_over_r], axis=1))
        return _tables_out(cfg, t, sig, start, coef)

    def _update(self, plan, c, state, out, noise):
        m = c["x0_x"] * state.x + c["x0_out"] * out
        x = c["x"] * state.x + combine(c["m"], jnp.concatenate([m[None], state.history]))
        return state.replace(x=x, history=m[None])


def _unipc_terms(lam_to, lam_at, lam_past, bh1):
    """UniPC's scalars for an update from log-SNR lam_at to lam_to using older predictions at
    lam_past (newest first): r_k = (lam_k - lam_at) / h with a final r = 1, the linear system
    R rho = b (R[i] = r^i, b_i = i! phi_{i+1}(hh) / B(h)), phi1 = exp(hh) - 1 and B(h), hh = -h."""
    h = lam_to - lam_at
    hh = -h
    phi1 = np.expm1(hh)
    b_h = hh if bh1 else np.expm1(hh)
    rks = np.append((np.asarray(lam_past) - lam_at) / h, 1.0)
    rhs, phi_k, fact = [], phi1 / hh - 1, 1
    for i in range(1, len(rks) + 1):
        rhs.append(phi_k * fact / b_h)
        fact *= i + 1
        phi_k = phi_k / hh - 1 / fact
    R = np.stack([rks ** i for i in range(len(rks))])
    return rks, np.asarray(rhs), R, phi1, b_h


@dataclasses.dataclass(frozen=True)
class UniPC(Sampler):
    """UniPC (Zhao et al. 2023), diffusers' UniPCMultistepScheduler (predict_x0, B(h) = bh2 or bh1).

    Each call first corrects the previous prediction with the new data prediction (UniC, from the
    second call of a run on), then predicts the next latents (UniP):
    x' = (s'/s) x - alpha' phi1 m - alpha' B(h) sum_k rho_k (m_k - m) / r_k, phi1 = exp(-h) - 1,
    r_k = (lambda_k - lambda) / h over the older predictions m_k; UniC adds the new prediction
    with r = 1. The rho solve R rho = b (UniP order 2: rho = 1/2; UniC order 1: rho = 1/2) and
    all other scalars are folded into weights on the host.
    """
    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    defaults = dict(_COMMON, predict_x0=True, solver_type="bh2", disable_corrector=[], solver_p=None,
                    sigma_min=None, sigma_max=None, shift_terminal=None)
    allowed = dict(use_karras_sigmas=_ON_OFF, lower_order_final=_ON_OFF, solver_type=("bh1", "bh2"),
                   final_sigmas_type=("zero", "sigma_min"), solver_order=(1, 2, 3))

    def _tables(self, cfg, steps, start):
        t, sig = _sigmas(cfg, steps, unipc=True)
        n, p = len(t), int(cfg["solver_order"])
        alpha, s, lam = _vp(sig)
        bh1 = cfg["solver_type"] == "bh1"
        orders = [min(min(p, n - j) if cfg["lower_order_final"] else p, j - start + 1) for j in range(n)]
        # corrector weights over [x, saved (previous call's corrected x), m_new, m_{j-1}, ..., m_{j-p}],
        # predictor weights over [corrected x, m_j, m_{j-1}, ..., m_{j-p+1}]
        correct = np.zeros((n, p + 3))
        predict = np.zeros((n, p + 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            for j in range(start, n):
                if j == start:
                    correct[j, 0] = 1.0
                else:  # UniC for the step lam_{j-1} -> lam_j, of the previous call's order
                    o = orders[j - 1]
                    past = lam[j - 1 - np.arange(1, o)]
                    rks, rhs, R, phi1, b_h = _unipc_terms(lam[j], lam[j - 1], past, bh1)
                    rho = np.array([0.5]) if o == 1 else np.linalg.solve(R, rhs)
                    a = alpha[j]
                    correct[j, 1] = s[j] / s[j - 1]
                    correct[j, 2] = -a * b_h * rho[-1]
                    correct[j, 3] = -a * phi1 + a * b_h * (np.sum(rho[:-1] / rks[:-1]) + rho[-1])
                    correct[j, 4:4 + o - 1] = -a * b_h * rho[:-1] / rks[:-1]
                # UniP for lam_j -> lam_{j+1}: m_new is m_j, the older ones are m_{j-1}, ...
                o = orders[j]
                past = lam[j - np.arange(1, o)]
                rks, rhs, R, phi1, b_h = _unipc_terms(lam[j + 1], lam[j], past, bh1)
                rho = np.array([]) if o == 1 else (np.array([0.5]) if o == 2 else
                                                   np.linalg.solve(R[:-1, :-1], rhs[:-1]))
                a = alpha[j + 1]
                predict[j, 0] = s[j + 1] / s[j]
                predict[j, 1] = -a * phi1 + a * b_h * np.sum(rho / rks[:-1])
                predict[j, 2:2 + o - 1] = -a * b_h * rho / rks[:-1]
        return dict(_tables_out(cfg, t, sig, start, dict(correct=correct, predict=predict)), history=p)

    def _update(self, plan, c, state, out, noise):
        m = c["x0_x"] * state.x + c["x0_out"] * out
        w = c["correct"]
        x = w[0] * state.x + w[1] * state.saved + combine(w[2:], jnp.concatenate([m[None], state.history]))
        ms = jnp.concatenate([m[None], state.history[:-1]])  # m_j, m_{j-1}, ...
        w = c["predict"]
        return state.replace(x=w[0] * x + combine(w[1:], ms), saved=x, history=ms)
