"""A LoRA kept beside a quantized weight: ``y = base(x) + (x @ down) * scale @ up``, instead of merged.

Merging a LoRA into the float weights and then quantizing (``sdjax.load(loras=...)``, then a recipe)
quantizes the LoRA's update together with the base. The alternative is what LoRA-serving systems do
with quantized base models (QLoRA, Core ML's adapters over a palettized base): quantize the base
model once, keep each LoRA's small factors in float, and compute the branch at run time.
``LoraBranchWeight`` is that, as a weight of the model core's protocol (``sdjax.nn``), so any
primitive runs it unchanged:

- ``linear(x)``: ``base(x) + ((x @ down) * scale) @ up`` with ``base(x)`` computed as the base weight
  computes it (a palettized base is expanded; an int8 base runs its own integer path);
- ``conv2d(x, stride, padding)``: the base convolution plus a LoCon branch: ``down`` as a
  ``kh x kw`` convolution with the layer's stride and padding (1 x 1 for a plain LoRA on a 1 x 1
  conv), then ``up`` as a 1 x 1 one, as kohya and PEFT define a conv LoRA;
- ``dequantize(dtype)``: the base's float value plus ``einsum("...ir,ro->...io", down * scale, up)``,
  the weight a merge would give (the branch's output equals the dequantized weight's, up to float
  rounding);
- ``nbytes``: the base's stored bytes plus the factors' and scales' (float16 factors by default).

``scale`` holds one number per rank component, so several LoRAs on one layer are one branch (their
factors concatenated along the rank axis, each with its own ``scale x alpha / rank``).

``apply(params, loras, configs)`` wraps the layers a LoRA file updates; the factors come from
``sdjax.lora.factors`` (the same parsing and checks as the merge). A layer the recipe left float
gets the LoRA merged instead (``merge_float``, the default): a float weight plus a merged update
costs no byte more, and runs one product instead of three.

Branch weights are not saved by ``quant.io`` (no codec) nor exported to Core ML: this type is for
measuring (``experiments/lora_quantization.py``).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax import lora as sdlora
from sdjax import nn


@flax.struct.dataclass
class LoraBranchWeight(nn.ShapedWeight):
    """A base weight (quantized, or a float array) and float LoRA factors run beside it; see the module
    docstring. ``down``: (in, rank) for a linear base (in, out), (kh, kw, in, rank) for an HWIO conv;
    ``up``: (rank, out); ``scale``: float32 (rank,)."""
    method = "lora-branch"   # the weight protocol's name for this type
    base: Any
    down: jax.Array
    up: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def rank(self):
        return self.up.shape[0]

    @property
    def nbytes(self):
        """Stored bytes: the base's (its own ``nbytes``) plus the factors' and scales'."""
        return int(self.base.nbytes) + sum(int(a.size) * np.dtype(a.dtype).itemsize
                                           for a in (self.down, self.up, self.scale))

    def delta(self, dtype=jnp.float32):
        """The LoRA's update of the weight, ``einsum("...ir,ro->...io", down * scale, up)``, in float32
        and cast to ``dtype``."""
        d = self.down.astype(jnp.float32) * self.scale.astype(jnp.float32)
        return jnp.einsum("...ir,ro->...io", d, self.up.astype(jnp.float32)).astype(dtype)

    def dequantize(self, dtype=jnp.float32):
        base = self.base.dequantize(jnp.float32) if nn.is_quantized(self.base) else self.base.astype(jnp.float32)
        return (base + self.delta()).astype(dtype)

    def _branch(self, h):
        """(N..., rank) down-projected input -> the branch's output (N..., out), float32."""
        h = h.astype(jnp.float32) * self.scale.astype(jnp.float32)
        return jnp.matmul(h, self.up.astype(jnp.float32), preferred_element_type=jnp.float32)

    def linear(self, x):
        y = nn.linear(x, {"weight": self.base})
        h = jnp.matmul(x.astype(jnp.float32), self.down.astype(jnp.float32), preferred_element_type=jnp.float32)
        return (y.astype(jnp.float32) + self._branch(h)).astype(x.dtype)

    def conv2d(self, x, stride, padding):
        y = nn.conv2d(x, {"weight": self.base}, stride, padding)
        h = nn.conv2d(x.astype(jnp.float32), {"weight": self.down.astype(jnp.float32)}, stride, padding)
        return (y.astype(jnp.float32) + self._branch(h)).astype(x.dtype)


