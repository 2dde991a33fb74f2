"""The pieces every sampler shares: the plan (host-side tables, one row per model call), the
state carried between calls, the Sampler protocol, and add_noise.

A plan's arrays are float32 numpy tables whose first axis is the model call; a state's
``index`` is a traced int32, so ``step``/``model_input`` read their row with a gather and one
compiled step serves every call of a run. Every update is linear in the latents, the model
output and past outputs; the host folds all schedule arithmetic (log-SNR steps, Lagrange
integrals, linear solves) into per-call coefficients, so the traced code is a few
multiply-adds per call.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import schedule as sch


@struct.dataclass
class Plan:
    """Host-side tables of one run (float32 numpy; pass the plan into jit as an argument).

    timesteps:   (n,) the timestep the model is called with at each call (as diffusers feeds it).
    input_scale: (n,) ``scale_model_input``: the model sees ``x * input_scale[k]``.
    signal, noise_level: (n,) ``add_noise`` to the level of call k: ``signal*x0 + noise_level*noise``.
    init_noise_sigma: () the factor diffusers' ``prepare_latents`` multiplies x_T by.
    coef: the sampler's own per-call coefficients (first axis n).
    clip: static; clamp the predicted x0 to [-clip, clip] (``clip_sample``), or None.
    history: static; how many past outputs the state keeps.
    """
    timesteps: Any
    input_scale: Any
    signal: Any
    noise_level: Any
    init_noise_sigma: Any
    coef: dict
    clip: float | None = struct.field(pytree_node=False, default=None)
    history: int = struct.field(pytree_node=False, default=0)

    @property
    def num_calls(self) -> int:
        """Number of model calls of the run (static, also under jit)."""
        return int(np.shape(self.timesteps)[0])

    def __len__(self) -> int:
        return self.num_calls


@struct.dataclass
class State:
    """What a sampler carries from one model call to the next (all float32 but ``index``).

    x: the latents. index: () int32, the next model call. history: (m, *x.shape) past
    outputs in the sampler's own form, newest first (m = 0 for one-step samplers).
    saved: a sample kept across calls (PLMS, Heun, UniPC), else zeros.
    """
    x: jax.Array
    index: jax.Array
    history: jax.Array
    saved: jax.Array


def row(table, index):
    """Row ``index`` (traced or not) of a per-call table."""
    return jnp.asarray(table)[index]


def add_noise(plan: Plan, x0, noise, index=0):
    """Forward-diffuse clean latents to the noise level of model call ``index`` of ``plan``:
    ``scheduler.add_noise(x0, noise, timesteps[index])`` as diffusers' img2img (index 0, after
    ``set_begin_index``) and inpainting (index i + 1 after step i) pipelines call it."""
    return (row(plan.signal, index) * jnp.asarray(x0, jnp.float32)
            + row(plan.noise_level, index) * jnp.asarray(noise, jnp.float32))


def combine(weights, arrays):
    """sum_i weights[i] * arrays[i] over the leading axis (a small, fixed number of terms)."""
    out = weights[0] * arrays[0]
    for i in range(1, arrays.shape[0]):
        out = out + weights[i] * arrays[i]
    return out


def x0_coefficients(prediction_type, alpha, sigma, x_scale=1.0):
    """(a, b) with predicted x0 = a * x + b * model_output.

    The model saw the variance-preserving latent ``z = x_scale * x = alpha * x0 + sigma * eps``
    (x_scale is 1 for DDPM-style samplers, 1 / sqrt(s^2 + 1) for the k-diffusion ones that
    keep x = x0 + s * eps). epsilon: x0 = (z - sigma * eps) / alpha; v_prediction
    (v = alpha * eps - sigma * x0): x0 = alpha * z - sigma * v; sample: x0 = output.
    """
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    if prediction_type == "epsilon":
        return x_scale / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha * x_scale, -sigma
    if prediction_type == "sample":
        return np.zeros_like(alpha), np.ones_like(alpha)
    raise ValueError(f"prediction_type {prediction_type!r}")


def eps_coefficients(prediction_type, alpha, sigma):
    """(a, b) with predicted noise eps = a * z + b * model_output, z = alpha * x0 + sigma * eps."""
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    if prediction_type == "epsilon":
        return np.zeros_like(alpha), np.ones_like(alpha)
    if prediction_type == "v_prediction":
        return sigma, alpha
    if prediction_type == "sample":
        return 1 / sigma, -alpha / sigma
    raise ValueError(f"prediction_type {prediction_type!r}")


class Sampler:
    """A named sampler mirroring one diffusers scheduler. Instances are frozen dataclasses
    (hashable, so a sampler can be a static argument of ``jax.jit``).

    Subclasses set ``name``, ``diffusers_class``, ``order`` (diffusers' ``scheduler.order``:
    model calls per step, 2 for Heun), ``defaults`` (the diffusers class's defaults of the
    options it reads), ``pinned`` (options the name fixes), ``allowed`` (values implemented
    per option; options not listed must keep their default), ``history`` (past outputs kept),
    and implement ``_tables`` and ``_update``.
    """
    name: ClassVar[str]
    diffusers_class: ClassVar[str]
    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False
    history: ClassVar[int] = 0
    defaults: ClassVar[Mapping[str, Any]]
    pinned: ClassVar[Mapping[str, Any]] = {}
    allowed: ClassVar[Mapping[str, tuple]] = {}
    # options read by every sampler whose values are free (numbers) or listed in allowed
    free: ClassVar[tuple] = ("num_train_timesteps", "beta_start", "beta_end", "trained_betas",
                             "steps_offset", "clip_sample_range", "set_alpha_to_one", "clip_sample",
                             "original_inference_steps", "timestep_scaling")

    # ---- host side ----

    def options(self, schedule: sch.Schedule | Mapping | None = None) -> dict:
        """The options ``SchedulerClass.from_config(schedule)`` would run with; raises
        ValueError for an option value this sampler does not implement."""
        if not isinstance(schedule, sch.Schedule):
            schedule = sch.Schedule.from_config(schedule)
        given = schedule.as_dict()
        cfg = {k: given.get(k, v) for k, v in self.defaults.items()}
        cfg.update(self.pinned)
        allowed = {"beta_schedule": sch.BETA_SCHEDULES, "timestep_spacing": sch.SPACINGS,
                   "prediction_type": sch.PREDICTION_TYPES, **self.allowed}
        for key, value in cfg.items():
            if key in self.free:
                continue
            ok = allowed.get(key, (sch.freeze(self.defaults[key]),))
            if sch.freeze(value) not in ok:
                raise ValueError(f"sampler {self.name!r} does not support {key}={value!r} "
                                 f"(supported: {', '.join(map(repr, ok))})")
        return cfg

    def plan(self, schedule, steps: int, strength: float = 1.0, *, denoising_start: float | None = None,
             denoising_end: float | None = None) -> Plan:
        """Tables of a run of ``steps`` inference steps. strength < 1 is img2img: the plan
        starts where diffusers' StableDiffusionImg2ImgPipeline.get_timesteps starts
        (``t_start = steps - min(int(steps * strength), steps)``, calls from ``t_start * order``).

        SDXL's ensemble of experts cuts the schedule at a fraction f of the training timesteps,
        the discrete threshold ``c = int(round(T - f * T))`` (T = num_train_timesteps) as diffusers'
        SDXL pipelines compute it. ``denoising_start`` (replaces strength) starts at the calls whose
        timestep is below c(denoising_start), one call earlier for a second-order sampler whose
        count would split a step (StableDiffusionXLImg2ImgPipeline.get_timesteps);
        ``denoising_end`` keeps the leading calls whose timestep is >= c(denoising_end)."""
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        steps = int(steps)
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        for name, f in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if f is not None and not 0.0 < float(f) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {f!r}")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
        cfg = self.options(schedule)
        if steps > cfg["num_train_timesteps"]:
            raise ValueError(f"steps ({steps}) cannot exceed num_train_timesteps ({cfg['num_train_timesteps']})")

        def cutoff(f):
            n_train = cfg["num_train_timesteps"]
            return int(round(n_train - f * n_train))

        if denoising_start is None:
            init_steps = min(int(steps * strength), steps)
            if init_steps < 1:
                raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step "
                                 f"(int(steps * strength) must be at least 1)")
            start = (steps - init_steps) * self.order
        else:
            every = np.asarray(self._tables(cfg, steps, 0)["timesteps"])
            calls = int((every < cutoff(denoising_start)).sum())
            if self.order == 2 and calls % 2 == 0:
                calls += 1  # never start between a step's two calls
            if calls < 1:
                raise ValueError(f"denoising_start {denoising_start} with {steps} steps leaves no denoising step")
            start = len(every) - min(calls, len(every))
        t = self._tables(cfg, steps, start)
        if denoising_end is not None:
            keep = int((np.asarray(t["timesteps"]) >= cutoff(denoising_end)).sum())
            if keep < 1:
                raise ValueError(f"denoising_end {denoising_end} with {steps} steps leaves no denoising step")
            t = dict(t, timesteps=t["timesteps"][:keep], noise_level=t["noise_level"][:keep],
                     coef={k: np.asarray(v)[:keep] for k, v in t["coef"].items()},
                     **{k: np.asarray(t[k])[:keep] for k in ("input_scale", "signal") if k in t})
        n = len(t["timesteps"])
        f = lambda a: np.asarray(a, np.float32)  # noqa: E731
        return Plan(timesteps=f(t["timesteps"]),
                    input_scale=f(t.get("input_scale", np.ones(n))),
                    signal=f(t.get("signal", np.ones(n))),
                    noise_level=f(t["noise_level"]),
                    init_noise_sigma=f(t.get("init_noise_sigma", 1.0)),
                    coef={k: f(v) for k, v in t["coef"].items()},
                    clip=float(cfg["clip_sample_range"]) if cfg.get("clip_sample") else None,
                    history=int(t.get("history", self.history)))

    def _tables(self, cfg: dict, steps: int, start: int) -> dict:
        """Per-call tables of calls ``start..`` of a ``steps``-step run (float64 numpy):
        timesteps, noise_level and coef, optionally input_scale, signal, init_noise_sigma, history."""
        raise NotImplementedError

    # ---- traced side ----

    def init(self, plan: Plan, noise, image_latents=None) -> State:
        """The state before the first call. Without image_latents: x = noise * init_noise_sigma
        (text-to-image's ``prepare_latents``, and inpainting's at strength 1). With them:
        x = add_noise(plan, image_latents, noise, 0), the noise level of the plan's first call
        (img2img's ``prepare_latents``, and inpainting's at strength < 1)."""
        noise = jnp.asarray(noise, jnp.float32)
        if image_latents is None:
            x = noise * jnp.asarray(plan.init_noise_sigma)
        else:
            x = add_noise(plan, image_latents, noise, 0)
        return State(x=x, index=jnp.zeros((), jnp.int32),
                     history=jnp.zeros((plan.history,) + x.shape, jnp.float32),
                     saved=jnp.zeros_like(x))

    def model_input(self, plan: Plan, state: State):
        """(x_in, t): the scaled latents and the timestep to call the model with."""
        k = state.index
        return state.x * row(plan.input_scale, k), row(plan.timesteps, k)

    def step(self, plan: Plan, state: State, model_output, noise=None) -> State:
        """The state after one model call. ``noise`` (shape of x) is read by stochastic
        samplers only (euler_a, ddim with eta > 0, lcm)."""
        if self.stochastic and noise is None:
            raise ValueError(f"sampler {self.name!r} is stochastic: step needs noise")
        k = state.index
        c = {key: row(v, k) for key, v in plan.coef.items()}
        out = jnp.asarray(model_output, jnp.float32)
        noise = None if noise is None else jnp.asarray(noise, jnp.float32)
        new = self._update(plan, c, state, out, noise)
        return new.replace(index=k + 1)

    def _update(self, plan: Plan, c: dict, state: State, out, noise) -> State:
        raise NotImplementedError

    def result(self, plan: Plan, state: State):
        """The denoised latents once all ``plan.num_calls`` calls are done."""
        return state.x


def clip_x0(plan: Plan, x0):
    return x0 if plan.clip is None else jnp.clip(x0, -plan.clip, plan.clip)

