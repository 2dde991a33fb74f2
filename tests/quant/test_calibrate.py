"""Calibration probes: the statistics they record at every conv/linear input of a tiny UNet
equal the inputs diffusers' own modules receive (forward pre-hooks on the PyTorch model), the
model output is unchanged, and the scales they give drive W8A8 end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_models
from quant import calibrate, int8
from sdjax import checkpoint, nn, unet

TIMESTEPS = (10.0, 500.0)


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """Tiny SD1-style UNet in diffusers and sdjax; per layer, every input the torch modules saw
    over two calls, and what calibrate.observe recorded over the same two calls."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    model = UNet2DConditionModel(**tiny_models.STYLES["sd1"]["unet"]).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised layer that would hide a wrong input
            p.add_(torch.randn_like(p) * 0.05)
    folder = str(tmp_path_factory.mktemp("unet"))
    model.save_pretrained(folder)
    params, cfg = checkpoint.load_component(folder, "unet", progress=False)

    seen = {}  # layer name -> list of inputs, channels last

    def hook(name):
        def record(module, args):
            a = args[0].detach().numpy()
            seen.setdefault(name, []).append(a.transpose(0, 2, 3, 1) if a.ndim == 4 else a)
        return record
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_pre_hook(hook(name))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        want = np.stack([model(x, torch.tensor([t, t]), ctx).sample.numpy().transpose(0, 2, 3, 1)
                         for t in TIMESTEPS])

    xs, cs = jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(ctx.numpy())
    # a jitted loop over timesteps: the probes' callbacks fire from inside lax.map
    run = jax.jit(lambda p: jax.lax.map(lambda t: unet.apply(p, cfg, xs, t, cs), jnp.array(TIMESTEPS)))
    outputs = []
    stats = calibrate.observe(params, lambda p: outputs.append(run(p)) or outputs[-1])
    return dict(params=params, seen=seen, stats=stats, run=run, probed_out=np.asarray(outputs[0]), want=want,
                x=xs)


def test_every_conv_and_linear_is_observed_on_every_call(observed):
    stats, seen = observed["stats"], observed["seen"]
    assert set(stats) == set(seen) == set(calibrate.layer_names(observed["params"]))
    for name, s in stats.items():
        assert s.calls == len(TIMESTEPS)
        assert s.numel == sum(a.size for a in seen[name])
        assert s.hist.sum() == s.numel


def test_recorded_maxima_equal_the_inputs_diffusers_layers_receive(observed):
    for name, s in observed["stats"].items():
        a = np.abs(np.concatenate([v.reshape(-1, v.shape[-1]) for v in observed["seen"][name]]))
        want = a.max(0)  # max over both calls, per input channel
        np.testing.assert_allclose(s.absmax_channel, want, atol=1e-4 * want.max(), err_msg=name)
        assert s.absmax == pytest.approx(want.max(), rel=1e-4)


@pytest.mark.parametrize("q", [50.0, 99.0, 99.99, 100.0])
def test_percentiles_over_all_calls(observed, q):
    """The histogram estimate is an upper bound of numpy's inverted-cdf percentile of every |x|
    seen, less than one bin (1/64) above it; 1e-4 slack for PyTorch vs XLA float rounding."""
    for name, s in observed["stats"].items():
        a = np.abs(np.concatenate([v.ravel() for v in observed["seen"][name]]))
        true = np.percentile(a, q, method="inverted_cdf")
        est = s.percentile(q)
        assert true * (1 - 1e-4) - 1e-7 <= est <= true * (1 + 1 / 64) * (1 + 1e-4) + 1e-7, name


def test_conv_in_percentile_is_exact_on_the_sample(observed):
    """conv_in sees the latents themselves: no framework rounding at all."""
    s = observed["stats"]["conv_in"]
    a = np.abs(np.tile(np.asarray(observed["x"]).ravel(), len(TIMESTEPS)))
    assert s.absmax == a.max()
    for q in (90.0, 99.99):
        true = np.percentile(a, q, method="inverted_cdf")
        assert true <= s.percentile(q) < true * (1 + 1 / 64)
    np.testing.assert_array_equal(s.absmax_channel, a.reshape(-1, 4).max(0))


def test_probes_leave_the_output_unchanged(observed):
    """The probed sdjax UNet still computes diffusers' function (the parity tolerance of
    tests/sdjax/test_models.py)."""
    want = observed["want"]
    assert np.abs(observed["probed_out"] - want).max() <= 1e-4 * np.abs(want).max()


