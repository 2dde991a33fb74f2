"""Helpers for building sdjax models as MIL programs (call them inside ``@mb.program``).

Activations use the Neural Engine layout of apple/ml-stable-diffusion: ``(B, C, 1, S)``
(channels on axis 1, the sequence on the last axis), linear layers as 1x1 convolutions,
layer norm over axis 1, and attention either "split_einsum_v2" (one head at a time, query
chunks of at most 512) or "original" (batched matmul + softmax).

Weights go through ``weight``/``conv1x1_weight``: float arrays become consts, sdjax's quantized
weights become constexpr ops that Core ML expands at load time, with the stored tables exactly
sdjax's (see ``weight``). The program's opset (the deployment target it is built for) picks the
op form: per-tensor LUTs and W8A16 int8 use the iOS16 ops below iOS18 and the iOS18 ops from
iOS18 on (an iOS18 program has only the iOS18 signatures); grouped LUTs and per-channel scales
exist only as iOS18 ops, so such weights in a program below iOS18 raise NotImplementedError
naming the weight and "iOS18 (macOS15)". ``dtype`` there is the float type the tables are written in:
"float32" for a program converted with the empty pass pipeline (``conv``/``linear`` accept
only a const or constexpr weight, so no cast may follow), "float16" for the fp16 pipeline (the
constexpr result is cast to fp32 in the fp32-typed Builder program, and
``common::cast_optimization`` removes that cast again). See ``sdjax.coreml.interp``'s
docstring for what coremltools 9 does to programs.

Names passed in must be identifiers (``[A-Za-z_][A-Za-z0-9_]*``): the backend rewrites
others.
"""
from __future__ import annotations

import math
import weakref

import numpy as np

from ..nn import method_of

SUPPORTED_WEIGHTS = ("float arrays", "PalettizedWeight with one per-tensor LUT (any target)",
                     "PalettizedWeight with grouped LUTs, a per-channel scale and/or int8 LUT entries "
                     "(iOS18 (macOS15) or later)",
                     "Int8Weight W8A16 (act_scale None; any target)",
                     "any of these with an activation scale (act_scale: W8A8, W4A8, ...; iOS17 (macOS14) or later)")
IOS18_NAME = "iOS18 (macOS15)"  # the first deployment target with grouped LUTs and per-channel scales
IOS17_NAME = "iOS17 (macOS14)"  # the first deployment target with the quantize/dequantize ops (int8 activations)
ACT_QMAX = 127  # sdjax's activation codes: clip(round(x / act_scale), -127, 127) (quant.int8)
QUERY_CHUNK = 512  # apple/ml-stable-diffusion's split_einsum_v2 query chunk
ATTENTION_MODES = ("split_einsum_v2", "original")


def _mb():
    from coremltools.converters.mil import Builder as mb
    return mb


def program(inputs: dict, body, opset_version=None):
    """A one-function MIL Program ("main") whose inputs are named by the keys of ``inputs``
    (``{name: shape}``, float32 tensors, in that order) -- names that are data, which
    ``@mb.program`` (inputs named after Python parameters) cannot take. ``body({name: Var})``
    returns the output Vars (a list, or one Var)."""
    from coremltools.converters.mil.mil import Function, Program
    mb = _mb()
    with Function({n: mb.TensorSpec(shape=tuple(int(d) for d in shp)) for n, shp in inputs.items()},
                  opset_version) as func:
        outs = body(dict(func.inputs))
        func.set_outputs(list(outs) if isinstance(outs, (list, tuple)) else [outs])
    if opset_version is None:
        func.opset_version = func.get_max_opset_version_and_op()[0]
    prog = Program()
    prog.add_function("main", func)
    return prog


_SHARED = weakref.WeakKeyDictionary()  # {Block being built: {(value, dtype): const Var}}


def shared_const(value, dtype=None):
    """One const Var per value in the block being built (each op's literal arguments would
    otherwise be a const op of their own: at SDXL size split_einsum_v2's einsum equations and
    axes were 20k const ops, memory and time in every later pass)."""
    from coremltools.converters.mil.mil.block import curr_block
    consts = _SHARED.setdefault(curr_block(), {})
    if isinstance(value, np.ndarray):  # by contents: repr elides the middle of a big array
        key = (value.dtype.str, value.shape, value.tobytes(), dtype)
    else:
        key = (repr(value), dtype)
    if key not in consts:
        consts[key] = _mb().const(val=value if dtype is None else np.array(value, dtype))
    return consts[key]


