"""k-means palettization: a weight becomes a small float16 (or int8) lookup table (LUT) and bit-packed indices.

This is the representation Core ML's ``constexpr_lut_to_dense`` decompresses on device (iOS 17+),
so a palette chosen here is a palette that can be shipped. ``PalettizedWeight`` stays compressed
inside the params pytree and is expanded by ``dequantize()`` inside the jitted forward, one layer
at a time; the model primitives (``sdjax.nn.linear``/``conv2d``) call it through the weight protocol.

The output-channel axis is the last axis of the sdjax layout (``(in, out)`` linear, ``HWIO`` conv):
grouped LUTs (``group_size``) and per-channel scales (``per_channel_scale``) run along it.

Why the clustering is exact, and how it is fast
-----------------------------------------------
A float16 weight has at most ~63k distinct values, so k-means over the weights is k-means over the
distinct values weighted by their counts (or by their summed importance), and in one dimension
optimal clusters are contiguous runs of the sorted values. ``kmeans_1d`` solves that exactly with
the textbook dynamic programme ``D_m[i] = min_j D_{m-1}[j] + cost(j, i)`` (``cost`` the weighted
squared error of values ``j..i-1``, from prefix sums). Its argmin ``opt_m[i]`` is monotone in ``i``
(the cost is Monge), so each layer is a divide-and-conquer over rows, run level by level with
numpy so that one level of the recursion is a handful of array operations; ``opt_{m-1}[i] <=
opt_m[i]`` bounds the search further. That is O(k n log n) against SMAWK's O(k n) in coremltools'
vendored ``kmeans1d`` (C++), yet it measured within about 20% of it either way (n = 7k..22k
distinct values, 4, 6 and 8 bits; 2 shared CPU cores). What makes the whole pass faster is
counting the distinct values with ``bincount`` over the 16-bit patterns instead of ``np.unique``
(a sort), which dominates coremltools' time on large tensors: 4.5 s of the 4.6 s it takes on a
3x3x1280x1280 conv, where the ``bincount`` takes 45 ms.

After the clusters are chosen the centroids are rounded to float16 and every value is mapped to its
*nearest* float16 entry, which can only lower the error compared with keeping cluster membership.

int8 LUT entries (W4A8, W6A8, W2A8)
-----------------------------------
``int8_lut`` stores a weight's float16 LUTs as int8 entries with one float16 scale per LUT, quantized
exactly as coremltools quantizes a LUT (``quantize_lut_int8``: symmetric, ``scale = 2 max|lut| / 254``,
round half to even, in float16 arithmetic); the indices stay as they are (so do coremltools'
``optimize.torch`` k-means, whose ``lut_dtype`` quantizes the centroids after clustering). With int8
activations (``act_scale``) such a layer can run on the Neural Engine's int8 x int8 path (iOS18, A17 Pro
/ M4). The weight is ``q[idx] * s[o]``, where ``s[o]`` is the channel's LUT scale, or, with a per-channel
``scale`` too, ``float16(lut_scale[g] * scale[o])``: Core ML holds it as ``constexpr_lut_to_dense`` with
the int8 LUT followed by one ``constexpr_blockwise_shift_scale`` whose float16 scale is that product
(``sdjax.coreml.mil.weight``), and sdjax computes the same value. In float32 every such product is exact.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax import nn

SUPPORTED_NBITS = (1, 2, 3, 4, 6, 8)


@flax.struct.dataclass
class PalettizedWeight(nn.ShapedWeight):
    """A weight as LUT(s) and bit-packed indices; see the module docstring.

    ``packed`` holds ``prod(shape)`` indices of ``nbits`` each, LSB first, in C order of ``shape``
    (the bit order of coremltools' ``pack_elements_into_bits``, so the bytes can be exported as they
    are). ``lut`` is ``(num_groups, 2**nbits)``; group ``g`` serves output channels
    ``[g*group_size, (g+1)*group_size)``. ``scale`` (``(out,)``, or None) multiplies each output
    channel after the lookup.

    int8 LUT entries (``lut_dtype == "int8"``, made by ``int8_lut``): ``lut`` is int8 and
    ``lut_scale`` (float16 ``(num_groups,)``) scales each LUT; see "int8 LUT entries" in the module
    docstring for the value this represents. ``act_scale`` (float32 scalar, or None): int8
    activations at the layer input, ``clip(round(x / act_scale), -127, 127) * act_scale`` (W4A8 and
    the like; the same per-tensor meaning as ``quant.int8.Int8Weight``'s), computed as fake-quantized
    activations against the dequantized weight.
    """
    method = "palettize"               # the recipe method (the weight protocol's name for this type)
    packed: jax.Array                  # uint8 (ceil(size * nbits / 8),)
    lut: jax.Array                     # float16 (num_groups, 2**nbits), or int8 with lut_scale
    shape: tuple = flax.struct.field(pytree_node=False)
    nbits: int = flax.struct.field(pytree_node=False)
    scale: Optional[jax.Array] = None  # float16 (out,) or None
    group_size: Optional[int] = flax.struct.field(pytree_node=False, default=None)
    lut_scale: Optional[jax.Array] = None  # float16 (num_groups,): int8 LUTs only
    act_scale: Optional[jax.Array] = None  # float32 (): int8 activations, or None (float activations)

    @property
    def dtype(self):
        """The dtype the values are stored in (the LUT's), not the packed bytes'."""
        return self.lut.dtype

    @property
    def lut_dtype(self):
        """"int8" (int8 entries with a per-LUT scale) or the float LUT's dtype name ("float16")."""
        return "int8" if self.lut_scale is not None else np.dtype(self.lut.dtype).name

    @property
    def num_groups(self):
        return self.lut.shape[0]

    @property
    def nbytes(self):
        """Bytes as stored: packed indices + LUTs + scales (an activation scale included)."""
        arrays = [a for a in (self.packed, self.lut, self.scale, self.lut_scale, self.act_scale) if a is not None]
        return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays)

    @property
    def bits_per_weight(self):
        return 8 * self.nbytes / self.size

    def indices(self):
        """The LUT index of every weight, int32 of ``shape`` (jit-friendly)."""
        return unpack_bits(self.packed, self.nbits, self.size).reshape(self.shape)

    def channel_scale(self):
        """The factor each output channel's looked-up entries are multiplied by, float32 ``(out,)``, or
        None: ``scale``; for int8 LUTs ``lut_scale`` of the channel's group, times ``scale`` rounded to
        float16 when there is one (the one float16 scale Core ML's ``constexpr_blockwise_shift_scale``
        holds; see the module docstring)."""
        if self.lut_scale is None:
            return None if self.scale is None else self.scale.astype(jnp.float32)
        gs = self.shape[-1] // self.num_groups
        s = jnp.repeat(self.lut_scale.astype(jnp.float32), gs)
        if self.scale is not None:
            s = (s * self.scale.astype(jnp.float32)).astype(jnp.float16).astype(jnp.float32)
        return s

    def dequantize(self, dtype=jnp.float32):
        """The float weight, looked up in float32 and cast to ``dtype`` at the end."""
        if self.lut_scale is None:
            return _dequantize(self.packed, self.lut, self.scale, self.shape, self.nbits, self.group_size,
                               jnp.dtype(dtype))
        return _dequantize(self.packed, self.lut, self.channel_scale(), self.shape, self.nbits, self.group_size,
                           jnp.dtype(dtype))

    def quantize_input(self, x):
        """Activation codes ``clip(round(x / act_scale), -127, 127)``, as float32."""
        return jnp.clip(jnp.round(x.astype(jnp.float32) / self.act_scale), -127, 127)

    # the weight protocol's compute methods (sdjax.nn): float activations compute exactly what
    # sdjax.nn does with the dequantized weight; int8 activations are fake-quantized first
    def linear(self, x):
        if self.act_scale is None:
            return nn.linear(x, {"weight": self.dequantize(x.dtype)})
        xq = self.quantize_input(x) * self.act_scale
        return jnp.matmul(xq, self.dequantize(jnp.float32), precision=HIGHEST).astype(x.dtype)

    def conv2d(self, x, stride, padding):
        if self.act_scale is None:
            return nn.conv2d(x, {"weight": self.dequantize(x.dtype)}, stride, padding)
        xq = self.quantize_input(x) * self.act_scale
        y = jax.lax.conv_general_dilated(xq, self.dequantize(jnp.float32), (stride, stride),
                                         [tuple(p) for p in padding], precision=HIGHEST,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.astype(x.dtype)


HIGHEST = jax.lax.Precision.HIGHEST  # the simulated W4A8 product is a reference: no TF32/bf16 passes
LUT_DTYPES = ("float16", "int8")


# one compiled program per weight shape when called eagerly; inlined when called inside jit
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _dequantize(packed, lut, scale, shape, nbits, group_size, dtype):
    out = shape[-1]
    idx = unpack_bits(packed, nbits, math.prod(shape)).reshape(-1, out)
    lut = lut.astype(jnp.float32)
    if lut.shape[0] == 1:
        w = jnp.take(lut[0], idx)
    else:  # one flat table: row offset of each output channel's group
        offset = (jnp.arange(out, dtype=jnp.int32) // group_size) * lut.shape[1]
        w = jnp.take(lut.reshape(-1), idx + offset)
    if scale is not None:
        w = w * scale.astype(jnp.float32)
    return w.reshape(shape).astype(dtype)


def quantize_lut_int8(lut):
    """coremltools' symmetric int8 quantization of float16 LUT(s), one scale per LUT (row).

    ``lut``: float16 ``(num_groups, 2**nbits)``. Returns ``(q, scale)``: int8 ``(num_groups, 2**nbits)``
    and float16 ``(num_groups,)``. Per row, in float16 arithmetic as coremltools'
    ``optimize._utils.quantize_weight_by_dtype(lut, axes, types.int8, "LINEAR_SYMMETRIC")`` computes it
    (``compute_qparams_by_dtype`` with the block size 0, the per-tensor call its joint compression and
    ``optimize.torch``'s ``_quantize_centroids`` make per LUT): ``m = max|lut|``,
    ``scale = (m - (-m)) / 254``, ``q = clip(round(lut / scale), -127, 127)`` (numpy's round half to
    even; -128 unused). A LUT of zeros gets scale 1 (coremltools would divide by zero)."""
    lut = np.asarray(lut, np.float16)
    if lut.ndim != 2:
        raise ValueError(f"lut must be (num_groups, entries), got shape {lut.shape}")
    if not np.all(np.isfinite(lut)):
        raise ValueError("lut must be finite")
    m = np.max(np.abs(lut), axis=1, keepdims=True)
    with np.errstate(over="ignore"):
        scale = (m - (-m)) / 254  # float16, as coremltools: (val_max - val_min) / (q_max - q_min)
    if not np.all(np.isfinite(scale)):
        raise ValueError(f"an int8 LUT's float16 scale overflows: LUT entries up to {float(m.max())}")
    scale = np.where(m == 0, np.float16(1), scale).astype(np.float16)
    q = np.clip(np.round(lut / scale), -127, 127).astype(np.int8)
    return q, scale[:, 0]


def int8_lut(w: "PalettizedWeight") -> "PalettizedWeight":
    """``w`` with int8 LUT entries (``quantize_lut_int8``) and the same indices, groups and per-channel
    scale; an int8-LUT weight is returned as it is."""
    if not isinstance(w, PalettizedWeight):
        raise TypeError(f"int8_lut takes a PalettizedWeight, got {type(w).__name__}")
    if w.lut_scale is not None:
        return w
    q, s = quantize_lut_int8(np.asarray(w.lut))
    return w.replace(lut=jnp.asarray(q), lut_scale=jnp.asarray(s))


def with_act_scale(w: "PalettizedWeight", act_scale) -> "PalettizedWeight":
    """``w`` with int8 activations at scale ``act_scale`` (a positive finite scalar: palettized weights
    take per-tensor activation scales only, since a per-input-channel one cannot be folded into a LUT
    shared by the inputs)."""
    a = np.asarray(act_scale, np.float32)
    if a.shape != ():
        raise ValueError(f"a palettized weight takes a per-tensor activation scale (a scalar); got shape {a.shape} "
                         "(a per-input-channel scale cannot be folded into a LUT)")
    if not (np.isfinite(a) and a > 0):
        raise ValueError(f"act_scale must be finite and > 0; got {float(a)}")
    return w.replace(act_scale=jnp.asarray(a))


# --- bit packing -----------------------------------------------------------------------------
# ``per`` indices fill a word of ``nbytes`` bytes exactly (lcm(nbits, 8) bits), so packing and
# unpacking are a few whole-array shifts, in numpy at quantize time and in jnp inside jit.

def _word(nbits):
    per = 8 // math.gcd(nbits, 8)
    return per, per * nbits // 8


_CHUNK_WORDS = 1 << 16  # words per chunk in the NumPy packers: bounded temporaries for big tensors


def pack_bits(indices, nbits):
    """uint8 bytes of ``indices`` (< 2**nbits), LSB first: ``ceil(len * nbits / 8)`` bytes.

    Works through the indices a chunk of whole words at a time, so the temporaries stay small
    (a few MB) whatever the tensor size."""
    idx = np.asarray(indices).reshape(-1)
    count = idx.size
    per, nbytes = _word(nbits)
    wtype = np.uint8 if nbytes == 1 else np.uint32
    out = np.empty(-(-count // per) * nbytes, np.uint8)
    step = per * _CHUNK_WORDS
    for s in range(0, count, step):
        chunk = idx[s:s + step]
        chunk = np.pad(chunk, (0, -chunk.size % per)).reshape(-1, per)
        word = np.zeros(chunk.shape[0], wtype)
        for t in range(per):
            word |= chunk[:, t].astype(wtype) << wtype(nbits * t)
        if nbytes > 1:
            word = np.stack([(word >> np.uint32(8 * b)).astype(np.uint8) for b in range(nbytes)], 1)
        b0 = s // per * nbytes
        out[b0:b0 + word.size] = word.reshape(-1)
    return out[:-(-count * nbits // 8)]


def unpack_bits_np(packed, nbits, count):
    """``unpack_bits`` in NumPy, chunked like ``pack_bits``: the first ``count`` indices as uint8
    (``nbits`` <= 8), for host-side work on big tensors (the Core ML exporter's re-packing)."""
    if not 1 <= nbits <= 8:
        raise ValueError(f"nbits must be in 1..8, got {nbits}")
    per, nbytes = _word(nbits)
    p = np.asarray(packed, np.uint8).reshape(-1)
    if p.size * 8 < count * nbits:
        raise ValueError(f"{p.size} packed bytes hold fewer than {count} {nbits}-bit indices")
    out = np.empty(count, np.uint8)
    shifts = np.arange(per, dtype=np.uint32) * np.uint32(nbits)
    mask = np.uint32((1 << nbits) - 1)
    step = per * _CHUNK_WORDS
    for s in range(0, count, step):
        n = min(step, count - s)
        b0 = s // per * nbytes
        chunk = p[b0:b0 + -(-n // per) * nbytes]
        chunk = np.pad(chunk, (0, -chunk.size % nbytes)).reshape(-1, nbytes).astype(np.uint32)
        word = chunk[:, 0]
        for b in range(1, nbytes):
            word = word | (chunk[:, b] << np.uint32(8 * b))
        out[s:s + n] = ((word[:, None] >> shifts) & mask).reshape(-1)[:n]
    return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def unpack_bits(packed, nbits, count):
    """Inverse of ``pack_bits``: the first ``count`` indices as int32 (jnp, jit-friendly)."""
    per, nbytes = _word(nbits)
    p = jnp.asarray(packed).astype(jnp.uint32)
    p = jnp.pad(p, (0, -p.shape[0] % nbytes)).reshape(-1, nbytes)
    word = p[:, 0]
    for b in range(1, nbytes):
        word = word | (p[:, b] << (8 * b))
    shifts = jnp.arange(per, dtype=jnp.uint32) * nbits
    idx = (word[:, None] >> shifts) & ((1 << nbits) - 1)
    return idx.reshape(-1)[:count].astype(jnp.int32)


# --- the exact 1-D solver --------------------------------------------------------------------

def _schedule(rows):
    """The divide-and-conquer over ``rows`` rows, level by level: (mid, left, right) where
    left/right are the already-solved rows bounding mid's segment (-1 and ``rows``: sentinels).
    It depends only on the row count, which is the same for every DP layer."""
    levels, lo, hi = [], np.array([0]), np.array([rows - 1])
    while lo.size:
        mid = (lo + hi) >> 1
        levels.append((mid, lo - 1, hi + 1))
        left, right = lo < mid, mid < hi
        lo, hi = np.concatenate([lo[left], mid[right] + 1]), np.concatenate([mid[left] - 1, hi[right]])
    return levels


def kmeans_1d(values, weights, k):
    """Exact weighted k-means of sorted distinct ``values`` with positive ``weights``.

    Returns ``(bounds, centroids)``: cluster ``c`` is ``values[bounds[c]:bounds[c+1]]`` and
    ``centroids[c]`` its weighted mean; ``min(k, n)`` clusters. See the module docstring.
    """
    c = np.asarray(weights, np.float64)
    x = np.asarray(values, np.float64)
    n = x.size
    k = min(int(k), n)
    if k == n:
        return np.arange(n + 1), x.copy()
    x = x - (c @ x) / c.sum()  # centred: the prefix sums lose less to cancellation
    W, S1, S2 = (np.concatenate([[0.0], np.cumsum(a)]) for a in (c, c * x, c * x * x))
    D = S2 - S1 * S1 / np.maximum(W, 1e-300)  # layer 1: one cluster over the first i values
    opts = np.zeros((k + 1, n + 2), np.int64)  # opts[m][i]: start of the last of m clusters
    prev = opts[1]
    rows = n - k + 1  # layer m < k needs the prefixes i in [m, n-k+m]
    sched, last = _schedule(rows), [(np.array([0]), np.array([-1]), np.array([1]))]
    take, repeat = np.take, np.repeat
    for m in range(2, k + 1):
        a, levels = (m, sched) if m < k else (n, last)
        b = a + (rows if m < k else 1) - 1
        # candidate j for row i scores D[j] + cost(j, i); S2[i] is constant per row and dropped,
        # S2[n] added so scores are >= 0 and compare exactly as their int64 bit patterns
        A = D - S2 + S2[-1]
        opt = opts[m]
        opt[a - 1], opt[b + 1] = m - 1, b  # sentinels: the smallest and largest possible j
        for mid, left, right in levels:
            mid = mid + a  # opt_m is monotone in i, and opt_{m-1}[i] <= opt_m[i]
            lo = np.maximum(take(opt, left + a), take(prev, mid))
            hi = np.minimum(take(opt, right + a), mid - 1)
            np.minimum(lo, hi, out=lo)
            ln = hi - lo + 1
            starts = np.cumsum(ln) - ln
            j = repeat(lo - starts, ln)
            j += np.arange(j.size)
            d1 = repeat(take(S1, mid), ln)
            d1 -= take(S1, j)
            dw = repeat(take(W, mid), ln)
            dw -= take(W, j)
            d1 *= d1
            d1 /= dw
            score = take(A, j)
            score -= d1
            key = np.maximum(score, 0.0, out=score).view(np.int64)
            best = np.minimum.reduceat(key, starts)
            pos = np.flatnonzero(key == repeat(best, ln))
            if pos.size > starts.size:  # ties: keep the first (leftmost) argmin of each row
                pos = take(pos, np.searchsorted(pos, starts))
            opt[mid] = take(j, pos)
        i, j = np.arange(a, b + 1), opt[a:b + 1]
        d1 = S1[i] - S1[j]
        D_new = np.zeros(n + 1)
        D_new[a:b + 1] = D[j] + (S2[i] - S2[j]) - d1 * d1 / (W[i] - W[j])
        D = D_new
        prev = opt.copy()
        prev[b + 1:] = opt[b]  # opt_{m-1}[i] <= opt_{m-1}[i+1]: a valid bound past the last row
    bounds = [n]
    for m in range(k, 1, -1):
        bounds.append(int(opts[m][bounds[-1]]))
    bounds = np.array([0] + bounds[::-1])
    cw = np.add.reduceat(c, bounds[:-1])
    centroids = np.add.reduceat(c * np.asarray(values, np.float64), bounds[:-1]) / cw
    return bounds, centroids


# --- float16 patterns ------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _patterns():
    """The 16-bit patterns of all finite float16 values except -0, sorted by value, and a mask of
    the non-finite patterns."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    v = bits.view(np.float16)
    keep = np.isfinite(v) & (bits != 0x8000)
    order = bits[keep][np.argsort(v[keep], kind="stable")]
    return order.astype(np.int64), ~np.isfinite(v)


def _palette(bits, weights, nbits):
    """LUT (float16, 2**nbits) and uint8 indices for one group of float16 patterns ``bits``."""
    order, nonfinite = _patterns()
    counts = np.bincount(bits, minlength=1 << 16)
    if counts[nonfinite].any():
        raise ValueError("w must be finite in float16 (it has inf/nan or values beyond +-65504)")
    counts[0] += counts[0x8000]  # -0 is +0
    mass = counts if weights is None else np.bincount(bits, weights=weights, minlength=1 << 16)
    if weights is not None:
        mass[0] += mass[0x8000]
        if not mass.any():  # no importance anywhere in this group: fall back to counts
            mass = counts
    present = order[counts[order] > 0]
    used = present[mass[present] > 0]  # zero-mass values cannot change the objective
    values = used.astype(np.uint16).view(np.float16).astype(np.float64)
    _, centroids = kmeans_1d(values, mass[used], 1 << nbits)
    lut = centroids.astype(np.float16)
    lut = np.concatenate([lut, np.full((1 << nbits) - lut.size, lut[-1], np.float16)])
    # every present value to its nearest float16 entry (the LUT is sorted)
    edges = (lut[1:].astype(np.float64) + lut[:-1]) / 2
    table = np.zeros(1 << 16, np.uint8)
    pv = present.astype(np.uint16).view(np.float16).astype(np.float64)
    table[present] = np.searchsorted(edges, pv)
    table[0x8000] = table[0]
    return lut, np.take(table, bits)


def kmeans(w, nbits, group_size=None, importance=None, per_channel_scale=False):
    """Palettize ``w`` (float, output channels last) with optimal k-means LUTs of ``2**nbits`` entries.

    - ``group_size=None``: one LUT for the tensor; ``g``: one LUT per ``g`` output channels
      (coremltools' ``granularity="per_grouped_channel"``), ``g`` dividing ``w.shape[-1]``.
    - ``importance`` (shape of ``w``, >= 0, e.g. squared gradients): minimise
      ``sum(importance * (w - w_q)**2)`` instead of the plain squared error (SqueezeLLM,
      coremltools' sensitive k-means).
    - ``per_channel_scale``: divide each output channel by its absmax (stored as float16) before
      clustering, as coremltools' ``enable_per_channel_scale``; the clusters then minimise the
      error of the *reconstructed* weight, so each normalised value weighs its channel's scale**2.

    Values are clustered as float16 (as Core ML stores them); the error is optimal for the
    float16-rounded weight.
    """
    if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) or nbits not in SUPPORTED_NBITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits!r}")
    w = np.asarray(w)
    if w.ndim < 1 or w.size == 0 or not jnp.issubdtype(w.dtype, jnp.floating):  # bfloat16 too
        raise ValueError("w must be a non-empty floating-point array with the output channels on "
                         f"its last axis, got dtype {w.dtype} shape {w.shape}")
    out = w.shape[-1]
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
                                   or group_size < 1 or out % group_size):
        raise ValueError(f"group_size must be None or a positive integer dividing the number of output "
                         f"channels (w.shape[-1] = {out}), got {group_size!r}")
    if importance is not None:
        importance = np.asarray(importance, np.float64)
        if importance.shape != w.shape:
            raise ValueError(f"importance must have the shape of w {w.shape}, got {importance.shape}")
        if not np.all(np.isfinite(importance)) or importance.min() < 0:
            raise ValueError("importance must be finite and nonnegative")
        importance = importance.reshape(-1, out)
    with np.errstate(over="ignore"):  # overflow to inf is reported below, by name
        w16 = w.astype(np.float16, copy=False).reshape(-1, out)
    scale = None
    if per_channel_scale:
        scale = np.abs(w16).max(0)
        scale[scale == 0] = 1
        if not np.all(np.isfinite(scale)):
            raise ValueError("w must be finite in float16 (it has inf/nan or values beyond +-65504)")
        w16 = (w16.astype(np.float32) / scale.astype(np.float32)).astype(np.float16)
        s2 = np.square(scale.astype(np.float64))
        importance = s2 if importance is None else importance * s2
        importance = np.broadcast_to(importance, w16.shape)
    groups = 1 if group_size is None else out // group_size
    bits = w16.view(np.uint16)
    if groups == 1:
        imp = None if importance is None else importance.reshape(-1)
        lut, idx = _palette(bits.reshape(-1), imp, nbits)
        luts = lut[None]
    else:  # groups of output channels are contiguous rows of the transpose
        bits_t = np.ascontiguousarray(bits.T).reshape(groups, -1)
        imp_t = None if importance is None else np.ascontiguousarray(importance.T).reshape(groups, -1)
        parts = [_palette(bits_t[g], None if imp_t is None else imp_t[g], nbits) for g in range(groups)]
        luts = np.stack([p[0] for p in parts])
        idx = np.stack([p[1] for p in parts]).reshape(out, -1).T
    return PalettizedWeight(
        packed=jnp.asarray(pack_bits(idx, nbits)), lut=jnp.asarray(luts),
        shape=tuple(int(d) for d in w.shape), nbits=int(nbits),
        scale=None if scale is None else jnp.asarray(scale),
        group_size=None if group_size is None else int(group_size))


COREMLTOOLS_KMEANS1D_MIN = 10_000   # coremltools clusters float16 tensors this large with kmeans1d


def coremltools_kmeans(w, nbits):
    """One LUT for ``w`` as coremltools' ``_get_kmeans_lookup_table_and_weight(nbits, w16)`` makes it,
    the clustering behind Apple's mixed-bit pre-analysis (its ``fake_palettize`` casts the weight to
    float16 first):

    - ``COREMLTOOLS_KMEANS1D_MIN`` weights or more: exact 1-D k-means over the distinct float16 values
      weighted by their counts (coremltools' ``kmeans1d``), which is ``kmeans`` here (the same optimal
      clusters up to ties; ``kmeans`` then maps each value to its nearest float16 centroid, where
      coremltools keeps the cluster, which differs only for values within rounding of a boundary);
    - fewer: scikit-learn's ``KMeans(2**nbits, init="k-means++", tol=1e-2, n_init=1, random_state=0)``
      over the weights in PyTorch's order (``(out, in, kh, kw)``; its seeding depends on the order),
      centroids rounded to float16. scikit-learn is needed for these (``pip install scikit-learn``).

    ``w``: sdjax layout (output channels last: ``(in, out)`` or HWIO)."""
    w = np.asarray(w)
    if w.size >= COREMLTOOLS_KMEANS1D_MIN:
        return kmeans(w, nbits)
    if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) or nbits not in SUPPORTED_NBITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits!r}")
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise ImportError("coremltools' k-means of tensors under 10,000 weights (Apple's mixed-bit pre-analysis) "
                          "uses scikit-learn: pip install scikit-learn") from None
    torch_order = {2: (1, 0), 4: (3, 2, 0, 1)}.get(w.ndim, tuple(reversed(range(w.ndim))))
    w16 = np.transpose(w.astype(np.float16), torch_order)  # (out, in[, kh, kw])
    k = min(w16.size, 2 ** nbits)
    km = KMeans(k, init="k-means++", tol=1e-2, n_init=1, random_state=0).fit(w16.reshape(-1, 1))
    lut = np.zeros(2 ** nbits, np.float16)
    lut[:k] = km.cluster_centers_[:, 0].astype(np.float16)
    idx = np.transpose(km.labels_.reshape(w16.shape), np.argsort(torch_order)).reshape(-1)
    return PalettizedWeight(packed=jnp.asarray(pack_bits(idx.astype(np.int64), nbits)), lut=jnp.asarray(lut[None]),
                            shape=tuple(int(d) for d in w.shape), nbits=int(nbits))