def test_calibrated_w8a8_unet_runs_close_to_float(observed):
    """act_scales -> int8.quantize on every layer -> the same jitted loop. Only the integer path
    runs here: end to end the simulated path drifts from it to the level of the quantization
    noise itself (a 1-ulp difference flips an activation code now and then, each flip moves the
    next layer by a whole step, and a few layers later the two runs differ like two draws of
    rounding noise); their per-layer agreement within float rounding is tests/quant/test_int8.py's."""
    flat = nn.flatten(observed["params"])
    for name, a in calibrate.act_scales(observed["stats"], method="max", granularity="channel").items():
        flat[name + ".weight"] = int8.quantize(flat[name + ".weight"], a)
    got = np.asarray(observed["run"](nn.unflatten(flat)))
    want = observed["want"]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-3 < err < 0.06  # measured 0.034 for t=10: quantized, and not far off


# --- small models: names, eager runs, quantized weights, act_scales -----------------------------

def _toy():
    rng = np.random.default_rng(0)
    params = {"token_embedding": {"weight": rng.standard_normal((10, 6)).astype(np.float32)},
              "fc": {"weight": rng.standard_normal((6, 5)).astype(np.float32), "bias": np.zeros(5, np.float32)},
              "conv": {"weight": rng.standard_normal((3, 3, 5, 4)).astype(np.float32)},
              "norm": {"weight": np.ones(4, np.float32)}}

    def run(p, ids=np.array([[1, 2, 3, 4]])):
        h = jnp.take(p["token_embedding"]["weight"], ids, axis=0)  # an embedding is looked up, not probed
        h = nn.linear(h, p["fc"])
        return nn.conv2d(h.reshape(1, 2, 2, 5), p["conv"], stride=2, padding=((0, 1), (0, 1)))
    return params, run


def test_layer_names_exclude_embeddings_and_norms():
    params, _ = _toy()
    assert calibrate.layer_names(params) == ["fc", "conv"]


def test_observe_a_subset_eagerly_and_through_a_quantized_weight():
    params, run = _toy()
    params["conv"]["weight"] = int8.quantize(params["conv"]["weight"])
    stats = calibrate.observe(params, run, names=["conv"])  # no jit: callbacks run op by op
    h = np.asarray(nn.linear(jnp.take(params["token_embedding"]["weight"], np.array([[1, 2, 3, 4]]), axis=0), params["fc"]))
    assert list(stats) == ["conv"] and stats["conv"].calls == 1 and stats["conv"].numel == h.size
    np.testing.assert_allclose(stats["conv"].absmax_channel, np.abs(h).reshape(-1, 5).max(0), rtol=1e-6)
    stats = calibrate.observe(params, run, names="fc")
    np.testing.assert_array_equal(stats["fc"].absmax_channel,
                                  np.abs(params["token_embedding"]["weight"][[1, 2, 3, 4]]).max(0))


def test_unknown_layer_names_are_refused():
    params, run = _toy()
    with pytest.raises(ValueError, match=r"^names contains .*'token_embedding'"):
        calibrate.observe(params, run, names=["fc", "token_embedding"])


def _stats(channel_max, values):
    """LayerStats as a probe would record ``values``."""
    a = np.abs(np.asarray(values, np.float32)).ravel()
    hist = np.bincount(a.view(np.int32) >> (23 - calibrate.MANTISSA_BITS), minlength=calibrate.N_BINS)
    return calibrate.LayerStats(np.asarray(channel_max, np.float32), hist, 1, a.size)


def test_act_scales_methods_and_granularity():
    values = np.concatenate([np.linspace(0, 1, 9999), [100.0]])  # one extreme value
    stats = {"l": _stats([100.0, 0.5, 0.0], values)}
    assert calibrate.act_scales(stats)["l"] == np.float32(100 / 127)
    p = stats["l"].percentile(99.9)
    assert 1.0 <= p <= 1 + 1 / 64
    assert calibrate.act_scales(stats, "percentile", percentile=99.9)["l"] == np.float32(p / 127)
    ch = calibrate.act_scales(stats, "max", "channel")["l"]
    # a channel never seen non-zero falls back to the tensor's clip value
    np.testing.assert_array_equal(ch, np.float32([100 / 127, 0.5 / 127, 100 / 127]))
    ch = calibrate.act_scales(stats, "percentile", "channel", percentile=99.9)["l"]
    np.testing.assert_allclose(ch, np.array([p, 0.5, p]) / 127, rtol=1e-6)
    assert calibrate.act_scales({"z": _stats([0.0, 0.0], np.zeros(4))})["z"] == np.float32(1 / 127)
    # the scales are what int8.quantize takes
    int8.quantize(np.ones((3, 2), np.float32), calibrate.act_scales(stats, granularity="channel")["l"])


def test_act_scales_bad_arguments():
    stats = {"l": _stats([1.0], [1.0])}
    with pytest.raises(ValueError, match="^method must"):
        calibrate.act_scales(stats, method="mse")
    with pytest.raises(ValueError, match="^granularity must"):
        calibrate.act_scales(stats, granularity="group")
    with pytest.raises(ValueError, match="^q must"):
        stats["l"].percentile(0)
