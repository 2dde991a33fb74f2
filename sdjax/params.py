"""Parameter pytrees: layout conversion to and from PyTorch, random init, shape checks.

sdjax keeps linear weights as ``(in, out)`` and conv weights as ``HWIO``; PyTorch
checkpoints hold ``(out, in)`` and ``OIHW``. Embedding tables are ``(num, dim)`` in both.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from .nn import unflatten

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def canonical_dtype(dtype):
    if isinstance(dtype, str):
        try:
            return jnp.dtype(DTYPES[dtype])
        except KeyError:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None
    return jnp.dtype(dtype)


def _is_embedding(name):
    return name.endswith("embedding.weight")


def torch_to_sdjax(name: str, a: np.ndarray) -> np.ndarray:
    """One tensor from PyTorch layout to sdjax layout."""
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    if a.ndim == 2 and not _is_embedding(name):
        return a.T
    return a


def sdjax_to_torch(name: str, a: np.ndarray) -> np.ndarray:
    """One tensor from sdjax layout back to PyTorch layout."""
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1)
    if a.ndim == 2 and not _is_embedding(name):
        return a.T
    return a


def torch_shape(name: str, shape) -> tuple:
    """The PyTorch-layout shape of a parameter whose sdjax shape is ``shape``."""
    return sdjax_to_torch(name, np.broadcast_to(np.empty((), bool), tuple(shape))).shape


def make_params(shapes: dict, seed: int, dtype="float32"):
    """Random parameters with the given {name: shape}: fan-in scaled normal weights,
    unit norm scales, zero biases. Deterministic from ``seed``; built one tensor at a time."""
    dtype = canonical_dtype(dtype)
    flat = {}
    for i, (name, shape) in enumerate(shapes.items()):
        rng = np.random.default_rng([seed, i])
        if name.endswith("bias"):
            a = np.zeros(shape, np.float32)
        elif len(shape) == 1:
            a = np.ones(shape, np.float32)
        elif _is_embedding(name):
            a = rng.standard_normal(shape, dtype=np.float32) * 0.02
        else:
            fan_in = int(np.prod(shape[:-1]))
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(fan_in))
        flat[name] = jnp.asarray(a, dtype=dtype)
    return unflatten(flat)


# shape-table builders used by each model's param_shapes

def conv_shape(s, name, cin, cout, k=3, bias=True):
    s[f"{name}.weight"] = (k, k, cin, cout)
    if bias:
        s[f"{name}.bias"] = (cout,)


def linear_shape(s, name, cin, cout, bias=True):
    s[f"{name}.weight"] = (cin, cout)
    if bias:
        s[f"{name}.bias"] = (cout,)


def norm_shape(s, name, c):
    s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)


def check_shapes(flat_shapes: dict, expected: dict, source: str):
    """Compare {name: shape} found in a checkpoint with the {name: shape} a config needs.

    Collects every problem and raises one error naming all of them.
    """
    missing = [k for k in expected if k not in flat_shapes]
    unexpected = [k for k in flat_shapes if k not in expected]
    wrong = [(k, expected[k], tuple(flat_shapes[k])) for k in expected
             if k in flat_shapes and tuple(flat_shapes[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source}: the weights do not match the config"]

    def listing(title, items):
        if items:
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8])
                         + (f", ... ({len(items) - 8} more)" if len(items) > 8 else ""))
    listing("missing keys", missing)
    listing("unexpected keys", unexpected)
    listing("shape mismatches", [f"{k} expected {e} got {g}" for k, e, g in wrong])
    raise CheckpointError("\n".join(lines))


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (names the file and the problem)."""
