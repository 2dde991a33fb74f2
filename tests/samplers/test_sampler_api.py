"""The samplers API: names, argument checks, the Schedule config, plan shapes and pytrees."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samplers
from sampler_reference import SD_CONFIG

SCHEDULE = samplers.Schedule.from_config(SD_CONFIG)


def test_names():
    assert samplers.NAMES == ("ddim", "plms", "euler", "euler_a", "heun", "lms", "dpmpp_2m",
                              "dpmpp_2m_karras", "unipc", "lcm")
    for name in samplers.NAMES:
        assert samplers.get(name).name == name


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown sampler 'dpm'") as e:
        samplers.get("dpm")
    assert all(name in str(e.value) for name in samplers.NAMES)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        samplers.get("euler").plan(SCHEDULE, steps)


@pytest.mark.parametrize("strength", [-0.1, 1.01, float("nan")])
def test_bad_strength(strength):
    with pytest.raises(ValueError, match="strength"):
        samplers.get("ddim").plan(SCHEDULE, 20, strength)


def test_strength_too_small_for_the_steps():
    with pytest.raises(ValueError, match="no denoising step"):
        samplers.get("ddim").plan(SCHEDULE, 20, 0.04)
    assert len(samplers.get("heun").plan(SCHEDULE, 20, 0.05)) == 1  # the last lone Euler call


@pytest.mark.parametrize("name,options", [
    ("ddim", dict(thresholding=True)), ("plms", dict(prediction_type="sample")),
    ("euler_a", dict(prediction_type="sample")), ("euler", dict(timestep_type="continuous")),
    ("dpmpp_2m", dict(solver_type="heun")), ("unipc", dict(disable_corrector=[1])),
    ("lms", dict(timestep_spacing="karras")), ("heun", dict(beta_schedule="exp")),
])
def test_unsupported_options_raise(name, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        samplers.get(name).plan(SCHEDULE.replace(**options), 10)


def test_lcm_steps_cannot_exceed_original_inference_steps():
    with pytest.raises(ValueError, match="original_inference_steps"):
        samplers.get("lcm").plan(SCHEDULE, 51)


def test_stochastic_step_needs_noise():
    sampler = samplers.get("euler_a")
    plan = sampler.plan(SCHEDULE, 4)
    state = sampler.init(plan, jnp.ones((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="noise"):
        sampler.step(plan, state, state.x)
    assert samplers.get("ddim", eta=0.3).stochastic and not samplers.get("ddim").stochastic
    with pytest.raises(ValueError, match="eta"):
        samplers.get("ddim", eta=-1.0)


def test_schedule_is_a_frozen_hashable_config(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD_CONFIG))
    from_file = samplers.Schedule.from_config(path)
    assert from_file == SCHEDULE and hash(from_file) == hash(SCHEDULE)
    assert "_class_name" not in SCHEDULE and SCHEDULE.get("steps_offset") == 1
    v = samplers.Schedule.from_config(SD_CONFIG, prediction_type="v_prediction")
    assert v.get("prediction_type") == "v_prediction" and v != SCHEDULE
    # a key the config leaves out takes the mirrored class's default
    assert samplers.get("ddim").options(SCHEDULE)["timestep_spacing"] == "leading"
    assert samplers.get("euler").options(SCHEDULE)["timestep_spacing"] == "linspace"
    assert samplers.get("dpmpp_2m_karras").options(SCHEDULE)["use_karras_sigmas"] is True
    # the name pins what it means, whatever the config says
    assert samplers.get("plms").options(SCHEDULE.replace(skip_prk_steps=False))["skip_prk_steps"] is True
    dpm = samplers.get("dpmpp_2m").options(SCHEDULE.replace(solver_order=3, algorithm_type="sde-dpmsolver++"))
    assert (dpm["solver_order"], dpm["algorithm_type"]) == (2, "dpmsolver++")


def test_class_defaults_follow_diffusers_from_config(tmp_path):
    """A DDIM config built in memory lists the keys it defaulted (_use_default_values) and
    from_config gives Euler its own "linspace"; saved to disk every key is explicit, "leading"."""
    import diffusers
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1)
    ddim.save_pretrained(tmp_path)
    for config in (ddim.config, diffusers.DDIMScheduler.from_pretrained(tmp_path).config):
        want = diffusers.EulerDiscreteScheduler.from_config(config).config.timestep_spacing
        got = samplers.get("euler").options(samplers.Schedule.from_config(dict(config)))["timestep_spacing"]
        assert got == want
    assert got == "leading" and samplers.get("euler").options(dict(ddim.config))["timestep_spacing"] == "linspace"


def test_plan_and_state_are_pytrees_with_static_shapes():
    sampler = samplers.get("unipc")
    plan = sampler.plan(SCHEDULE, 7)
    assert len(plan) == plan.num_calls == 7
    leaves = jax.tree_util.tree_leaves(plan)
    assert all(leaf.dtype == np.float32 and leaf.shape[:1] in ((7,), ()) for leaf in leaves)
    state = sampler.init(plan, np.zeros((2, 8, 8, 4), np.float32))
    assert state.history.shape == (2, 2, 8, 8, 4) and state.index.dtype == jnp.int32
    # a sampler is a static jit argument: equal settings hash equal
    assert hash(samplers.get("ddim", eta=0.5)) == hash(samplers.get("ddim", eta=0.5))
    assert samplers.get("dpmpp_2m") != samplers.get("dpmpp_2m_karras")
    assert len(samplers.get("heun").plan(SCHEDULE, 7)) == 13
    assert len(samplers.get("plms").plan(SCHEDULE, 7)) == 8


def test_init_scales_x_T_and_img2img_noises_the_image():
    x = np.ones((1, 4, 2, 2), np.float32)
    sampler = samplers.get("euler")
    plan = sampler.plan(SCHEDULE, 10)
    np.testing.assert_allclose(sampler.init(plan, x).x, x * plan.init_noise_sigma)
    plan = sampler.plan(SCHEDULE, 10, strength=0.5)
    state = sampler.init(plan, x, image_latents=2 * x)
    np.testing.assert_allclose(state.x, 2 * x + plan.noise_level[0] * x, rtol=1e-6)


def test_for_scheduler_is_the_checkpoints_own_scheduler():
    """The sampler mirroring the diffusers scheduler a scheduler_config names (Apple's reading runs it)."""
    assert samplers.for_scheduler({"_class_name": "PNDMScheduler", "skip_prk_steps": True}).name == "plms"
    assert samplers.for_scheduler({"_class_name": "EulerDiscreteScheduler"}).name == "euler"
    assert samplers.for_scheduler({"_class_name": "DPMSolverMultistepScheduler"}).name == "dpmpp_2m"
    with pytest.raises(ValueError, match="'KDPM2DiscreteScheduler', which no sampler mirrors; known: DDIMScheduler"):
        samplers.for_scheduler({"_class_name": "KDPM2DiscreteScheduler"})
