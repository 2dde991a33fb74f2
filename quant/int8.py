"""Symmetric per-output-channel int8 weights, weight-only (W8A16) or with int8 activations (W8A8).

A weight ``w`` (linear ``(in, out)`` or conv ``HWIO``) is stored as int8 ``data`` and one float32
``scale`` per output channel (the last axis): ``w ~= data * scale`` with
``scale = max|w[..., o]| / 127`` and ``data = clip(round(w / scale), -127, 127)`` (round half to
even). -128 is never used, so the grid is symmetric and negation is exact.

W8A16 (``act_scale=None``): activations stay float; the weight is expanded inside the jitted
forward and the float primitive runs.

W8A8 (``act_scale`` given, calibrated on real activations by ``quant.calibrate``): activations are
quantized as ``q = clip(round(x / act_scale), -127, 127)`` at the layer input, per tensor
(``act_scale`` a scalar) or per input channel (shape ``(in,)``). A per-input-channel activation
scale cannot be pulled out of an integer matrix product, so it is folded into the weight before
the weight's own quantization, SmoothQuant-style: ``data, scale`` quantize ``diag(act_scale) @ w``
per output channel, and then ``x @ w ~= q @ (data * scale)`` with no per-input factor left at run
time. ``dequantize()`` returns the float weight this represents (``data * scale / act_scale``).

Two compute paths for W8A8, equal up to the float rounding of the scales (tests/quant/test_int8.py
states the bound):
- ``"integer"``: int8 operands, int32 accumulation, one float rescale per output channel by
  ``act_scale * scale``. The int32 sum is exact while ``prod(shape[:-1]) * 127**2 < 2**31``
  (fan-in < 133,144; SD's largest is 3*3*2560).
- ``"simulated"``: fake-quantized activations (``q * act_scale``) against the dequantized weight
  in a float32 product at full precision; the reference for the integer path, and what to use
  where int8 kernels are slow.
Switch with ``qw.replace(path="simulated")``.

Which integer convolution: measured on XLA CPU (jax 0.10.2, AMD EPYC with AVX512-VNNI, 2 cores
shared with a training job; 3x3 kernels, Cout = Cin, int8 operands with int32 results, min of
15 interleaved runs, ms; compile time of the one op in parentheses):

    input (N,H,W,C), stride      float32 conv    int8 XLA conv    im2col + int8 dot_general
    (2,32,32,320), 1             39.9 (0.02 s)   26.8 (0.01 s)    24.9 (0.21 s)
    (2,16,16,640), 1             37.9            27.7             25.3 (0.19 s)
    (2,8,8,1280), 1              70.3            30.5             29.9 (0.21 s)
    (1,64,64,128), 1             12.0             6.0              7.3 (0.38 s)
    (2,32,32,320), 2 ((0,1),(0,1))  10.5          7.3              6.7 (0.49 s)

On this CPU the int8 XLA convolution is not slower than float32 but 1.4-2.3x faster, and
im2col + int8 dot is within -18%..+9% of it while taking 10-20x longer to compile (every conv
layer of a jitted UNet compiles separately: +0.2-0.5 s each, +8 s on the tiny test UNet) and 9x
the activation memory for its patches. So the default is the XLA int8 convolution
(``INT8_CONV = "xla"``); ``"im2col"`` remains selectable (same exact int32 result). Linear layers
use an int8 ``dot_general`` with int32 results: (8192,320)x(320,320) 12.4 ms vs 18.0 float32
(1.45x), (2048,640)x(640,5120) 108.4 vs 153.5 (1.42x), (128,1280)x(1280,1280) 3.0 vs 4.6 (1.54x).
A whole W8A8 conv layer (quantize x, int8 conv, rescale) on (2,32,32,320) took 27.3 ms against 40.0
for float32. W8A16 pays for expanding its weight on every call: negligible at (2,32,32,320) (40.4
ms) but 98.6 against 66.4 ms at (2,8,8,1280), where the weight is larger than the activation.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax import nn

PATHS = ("integer", "simulated")
HIGHEST = jax.lax.Precision.HIGHEST  # the simulated path is a reference: no TF32/bf16 passes on GPUs
INT8_CONV = "xla"  # or "im2col"; read when a conv is traced (see the module docstring)
_INT32_FAN_IN_LIMIT = (2 ** 31 - 1) // (127 * 127)


class Int8Data:
    """``shape``/``ndim`` of the int8 ``data`` array, and ``nbytes`` of every stored array (the
    int8 data, its scales): shared by the int8 weight types here and in ``quant.llm_int8``."""

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def nbytes(self):
        return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(self))


@flax.struct.dataclass
class Int8Weight(Int8Data):
    """int8 weight with per-output-channel float32 scales; see the module docstring."""
    data: jax.Array                      # int8, sdjax layout
    scale: jax.Array                     # float32 (out,)
    act_scale: jax.Array | None = None   # float32 () or (in,); None for W8A16
    path: str = flax.struct.field(pytree_node=False, default="integer")

    @property
    def method(self):
        """The recipe method (the weight protocol's name): "int8" (W8A16) or "int8-w8a8"."""
        return "int8" if self.act_scale is None else "int8-w8a8"

    @property
    def mode(self):
        return "w8a16" if self.act_scale is None else "w8a8"

    def dequantize(self, dtype=jnp.float32):
        w = self.data.astype(jnp.float32) * self.scale
        if self.act_scale is not None and self.act_scale.ndim == 1:
            w = w / self.act_scale[:, None]  # undo the fold; broadcasts over the input axis (-2)
        return w.astype(dtype)

    def quantize_input(self, x):
        """Activation codes ``clip(round(x / act_scale), -127, 127)``, as float32."""
        q = jnp.round(x.astype(jnp.float32) / self.act_scale)
        return jnp.clip(q, -127, 127)

    def _out_scale(self):
        if self.act_scale.ndim == 0:
            return self.act_scale * self.scale
        return self.scale  # per-channel activation scales live inside data/scale

    def linear(self, x):
        if self.act_scale is None:
            return nn.linear(x, {"weight": self.dequantize(x.dtype)})
        q = self.quantize_input(x)
        if self.path == "simulated":
            y = jnp.matmul(q * self.act_scale, self.dequantize(jnp.float32), precision=HIGHEST)
        else:
            acc = jax.lax.dot_general(q.astype(jnp.int8), self.data, (((q.ndim - 1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.int32)
            y = acc.astype(jnp.float32) * self._out_scale()
        return y.astype(x.dtype)

    def conv2d(self, x, stride, padding):
        if self.act_scale is None:
            return nn.conv2d(x, {"weight": self.dequantize(x.dtype)}, stride, padding)
        q = self.quantize_input(x)
        if self.path == "simulated":
            y = jax.lax.conv_general_dilated(q * self.act_scale, self.dequantize(jnp.float32),
                                             (stride, stride), [tuple(p) for p in padding],
                                             precision=HIGHEST, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            acc = int8_conv(q.astype(jnp.int8), self.data, stride, padding)
            y = acc.astype(jnp.float32) * self._out_scale()
        return y.astype(x.dtype)


# im2col: (N, H, W, C) -> (N, OH, OW, kh*kw*C), features ordered (dy, dx, c) like an HWIO weight
# reshaped to (kh*kw*C, out); any dtype
patches = nn.im2col


def int8_conv(q, w, stride, padding):
    """Exact int32 convolution of int8 NHWC ``q`` with int8 HWIO ``w``, formulated per INT8_CONV."""
    kh, kw, cin, cout = w.shape
    if INT8_CONV == "im2col":
        cols = patches(q, kh, kw, stride, padding)
        return jax.lax.dot_general(cols, w.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())),
                                   preferred_element_type=jnp.int32)
    return jax.lax.conv_general_dilated(q, w, (stride, stride), [tuple(p) for p in padding],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        preferred_element_type=jnp.int32)


def check_weight(w, name="w"):
    """A float 2-D (in, out) or 4-D HWIO array, or a ValueError naming ``name``."""
    w = jnp.asarray(w)
    if w.ndim not in (2, 4):
        raise ValueError(f"{name} must be a linear weight (in, out) or an HWIO conv weight; "
                         f"got shape {tuple(w.shape)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array; got dtype {w.dtype}")
    fan_in = math.prod(w.shape[:-1])
    if fan_in > _INT32_FAN_IN_LIMIT:
        raise ValueError(f"{name} has fan-in {fan_in}: int32 accumulation of int8 products could "
                         f"overflow above {_INT32_FAN_IN_LIMIT}")
    return w


@jax.jit  # one compile per weight shape: op by op, quantizing the tiny test UNet took 2.2x longer
def absmax_quantize(w, fold=None):
    """Per-output-channel (last axis) symmetric int8 of ``diag(fold) @ w``: ``(data, scale)``;
    an all-zero channel gets scale 1 so nothing divides by zero."""
    w = w.astype(jnp.float32)
    if fold is not None:
        w = w * fold[:, None]
    absmax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)))
    scale = jnp.where(absmax > 0, absmax / 127, 1.0).astype(jnp.float32)
    data = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return data, scale


def quantize(w, act_scale=None, path="integer"):
    """Quantize one linear ``(in, out)`` or HWIO conv weight; W8A8 when ``act_scale`` is given.

    ``act_scale``: positive, a scalar (per tensor) or shape ``(in,)`` (per input channel, folded
    into the weight; see the module docstring); from ``quant.calibrate.act_scales``.
    ``path``: "integer" or "simulated", the W8A8 compute path.
    """
    w = check_weight(w)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    if act_scale is None:
        return Int8Weight(*absmax_quantize(w), None, path=path)
    a = jnp.asarray(act_scale, jnp.float32)
    cin = w.shape[-2]
    if a.shape not in ((), (cin,)):
        raise ValueError(f"act_scale must be a scalar (per tensor) or have shape ({cin},) (one per input "
                         f"channel of w {tuple(w.shape)}); got shape {tuple(a.shape)}")
    try:
        an = np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        an = None  # quantizing inside a trace: values unknown until run time
    if an is not None and not (np.all(np.isfinite(an)) and np.all(an > 0)):
        raise ValueError(f"act_scale must be finite and > 0; got min {an.min()}, max {an.max()}")
    return Int8Weight(*absmax_quantize(w, a if a.ndim == 1 else None), a, path=path)
