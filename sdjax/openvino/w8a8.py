"""sdjax's W8A8 int8 weights as OpenVINO's int8 path: FakeQuantize on activations, i8 weight constants.

OpenVINO's CPU plugin runs a convolution or matrix product on int8 x int8 -> int32 kernels when
its low-precision transformations find this form: the activation goes through ``FakeQuantize``
(levels 255 or 256) and the weight is an ``i8`` constant followed by ``Convert`` and a
``Multiply`` by its scales. sdjax's W8A8 layer (``quant.int8.Int8Weight`` with a per-tensor
``act_scale``) computes ``clip(round(x / act_scale), -127, 127)`` and an int8 product with its
int8 ``data``, rescaled by ``act_scale * scale``. The JAX frontend has no ``round`` or ``min``
rule, so the graph cannot be written as sdjax writes it. Instead:

1. ``mark(params)`` replaces each such weight by an ``OVInt8Weight`` (same int8 data, same scales,
   bit for bit). Its ``linear``/``conv2d`` trace ``max(x, MARKER_k)`` -- an identity whose constant
   ``MARKER_k = -2**100 * (1 + k / 2**22)`` names the layer -- and a float product with the weight
   ``convert(data) * scale``, data stored as i8 in the layout OpenVINO's own op takes (OIHW for a
   convolution, so no transpose sits between the constant and its dequantization).
2. ``to_fake_quantize(model, marks)`` finds each marker ``Maximum`` in the converted ov.Model and
   replaces it by ``FakeQuantize(max(x, -127 s), -128 s, 127 s, -128 s, 127 s, levels=256)`` with
   the layer's ``s = act_scale``: ``round(x / s)`` clipped to [-127, 127], times ``s`` -- sdjax's
   activation codes. (``levels=255`` on [-127 s, 127 s], the same function on paper, is not what
   the CPU plugin computes: its u8 convolution re-grids 255 levels onto 256 and was off by ~2% of
   the output range in a one-layer check; the 256-level signed grid is exact.) A marker left over
   (or a layer never found) is an error, never a silent float layer.

Per-input-channel activation scales (``granularity="channel"``), folded into the weight by sdjax,
leave no per-tensor activation scale for an integer kernel; they raise ValueError here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import nn

_MARK_BASE = -float(2 ** 100)


def marker_value(k):
    return np.float32(_MARK_BASE * (1 + k / 2 ** 22))


def marker_index(v):
    """The layer number encoded in a marker constant, or None for any other value."""
    v = float(v)
    if not v <= _MARK_BASE * 0.999:
        return None
    k = round((v / _MARK_BASE - 1) * 2 ** 22)
    return k if marker_value(k) == np.float32(v) else None


class OVInt8Weight(nn.ShapedWeight):
    """A W8A8 weight traced for OpenVINO (see the module docstring). Not a pytree with leaves: its
    arrays become constants of the traced jaxpr and sdjax's tie to the layer input leaves it alone."""

    method = "int8-w8a8"

    def __init__(self, qw, tag):
        if qw.act_scale is None:
            raise ValueError("OVInt8Weight needs a W8A8 weight (act_scale given)")
        if np.ndim(qw.act_scale) != 0:
            raise ValueError("the OpenVINO int8 path takes a per-tensor act_scale (granularity='tensor'); "
                             f"got one of shape {np.shape(qw.act_scale)}")
        self.data = np.asarray(qw.data)                  # int8, sdjax layout
        self.scale = np.asarray(qw.scale, np.float32)    # (out,)
        self.act_scale = np.float32(qw.act_scale)
        self.tag = tag
        self.shape = self.data.shape

    def dequantize(self, dtype=jnp.float32):
        return (self.data.astype(np.float32) * self.scale).astype(dtype)

    def _mark(self, x):
        m = jnp.full((1,) * x.ndim, marker_value(self.tag), jnp.float32)
        return jnp.maximum(x.astype(jnp.float32), m)

    def linear(self, x):
        # NumPy operands stay NumPy constants of the jaxpr, which OpenVINO's Constant shares (no copy)
        w = jax.lax.convert_element_type(self.data, jnp.float32) * self.scale[None, :]
        y = jax.lax.dot_general(self._mark(x), w, (((x.ndim - 1,), (0,)), ((), ())))
        return y.astype(x.dtype)

    def conv2d(self, x, stride, padding):
        oihw = np.ascontiguousarray(self.data.transpose(3, 2, 0, 1))
        w = jax.lax.convert_element_type(oihw, jnp.float32) * self.scale[:, None, None, None]
        y = jax.lax.conv_general_dilated(self._mark(x), w, (stride, stride), [tuple(p) for p in padding],
                                         dimension_numbers=("NHWC", "OIHW", "NHWC"))
        return y.astype(x.dtype)


