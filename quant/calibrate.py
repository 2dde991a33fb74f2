"""Activation statistics at every conv/linear input, gathered without touching model code.

``observe`` swaps each chosen weight for a ``Probe``: a pytree weight type that keeps the original
weight, knows its layer name, and, through the weight protocol of ``sdjax.nn``, sees the input of
each ``nn.linear``/``nn.conv2d`` that uses it. The probe reduces that input on the device to

- the absolute maximum of each input channel (last axis; the tensor maximum is their max), and
- a histogram of |x| whose bins are the float32 exponent and the top 6 mantissa bits (exactly
  16384 bins, each at most 1/64 of its lower edge wide), so percentiles can be aggregated over
  any number of calls (the q-th percentile of everything seen, not an average of per-call ones),

hands them to the host with ``jax.debug.callback`` (so it works under ``jit``, ``lax.scan`` and
``lax.map``), and then computes the ordinary float result, so the model runs unchanged.

Layer names are the diffusers parameter paths without ".weight", e.g.
``"down_blocks.0.resnets.0.conv1"``.
"""
from __future__ import annotations

import dataclasses
import threading

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax import nn

MANTISSA_BITS = 6                      # histogram resolution: 2**6 bins per octave
_SHIFT = 23 - MANTISSA_BITS
N_BINS = 1 << (31 - _SHIFT)            # every non-negative float32 bit pattern, sign bit excluded
DEFAULT_PERCENTILE = 99.99


@dataclasses.dataclass
class LayerStats:
    """Statistics of one layer's input, aggregated over every call ``run`` made."""
    absmax_channel: np.ndarray   # float32 (in_channels,): max |x| of each input channel
    hist: np.ndarray             # int64 (N_BINS,): counts of |x| per float32 bin (see bin_edges)
    calls: int
    numel: int

    @property
    def absmax(self):
        return float(self.absmax_channel.max())

    def percentile(self, q=DEFAULT_PERCENTILE):
        """An upper bound within one bin (< 1/64 relative) of the q-th percentile of |x| over all
        calls, taken as the smallest element with at least q% of the elements at or below it
        (numpy's ``method="inverted_cdf"``); never above ``absmax``."""
        if not 0 < q <= 100:
            raise ValueError(f"q must be in (0, 100]; got {q!r}")
        rank = max(1, int(np.ceil(q / 100 * self.numel)))
        b = int(np.searchsorted(np.cumsum(self.hist), rank))
        return self.absmax if b + 1 >= N_BINS else float(min(bin_edges(b + 1), self.absmax))


def bin_edges(b):
    """Lower edge of histogram bin ``b`` (the float32 whose bits are ``b << _SHIFT``)."""
    return np.asarray(np.asarray(b, np.int64) << _SHIFT, np.uint32).view(np.float32).astype(np.float64)


class _Sink:
    """Host-side accumulator that the probes' callbacks write into (hashed by identity, so each
    ``observe`` call is its own static jit key)."""

    def __init__(self):
        self.stats = {}
        self._lock = threading.Lock()

    def add(self, name, numel, channel_max, hist):
        channel_max, hist = np.asarray(channel_max, np.float32), np.asarray(hist, np.int64)
        with self._lock:
            s = self.stats.get(name)
            if s is None:
                self.stats[name] = LayerStats(channel_max.copy(), hist.copy(), 1, numel)
            else:
                s.absmax_channel = np.maximum(s.absmax_channel, channel_max)
                s.hist = s.hist + hist
                s.calls += 1
                s.numel += numel


class WeightProbe:
    """Base of the probes (pytree dataclasses with a ``weight``, a static ``name`` and ``sink``): a
    weight that behaves as ``weight`` and shows each input of its layer to ``_record`` (a
    convolution's input with its stride and padding to ``_record_conv``) through the weight
    protocol of ``sdjax.nn``."""

    @property
    def shape(self):
        return self.weight.shape

    @property
    def ndim(self):
        return len(self.weight.shape)

    def dequantize(self, dtype=jnp.float32):
        w = self.weight
        return w.dequantize(dtype) if nn.is_quantized(w) else w.astype(dtype)

    def _record_conv(self, x, stride, padding):
        self._record(x)

    def linear(self, x):
        self._record(x)
        return nn.linear(x, {"weight": self.weight})

    def conv2d(self, x, stride, padding):
        self._record_conv(x, stride, padding)
        return nn.conv2d(x, {"weight": self.weight}, stride, padding)


