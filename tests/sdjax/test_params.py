"""Parameter layout conversion (against the layouts torch's own layers hold), random init, the
shape check's one error that names every problem, dtype names."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import nn, params
from sdjax.params import CheckpointError


def test_layout_conversion_is_what_torch_layers_compute():
    """A torch Linear/Conv2d weight converted to sdjax layout gives the same outputs in nn."""
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(5, 7), torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 5)
    img = torch.randn(1, 3, 6, 6)
    ours = {k: params.torch_to_sdjax(k, v.detach().numpy()) for k, v in lin.state_dict().items()}
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(nn.linear(jnp.asarray(x.numpy()), ours)), lin(x).numpy(), rtol=1e-5,
                                   atol=1e-6)
        want = conv(img).numpy().transpose(0, 2, 3, 1)
    ours = {k: params.torch_to_sdjax(k, v.detach().numpy()) for k, v in conv.state_dict().items()}
    got = nn.conv2d(jnp.asarray(img.numpy().transpose(0, 2, 3, 1)), ours)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,shape", [("a.weight", (3, 4, 5, 6)), ("b.weight", (3, 4)), ("c.bias", (5,)),
                                        ("token_embedding.weight", (10, 4))])
def test_layout_conversion_round_trips(name, shape):
    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    back = params.sdjax_to_torch(name, params.torch_to_sdjax(name, a))
    np.testing.assert_array_equal(back, a)
    assert params.torch_shape(name, params.torch_to_sdjax(name, a).shape) == shape
    if name.startswith("token_embedding"):  # embedding tables keep (num, dim)
        assert params.torch_to_sdjax(name, a).shape == shape


def test_check_shapes_names_every_problem():
    expected = {f"k{i}": (2, 2) for i in range(12)}
    found = {**{f"k{i}": (2, 2) for i in range(1, 11)}, "k10": (3, 2), "extra": (1,)}
    with pytest.raises(CheckpointError) as e:
        params.check_shapes(found, expected, "x/unet.safetensors")
    msg = str(e.value)
    assert msg.startswith("x/unet.safetensors: the weights do not match the config")
    assert "missing keys (2): k0, k11" in msg and "unexpected keys (1): extra" in msg
    assert "k10 expected (2, 2) got (3, 2)" in msg
    many = {f"m{i}": (1,) for i in range(11)}
    with pytest.raises(CheckpointError) as e:
        params.check_shapes({}, many, "f")
    assert str(e.value).endswith("missing keys (11): m0, m1, m2, m3, m4, m5, m6, m7, ... (3 more)")
    params.check_shapes(dict(expected), expected, "f")  # a match raises nothing


def test_make_params_is_deterministic_and_scaled():
    shapes = {"l.weight": (256, 64), "l.bias": (64,), "n.weight": (64,), "e.token_embedding.weight": (10, 8)}
    a, b = params.make_params(shapes, 1), params.make_params(shapes, 1)
    fa, fb = nn.flatten(a), nn.flatten(b)
    assert all(np.array_equal(fa[k], fb[k]) for k in shapes)
    assert {k: v.shape for k, v in fa.items()} == shapes
    assert float(jnp.abs(fa["l.bias"]).max()) == 0 and float(fa["n.weight"].min()) == 1
    assert abs(float(fa["l.weight"].std()) - 1 / 16) < 0.005          # fan-in 256
    assert not np.array_equal(fa["l.weight"], nn.flatten(params.make_params(shapes, 2))["l.weight"])
    assert nn.flatten(params.make_params(shapes, 1, "bfloat16"))["l.weight"].dtype == jnp.bfloat16


def test_dtype_names():
    assert params.canonical_dtype("float16") == jnp.float16
    assert params.canonical_dtype(jnp.bfloat16) == jnp.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype 'float8'.*bfloat16"):
        params.canonical_dtype("float8")
