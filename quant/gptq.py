"""GPTQ palettization: k-means LUTs whose indices are chosen for the layer's output, not its weight.

``quant.palettize.kmeans`` minimises the weight error ``sum (W - Q)**2``. What the model computes
with a linear layer is ``X @ W`` (a convolution: its im2col patches ``@`` the ``(kh*kw*cin, out)``
weight), so the error that matters is the output error on real inputs,

    E(Q) = ||X (W - Q)||_F**2 = tr((W - Q)^T H (W - Q)),     H = X^T X over calibration inputs,

and H is far from diagonal: neighbouring pixels and channels are correlated, so the error of one
weight can be cancelled by moving others. GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023; the OBQ
update of Frantar & Alistarh, NeurIPS 2022) rounds one input row of W at a time and moves the rows
not yet rounded to compensate: with ``e = w_i - q_i`` the rounding error of row i,

    W[rest] -= H^-1[rest, i] e / H^-1[i, i],   then row and column i leave H^-1 (Schur complement),

the optimal compensation of ``e`` by the remaining rows under E. ``palettize`` computes the same
updates for all rows from the upper Cholesky factor U of H^-1 (``H^-1 = U^T U``; row i's update is
``U[i, i+1:]^T e / U[i, i]``), in blocks of ``block_size`` rows with the rest updated lazily once per
block, as the paper's Algorithm 1. ``reference_indices`` states the first form in plain float64
NumPy; the tests check one against the other.

The grid is the k-means LUT instead of GPTQ's uniform one: the LUT (per tensor, per group of output
channels, with an optional per-output-channel scale: what ``palettize.kmeans`` makes and Core ML
stores) is fitted first, weighting every weight of input row i by ``H[i, i]`` (its cost when rows are
taken independently), and GPTQ then picks the indices. The result is an ordinary
``PalettizedWeight``: the same bytes, the same export.

As in the GPTQ reference code: ``damp`` adds ``damp * mean(diag H)`` to the diagonal (numerical
stability, and a pull towards plain rounding); ``act_order`` rounds rows of large ``H[i, i]`` first;
rows whose input was always zero (``H[i, i] = 0``) do not change the output and are rounded plainly.

``collect`` gathers H for chosen conv/linear layers while a calibration run drives the model (the
probe mechanism of ``quant.calibrate.observe``). H is ``d x d`` with ``d = kh*kw*cin``: up to
11520**2 float64 (1 GiB) for SD 1.5's 1280-channel 3x3 convolutions, so a full-size UNet is
collected a few layers at a time (``names``), each group one calibration run.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import threading

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax import nn

from . import palettize as _pal
from .calibrate import WeightProbe, run_probed

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128


# --- the algorithm ---------------------------------------------------------------------------

def _rows(w):
    """(d, out): input rows x output channels, the layout H refers to."""
    return int(math.prod(w.shape[:-1])), int(w.shape[-1])


def check_hessian(hessian, w, name="hessian"):
    """``hessian`` as float64 ``(d, d)`` for weight ``w`` (symmetrised: ``X^T X`` summed in float32
    is symmetric only up to rounding), or a ValueError naming what is wrong."""
    d, _ = _rows(w)
    h = np.asarray(hessian, np.float64)
    if h.shape != (d, d):
        raise ValueError(f"{name} must be ({d}, {d}) for a weight of shape {tuple(w.shape)} (input rows "
                         f"kh*kw*cin = {d}); got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError(f"{name} must be finite")
    if np.any(np.diag(h) < 0):
        raise ValueError(f"{name} must have a nonnegative diagonal (it is X^T X)")
    return (h + h.T) / 2


@dataclasses.dataclass(frozen=True)
class Factor:
    """What GPTQ needs of a hessian, independent of the weight's values and of nbits: the row order,
    the upper Cholesky factor U of the damped inverse in that order, and diag(H). ``factorize`` makes
    it; ``palettize`` takes it instead of H, so a layer swept at several widths is factored once."""
    d: int
    perm: np.ndarray
    U: np.ndarray
    diag: np.ndarray
    damp: float
    act_order: bool


def factorize(hessian, damp=DEFAULT_DAMP, act_order=True, name="hessian"):
    """``Factor`` of a ``(d, d)`` hessian (checked like ``check_hessian``)."""
    h = np.asarray(hessian, np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{name} must be a square (d, d) matrix; got shape {h.shape}")
    return _factorize(check_hessian(h, np.empty((h.shape[0], 1), np.float32), name), damp, act_order, name)


def _factorize(h, damp, act_order, name):
    """``factorize`` of an already checked (symmetric, finite) hessian."""
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not (0 <= damp < math.inf):
        raise ValueError(f"damp must be a finite number >= 0; got {damp!r}")
    diag = np.clip(np.diag(h), 0, None)
    h, _ = _prepare(h, float(damp))
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(len(diag))
    h = h[np.ix_(perm, perm)]
    try:
        U = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U
    except np.linalg.LinAlgError:
        raise ValueError(f"{name} must be positive semidefinite (X^T X of the layer's inputs); with damp "
                         f"{damp} it is not: a larger damp helps a nearly singular one") from None
    if not np.all(np.isfinite(U)):
        raise ValueError(f"{name} is too ill-conditioned to invert; use a larger damp than {damp}")
    return Factor(len(diag), perm, U, diag, float(damp), bool(act_order))


def _prepare(h, damp):
    """(damped H, dead rows): zero-input rows get H_ii = 1 (any value: they never move the output)."""
    diag = np.diag(h).copy()
    dead = diag <= 0
    h = h.copy()
    h[dead, dead] = 1.0
    live = diag[~dead]
    h[np.diag_indices_from(h)] += damp * (float(live.mean()) if live.size else 1.0)
    return h, dead


class _Grid:
    """The values a row may take: per output channel j, ``lut[group(j)] * scale[j]`` (sorted LUTs)."""

    def __init__(self, pw: _pal.PalettizedWeight):
        out = pw.shape[-1]
        lut = np.asarray(pw.lut, np.float64)                      # (G, K), each row sorted
        group = np.zeros(out, np.int64) if pw.num_groups == 1 else np.arange(out) // pw.group_size
        self.table = lut[group]                                   # (out, K)
        self.scale = np.ones(out) if pw.scale is None else np.asarray(pw.scale, np.float64)
        self.mid = (self.table[:, 1:] + self.table[:, :-1]) / 2   # (out, K-1)
        self.shared = pw.num_groups == 1

    def nearest(self, row):
        """(indices uint8, values) of the nearest grid value of each entry of ``row`` (out,): the
        number of midpoints below it (ties go down, as ``searchsorted(side="left")``)."""
        v = row / self.scale
        if self.shared:  # one LUT for every column: a binary search instead of out x (K - 1) compares
            k = np.searchsorted(self.mid[0], v, side="left")
            return k.astype(np.uint8), self.table[0][k] * self.scale
        k = np.sum(v[:, None] > self.mid, axis=1)
        return k.astype(np.uint8), np.take_along_axis(self.table, k[:, None], 1)[:, 0] * self.scale


def palettize(w, hessian, nbits, *, group_size=None, per_channel_scale=False, damp=DEFAULT_DAMP,
              act_order=True, block_size=DEFAULT_BLOCK):
    """Palettize ``w`` (sdjax layout, output channels last) minimising the output error under
    ``hessian`` (``X^T X`` of the layer's inputs, ``(d, d)``, d = prod(w.shape[:-1]), or its
    ``Factor``, which then fixes ``damp`` and ``act_order``); see the module docstring. ``nbits``,
    ``group_size``, ``per_channel_scale`` as ``palettize.kmeans``."""
    w = np.asarray(w)
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer; got {block_size!r}")
    d, out = _rows(w)
    if isinstance(hessian, Factor):
        f = hessian
        if f.d != d:
            raise ValueError(f"hessian factor is for {f.d} input rows; the weight of shape {tuple(w.shape)} "
                             f"has {d} (kh*kw*cin)")
    else:
        f = _factorize(check_hessian(hessian, w), damp, act_order, "hessian")
    diag, perm, U = f.diag, f.perm, f.U
    importance = np.broadcast_to(diag[:, None], (d, out)).reshape(w.shape) if diag.any() else None
    base = _pal.kmeans(w, nbits, group_size, importance=importance, per_channel_scale=per_channel_scale)
    grid = _Grid(base)
    # the LUT was fitted to the float16-rounded weight (as Core ML stores it); GPTQ starts from it too
    W = w.astype(np.float16).astype(np.float64).reshape(d, out)[perm]
    idx = np.empty((d, out), np.uint8)
    for b0 in range(0, d, block_size):
        b1 = min(b0 + block_size, d)
        Wb = W[b0:b1]
        err = np.empty((b1 - b0, out))
        for i in range(b1 - b0):
            k, q = grid.nearest(Wb[i])
            idx[b0 + i] = k
            e = (Wb[i] - q) / U[b0 + i, b0 + i]
            Wb[i + 1:] -= np.outer(U[b0 + i, b0 + i + 1:b1], e)
            err[i] = e
        W[b1:] -= U[b0:b1, b1:].T @ err
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(d)
    idx = idx[inverse].reshape(w.shape)
    return _pal.PalettizedWeight(packed=jnp.asarray(_pal.pack_bits(idx, nbits)), lut=base.lut, shape=base.shape,
                                 nbits=base.nbits, scale=base.scale, group_size=base.group_size)


def reference_indices(w, hessian, pw, damp=DEFAULT_DAMP, order=None):
    """The OBQ/GPTQ rounding in its first form, float64 NumPy, one row at a time: the indices (of
    ``w``'s shape) into ``pw``'s LUT grid that GPTQ chooses for ``w`` with rows taken in ``order``
    (default 0..d-1). For tests; O(d**2 * out) memory-light but slow."""
    w = np.asarray(w)
    d, out = _rows(w)
    h, _ = _prepare(check_hessian(hessian, w), damp)
    grid = _Grid(pw)
    W = w.astype(np.float16).astype(np.float64).reshape(d, out).copy()
    hinv = np.linalg.inv(h)
    left = np.ones(d, bool)
    idx = np.empty((d, out), np.uint8)
    for i in (range(d) if order is None else order):
        k, q = grid.nearest(W[i])
        idx[i] = k
        left[i] = False
        e = W[i] - q
        W[left] -= np.outer(hinv[left, i] / hinv[i, i], e)
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return idx.reshape(w.shape)


def output_error(w, wq, hessian):
    """``tr((W - Q)^T H (W - Q))``: the summed squared output error over the inputs H came from."""
    w = np.asarray(w)
    q = wq.dequantize(jnp.float32) if nn.is_quantized(wq) else wq
    d, out = _rows(w)
    diff = np.asarray(w, np.float64).reshape(d, out) - np.asarray(q, np.float64).reshape(d, out)
    return float(np.sum(diff * (np.asarray(hessian, np.float64) @ diff)))


# --- collecting H ----------------------------------------------------------------------------

class _Sink:
    def __init__(self):
        self.sums, self.rows = {}, {}
        self._lock = threading.Lock()

    def add(self, name, xtx, rows):
        xtx = np.asarray(xtx, np.float64)
        with self._lock:
            if name in self.sums:
                self.sums[name] += xtx
                self.rows[name] += int(rows)
            else:
                self.sums[name], self.rows[name] = xtx, int(rows)


@flax.struct.dataclass
class HessianProbe(WeightProbe):
    """A weight that adds ``X^T X`` of its layer's input rows (im2col patches for a convolution) to
    a host-side sum, and otherwise behaves as ``weight``."""
    weight: object
    name: str = flax.struct.field(pytree_node=False)
    sink: _Sink = flax.struct.field(pytree_node=False)

    def _record(self, cols):
        x = cols.reshape(-1, cols.shape[-1]).astype(jnp.float32)
        xtx = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
        jax.debug.callback(lambda h, name=self.name, n=x.shape[0]: self.sink.add(name, h, n), xtx)

    def _record_conv(self, x, stride, padding):
        kh, kw = self.shape[:2]
        self._record(nn.im2col(x, kh, kw, stride, padding))


def collect(params, run, names=None):
    """Run ``run(params)`` with probes on the chosen layers -> ``{layer: H}``, H the float64 mean of
    ``x x^T`` over every input row ``x`` the layer saw (``X^T X / rows``; GPTQ is invariant to the
    scale). ``run`` drives the model over calibration data, as for ``calibrate.observe`` (e.g. guided
    generation of calibration prompts). ``names``: layers to probe (default every conv/linear layer
    of ``params``); layers ``run`` never reached are absent from the result."""
    sink = _Sink()
    names = run_probed(params, run, names, lambda w, name: HessianProbe(w, name, sink))
    # the probes (and so this sink) stay referenced by jit's caches: hand the sums over and empty it,
    # or every collect's float64 statistics would stay alive (52 GiB for SD 1.5's UNet)
    sums, rows = sink.sums, sink.rows
    sink.sums, sink.rows = {}, {}
    return {n: sums.pop(n) / max(rows[n], 1) for n in names if n in sums}


__all__ = ["DEFAULT_BLOCK", "DEFAULT_DAMP", "Factor", "HessianProbe", "check_hessian", "collect", "factorize",
           "output_error", "palettize", "reference_indices"]
