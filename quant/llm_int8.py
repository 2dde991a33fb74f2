"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 matrix products with outlier decomposition.

For ``X (tokens, in) @ W (in, out)``, following bitsandbytes' ``int8_vectorwise_quant`` and
``int8_mixed_scaled_mm``:

- outlier features: input columns ``O = {c : any_t |X[t, c]| >= threshold}``, over every row of
  this call (so in a batched call the rows of one sample influence another's decomposition);
- activations, row-wise absmax: the outlier *elements* are zeroed, ``cx[t] = max_c |X'[t, c]|``,
  ``Xq = round(X' * 127 / cx[t])``, then every column in ``O`` of ``Xq`` is zeroed;
- weights, column-wise absmax: ``cw[o] = max_c |W[c, o]|``, ``Wq = round(W * 127 / cw[o])``;
- ``Y = (Xq @ Wq) * outer(cx, cw) / 127**2  +  X[:, O] @ Wdq[O, :]``, int32 accumulation, the second
  term in float32 with ``Wdq = Wq * cw / 127``.

The outlier rows of the weight are the *dequantized* int8 rows, as bitsandbytes' inference layer
(``Linear8bitLt(has_fp16_weights=False)``) computes them: only int8 and ``cw`` are stored, so
``nbytes`` is about a quarter of float32, and the outlier term differs from a float weight only by
the weight's own rounding. A row whose every element is an outlier (or zero) gets ``cx = 0`` and
contributes nothing to the int8 term (bitsandbytes would divide by zero there).

jit-compatible with data-dependent ``O``: the integer path gathers at most ``max_outlier_cols``
outlier columns with ``jnp.nonzero(size=...)`` into a small float product, and switches
(``lax.cond``) to a masked full-width float product when a call has more. The ``"simulated"``
path computes the same sum as one float product of the fake-quantized X (outlier columns kept
exact) with ``Wdq``; it is the reference for the integer path.

Convolutions run as the same product over im2col patches, so "features" there are the
``(dy, dx, c)`` patch features (a 1x1 stride-1 convolution is exactly the matrix case).
"""
from __future__ import annotations

import math
import numbers

import flax.struct
import jax
import jax.numpy as jnp

from . import int8

PATHS = int8.PATHS
DEFAULT_THRESHOLD = 6.0


@flax.struct.dataclass
class LLMInt8Weight(int8.Int8Data):
    """Column-wise absmax int8 weight for LLM.int8() products; see the module docstring."""
    method = "llm-int8"  # the recipe method (the weight protocol's name for this type)
    data: jax.Array     # int8, (in, out) or HWIO
    absmax: jax.Array   # float32 (out,): cw, the column absmax (bitsandbytes' SCB)
    threshold: float = flax.struct.field(pytree_node=False, default=DEFAULT_THRESHOLD)
    path: str = flax.struct.field(pytree_node=False, default="integer")
    max_outlier_cols: int = flax.struct.field(pytree_node=False, default=64)

    def dequantize(self, dtype=jnp.float32):
        return (self.data.astype(jnp.float32) * (self.absmax / 127)).astype(dtype)

    def linear(self, x):
        return matmul(x, self)

    def conv2d(self, x, stride, padding):
        kh, kw, cin, cout = self.shape
        flat = self.replace(data=self.data.reshape(kh * kw * cin, cout))
        return matmul(int8.patches(x, kh, kw, stride, padding), flat)


def _check_threshold(threshold):
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold > 0:
        raise ValueError(f"threshold must be a number > 0 (LLM.int8() uses 6.0); got {threshold!r}")
    return float(threshold)


def quantize(w, threshold=DEFAULT_THRESHOLD, path="integer", max_outlier_cols=64):
    """Column-wise absmax int8 of a linear ``(in, out)`` or HWIO conv weight.

    ``threshold`` is the outlier threshold that ``.linear``/``.conv2d`` (and ``matmul`` by default)
    use; ``max_outlier_cols`` bounds the outlier columns taken by the cheap gathered float product
    before a call falls back to a full-width one (the result is the same either way).
    """
    w = int8.check_weight(w)
    threshold = _check_threshold(threshold)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    if isinstance(max_outlier_cols, bool) or not isinstance(max_outlier_cols, int) or max_outlier_cols < 1:
        raise ValueError(f"max_outlier_cols must be an int >= 1; got {max_outlier_cols!r}")
    return LLMInt8Weight(*_colwise_quantize(w), threshold, path, max_outlier_cols)


@jax.jit  # one compile per weight shape instead of op-by-op dispatch
def _colwise_quantize(w):
    wf = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(wf), axis=tuple(range(w.ndim - 1)))
    inv = jnp.where(absmax > 0, 127 / absmax, 0.0)
    return jnp.clip(jnp.round(wf * inv), -127, 127).astype(jnp.int8), absmax


def decompose(x, threshold):
    """Row-wise absmax int8 of ``x (rows, in)`` with outlier columns removed:
    ``(xq float32 codes, cx (rows,), outlier column mask (in,))``."""
    xf = x.astype(jnp.float32)
    big = jnp.abs(xf) >= threshold
    cols = jnp.any(big, axis=0)
    inner = jnp.where(big, 0.0, xf)
    cx = jnp.max(jnp.abs(inner), axis=1)
    inv = jnp.where(cx > 0, 127 / cx, 0.0)
    xq = jnp.where(cols, 0.0, jnp.round(inner * inv[:, None]))
    return xq, cx, cols


def matmul(x, qw, threshold=None, path=None):
    """LLM.int8() ``x (..., in) @ w (in, out)`` -> ``(..., out)`` in ``x.dtype``.

    ``qw``: an ``LLMInt8Weight`` (2-D) or a float ``(in, out)`` array, quantized on the fly.
    ``threshold``/``path`` default to the weight's own (6.0, "integer").
    """
    if not isinstance(qw, LLMInt8Weight):
        w = jnp.asarray(qw)
        if w.ndim != 2:
            raise ValueError(f"qw must be an (in, out) weight for matmul; got shape {tuple(w.shape)}")
        qw = quantize(w, DEFAULT_THRESHOLD if threshold is None else threshold)
    if qw.ndim != 2:
        raise ValueError(f"qw must be an (in, out) weight for matmul; got shape {tuple(qw.shape)} "
                         "(convolutions go through .conv2d)")
    threshold = qw.threshold if threshold is None else _check_threshold(threshold)
    path = qw.path if path is None else path
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    n_in, n_out = qw.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x must have {n_in} features on its last axis to match qw {qw.shape}; "
                         f"got shape {tuple(x.shape)}")
    x = jnp.asarray(x)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), n_in).astype(jnp.float32)
    xq, cx, cols = decompose(x2, threshold)
    wdq = qw.dequantize(jnp.float32)
    if path == "simulated":
        xs = jnp.where(cols, x2, xq * (cx[:, None] / 127))
        y = jnp.matmul(xs, wdq, precision=int8.HIGHEST)
    else:
        acc = jax.lax.dot_general(xq.astype(jnp.int8), qw.data, (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32) * (cx[:, None] * qw.absmax[None, :]) * (1.0 / (127 * 127))
        y = y + _outlier_product(x2, wdq, cols, min(qw.max_outlier_cols, n_in))
    return y.reshape(*lead, n_out).astype(x.dtype)


def _outlier_product(x, w, cols, k):
    """``x[:, O] @ w[O, :]`` in float32 for the columns in the mask ``cols``, static shapes only."""
    def gathered(_):
        idx = jnp.nonzero(cols, size=k, fill_value=0)[0]
        valid = jnp.arange(k) < jnp.sum(cols)
        return jnp.matmul(jnp.where(valid, x[:, idx], 0.0), w[idx], precision=int8.HIGHEST)

    def masked(_):
        return jnp.matmul(jnp.where(cols, x, 0.0), w, precision=int8.HIGHEST)
    if k == cols.shape[0]:
        return masked(None)
    return jax.lax.cond(jnp.sum(cols) > k, masked, gathered, None)