jax.tree_util.register_pytree_node(OVInt8Weight, lambda w: ((), w), lambda aux, _: aux)


def mark(params):
    """``(params', marks)``: every W8A8 ``Int8Weight`` replaced by an ``OVInt8Weight``;
    ``marks = {tag: (layer name, act_scale)}``."""
    flat = nn.flatten(params)
    marks = {}
    for key in sorted(flat):
        w = flat[key]
        if getattr(w, "method", None) == "int8-w8a8" and hasattr(w, "data") and hasattr(w, "scale"):
            tag = len(marks)
            flat[key] = OVInt8Weight(w, tag)
            marks[tag] = (key.rsplit(".weight", 1)[0], float(w.act_scale))
        elif nn.is_quantized(w) and getattr(w, "act_scale", None) is not None:
            raise ValueError(f"{key}: {type(w).__name__} with activation quantization has no OpenVINO "
                             "int8 form here (only quant.int8 W8A8 weights do)")
    return nn.unflatten(flat), marks


def _constant_value(output):
    """The value of a Constant (possibly behind Broadcast/Convert nodes), else None."""
    node = output.get_node()
    while node.get_type_name() in ("Broadcast", "Convert", "Reshape") and node.get_input_size() >= 1:
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return node.get_data()


def to_fake_quantize(model, marks):
    """Replace each marker ``Maximum`` of ``model`` (an ov.Model) by a FakeQuantize with the layer's
    activation scale, in place. Returns the number replaced; raises ValueError unless every layer
    in ``marks`` was found exactly once."""
    from openvino import opset13 as ops

    found = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Maximum":
            continue
        for i in (0, 1):
            v = _constant_value(node.input_value(i))
            if v is None or v.size == 0 or not np.all(v == v.flat[0]):
                continue
            tag = marker_index(v.flat[0])
            if tag is None:
                continue
            if tag not in marks or tag in found:
                raise ValueError(f"marker {tag} found twice or unknown")
            s = np.float32(marks[tag][1])
            x = ops.maximum(node.input_value(1 - i), ops.constant(np.array(-127 * s, np.float32)))
            lo, hi = (ops.constant(np.array(v * s, np.float32)) for v in (-128, 127))
            fq = ops.fake_quantize(x, lo, hi, lo, hi, 256, name=f"fq/{marks[tag][0]}")
            node.output(0).replace(fq.output(0))
            found[tag] = node
            break
    missing = sorted(set(marks) - set(found))
    if missing:
        raise ValueError(f"{len(missing)} W8A8 layers lost their activation marker in the converted model "
                         f"(first: {marks[missing[0]][0]})")
    model.validate_nodes_and_infer_types()
    return len(found)


def runtime_precisions(compiled, types=("Convolution", "MatMul", "FullyConnected")):
    """``{(layer type, runtime precision): count}`` over the compiled model's executed graph, for the
    compute layers: ``I8``/``U8`` show int8 kernels ran."""
    counts = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        t = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if t not in types:
            continue
        prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        counts[(t, prec)] = counts.get((t, prec), 0) + 1
    return counts
