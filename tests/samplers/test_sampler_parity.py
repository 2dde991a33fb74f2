"""Each sampler's whole trajectory (the latents after every model call) equals the diffusers
scheduler of the same config, driven by the same toy model, x_T and step noise, within 1e-5
relative at every call; so do the timesteps fed to the model, img2img plans and add_noise."""
import jax
import numpy as np
import pytest

import samplers
from sampler_reference import (SD_CONFIG, TOLERANCE, diffusers_run, inputs, scan_run, sdjax_run,
                               stepwise_error, toy_model)

STEPS = 30
# diffusers' schedulers turn torch tensors into numpy arrays the way numpy 2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def data():
    return inputs()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", samplers.NAMES)
def test_trajectory_matches_diffusers(data, name, spacing, prediction_type):
    x_T, _, noises = data
    config = dict(SD_CONFIG, timestep_spacing=spacing, prediction_type=prediction_type)
    ref, ref_t, _ = diffusers_run(name, config, STEPS, x_T, noises)
    ours, our_t, plan = sdjax_run(name, config, STEPS, x_T, noises)
    assert len(plan) == len(ref)
    np.testing.assert_array_equal(our_t, ref_t)
    assert stepwise_error(ours, ref) < TOLERANCE


@pytest.mark.parametrize("name", samplers.NAMES)
def test_img2img_and_add_noise_match_diffusers(data, name):
    """strength 0.6 starts at diffusers' img2img timestep; add_noise(plan, x0, noise, k) equals
    scheduler.add_noise at the timestep of call k (img2img's start, inpainting's blend)."""
    x_T, image, noises = data
    ref, ref_t, ref_blend = diffusers_run(name, SD_CONFIG, STEPS, x_T, noises, strength=0.6, image=image)
    ours, our_t, plan = sdjax_run(name, SD_CONFIG, STEPS, x_T, noises, strength=0.6, image=image)
    np.testing.assert_array_equal(our_t, ref_t)
    assert stepwise_error(ours, ref) < TOLERANCE
    blend = np.stack([samplers.add_noise(plan, image, x_T, k) for k in range(1, len(plan))])
    assert stepwise_error(blend, ref_blend) < TOLERANCE


# Non-default config options and sampler settings, each against diffusers.
OPTIONS = [
    ("ddim", dict(timestep_spacing="trailing"), dict(eta=0.5)),
    ("ddim", dict(clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=True), {}),
    ("plms", dict(set_alpha_to_one=True, beta_schedule="linear", beta_start=0.0001, beta_end=0.02), {}),
    ("euler", dict(use_karras_sigmas=True, prediction_type="v_prediction"), {}),
    ("euler", dict(final_sigmas_type="sigma_min", beta_schedule="squaredcos_cap_v2"), {}),
    ("heun", dict(use_karras_sigmas=True, clip_sample=True, clip_sample_range=0.3), {}),
    ("lms", dict(use_karras_sigmas=True), {}),
    ("dpmpp_2m", dict(final_sigmas_type="sigma_min", lower_order_final=False), {}),
    ("dpmpp_2m", dict(euler_at_final=True, final_sigmas_type="sigma_min", beta_schedule="squaredcos_cap_v2"), {}),
    ("dpmpp_2m_karras", dict(final_sigmas_type="sigma_min", prediction_type="sample"), {}),
    ("unipc", dict(solver_order=3, use_karras_sigmas=True), {}),
    ("unipc", dict(solver_type="bh1", final_sigmas_type="sigma_min", prediction_type="sample"), {}),
    ("lcm", dict(clip_sample=True, prediction_type="v_prediction", original_inference_steps=40), {}),
    ("euler_a", dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist(), beta_schedule="linear"), {}),
]


@pytest.mark.parametrize("name,overrides,options", OPTIONS,
                         ids=[f"{n}-{'-'.join(map(str, {**o, **s}))}" for n, o, s in OPTIONS])
def test_options_match_diffusers(data, name, overrides, options):
    x_T, _, noises = data
    config = dict(SD_CONFIG, **overrides)
    ref, ref_t, _ = diffusers_run(name, config, STEPS, x_T, noises, **options)
    ours, our_t, _ = sdjax_run(name, config, STEPS, x_T, noises, **options)
    # Karras timesteps are fractional for the k-diffusion samplers: equal to float32 rounding
    np.testing.assert_allclose(our_t, ref_t, rtol=1e-6, atol=0)
    assert stepwise_error(ours, ref) < TOLERANCE


@pytest.mark.parametrize("name", ["euler", "heun", "lcm"])
def test_missing_keys_take_the_diffusers_class_defaults(data, name):
    """An empty config means each diffusers class's own defaults (different betas for Heun and LCM)."""
    x_T, _, noises = data
    ref, ref_t, _ = diffusers_run(name, {}, 12, x_T, noises)
    ours, our_t, _ = sdjax_run(name, {}, 12, x_T, noises)
    np.testing.assert_array_equal(our_t, ref_t)
    assert stepwise_error(ours, ref) < TOLERANCE


def test_a_wrong_schedule_fails_the_comparison(data):
    """The comparison can fail: a plan built with steps_offset 0 instead of SD's 1 is off by one
    timestep at every call and misses the tolerance by orders of magnitude."""
    x_T, _, noises = data
    ref, ref_t, _ = diffusers_run("ddim", SD_CONFIG, STEPS, x_T, noises)
    ours, our_t, _ = sdjax_run("ddim", dict(SD_CONFIG, steps_offset=0), STEPS, x_T, noises)
    assert np.all(ref_t - our_t == 1)
    assert stepwise_error(ours, ref) > 100 * TOLERANCE
    ours, _, _ = sdjax_run("euler", dict(SD_CONFIG, prediction_type="v_prediction"), STEPS, x_T, noises)
    ref, _, _ = diffusers_run("euler", SD_CONFIG, STEPS, x_T, noises)
    assert stepwise_error(ours, ref) > 100 * TOLERANCE


@pytest.mark.parametrize("name", samplers.NAMES)
def test_host_driven_jitted_step_equals_scan(data, name):
    """One compiled step function, driven from Python call by call, gives the scan's latents."""
    x_T, _, noises = data
    sampler = samplers.get(name)
    plan = sampler.plan(samplers.Schedule.from_config(SD_CONFIG), 12)
    expected, _ = scan_run(sampler, plan, x_T, noises)

    @jax.jit
    def call(plan, state, noise):
        x_in, t = sampler.model_input(plan, state)
        return sampler.step(plan, state, toy_model(x_in, t), noise)

    state = sampler.init(plan, x_T)
    for k in range(len(plan)):
        state = call(plan, state, noises[k])
        np.testing.assert_allclose(np.asarray(state.x), np.asarray(expected[k]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sampler.result(plan, state), state.x)
    assert call._cache_size() == 1