def tables_dtype(dtype):
    """``dtype`` as a NumPy float type for quantization tables: float32 or float16, else ValueError.
    Every builder's ``dtype`` argument goes through this."""
    d = np.dtype(dtype)
    if d not in (np.float32, np.float16):
        raise ValueError(f"weight table dtype must be float32 or float16, got {dtype!r}")
    return d


def _kind(w):
    """How a weight is written, from the weight protocol's ``method`` (see ``sdjax.nn``)."""
    if not hasattr(w, "shape"):
        return "other"
    # an int8-w8a8 weight is its int8 form here; conv2d/linear_as_conv quantize its input (activation_quant)
    return {"palettize": "lut", "int8": "int8", "int8-w8a8": "int8", "float": "float"}.get(method_of(w), "other")


def _unsupported(w, name, why=""):
    raise NotImplementedError(
        f"Core ML export of weight {name!r} ({type(w).__name__}{why}) is not implemented; "
        f"supported so far: {'; '.join(SUPPORTED_WEIGHTS)}")


def lut_indices(w) -> np.ndarray:
    """The LUT index of every element of a ``PalettizedWeight``, uint8 of ``w.shape`` (unpacked in
    NumPy a chunk at a time: a full-size UNet's big tensors stay a few MB of temporaries)."""
    from quant.palettize import unpack_bits_np
    return unpack_bits_np(w.packed, w.nbits, w.size).reshape(w.shape)


def _opset():
    """The opset (a ``ct.target``) of the ``@mb.program`` being built, or None (none given)."""
    from coremltools.converters.mil.mil.block import curr_opset_version
    return curr_opset_version()


def _is_ios18(opset):
    import coremltools as ct
    return opset is not None and opset >= ct.target.iOS18


def _needs_ios18(w, name, what, opset):
    have = "none given (the Builder's default)" if opset is None else getattr(opset, "name", str(opset))
    raise NotImplementedError(
        f"Core ML export of weight {name!r} ({type(w).__name__} with {what}) needs minimum deployment "
        f"target {IOS18_NAME} or later, where constexpr_lut_to_dense takes grouped LUTs and "
        f"constexpr_blockwise_shift_scale exists; this program's opset is {have}. Export with "
        f"minimum_deployment_target=ct.target.iOS18; supported so far: {'; '.join(SUPPORTED_WEIGHTS)}")


def _out_axis(name, permuted, shape, axis):
    """The axis of ``shape`` that holds axis ``axis`` of ``permuted`` (the output channels), when
    ``shape`` only inserts or drops unit axes; None when that axis has size 1 (any axis will do)."""
    if permuted[axis] == 1:
        return None
    keep_p = [i for i, d in enumerate(permuted) if d != 1]
    keep_s = [i for i, d in enumerate(shape) if d != 1]
    if [permuted[i] for i in keep_p] != [shape[i] for i in keep_s]:
        raise ValueError(f"{name}: quantized weights may only gain or lose unit axes, {permuted} -> {shape}")
    return keep_s[keep_p.index(axis)]


