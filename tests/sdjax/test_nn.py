"""The primitives: attention chunking, timestep embedding (against diffusers), the im2col
convolution (against XLA's), the dotted-path trees and the quantized-weight protocol."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import nn
from tiny_models import TOL, rel_err


def test_chunked_attention_equals_unchunked():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(k1, (2, 300, 32))
    k = jax.random.normal(k2, (2, 77, 32))
    v = jax.random.normal(k3, (2, 77, 32))
    full = nn.attention(q, k, v, heads=4, chunk_elements=1 << 30)
    chunked = nn.attention(q, k, v, heads=4, chunk_elements=64 * 77)  # 64 queries; 300 is no multiple
    assert nn.query_chunk(8, 300, 77, 64 * 77) == 64 and nn.query_chunk(8, 300, 77, 1 << 30) is None
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-5, atol=1e-6)
    # short sequences: whole heads per step, 3 of the 8 (so the last step's group is padded)
    grouped = nn.attention(q, k, v, heads=4, chunk_elements=3 * 300 * 77)
    assert nn.query_chunk(8, 300, 77, 3 * 300 * 77) == 300
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(full), rtol=1e-5, atol=1e-6)
    hlo = jax.jit(lambda q: nn.attention(q, k, v, heads=4, chunk_elements=3 * 300 * 77)).lower(q).as_text()
    assert "3x300x77" in hlo or "[3,300,77]" in hlo


def test_attention_chunk_elements_sets_the_default_within_its_block():
    q = jnp.ones((1, 300, 32))
    kv = jnp.ones((1, 77, 32))
    prims = lambda: {e.primitive.name for e in jax.make_jaxpr(  # noqa: E731
        lambda q: nn.attention(q, kv, kv, heads=4))(q).eqns}
    with nn.attention_chunk_elements(64 * 77):
        assert "scan" in prims()                   # chunked: a loop over query blocks
        inner = prims()
    assert "scan" not in prims() and inner != prims()    # the default (4M elements) is restored
    with nn.attention_chunk_elements(1 << 62):
        assert "scan" not in prims()


def test_attention_matches_torch_sdpa():
    """Multi-head attention as torch's scaled_dot_product_attention computes it."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, n, 32), dtype=np.float32) for n in (10, 7, 7))
    heads = 4
    split = lambda a: torch.from_numpy(a).reshape(2, -1, heads, 8).transpose(1, 2)  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    want = want.transpose(1, 2).reshape(2, 10, 32).numpy()
    assert rel_err(nn.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), heads=heads), want) < 1e-5


def test_chunked_attention_never_materialises_full_scores():
    """At 4096 tokens the compiled program holds no (B, heads, 4096, 4096) array."""
    q = jnp.zeros((2, 4096, 320))
    hlo = jax.jit(lambda q: nn.attention(q, q, q, heads=8)).lower(q).as_text()
    c = nn.query_chunk(16, 4096, 4096)
    assert c < 4096 and "4096x4096" not in hlo
    assert f"[{c},4096]" in hlo or f"{c}x4096" in hlo


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0.0, 1.0, 499.0, 999.0])
    for flip, shift in [(True, 0), (False, 1)]:
        want = get_timestep_embedding(t, 320, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
        got = nn.timestep_embedding(jnp.asarray(t.numpy()), 320, flip, shift)
        # one ulp of exp() in the frequencies, times t=999, moves the phase by ~6e-5
        np.testing.assert_allclose(np.asarray(got), want, atol=TOL)


@pytest.mark.parametrize("x_shape,w_shape,stride,padding", [
    ((2, 8, 8, 64), (3, 3, 64, 32), 1, ((1, 1), (1, 1))),
    ((2, 9, 7, 64), (3, 3, 64, 32), 2, ((0, 1), (0, 1))),   # VAE downsampler padding, odd sizes
    ((1, 16, 16, 16), (3, 3, 16, 8), 2, ((1, 1), (1, 1))),
    ((2, 16, 16, 64), (1, 1, 64, 32), 1, ((0, 0), (0, 0))),
])
def test_conv_as_matmul_equals_xla_convolution(x_shape, w_shape, stride, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    w = jax.random.normal(jax.random.PRNGKey(1), w_shape)
    want = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert rel_err(nn._conv_as_matmul(x, w, stride, padding), want) < 1e-6


def test_conv2d_and_linear_match_torch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 9, 7), dtype=np.float32)          # NCHW, odd sizes
    w = rng.standard_normal((5, 3, 3, 3), dtype=np.float32)          # OIHW
    b = rng.standard_normal(5, dtype=np.float32)
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                      stride=2, padding=1).numpy().transpose(0, 2, 3, 1)
    got = nn.conv2d(jnp.asarray(x.transpose(0, 2, 3, 1)),
                    {"weight": jnp.asarray(w.transpose(2, 3, 1, 0)), "bias": jnp.asarray(b)}, stride=2, padding=1)
    assert rel_err(got, want) < 1e-5
    lw = rng.standard_normal((6, 4), dtype=np.float32)               # (out, in) as torch holds it
    xl = rng.standard_normal((3, 4), dtype=np.float32)
    want = torch.nn.functional.linear(torch.from_numpy(xl), torch.from_numpy(lw)).numpy()
    assert rel_err(nn.linear(jnp.asarray(xl), {"weight": jnp.asarray(lw.T)}), want) < 1e-6


