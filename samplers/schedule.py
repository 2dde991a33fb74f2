"""Noise schedules read from a diffusers ``scheduler_config.json``, and the host-side tables
(betas, cumulative alphas, spaced timesteps, sigmas) every sampler builds its plan from.

Tables are float64 numpy, except that betas and alpha_bar are rounded to float32 the way
diffusers makes them (float32 betas, 1 - beta in float32, a cumulative product accumulated in
float64 as torch's CPU cumprod does, rounded to float32). That rounding is what diffusers'
samplers actually run with: near t = 0, where 1 - alpha_bar is about 1e-3, an exact float64
alpha_bar would move sigma by about 1e-5 relative.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    return value


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A scheduler config (diffusers key names) as a frozen, hashable mapping.

    Only the keys the config states are kept: a key it leaves out takes the default of the
    diffusers scheduler class that the chosen sampler mirrors, exactly as
    ``SchedulerClass.from_config(config)`` would (the defaults differ between classes, e.g.
    ``timestep_spacing`` is "leading" for DDIM and "linspace" for Euler). Keys starting with
    ``_`` (``_class_name``, ``_diffusers_version``) are dropped: the sampler is chosen by name;
    so are the keys an in-memory diffusers config lists in ``_use_default_values``.
    """
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_config(cls, config=None, **overrides) -> "Schedule":
        """config: a dict, or the path of a scheduler_config.json; overrides win over it."""
        if isinstance(config, (str, os.PathLike)):
            with open(config) as f:
                config = json.load(f)
        config = dict(config or {})
        # an in-memory diffusers config lists the keys its class filled with its own defaults;
        # from_config leaves those out so that the new class uses its own (not on disk: saving
        # drops the list and writes every key)
        defaulted = set(config.get("_use_default_values", ()))
        merged = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted}
        merged.update(overrides)
        return cls(tuple(sorted((k, freeze(v)) for k, v in merged.items())))

    def replace(self, **overrides) -> "Schedule":
        return Schedule.from_config(dict(self.options), **overrides)

    def get(self, key, default=None):
        return dict(self.options).get(key, default)

    def __contains__(self, key):
        return key in dict(self.options)

    def as_dict(self) -> dict:
        return dict(self.options)


# ---- betas and cumulative alphas, indexed by training timestep ----

def betas(cfg) -> np.ndarray:
    """(T,) float32 betas of the resolved options ``cfg`` (a dict of diffusers keys)."""
    n = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], np.float32)
    kind = cfg["beta_schedule"]
    if kind == "linear":
        return np.linspace(cfg["beta_start"], cfg["beta_end"], n).astype(np.float32)
    if kind == "scaled_linear":  # linear in sqrt(beta): the schedule SD was trained with
        return np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n).astype(np.float32) ** 2
    if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine alpha_bar, betas capped at 0.999
        t = np.arange(n + 1) / n
        alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
    raise ValueError(f"beta_schedule {kind!r} is not supported; choose one of {BETA_SCHEDULES}")


def alphas_cumprod(cfg) -> np.ndarray:
    """(T,) alpha_bar_t = prod_{s<=t} (1 - beta_s), float32 values held in float64."""
    return f32(np.cumprod((np.float32(1) - betas(cfg)).astype(np.float64)))


def sigmas_of(alpha_bar) -> np.ndarray:
    """Noise-to-signal ratio sigma_t = sqrt((1 - alpha_bar) / alpha_bar) (the k-diffusion sigma)."""
    return np.sqrt((1 - alpha_bar) / alpha_bar)


# ---- timestep spacing ----

def spaced_timesteps(cfg, steps: int, *, plus_one: bool = False) -> np.ndarray:
    """Descending float64 training timesteps of ``steps`` inference steps, unrounded for
    "linspace" (callers round or cast as their diffusers class does).

    plus_one: the DPM-Solver/UniPC variant, which spaces steps + 1 points and drops the last
    (t = 0) for "linspace" and "leading".
    """
    T, spacing, offset = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"], int(cfg["steps_offset"])
    if spacing == "linspace":
        if plus_one:
            return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy()
        return np.linspace(0, T - 1, steps)[::-1].copy()
    if spacing == "leading":  # multiples of T // steps from 0, shifted by steps_offset
        if plus_one:
            return (np.arange(steps + 1) * (T // (steps + 1)))[::-1][:-1].astype(np.float64) + offset
        return (np.arange(steps) * (T // steps))[::-1].astype(np.float64) + offset
    if spacing == "trailing":  # multiples of T / steps counted down from T, minus one
        return np.round(np.arange(T, 0, -T / steps)) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported; choose one of {SPACINGS}")


# ---- sigma helpers of the k-diffusion samplers ----

def interp_sigmas(timesteps, alpha_bar) -> np.ndarray:
    """sigma at (possibly fractional) timesteps, linear in t between training timesteps."""
    sig = sigmas_of(alpha_bar)
    return np.interp(timesteps, np.arange(len(sig)), sig)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: n sigmas from sigma_max to sigma_min, uniform in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas, alpha_bar) -> np.ndarray:
    """Fractional training timesteps whose sigma is ``sigmas`` (linear in log sigma)."""
    log_sigmas = np.log(sigmas_of(alpha_bar))
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def f32(a) -> np.ndarray:
    """Round to float32 and back: tables diffusers stores in float32 are rounded the same way."""
    return np.asarray(a, np.float32).astype(np.float64)