def branch(base, down, up, scale, dtype=jnp.float16):
    """A ``LoraBranchWeight`` of ``base`` (a quantized weight or float array, sdjax layout) and
    factors in sdjax layout (``sdjax.lora.factors``), stored as ``dtype``; ``scale`` a number or one
    per rank component. ValueError when the factors do not fit the base."""
    down, up = np.asarray(down), np.asarray(up)
    shape = tuple(base.shape)
    rank = up.shape[0] if up.ndim == 2 else None
    want_down = (shape[0], rank) if len(shape) == 2 else (*shape[:2], shape[2], rank)
    if rank is None or up.shape != (rank, shape[-1]) or down.shape != want_down:
        raise ValueError(f"LoRA factors down {down.shape}, up {up.shape} do not fit a weight of shape {shape} "
                         f"(expected down {want_down if rank else '(in, rank)'} and up (rank, {shape[-1]}))")
    s = np.broadcast_to(np.asarray(scale, np.float32), (rank,))
    if not np.all(np.isfinite(s)):
        raise ValueError(f"LoRA scale {scale!r} is not finite")
    return LoraBranchWeight(base, jnp.asarray(down, dtype), jnp.asarray(up, dtype), jnp.asarray(s, jnp.float32))


def _merged_float(w, updates):
    """A float weight plus each update ``scale * down @ up``, in float32, cast back (``sdjax.lora.merge``'s rule)."""
    w32 = np.asarray(w, np.float32)
    for down, up, s in updates:
        w32 = w32 + np.float32(s) * np.einsum("...ir,ro->...io", down.astype(np.float32), up.astype(np.float32))
    return jnp.asarray(w32, dtype=w.dtype)


def apply(params, loras, configs=None, dtype=jnp.float16, merge_float=True):
    """``params`` (a pipeline's ``{"unet", "text_encoder", ...}`` params, typically quantized by a recipe)
    with each LoRA of ``loras`` (paths or (path, scale) pairs, diffusers/PEFT or kohya safetensors, as
    ``sdjax.load(loras=...)`` takes them) run beside the weights it updates: a quantized weight becomes a
    ``LoraBranchWeight`` holding it and the LoRA factors (stored as ``dtype``; several LoRAs on one
    layer are one branch); a float weight gets the update merged (``merge_float``; False: a branch over
    the float weight too). ``configs``: the pipeline's (kohya files in LDM names, error messages).
    ``params`` is left as it was. ``sdjax.lora.LoraError`` names each key that fits no layer, before
    anything is built."""
    per_layer = sdlora.factors(params, configs, loras)
    out = dict(params)
    for comp, table in per_layer.items():
        flat = nn.flatten(params[comp])
        for name, updates in table.items():
            w = flat[name]
            if merge_float and not nn.is_quantized(w):
                flat[name] = _merged_float(w, updates)
                continue
            if isinstance(w, LoraBranchWeight):  # a second apply: its factors join the branch
                updates = [(np.asarray(w.down, np.float32), np.asarray(w.up, np.float32), np.asarray(w.scale))] \
                    + list(updates)
                w = w.base
            down = np.concatenate([d for d, _, _ in updates], axis=-1)
            up = np.concatenate([u for _, u, _ in updates], axis=0)
            scale = np.concatenate([np.broadcast_to(np.asarray(s, np.float32), (u.shape[0],)) for _, u, s in updates])
            flat[name] = branch(w, down, up, scale, dtype)
        out[comp] = nn.unflatten(flat)
    return out


def lora_bytes(params):
    """Bytes of every branch's factors and scales in ``params`` (the LoRAs' share of ``quant.size_bytes``)."""
    leaves = jax.tree.leaves(params, is_leaf=nn.is_quantized)
    return sum(w.nbytes - int(w.base.nbytes) for w in leaves if isinstance(w, LoraBranchWeight))
