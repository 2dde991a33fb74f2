"""More MIL ops for ``sdjax.coreml.interp``: the ones coremltools' PyTorch frontend emits for
apple/ml-stable-diffusion's packages (``torch2coreml.py``) and sdjax's builders do not, so the
interpreter can run Apple's own TextEncoder, Unet, VAE and ControlNet packages
(``sdjax verify-coreml``).

Imported once at the bottom of ``interp``, which registers them in its op table; nothing here is
called directly. What each computes is read from coremltools' op definitions
(``coremltools/converters/mil/mil/ops/defs/iOS15..iOS18``), written anew in NumPy:

* comparisons (``equal`` ... ``greater_equal``; bool results) and ``logical_*``: CLIP's pooling
  compares ids with ``eos_token_id`` (transformers' non-legacy path);
* ``reduce_argmax`` / ``reduce_argmin`` over one ``axis`` (default -1): the pooled position. Ties
  go to the first index, as NumPy's; Core ML documents no tie rule ("the identity of the return
  value is not guaranteed"), and CLIP's ``argmax`` of ``ids == eos`` relies on the first;
* ``gather_nd`` (iOS15 and iOS16+'s ``batch_dims``): the pooled state, ``x[arange(B), pos]``;
* ``stack``, ``square``, ``pad`` (constant / reflect / replicate over the last ``len(pad) / 2``
  axes), ``select``, ``tile``, ``floor_div``, ``floor``, ``ceil``, ``round``, ``sign``,
  ``inverse``, ``reduce_prod``, ``fill``, ``range_1d``;
* ``scaled_dot_product_attention`` (iOS18): what the frontend makes of
  ``F.scaled_dot_product_attention`` (diffusers' VAE mid-block attention) at an iOS18 target.
"""
from __future__ import annotations

import numpy as np

from .interp import _axes, _float, _int, _ints, _op

_COMPARE = {
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


@_op(*_COMPARE)
def _compare(op, a):
    return _COMPARE[op.op_type](a["x"], a["y"])


@_op("logical_not")
def _logical_not(op, a):
    return np.logical_not(a["x"])


@_op("floor_div")
def _floor_div(op, a):
    return np.floor_divide(a["x"], a["y"])


# round: halves to even, as np.round and coremltools' value inference (its docs: "0.5 is rounded to 0")
_UNARY = {"square": np.square, "floor": np.floor, "ceil": np.ceil, "sign": np.sign, "round": np.round}


@_op(*_UNARY)
def _unary(op, a):
    return _UNARY[op.op_type](a["x"])


@_op("inverse")
def _inverse(op, a):
    return 1.0 / (a["x"] + _float(a.get("epsilon"), 1e-4))


@_op("select")
def _select(op, a):
    return np.where(np.asarray(a["cond"]).astype(bool), a["a"], a["b"])


@_op("reduce_argmax", "reduce_argmin")
def _reduce_arg(op, a):
    x = a["x"]
    axis = _int(a.get("axis"), -1) % x.ndim
    out = (np.argmax if op.op_type == "reduce_argmax" else np.argmin)(x, axis=axis)  # first of ties
    return np.expand_dims(out, axis) if bool(a.get("keep_dims", False)) else out


@_op("reduce_prod")
def _reduce_prod(op, a):
    x = a["x"]
    return np.prod(x, axis=_axes(a.get("axes"), x.ndim), keepdims=bool(a.get("keep_dims", False)))


@_op("stack")
def _stack(op, a):
    return np.stack(a["values"], axis=_int(a["axis"]))


@_op("tile")
def _tile(op, a):
    return np.tile(a["x"], _ints(a["reps"]))


@_op("fill")
def _fill(op, a):
    return np.full(_ints(a["shape"]), a.get("value", 0.0))


@_op("range_1d")
def _range_1d(op, a):
    return np.arange(a["start"], a["end"], a["step"])


@_op("pad")
def _pad(op, a):
    x, pad = a["x"], _ints(a["pad"])
    n = len(pad) // 2  # the last n axes are padded, pad[2i] before and pad[2i+1] after
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    mode = str(a.get("mode", "constant"))
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=_float(a.get("constant_val"), 0.0))
    if mode in ("reflect", "replicate"):
        return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
    raise ValueError(f"pad: unknown mode {mode!r}")


def _gather_nd(x, idx, batch_dims):
    if batch_dims:
        return np.stack([_gather_nd(x[i], idx[i], batch_dims - 1) for i in range(x.shape[0])])
    depth = idx.shape[-1]
    flat = idx.reshape(-1, depth)
    out = x[tuple(flat.T)]  # (M,) + x.shape[depth:]; NumPy raises on an index out of range
    return out.reshape(idx.shape[:-1] + x.shape[depth:])


@_op("gather_nd")
def _gather_nd_op(op, a):
    return _gather_nd(a["x"], np.asarray(a["indices"]).astype(np.int64), _int(a.get("batch_dims"), 0))


@_op("scaled_dot_product_attention")
def _sdpa(op, a):
    q, k, v = a["query"], a["key"], a["value"]
    s = np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(np.float32(q.shape[-1])).astype(q.dtype)
    mask = a.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    e = np.exp(s - np.max(s, axis=-1, keepdims=True))
    return np.matmul(e / np.sum(e, axis=-1, keepdims=True), v)