def run_probed(params, run, names, probe):
    """Check ``names`` (default: every conv/linear layer of ``params``), replace each one's weight by
    ``probe(weight, name)``, and run ``run`` on the probed params to the end (callbacks included).
    Returns the names probed."""
    valid = layer_names(params)
    if names is None:
        names = valid
    else:
        names = [names] if isinstance(names, str) else list(names)
        unknown = sorted(set(names) - set(valid))
        if unknown:
            raise ValueError(f"names contains layers that are not conv/linear weights of params: "
                             f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    flat = nn.flatten(params)
    for name in names:
        flat[name + ".weight"] = probe(flat[name + ".weight"], name)
    jax.block_until_ready(run(nn.unflatten(flat)))
    jax.effects_barrier()
    return names


@flax.struct.dataclass
class Probe(WeightProbe):
    """A weight that records statistics of its layer's input and otherwise behaves as ``weight``."""
    weight: object
    name: str = flax.struct.field(pytree_node=False)
    sink: _Sink = flax.struct.field(pytree_node=False)

    def _record(self, x):
        a = jnp.abs(x.astype(jnp.float32))
        channel_max = jnp.max(a.reshape(-1, a.shape[-1]), axis=0)
        bins = jax.lax.bitcast_convert_type(a, jnp.int32) >> _SHIFT
        hist = jnp.bincount(bins.reshape(-1), length=N_BINS)
        jax.debug.callback(lambda c, h, name=self.name, n=x.size: self.sink.add(name, n, c, h),
                           channel_max, hist)


def layer_names(params):
    """Names of the conv/linear layers in ``params`` (2-D or 4-D ".weight" leaves, embeddings
    excluded since they are looked up, not multiplied)."""
    out = []
    for key, w in nn.flatten(params).items():
        if key.endswith(".weight") and not key.endswith("embedding.weight") \
                and len(getattr(w, "shape", ())) in (2, 4):
            out.append(key[:-len(".weight")])
    return out


def layer_numel(params):
    """``{name: number of weights}`` of the conv/linear layers in ``params`` (``layer_names``' order)."""
    flat = nn.flatten(params)
    return {n: int(np.prod(flat[n + ".weight"].shape)) for n in layer_names(params)}


def observe(params, run, names=None):
    """Run ``run(params)`` with probes on the chosen layers -> ``{layer name: LayerStats}``.

    ``run`` is any function of the params that drives the model over calibration data (one
    ``unet.apply``, a jitted sampler loop, several prompts...); its result is waited for and
    discarded. ``names``: layer names to probe (default: all of ``layer_names(params)``). Layers
    that ``run`` never reached are absent from the result.
    """
    sink = _Sink()
    names = run_probed(params, run, names, lambda w, name: Probe(w, name, sink))
    return {name: sink.stats[name] for name in names if name in sink.stats}


def act_scales(stats, method="max", granularity="tensor", percentile=DEFAULT_PERCENTILE):
    """int8 activation scales (clip value / 127) for ``int8.quantize(w, act_scale=...)``.

    method "max": the largest |x| seen; "percentile": the ``percentile``-th percentile of |x|,
    which clips rare extremes to spend the 255 levels on the bulk. granularity "tensor": a
    scalar; "channel": one per input channel (its own max, capped by the tensor's percentile
    clip value under "percentile"). A channel that was always zero gets the tensor's clip value,
    and an all-zero tensor the clip value 1, so every scale is positive.
    """
    if method not in ("max", "percentile"):
        raise ValueError(f"method must be 'max' or 'percentile'; got {method!r}")
    if granularity not in ("tensor", "channel"):
        raise ValueError(f"granularity must be 'tensor' or 'channel'; got {granularity!r}")
    out = {}
    for name, s in stats.items():
        clip = s.absmax if method == "max" else s.percentile(percentile)
        clip = clip if clip > 0 else 1.0
        if granularity == "tensor":
            out[name] = np.float32(clip / 127)
        else:
            c = np.minimum(s.absmax_channel.astype(np.float64), clip)
            out[name] = (np.where(c > 0, c, clip) / 127).astype(np.float32)
    return out