def _per_out(values, rank, axis):
    """``values`` (out,) shaped to broadcast along axis ``axis`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    if axis is not None:
        shape[axis] = values.size
    return values.reshape(shape)


def weight(w, name: str, dtype="float32", perm=None, shape=None):
    """The MIL value of sdjax weight ``w``, optionally transposed by axis permutation ``perm``
    and then given ``shape`` (same size and C order, e.g. unit axes appended; quantized weights
    may only gain or lose unit axes).

    The form depends on the opset of the ``@mb.program`` being built (``curr_opset_version``):

    - float array: a float32 const whatever ``dtype`` says (the fp16 pipeline's
      const_elimination makes fp16 consts of them);
    - ``PalettizedWeight`` with one LUT for the tensor and no per-channel scale, below iOS18:
      an iOS16 ``constexpr_lut_to_dense`` with sdjax's LUT (in ``dtype``: float16 tables are
      sdjax's bits exactly, float32 ones hold the same values) and sdjax's indices, bit-packed
      LSB first as Core ML reads them (sdjax's own packing; re-packed here only when ``perm``
      moves them: the LUT is per tensor, so transposing the index array is exact);
    - ``PalettizedWeight`` from iOS18 on (the only form there: an iOS18 program has no iOS16
      signature), and with grouped LUTs (``num_groups > 1``) only there: an iOS18
      ``constexpr_lut_to_dense`` named ``name`` with ``indices`` the dense index array (permuted,
      reshaped to ``shape``, coremltools' uint``nbits`` dtype) and ``lut`` of shape
      ``[*G, 2**nbits, 1]``, ``G`` 1 on every axis but the output-channel one (where ``perm`` puts
      sdjax's last axis), which holds ``num_groups``: group ``g`` serves output channels
      ``[g*group_size, (g+1)*group_size)``, as in sdjax. LUT values as above;
    - ``PalettizedWeight`` with a per-channel ``scale`` (1 or more LUT groups), iOS18 only: the
      lookup above followed by ``constexpr_blockwise_shift_scale(data=<lookup>, scale=...)``
      named ``name + "_scale"``, the scale sdjax's ``(out,)`` values (in ``dtype``) shaped 1 on
      every axis but the output-channel one (so one block per output channel, no offset). This is
      coremltools' own form for palettization with per-channel scale
      (``optimize/coreml/_quantization_passes.py``, ``palettize_weights.transform_op`` with
      ``enable_per_channel_scale``; the torch frontend's ``_construct_palettization_op``);
      its ``common::reorder_lut_per_channel_scale`` pass may later move the scale after the
      conv/linear for the Neural Engine (not in sdjax's pipelines);
    - ``PalettizedWeight`` with int8 LUT entries (``lut_scale``), iOS18 only: the lookup above with
      sdjax's int8 LUT as stored (an int8 dense result), followed by
      ``constexpr_blockwise_shift_scale`` named ``name + "_scale"`` whose scale is the per-LUT scale
      (shaped like the LUT groups: ``num_groups`` on the output-channel axis), or, with a per-channel
      scale too, ``w.channel_scale()`` (their product rounded to float16) per output channel, in
      ``dtype``. This is coremltools' joint palettization + quantization form (the torch frontend's
      ``_construct_quantization_op`` after ``_construct_palettization_op``);
    - ``Int8Weight`` W8A16: sdjax's int8 data with the per-output-channel scale (in ``dtype``;
      sdjax's last axis, moved with ``perm``) and no offset: below iOS18 an iOS16
      ``constexpr_affine_dequantize`` (zero point 0, ``axis`` the output-channel axis), from
      iOS18 on a ``constexpr_blockwise_shift_scale`` (int8 ``data``, ``scale`` shaped 1 on every
      axis but the output-channel one).

    The value is float32-typed in the Builder program (``dtype="float16"`` tables are followed by
    a cast named ``name + "_fp32"`` that the fp16 pipeline removes). A grouped-LUT or
    per-channel-scale weight in a program whose opset is below iOS18 raises NotImplementedError
    naming ``name``, what the weight has and "iOS18 (macOS15)"; LLM.int8 and other weights raise
    NotImplementedError naming ``name`` and what is supported. A weight with an activation scale
    (W8A8) is written in its stored form (an ``Int8Weight``'s data and scale, which hold a
    per-input-channel scale folded in): it computes the layer only behind ``activation_quant`` of
    the layer's input, which ``conv2d`` and ``linear_as_conv`` add."""
    mb = _mb()
    dtype = tables_dtype(dtype)
    kind = _kind(w)
    nd = len(w.shape)
    perm = tuple(range(nd)) if perm is None else tuple(perm)
    permuted = tuple(int(w.shape[p]) for p in perm)
    shape = permuted if shape is None else tuple(int(d) for d in shape)
    if math.prod(shape) != math.prod(permuted):
        raise ValueError(f"{name}: shape {shape} does not hold {permuted}")
    if kind == "float":
        return mb.const(val=np.transpose(np.asarray(w, np.float32), perm).reshape(shape), name=name)

    def as_fp32(out):
        return out if dtype == np.float32 else mb.cast(x=out, dtype="fp32", name=name + "_fp32")

    opset = _opset()
    if kind == "lut":
        ios18 = _is_ios18(opset)
        int8_lut = getattr(w, "lut_scale", None) is not None
        extras = ([f"{w.num_groups} LUT groups"] if w.num_groups != 1 else []) + \
            (["per-channel scale"] if w.scale is not None else []) + (["int8 LUT entries"] if int8_lut else [])
        if extras and not ios18:
            _needs_ios18(w, name, " and ".join(extras), opset)
        if not ios18:
            from quant.palettize import pack_bits
            if perm == tuple(range(nd)):
                packed = np.asarray(w.packed, np.uint8)
            else:
                packed = np.asarray(pack_bits(np.transpose(lut_indices(w), perm), w.nbits), np.uint8)
            lut = np.asarray(w.lut)[0].astype(dtype)
            out = mb.constexpr_lut_to_dense(lut=lut, indices=packed, shape=np.array(shape, np.uint32), name=name)
            return as_fp32(out)
        from coremltools.converters.mil.mil import types
        axis = _out_axis(name, permuted, shape, perm.index(nd - 1))
        if w.num_groups != 1 and axis is None:
            raise ValueError(f"{name}: {w.num_groups} LUT groups over a single output channel")
        idx_dtype = types.nptype_from_builtin(types.string_to_builtin(f"uint{w.nbits}"))
        indices = np.transpose(lut_indices(w), perm).reshape(shape).astype(idx_dtype)
        groups = [1] * len(shape)
        if axis is not None:
            groups[axis] = w.num_groups
        lut = np.asarray(w.lut).astype(np.int8 if int8_lut else dtype).reshape(groups + [1 << w.nbits, 1])
        out = mb.constexpr_lut_to_dense(indices=indices, lut=lut, name=name)
        if int8_lut and w.scale is None:  # one scale per LUT: a block of output channels each
            scale = np.asarray(w.lut_scale).astype(dtype).reshape(groups)
            out = mb.constexpr_blockwise_shift_scale(data=out, scale=scale, name=name + "_scale")
        elif w.scale is not None:  # int8 LUTs: the per-LUT scale times this one, as float16 (channel_scale)
            s = w.channel_scale() if int8_lut else w.scale
            scale = _per_out(np.asarray(s).astype(dtype), len(shape), axis)
            out = mb.constexpr_blockwise_shift_scale(data=out, scale=scale, name=name + "_scale")
        return as_fp32(out)
    if kind == "int8":
        axis = _out_axis(name, permuted, shape, perm.index(nd - 1))
        data = np.transpose(np.asarray(w.data, np.int8), perm).reshape(shape)
        scale = np.asarray(w.scale, np.float32).astype(dtype)
        if _is_ios18(opset):
            out = mb.constexpr_blockwise_shift_scale(data=data, scale=_per_out(scale, len(shape), axis), name=name)
        else:
            if axis is None:  # one output channel: a per-tensor scale
                axis, scale = 0, scale.reshape(())
            out = mb.constexpr_affine_dequantize(quantized_data=data, zero_point=np.int8(0), scale=scale,
                                                 axis=axis, name=name)
        return as_fp32(out)
    _unsupported(w, name)


def act_scale_of(w):
    """The activation scale of weight ``w`` (the weight protocol's ``act_scale`` attribute: a
    float32 scalar, or one value per input channel), or None when its layer's activations stay
    float. Any weight type with an ``act_scale`` exports through ``activation_quant``; a per-input-channel
    scale means the weight's stored form (what ``weight`` writes) is ``diag(act_scale) @ w``, as
    ``quant.int8.Int8Weight`` folds it, because the layer then receives the integer codes themselves."""
    a = getattr(w, "act_scale", None)
    return None if a is None else np.asarray(a, np.float32)


def activation_quant(x, act_scale, name):
    """sdjax's int8 activation quantization of ``x`` (channels on axis 1: ``(B, C, H, W)`` or
    ``(B, C, 1, S)``) as iOS17 ops, the input of an int8 layer (``quant.int8``'s
    ``quantize_input``: codes ``clip(round(x / act_scale), -127, 127)``, half to even):

    - per tensor (``act_scale`` a scalar ``s``): ``clip(x, -127 s, 127 s)`` -> ``quantize(scale=s)``
      int8 -> ``dequantize(scale=s)``, so the layer sees ``codes * s`` as in sdjax;
    - per input channel (``act_scale`` shape ``(C,)``, which sdjax folds into the weight):
      ``real_div(x, act_scale)`` along axis 1 -> ``clip(-127, 127)`` -> ``quantize(scale=1)`` ->
      ``dequantize(scale=1)``: the layer sees the codes themselves, and the weight's stored form
      (``diag(act_scale) @ w``, quantized) does the rest, as sdjax's integer path does.

    Core ML's ``quantize`` clamps int8 to [-128, 127] (coremltools' ``iOS17.quantize``:
    ``clip(round(x / scale) + zero_point)`` over the dtype's range); the ``clip`` before it keeps
    the codes sdjax's symmetric [-127, 127], so the package computes what sdjax evaluates also
    for activations beyond the calibrated range. Ops are named ``name + "_aclip"``, ``"_aq"``,
    ``"_adq"`` (and ``"_adiv"``); scales are written float32 (the fp16 pipeline makes them
    float16). Below iOS17 this raises NotImplementedError naming ``name`` and "iOS17 (macOS14)"."""
    import coremltools as ct
    mb = _mb()
    opset = _opset()
    if opset is None or opset < ct.target.iOS17:
        have = "none given (the Builder's default)" if opset is None else getattr(opset, "name", str(opset))
        raise NotImplementedError(
            f"Core ML export of {name!r} with int8 activations (act_scale: quantize/dequantize ops) needs "
            f"minimum deployment target {IOS17_NAME} or later; this program's opset is {have}")
    a = np.asarray(act_scale, np.float32)
    c = int(x.shape[1])
    if a.ndim == 0:
        s = a.reshape(())
        lo, hi = np.float32(-ACT_QMAX * s), np.float32(ACT_QMAX * s)
    elif a.shape == (c,):
        shape = [1] * len(x.shape)
        shape[1] = c
        x = mb.real_div(x=x, y=a.reshape(shape), name=name + "_adiv")
        s, lo, hi = np.float32(1), np.float32(-ACT_QMAX), np.float32(ACT_QMAX)
    else:
        raise ValueError(f"{name}: act_scale of shape {a.shape}; expected a scalar or ({c},), one per input channel")
    x = mb.clip(x=x, alpha=lo, beta=hi, name=name + "_aclip")
    q = mb.quantize(input=x, scale=s, output_dtype="int8", name=name + "_aq")
    return mb.dequantize(input=q, scale=s, name=name + "_adq")


def _layer_input(x, w, name):
    """``x``, or its ``activation_quant`` when ``w`` has an activation scale."""
    a = act_scale_of(w)
    return x if a is None else activation_quant(x, a, name)


def linear_as_conv(x, w, b=None, name="linear", dtype="float32"):
    """``x @ W + b`` on a ``(B, C_in, 1, S)`` activation as a 1x1 conv -> ``(B, C_out, 1, S)``.

    ``w`` is sdjax's ``(in, out)`` weight (float or quantized), ``b`` its bias or None. A weight
    with an activation scale (W8A8) gets ``activation_quant`` of ``x`` first."""
    mb = _mb()
    x = _layer_input(x, w, name)
    wv = conv1x1_weight(w, name + "_w", dtype)
    kw = {}
    if b is not None:
        kw["bias"] = mb.const(val=np.asarray(b, np.float32), name=name + "_b")
    return mb.conv(x=x, weight=wv, strides=[1, 1], pad_type="valid", dilations=[1, 1], groups=1,
                   name=name, **kw)


def conv1x1_weight(w, name, dtype="float32"):
    """sdjax ``(in, out)`` linear weight as a const/constexpr of shape ``(out, in, 1, 1)`` (OIHW).

    The transpose is done on the stored data, so a quantized weight's dense shape is OIHW
    already (``conv`` takes its weight straight from the const/constexpr, no runtime op)."""
    if len(w.shape) != 2:
        raise ValueError(f"{name}: a linear weight is (in, out), got shape {tuple(w.shape)}")
    n_in, n_out = (int(d) for d in w.shape)
    return weight(w, name, dtype, perm=(1, 0), shape=(n_out, n_in, 1, 1))


def conv2d(x, p, name, dtype="float32", stride=1, pad=None):
    """``sdjax.nn.conv2d`` on NCHW: ``p = {"weight": HWIO (float or quantized), "bias": optional}``;
    the weight goes in as OIHW (``weight(..., perm=(3, 2, 0, 1))``, so quantized ones stay constexpr).
    ``pad``: an int (every side) or [top, bottom, left, right]; default 'same' for odd kernels.
    A weight with an activation scale (W8A8) gets ``activation_quant`` of ``x`` first (before the
    padding, as in sdjax: padded zeros are code 0)."""
    mb = _mb()
    w = p["weight"]
    if pad is None:
        pad = int(w.shape[0]) // 2
    if isinstance(pad, (int, np.integer)):
        pad = [pad] * 4
    kw = {}
    if "bias" in p:
        kw["bias"] = mb.const(val=np.asarray(p["bias"], np.float32), name=name + "_b")
    x = _layer_input(x, w, name)
    return mb.conv(x=x, weight=weight(w, name + "_w", dtype, perm=(3, 2, 0, 1)), strides=[stride, stride],
                   pad_type="custom", pad=[int(v) for v in pad], dilations=[1, 1], groups=1, name=name, **kw)


def group_norm(x, p, groups, eps, name):
    """``sdjax.nn.group_norm`` on NCHW (or (B, C, 1, S)): each group normalized over (C/G, H, W) with
    ``layer_norm`` on a (B, G, C/G*H*W) reshape, then the per-channel affine."""
    mb = _mb()
    b, c, h, w = (int(d) for d in x.shape)
    if c % groups:
        raise ValueError(f"{name}: {c} channels do not split into {groups} groups")
    g = mb.reshape(x=x, shape=[b, groups, (c // groups) * h * w], name=name + "_g")
    g = mb.layer_norm(x=g, axes=[2], epsilon=np.float32(eps), name=name + "_n")
    g = mb.reshape(x=g, shape=[b, c, h, w], name=name + "_r")
    g = mb.mul(x=g, y=np.asarray(p["weight"], np.float32).reshape(1, c, 1, 1), name=name + "_s")
    return mb.add(x=g, y=np.asarray(p["bias"], np.float32).reshape(1, c, 1, 1), name=name)


def layer_norm_channels(x, gamma, beta, eps, name="ln"):
    """LayerNorm over the channel axis (1) of a ``(B, C, 1, S)`` activation."""
    mb = _mb()
    return mb.layer_norm(x=x, axes=[1], gamma=np.asarray(gamma, np.float32),
                         beta=np.asarray(beta, np.float32), epsilon=np.float32(eps), name=name)


def attention(q, k, v, heads, mask=None, mode="split_einsum_v2", name="attn", query_chunk=QUERY_CHUNK):
    """Scaled dot-product attention on ``(B, C, 1, S)`` q and ``(B, C, 1, Sk)`` k, v.

    ``mask``: None or an additive float array ``(Sk, Sq)`` (``mask[j, i]`` is added to the score
    of query i against key j; use a large negative finite value, not -inf, for masked pairs).
    Returns ``(B, C, 1, Sq)``.

    "split_einsum_v2" (apple/ml-stable-diffusion): per head, queries in chunks of at most
    ``query_chunk`` (the last chunk is the remainder, kept), scores ``(B, Sk, 1, chunk)`` by
    einsum with softmax over axis 1, outputs concatenated over chunks then heads; q is scaled
    once before it is split (``split`` ops give the heads and chunks).
    "original": heads reshaped into a batch axis, matmul, softmax over keys, matmul."""
    mb = _mb()
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r}; supported: {ATTENTION_MODES}")
    b, c, _, sq = (int(d) for d in q.shape)
    sk = int(k.shape[-1])
    if c % heads:
        raise ValueError(f"{c} channels do not split into {heads} heads")
    hd = c // heads
    scale = np.float32(hd ** -0.5)
    if mask is not None:
        mask = np.asarray(mask, np.float32)
        if mask.shape != (sk, sq):
            raise ValueError(f"mask shape {mask.shape}, expected (keys, queries) = {(sk, sq)}")

    if mode == "original":
        qh = mb.reshape(x=q, shape=[b, heads, hd, sq], name=name + "_qh")
        kh = mb.reshape(x=k, shape=[b, heads, hd, sk], name=name + "_kh")
        vh = mb.reshape(x=v, shape=[b, heads, hd, sk], name=name + "_vh")
        s = mb.matmul(x=qh, y=kh, transpose_x=True, name=name + "_qk")  # (b, h, sq, sk)
        s = mb.mul(x=s, y=scale, name=name + "_scaled")
        if mask is not None:
            s = mb.add(x=s, y=shared_const(np.ascontiguousarray(mask.T[None, None])), name=name + "_masked")
        w = mb.softmax(x=s, axis=-1, name=name + "_w")
        o = mb.matmul(x=vh, y=w, transpose_y=True, name=name + "_o")  # (b, h, hd, sq)
        return mb.reshape(x=o, shape=[b, c, 1, sq], name=name)

    # split_einsum_v2: the scale is applied to q once (Apple's code scales every chunk's scores;
    # the same product, and for power-of-two scales such as SDXL's 64-wide heads the same bits), and
    # heads and query chunks come from one ``split`` op each rather than a slice per head and chunk,
    # and the equations and axes are shared consts: a full-size SDXL UNet has 37k MIL ops instead of
    # 62k, and its export's memory and time scale with them
    q = mb.mul(x=q, y=scale, name=name + "_qs")
    kt = mb.transpose(x=k, perm=[0, 3, 2, 1], name=name + "_kt")  # (b, sk, 1, c)
    sizes = [min(query_chunk, sq - s0) for s0 in range(0, sq, query_chunk)]

    def heads_of(x, axis, tag):
        return [x] if heads == 1 else list(mb.split(x=x, num_splits=heads, axis=axis, name=tag))

    q_chunks = [q] if len(sizes) == 1 else list(mb.split(x=q, split_sizes=sizes, axis=3, name=name + "_qc"))
    q_heads = [heads_of(qc, 1, f"{name}_qc{j}_h") for j, qc in enumerate(q_chunks)]  # [chunk][head]
    k_heads = heads_of(kt, 3, name + "_kh")
    v_heads = heads_of(v, 1, name + "_vh")
    qk, vw, axis1 = shared_const("bkhc,bchq->bkhq"), shared_const("bchk,bkhq->bchq"), shared_const(1, np.int32)
    axis3, no = shared_const(3, np.int32), shared_const(False)
    head_outs = []
    for h in range(heads):
        chunks = []
        for j, (s0, s1) in enumerate(zip(np.cumsum([0] + sizes[:-1]), np.cumsum(sizes))):
            tag = f"{name}_h{h}c{j}"
            # "bchq,bkhc->bkhq" written with the operands swapped, the form MIL accepts
            s = mb.einsum(values=(k_heads[h], q_heads[j][h]), equation=qk, name=tag + "_qk")
            if mask is not None:
                # one const per distinct slice, shared by every head and layer (a CLIP encoder's
                # causal mask was stored once per head per layer: 1.7 MB of copies at SD 1.5 size)
                s = mb.add(x=s, y=shared_const(np.ascontiguousarray(mask[:, s0:s1][None, :, None, :])),
                           name=tag + "_masked")
            w = mb.softmax(x=s, axis=axis1, name=tag + "_w")  # (b, sk, 1, n)
            # "bkhq,bchk->bchq", swapped likewise
            chunks.append(mb.einsum(values=(v_heads[h], w), equation=vw, name=tag + "_o"))
        head_outs.append(chunks[0] if len(chunks) == 1 else
                         mb.concat(values=chunks, axis=axis3, interleave=no, name=f"{name}_h{h}_o"))
    if len(head_outs) == 1:
        return mb.identity(x=head_outs[0], name=name)
    return mb.concat(values=head_outs, axis=axis1, interleave=no, name=name)


def activation(x, name_of_act, name):
    """sdjax.nn activations by their transformers/diffusers names."""
    mb = _mb()
    if name_of_act == "quick_gelu":
        return mb.mul(x=x, y=mb.sigmoid(x=mb.mul(x=x, y=np.float32(1.702), name=name + "_s"),
                                         name=name + "_sig"), name=name)
    if name_of_act == "gelu":
        return mb.gelu(x=x, mode="EXACT", name=name)
    if name_of_act == "gelu_pytorch_tanh":
        return mb.gelu(x=x, mode="TANH_APPROXIMATION", name=name)
    if name_of_act in ("silu", "swish"):
        return mb.silu(x=x, name=name)
    raise NotImplementedError(f"activation {name_of_act!r}; supported: quick_gelu, gelu, "
                              "gelu_pytorch_tanh, silu")


def psnr(ref, got) -> float:
    """20 log10(max|ref| / rmse(ref - got)) in dB (inf when equal)."""
    ref = np.asarray(ref, np.float64)
    err = np.sqrt(np.mean((ref - np.asarray(got, np.float64)) ** 2))
    return math.inf if err == 0 else 20 * math.log10(np.abs(ref).max() / err)
