"""Noise schedules and samplers as pure JAX step functions, each matching a diffusers scheduler.

    import samplers
    sampler = samplers.get("dpmpp_2m")                      # samplers.NAMES lists the names
    schedule = samplers.Schedule.from_config(scheduler_config_dict, prediction_type="v_prediction")
    plan = sampler.plan(schedule, steps=25)                 # host tables; len(plan) model calls
    state = sampler.init(plan, x_T)                         # x_T * init_noise_sigma
    for _ in range(len(plan)):                              # or lax.scan, or one jitted step
        x_in, t = sampler.model_input(plan, state)          # scale_model_input, timestep
        state = sampler.step(plan, state, unet(x_in, t), noise)   # noise: stochastic samplers only
    latents = sampler.result(plan, state)

img2img / inpainting: ``plan = sampler.plan(schedule, steps, strength)`` starts where diffusers'
img2img pipeline starts; ``sampler.init(plan, noise, image_latents)`` noises the image latents to
that level; ``samplers.add_noise(plan, x0, noise, k)`` noises to the level of model call k
(inpainting's known region after step k - 1).

Contract:
- The sampler (a frozen dataclass, hashable) is static; the plan and the state are pytrees of
  arrays. ``state.index`` is a traced int32 that ``model_input``/``step`` use to read the plan's
  row, so one compiled step serves a whole run; shapes change only with (sampler, steps).
- ``step`` consumes one model output per call (Heun makes two calls per step). ``noise`` has
  x's shape and is read only when ``sampler.stochastic`` (euler_a, ddim with eta > 0, lcm).
- Schedule math runs on the host in float64 and the tables, state and updates are float32
  whatever the model dtype. Latent layout does not matter (all updates are elementwise).
- A schedule key the config leaves out takes the default of the mirrored diffusers class, as
  ``from_config`` does; an option value a sampler does not implement raises ValueError.
"""
from __future__ import annotations

from .base import Plan, Sampler, State, add_noise
from .discrete import DDIM, LCM, PLMS
from .multistep import DPMSolverPP2M, UniPC
from .schedule import Schedule
from .sigma import Euler, EulerAncestral, Heun, LMS

_FACTORIES = {
    "ddim": DDIM,
    "plms": PLMS,
    "euler": Euler,
    "euler_a": EulerAncestral,
    "heun": Heun,
    "lms": LMS,
    "dpmpp_2m": DPMSolverPP2M,
    "dpmpp_2m_karras": lambda: DPMSolverPP2M(karras=True),
    "unipc": UniPC,
    "lcm": LCM,
}
NAMES = tuple(_FACTORIES)


def get(name: str, **options) -> Sampler:
    """The sampler called ``name`` (a CLI name, see NAMES). options: the sampler's own
    settings, e.g. ``get("ddim", eta=0.5)``."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(NAMES)}")
    return _FACTORIES[name](**options)


def for_scheduler(scheduler_config: dict) -> Sampler:
    """The sampler that mirrors the diffusers scheduler a checkpoint names (its scheduler_config's
    ``_class_name``): what ``DiffusionPipeline.from_pretrained(...)`` would run. Its options (Karras
    sigmas, spacing...) come from the config through ``Schedule.from_config``; a value the sampler does
    not implement raises ValueError there."""
    name = (scheduler_config or {}).get("_class_name")
    for factory in _FACTORIES.values():
        sampler = factory()
        if sampler.diffusers_class == name:
            return sampler
    known = sorted({f().diffusers_class for f in _FACTORIES.values()})
    raise ValueError(f"scheduler_config names scheduler {name!r}, which no sampler mirrors; known: {', '.join(known)}")


__all__ = ["NAMES", "Plan", "Sampler", "Schedule", "State", "add_noise", "for_scheduler", "get"]
