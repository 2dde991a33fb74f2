"""Quantization-aware fine-tuning of palettized weights, weight-level: a ``PalettizedWeight`` as
trainable float32 leaves, its dense weight as a differentiable function of them, and back to a
``PalettizedWeight`` of the same bytes. Pure functions over pytrees, for an optax loop:

    params, frozen = finetune.trainable(pw, "dkm")
    def loss(p):
        return jnp.sum((finetune.weight(p, frozen, "dkm", temperature=1e-4) - target) ** 2)
    ...                                        # optax steps on params
    pw2 = finetune.finalize(params, frozen)    # same shape, nbits, group_size, scale presence

Every method works on the layout of ``PalettizedWeight`` (see ``quant.palettize``): the weight
viewed as ``(rows, out)``, output channel ``o`` looked up in LUT row ``o // group_size`` (row 0
when there is one LUT) and multiplied by ``scale[o]`` when the weight has per-channel scales.

- ``"lut"``: the indices stay as they are; the LUT (and the scales) are learned. The dense weight
  is ``lut[group(o), idx] * scale[o]``, so the LUT's gradient is the upstream gradient times the
  scale, summed over the weights using each entry. ``finalize`` rounds the LUT and scales to
  float16 and keeps the packed bytes as they were: every byte of the starting weight is kept.
- ``"dkm"``: differentiable k-means (Cho et al., "DKM", ICLR 2022; coremltools' DKMPalettizer).
  The float weights ``w`` are trained with the LUT ``c``: with ``x = w / scale``, the weight is
  ``scale * sum_k softmax_k(-(x - c_k)**2 / temperature) * c_k`` over the entries of the element's
  group, so gradients reach both. ``temperature`` is in the units of ``x**2`` (the weights'
  own units squared, or the channel-normalised ones' when there are scales); as it goes to 0 the
  weight tends to the hard nearest-entry quantization (``"ste"``'s forward value).
- ``"ste"``: straight-through estimator: the forward value is the hard quantization
  ``scale * c[nearest(x)]``, the gradient w.r.t. ``w`` is the upstream gradient unchanged, and the
  LUT and scales get the gradient of the hard assignment (as in ``"lut"``).

For ``"dkm"`` and ``"ste"``, ``finalize`` re-snaps: each weight to the nearest float16 entry of its
group's float16-rounded LUT (``argmin_k |w / scale - c_k|``, ties to the lowest index among equal
entries), optionally after one Lloyd step (``refine=True``: each entry becomes the least-squares
value of the weights assigned to it, i.e. the mean of ``x`` weighted by ``scale**2`` as
``palettize.kmeans`` weighs it, an entry nobody uses keeps its value), and the indices are packed
with ``palettize.pack_bits``.

The per-channel scales are trained by every method when the weight has them (freeze them with
``optax.masked`` if wanted). DKM's soft assignment is ``rows * out * 2**nbits`` floats per layer;
it is rematerialised in the backward pass (``jax.checkpoint``), so only one layer's is alive at a
time, which at 4 bits is still ~0.9 GB for SD's largest conv (3x3x1280x1280).

The ``*_tree`` helpers do the same over a nested dict of params: only ``PalettizedWeight`` leaves
become trainable, every other leaf is carried along unchanged.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.nn import flatten, is_quantized, method_of

from .palettize import PalettizedWeight, pack_bits, unpack_bits

METHODS = ("lut", "dkm", "ste")


@flax.struct.dataclass
class Frozen:
    """The part of a palettized weight that training leaves alone: its packed indices (the
    ``"lut"`` method's, and kept by ``finalize`` there) and its layout."""
    packed: jax.Array                  # uint8, as in the PalettizedWeight
    shape: tuple = flax.struct.field(pytree_node=False)
    nbits: int = flax.struct.field(pytree_node=False)
    group_size: Optional[int] = flax.struct.field(pytree_node=False, default=None)

    @property
    def size(self):
        return math.prod(self.shape)


# --- checks ----------------------------------------------------------------------------------

def _check_method(method):
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; valid methods: {', '.join(METHODS)}")


def _check_temperature(temperature, method):
    if temperature is None:
        if method == "dkm":
            raise ValueError('method "dkm" needs a temperature > 0 (in units of the weights squared, or of '
                             "the channel-normalised weights squared when there are per-channel scales)")
        return
    if isinstance(temperature, jax.core.Tracer):  # an annealed temperature inside jit: checked by its caller
        return
    t = np.asarray(temperature)
    if t.shape != () or not np.issubdtype(t.dtype, np.number) or not t > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")


def _check_params(params, frozen, method):
    if not isinstance(frozen, Frozen):
        raise ValueError(f"frozen must be the Frozen part made by trainable(), got {type(frozen).__name__}")
    if not isinstance(params, dict) or "lut" not in params:
        raise ValueError("params must be the dict made by trainable() (with a 'lut' entry)")
    k, out = 1 << frozen.nbits, frozen.shape[-1]
    lut = params["lut"]
    groups = 1 if frozen.group_size is None else out // frozen.group_size
    if lut.shape not in ((groups, k), (1, k)):
        raise ValueError(f"params['lut'] has shape {lut.shape}; this weight's LUTs are ({groups}, {k})")
    if "scale" in params and params["scale"].shape != (out,):
        raise ValueError(f"params['scale'] has shape {params['scale'].shape}; expected ({out},)")
    if method is None:
        return
    if method == "lut" and "w" in params:
        raise ValueError('these params train the float weights (made for "dkm"/"ste"): method "lut" would '
                         "leave them stale; make params with trainable(pw, \"lut\")")
    if method != "lut" and "w" not in params:
        raise ValueError(f'method {method!r} trains the float weights, and these params (made for "lut") '
                         f"have none; make them with trainable(pw, {method!r})")
    if "w" in params and tuple(params["w"].shape) != tuple(frozen.shape):
        raise ValueError(f"params['w'] has shape {tuple(params['w'].shape)}; the weight's is {frozen.shape}")


# --- the dense weight --------------------------------------------------------------------------

def _column_groups(num_groups, group_size, out):
    """LUT row of each output channel, int32 ``(out,)``, as ``palettize._dequantize`` lays them out."""
    if num_groups == 1:
        return jnp.zeros(out, jnp.int32)
    return jnp.arange(out, dtype=jnp.int32) // group_size


def _safe(scale):
    return jnp.where(scale == 0, 1.0, scale)  # a scale rounded to 0 zeroes its channel; no 0/0


def _nearest(x, lut, group_size):
    """Index of the nearest entry of its group's LUT for each ``x`` ``(rows, out)``; ties (and equal
    entries) go to the lowest index. A binary search over each sorted LUT: no ``(rows, out, K)``
    distance tensor."""
    rows, out = x.shape
    groups, k = lut.shape
    order = jnp.argsort(lut, axis=-1, stable=True)
    srt = jnp.take_along_axis(lut, order, -1)
    # equal entries: the sorted position of the first of each run, whose index is the lowest
    first = jax.vmap(lambda s: jnp.searchsorted(s, s, side="left"))(srt)
    canonical = jnp.take_along_axis(order, first, -1)
    edges = (srt[:, 1:] + srt[:, :-1]) / 2
    xg = x.T.reshape(groups, -1)  # group g = output channels [g*gs, (g+1)*gs), contiguous rows of x.T
    # up to 16 entries: each index is the count of midpoints below the value, in one fused pass. The
    # binary search ("scan") starts from two weight-sized uint32 bound arrays that XLA:CPU allocates
    # at the program start and keeps: 11.9 of a full-size "ste" step's 13.0 GiB of temporaries
    how = "compare_all" if k <= 16 else "scan"
    pos = jax.vmap(lambda e, v: jnp.searchsorted(e, v, side="left", method=how))(edges, xg)
    idx = jnp.take_along_axis(canonical, pos, -1)
    return idx.reshape(out, rows).T.astype(jnp.int32)


@jax.checkpoint  # the (rows, out, K) assignment is recomputed in the backward pass, not stored
def _soft_assign(x, centroids, temperature):
    """``sum_k softmax_k(-(x - c_k)**2 / T) * c_k``; x ``(rows, out)``, centroids ``(out, K)``."""
    logits = -jnp.square(x[..., None] - centroids) / temperature
    return jnp.sum(jax.nn.softmax(logits, axis=-1) * centroids, axis=-1)


def weight(params, frozen, method, temperature=None):
    """The dense float32 weight (``frozen.shape``) of ``params`` under ``method`` ("lut", "dkm",
    "ste"; see the module docstring), differentiable w.r.t. every leaf of ``params``. jit-able
    (``method`` static; ``temperature``, needed by "dkm", may be traced)."""
    _check_method(method)
    _check_temperature(temperature, method)
    _check_params(params, frozen, method)
    shape, out, k = frozen.shape, frozen.shape[-1], 1 << frozen.nbits
    lut = params["lut"].astype(jnp.float32)
    scale = params["scale"].astype(jnp.float32) if "scale" in params else None
    offset = _column_groups(lut.shape[0], frozen.group_size, out) * k
    if method == "lut":
        idx = unpack_bits(frozen.packed, frozen.nbits, frozen.size).reshape(-1, out)
        w = jnp.take(lut.reshape(-1), idx + offset)
        return (w if scale is None else w * scale).reshape(shape)
    w = params["w"].astype(jnp.float32).reshape(-1, out)
    x = w if scale is None else w / _safe(scale)
    if method == "dkm":
        centroids = jnp.take(lut.reshape(-1), offset[:, None] + jnp.arange(k))  # (out, K)
        q = _soft_assign(x, centroids, temperature)
    else:  # hard assignment; the LUT's gradient flows through the lookup, w's straight through
        idx = _nearest(jax.lax.stop_gradient(x), jax.lax.stop_gradient(lut), frozen.group_size)
        q = jnp.take(lut.reshape(-1), idx + offset)
    q = q if scale is None else q * scale
    if method == "ste":
        q = q + (w - jax.lax.stop_gradient(w))  # adds exactly 0; d/dw = identity
    return q.reshape(shape)


# --- to and from PalettizedWeight ------------------------------------------------------------

def trainable(pw, method="lut", init=None):
    """``(params, frozen)`` for fine-tuning ``pw`` with ``method``.

    ``params``: float32 ``{"lut": (groups, 2**nbits)}``, plus ``"scale": (out,)`` when ``pw`` has
    per-channel scales, plus ``"w": shape`` for "dkm"/"ste" (the float weights: ``init`` if given,
    e.g. the float checkpoint's weight, else ``pw``'s dequantized weight). ``frozen``: the rest, a
    pytree to pass beside ``params`` into ``weight``/``finalize`` (jit arguments, not trained)."""
    _check_method(method)
    if not isinstance(pw, PalettizedWeight):
        raise ValueError(f"only palettized weights (PalettizedWeight) can be fine-tuned, got "
                         f"{type(pw).__name__} (method {method_of(pw)!r})")
    params = {"lut": jnp.asarray(pw.lut, jnp.float32)}
    if pw.scale is not None:
        params["scale"] = jnp.asarray(pw.scale, jnp.float32)
    if method == "lut":
        if init is not None:
            raise ValueError('method "lut" keeps the indices and trains no float weights: init applies to '
                             '"dkm"/"ste" only')
    elif init is None:
        params["w"] = pw.dequantize(jnp.float32)
    else:
        if not hasattr(init, "shape") or tuple(init.shape) != tuple(pw.shape) \
                or not jnp.issubdtype(init.dtype, jnp.floating):
            raise ValueError(f"init must be a float array of the weight's shape {pw.shape}, got "
                             f"{getattr(init, 'dtype', type(init).__name__)} {getattr(init, 'shape', '')}")
        params["w"] = jnp.asarray(init, jnp.float32)
    return params, Frozen(packed=pw.packed, shape=tuple(pw.shape), nbits=pw.nbits, group_size=pw.group_size)


def _float16(a, name):
    with np.errstate(over="ignore"):
        a16 = np.asarray(a, np.float32).astype(np.float16)
    if not np.all(np.isfinite(a16)):
        raise ValueError(f"trained {name} is not finite in float16 (inf/nan, or beyond +-65504)")
    return a16


def _lloyd(x, idx, lut16, scale, group_size):
    """One Lloyd update of float16 LUTs ``(groups, K)`` for ``x``/``idx`` ``(rows, out)``: each
    entry the ``scale**2``-weighted mean of its ``x`` (float64); unused entries keep their value."""
    groups, k = lut16.shape
    out = x.shape[1]
    col = np.zeros(out, np.int64) if groups == 1 else np.arange(out) // group_size
    ids = (col[None, :] * k + idx).reshape(-1)
    mass = np.ones(out) if scale is None else np.square(scale.astype(np.float64))
    mass = np.broadcast_to(mass, x.shape).reshape(-1)
    total = np.bincount(ids, weights=mass, minlength=groups * k)
    sums = np.bincount(ids, weights=mass * x.reshape(-1).astype(np.float64), minlength=groups * k)
    lut = lut16.astype(np.float64).reshape(-1)
    used = total > 0
    lut[used] = sums[used] / total[used]
    return _float16(lut.reshape(groups, k), "LUT (after the Lloyd step)")


def finalize(params, frozen, refine=False):
    """The ``PalettizedWeight`` of ``params``: the same shape, nbits, group_size and scale presence
    as the weight ``trainable`` started from, so the same number of bytes. Host-side (NumPy).

    Params made for "lut" keep the packed indices bit for bit and get their LUT (and scales)
    rounded to float16. Params with float weights ("dkm"/"ste") are re-snapped to the nearest
    entries (see the module docstring); ``refine=True`` adds one Lloyd step first."""
    _check_params(params, frozen, None)
    out = frozen.shape[-1]
    lut16 = _float16(params["lut"], "LUT")
    scale16 = _float16(params["scale"], "scale") if "scale" in params else None
    if "w" not in params:
        if refine:
            raise ValueError('refine re-clusters the float weights, and params made for "lut" have none')
        packed = frozen.packed
    else:
        w = np.asarray(params["w"], np.float32).reshape(-1, out)
        if scale16 is not None:
            s = scale16.astype(np.float32)
            w = w / np.where(s == 0, np.float32(1), s)
        x = jnp.asarray(w)
        idx = np.asarray(_nearest(x, jnp.asarray(lut16, jnp.float32), frozen.group_size))
        if refine:
            lut16 = _lloyd(w, idx, lut16, scale16, frozen.group_size)
            idx = np.asarray(_nearest(x, jnp.asarray(lut16, jnp.float32), frozen.group_size))
        packed = jnp.asarray(pack_bits(idx, frozen.nbits))
    return PalettizedWeight(packed=packed, lut=jnp.asarray(lut16), shape=frozen.shape, nbits=frozen.nbits,
                            scale=None if scale16 is None else jnp.asarray(scale16), group_size=frozen.group_size)


# --- over a params tree ----------------------------------------------------------------------

def _map(tree, fn, prefix=""):
    """``tree`` with each non-dict leaf replaced by ``fn(dotted path, leaf)``; dict structure kept."""
    return {k: _map(v, fn, f"{prefix}{k}.") if isinstance(v, dict) else fn(f"{prefix}{k}", v)
            for k, v in tree.items()}


def _check_required(flat, require):
    """Every path in ``require`` names a palettized leaf, or a subtree whose quantized leaves are
    all palettized (and at least one is); all problems reported at once."""
    if isinstance(require, str):
        require = [require]
    errors = []
    for r in require:
        if r in flat:
            leaf = flat[r]
            if not isinstance(leaf, PalettizedWeight):
                kind = "a float array" if not is_quantized(leaf) else f"method {method_of(leaf)!r}"
                errors.append(f"{r}: {type(leaf).__name__} ({kind}) cannot be fine-tuned")
            continue
        under = {p: v for p, v in flat.items() if p.startswith(r + ".")}
        if not under:
            errors.append(f"{r}: no such layer or subtree in params")
            continue
        bad = [f"{p} ({type(v).__name__}, method {method_of(v)!r})" for p, v in under.items()
               if is_quantized(v) and not isinstance(v, PalettizedWeight)]
        if bad:
            errors.append(f"{r}: holds weights that cannot be fine-tuned: {', '.join(bad)}")
        elif not any(isinstance(v, PalettizedWeight) for v in under.values()):
            errors.append(f"{r}: holds no palettized weight to fine-tune")
    if errors:
        raise ValueError("only palettized weights (PalettizedWeight) can be fine-tuned:\n  " + "\n  ".join(errors))


def trainable_tree(tree, method="lut", require=None, init=None):
    """``(train, frozen_tree)`` over a nested dict of params.

    ``train``: ``{dotted path: params}`` (as ``trainable``) for every ``PalettizedWeight`` leaf;
    ``frozen_tree``: ``tree`` with those leaves replaced by their ``Frozen`` parts and every other
    leaf (float arrays, int8 weights, ...) unchanged. ``require``: dotted paths of layers (or
    subtrees) the caller means to train; a ValueError names each one that is not palettized (int8,
    LLM.int8, float) or does not exist. ``init``: ``{dotted path: float weight}`` for "dkm"/"ste"."""
    _check_method(method)
    if not isinstance(tree, dict):
        raise ValueError(f"tree must be a nested dict of params, got {type(tree).__name__}")
    flat = flatten(tree)
    if require is not None:
        _check_required(flat, require)
    init = {} if init is None else dict(init)
    unknown = [p for p in init if not isinstance(flat.get(p), PalettizedWeight)]
    if unknown:
        raise ValueError(f"init names layers that are not palettized weights of tree: {', '.join(unknown)}")
    train = {}

    def split(path, leaf):
        if not isinstance(leaf, PalettizedWeight):
            return leaf
        train[path], frozen = trainable(leaf, method, init.get(path))
        return frozen
    frozen_tree = _map(tree, split)
    return train, frozen_tree


def _paired(train, frozen_tree):
    paths = {p for p, v in flatten(frozen_tree).items() if isinstance(v, Frozen)}
    if set(train) != paths:
        missing, extra = sorted(paths - set(train)), sorted(set(train) - paths)
        raise ValueError(f"train and frozen_tree do not match (made by different trainable_tree calls?): "
                         f"missing {missing[:5]}, unknown {extra[:5]}")


@flax.struct.dataclass
class TrainingWeight:
    """A weight being fine-tuned, expanded where its layer runs: the weight protocol of ``sdjax.nn``
    (``dequantize``) over ``weight``. With these leaves the dense float32 weights of a whole UNet
    (3.2 GiB at full size) never exist at once; with a rematerialised model (``unet.apply(...,
    remat=True)``) each is expanded again in its block's backward pass instead of being kept."""
    params: dict
    frozen: Frozen
    how: str = flax.struct.field(pytree_node=False)
    temperature: Optional[float] = flax.struct.field(pytree_node=False, default=None)

    @property
    def shape(self):
        return self.frozen.shape

    @property
    def ndim(self):
        return len(self.frozen.shape)

    def dequantize(self, dtype=jnp.float32):
        return weight(self.params, self.frozen, self.how, self.temperature).astype(dtype)


def weights_tree(train, frozen_tree, method, temperature=None, lazy=False):
    """``frozen_tree`` with each ``Frozen`` leaf replaced by its dense float32 ``weight``: params a
    model's ``apply`` runs as they are. jit-able, differentiable w.r.t. ``train``. ``lazy``: leaves
    are ``TrainingWeight``s, expanded where their layer runs (same values); "dkm"'s ``temperature``
    must then be a Python number."""
    _check_method(method)
    _check_temperature(temperature, method)
    _paired(train, frozen_tree)
    if lazy:
        t = None if temperature is None else float(temperature)
        return _map(frozen_tree, lambda p, v: TrainingWeight(train[p], v, method, t) if isinstance(v, Frozen) else v)
    return _map(frozen_tree, lambda p, v: weight(train[p], v, method, temperature) if isinstance(v, Frozen) else v)


def finalize_tree(train, frozen_tree, refine=False):
    """``frozen_tree`` with each ``Frozen`` leaf replaced by its ``finalize``d ``PalettizedWeight``."""
    _paired(train, frozen_tree)
    return _map(frozen_tree, lambda p, v: finalize(train[p], v, refine) if isinstance(v, Frozen) else v)
