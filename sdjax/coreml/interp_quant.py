"""``sdjax.coreml.interp``'s activation-quantization ops: iOS17 ``quantize`` and ``dequantize``, and
``clip`` (which ``sdjax.coreml.mil.activation_quant`` puts before ``quantize``).

Semantics of coremltools' op definitions (``mil/ops/defs/iOS17/quantization_ops.py``, whose value
inference is ``optimize/_utils.py``'s ``quantize_by_scale_and_zp`` / ``dequantize_by_scale_and_zp``;
``clip`` from ``mil/ops/defs/iOS15/elementwise_unary.py``), written anew:

- ``quantize(input, scale, zero_point=None, axis=None, output_dtype)``:
  ``clip(round(input / scale) + zero_point, lo, hi)`` cast to ``output_dtype`` (int8: [-128, 127],
  uint8: [0, 255]); ``round`` is NumPy's ``around``, half to even; a vector ``scale`` /
  ``zero_point`` lies along ``axis`` (size ``input.shape[axis]``), a scalar needs no axis.
- ``dequantize(input, scale, zero_point=None, axis=None)``: ``(input - zero_point) * scale``, in
  the scale's float type.
- ``clip(x, alpha, beta)``: ``min(max(x, alpha), beta)``.

Imported by ``sdjax.coreml.interp`` (its last import), which registers these with its ``_op``.
"""
from __future__ import annotations

import numpy as np

from .interp import _int, _op

INT_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


def _along(p, ndim, axis, op):
    """Scale or zero point ``p`` shaped to broadcast against a rank-``ndim`` input: a scalar as is,
    a vector along ``axis``."""
    p = np.asarray(p)
    if p.ndim == 0:
        return p
    if p.ndim != 1 or axis is None:
        raise ValueError(f"op {op.name!r} ({op.op_type}): a vector scale/zero_point needs an axis; got shape "
                         f"{p.shape}, axis {axis}")
    shape = [1] * ndim
    shape[axis % ndim] = p.size
    return p.reshape(shape)


@_op("quantize")
def _quantize(op, a):
    x = np.asarray(a["input"], np.float32)
    dtype = np.dtype(str(a["output_dtype"]))
    if dtype not in INT_RANGES:
        raise ValueError(f"op {op.name!r} (quantize): output_dtype {dtype}; Core ML has int8 and uint8")
    axis = _int(a.get("axis"))
    q = np.around(x / _along(a["scale"], x.ndim, axis, op).astype(np.float32))
    if a.get("zero_point") is not None:
        q = q + _along(a["zero_point"], x.ndim, axis, op).astype(np.float32)
    lo, hi = INT_RANGES[dtype]
    return np.clip(q, lo, hi).astype(dtype)


@_op("dequantize")
def _dequantize(op, a):
    q = np.asarray(a["input"])
    axis = _int(a.get("axis"))
    scale = _along(a["scale"], q.ndim, axis, op)
    x = q.astype(np.float32)
    if a.get("zero_point") is not None:
        x = x - _along(a["zero_point"], q.ndim, axis, op).astype(np.float32)
    return x * scale.astype(np.float32)


@_op("clip")
def _clip(op, a):
    return np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"])