def test_flatten_unflatten_round_trip_and_child():
    tree = {"a": {"b": {"weight": 1, "bias": 2}, "c": 3}, "d": 4}
    flat = nn.flatten(tree)
    assert flat == {"a.b.weight": 1, "a.b.bias": 2, "a.c": 3, "d": 4}
    assert nn.unflatten(flat) == tree
    assert nn.child(tree, "a.b") == {"weight": 1, "bias": 2}


@jax.tree_util.register_pytree_node_class
class _Scaled:
    """A weight of the protocol: int8 values and one scale; optionally its own linear path."""
    method = "test-scaled"

    def __init__(self, q, scale, own_linear=False):
        self.q, self.scale, self.own_linear = q, scale, own_linear

    def tree_flatten(self):
        return (self.q, self.scale), self.own_linear

    @classmethod
    def tree_unflatten(cls, own_linear, children):
        return cls(*children, own_linear=own_linear)

    @property
    def shape(self):
        return self.q.shape

    def dequantize(self, dtype=jnp.float32):
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)

    def __getattr__(self, name):
        if name == "linear" and self.__dict__.get("own_linear"):
            return lambda x: jnp.full((x.shape[0], self.q.shape[1]), 42.0, x.dtype)
        raise AttributeError(name)


def test_quantized_weight_protocol():
    q = jnp.asarray(np.arange(-6, 6, dtype=np.int8).reshape(4, 3))
    w = _Scaled(q, jnp.float32(0.5))
    x = jnp.ones((2, 4), jnp.float32)
    assert nn.is_quantized(w) and not nn.is_quantized(q) and not nn.is_quantized(np.zeros(3))
    assert nn.method_of(w) == "test-scaled" and nn.method_of(jnp.zeros(3)) == "float"
    np.testing.assert_array_equal(nn.float_value(w), np.asarray(q, np.float32) * 0.5)
    # dequantize-then-float, through a jitted layer
    got = jax.jit(nn.linear)(x, {"weight": w, "bias": jnp.ones(3)})
    np.testing.assert_allclose(np.asarray(got), np.ones((2, 4)) @ (np.asarray(q) * 0.5) + 1, rtol=1e-6)
    # a weight with its own linear path replaces the float matmul
    own = _Scaled(q, jnp.float32(0.5), own_linear=True)
    np.testing.assert_array_equal(np.asarray(nn.linear(x, {"weight": own})), np.full((2, 3), 42.0))


def test_chunked_attention_gradient_equals_unchunked():
    """Chunks are recomputed in the backward pass (``jax.checkpoint``); the gradient is the same."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = jax.random.normal(k1, (2, 300, 32)), jax.random.normal(k2, (2, 77, 32)), jax.random.normal(k3, (2, 77, 32))

    def loss(q, k, v, ce):
        return jnp.sum(jnp.sin(nn.attention(q, k, v, heads=4, chunk_elements=ce)))
    full = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 1 << 30)
    chunked = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 64 * 77)
    for a, b in zip(full, chunked):
        assert rel_err(b, a) < 1e-5


def test_remat_recomputes_with_the_same_values_and_gradients():
    """``nn.remat(f)``: f's values and gradients (pytree and integer arguments included)."""
    def f(x, p, idx):
        return jnp.tanh(x @ p["w"] + p["b"][idx])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8), dtype=np.float32))
    p = {"w": jnp.asarray(rng.standard_normal((8, 8), dtype=np.float32)), "b": jnp.ones((3, 8))}
    idx = jnp.array([0, 2, 1, 1])
    loss = lambda g: lambda x, p: jnp.sum(jnp.square(g(x, p, idx)))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(nn.remat(f)(x, p, idx)), np.asarray(f(x, p, idx)))
    want, got = jax.grad(loss(f), argnums=(0, 1))(x, p), jax.grad(loss(nn.remat(f)), argnums=(0, 1))(x, p)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
