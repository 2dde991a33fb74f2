"""A NumPy interpreter for Core ML MIL programs, so exports can be checked numerically on Linux.

Core ML only runs on Apple hardware (coremltools 9 on Linux has no ``MLModel.predict``: the
"Failed to load _MLModelProxy" messages on import say so), yet the exporter's output must be
shown to compute what sdjax computes. So this module reads the program back from the saved
``.mlpackage`` -- the bytes Core ML would load, after coremltools' passes and serialization,
not the in-memory ``Builder`` program -- and evaluates it op by op in NumPy:

    from sdjax.coreml import interp
    prog = interp.load_program("unet.mlpackage")
    out = interp.run(prog, {"sample": x, "timestep": t})          # {output name: array}
    interp.constexpr_values(prog)["w_palettized"]["lut"]          # stored LUT, as written

Reading back is ``ct.models.MLModel(path, skip_model_load=True)`` (works on Linux: it only
parses the spec), then ``coremltools.converters.mil.frontend.milproto.load.load(spec,
spec.specificationVersion, file_weights_dir=model.weights_dir)``, which rebuilds a PyMIL
``Program`` whose weights are read from ``Data/com.apple.CoreML/weights/weight.bin``.

Semantics follow coremltools' op definitions (``mil/ops/defs/iOS15..iOS18``), written anew
here; an op this module does not know raises NotImplementedError naming it and the ones it
does (``SUPPORTED_OPS``). Every op output is checked against the shape the program declares,
so a semantic slip shows up as a shape error at the op that made it, not as a wrong number
at the end.

Precision. Each op computes in float32 and its result is rounded to the dtype its output var
declares: a program converted with ``compute_precision=ct.precision.FLOAT16`` has fp16 vars
between ``cast`` ops, so every intermediate is rounded to float16 (and overflows to inf)
exactly where Core ML stores fp16. Accumulation *inside* one op (a matmul's sums, a
layer_norm's variance) stays float32; how the GPU/ANE accumulates is not documented, so this
is the optimistic reading. ``run(..., dtype=np.float16)`` rounds every float result to
float16 even in an fp32 program; ``dtype=np.float32`` ignores the fp16 casts (fp16-stored
weights keep their fp16 values), which separates weight rounding from activation rounding.

What the exporter must know about coremltools 9's conversion (ops it accepts, the passes that
run whatever ``pass_pipeline`` says, fp16 casts, names) is written down in docs/coreml.md.
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Callable

import numpy as np

_OPS: dict[str, Callable] = {}


def _op(*names):
    def register(fn):
        for n in names:
            _OPS[n] = fn
        return fn
    return register


# --------------------------------------------------------------------------- public API

def load_program(mlpackage_path):
    """The MIL Program stored in ``mlpackage_path``, with its weights read from the package."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(os.fspath(mlpackage_path), skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{mlpackage_path} is not an ML program (it holds {spec.WhichOneof('Type')})")
    return load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)


def run(program, inputs: dict, function: str = "main", dtype=None) -> dict:
    """Evaluate ``program`` (a Program, or a path to an .mlpackage) on ``inputs``.

    inputs: {input name: array}; arrays are cast to the declared input dtype.
    dtype: None keeps each var's declared dtype (fp16 where the program casts to fp16);
    np.float16 / np.float32 / np.float64 rounds every float result to that type instead.
    Returns {output name: array} in the program's output order."""
    if isinstance(program, (str, os.PathLike)):
        program = load_program(program)
    func = _function(program, function)
    env: dict[str, object] = {}
    missing = [n for n in func.inputs if n not in inputs]
    extra = [n for n in inputs if n not in func.inputs]
    if missing or extra:
        raise KeyError(f"inputs: missing {missing}, unknown {extra}; the program takes {list(func.inputs)}")
    for name, var in func.inputs.items():
        env[var.name] = _coerce(np.asarray(inputs[name]), var, dtype, f"input {name!r}")
    # drop each value after its last use: a full UNet's activations would not all fit
    keep = {v.name for v in func.outputs}
    last_use: dict[int, list[str]] = {}
    seen = set()
    ops = list(func.operations)
    for i in range(len(ops) - 1, -1, -1):
        for v in _flat_inputs(ops[i]):
            if v.name not in seen and v.name not in keep:
                seen.add(v.name)
                last_use.setdefault(i, []).append(v.name)
    for i, op in enumerate(ops):
        _eval_op(op, env, dtype)
        for name in last_use.get(i, ()):
            env.pop(name, None)
    return {v.name: env[v.name] for v in func.outputs}


def _flat_inputs(op):
    for v in op.inputs.values():
        yield from (v if isinstance(v, (list, tuple)) else (v,))


def constexpr_values(program, function: str = "main") -> dict:
    """{op name: {input name: value as stored}} for every ``constexpr_*`` op.

    Values are the raw inputs read from the package: for iOS16 ``constexpr_lut_to_dense`` the
    packed uint8 ``indices`` bytes, the ``lut`` and ``shape``; for the iOS18 form the
    ``indices`` as unpacked integers (dtype uint8 for uint1..uint8) and the grouped ``lut``;
    for affine/blockwise dequantization the integer data, scales and offsets. An input that
    is itself another constexpr's output is given decompressed."""
    if isinstance(program, (str, os.PathLike)):
        program = load_program(program)
    func = _function(program, function)
    env: dict[str, object] = {}
    found = {}
    for op in func.operations:
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            if op.op_type.startswith("constexpr_"):
                found[op.name] = {k: _input_value(v, env) for k, v in op.inputs.items()}
            _eval_op(op, env, None)
    return found


def _function(program, name):
    if name not in program.functions:
        raise KeyError(f"no function {name!r}; the program has {list(program.functions)}")
    return program.functions[name]


# --------------------------------------------------------------------------- evaluation

def _eval_op(op, env, dtype):
    impl = _OPS.get(op.op_type)
    if impl is None:
        raise NotImplementedError(
            f"MIL op {op.op_type!r} (op {op.name!r}) is not supported by sdjax.coreml.interp; "
            f"supported: {', '.join(SUPPORTED_OPS)}")
    compute = np.float64 if dtype is not None and np.dtype(dtype) == np.float64 else np.float32
    args = {}
    for k, v in op.inputs.items():
        if isinstance(v, (list, tuple)):
            args[k] = [_to_compute(_input_value(x, env), compute) for x in v]
        else:
            args[k] = _to_compute(_input_value(v, env), compute)
    result = impl(op, args)
    if not isinstance(result, (list, tuple)):
        result = (result,)
    if len(result) != len(op.outputs):
        raise RuntimeError(f"op {op.name!r} ({op.op_type}): {len(result)} results for {len(op.outputs)} outputs")
    for var, val in zip(op.outputs, result):
        env[var.name] = _coerce(val, var, dtype, f"op {op.name!r} ({op.op_type})")


def _input_value(var, env):
    if var.name in env:
        return env[var.name]
    if var.op is not None and var.op.op_type == "const":  # e.g. a const outside this block
        return _const_value(var.op)
    raise RuntimeError(f"var {var.name!r} is used before any op produced it")


def _const_value(op):
    v = op.val.val
    return v if isinstance(v, str) else np.asarray(v)


def _to_compute(v, compute):
    if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.dtype != compute:
        return v.astype(compute)
    return v


def _coerce(val, var, dtype, where):
    """``val`` in the dtype ``var`` declares (or ``dtype`` for floats), shape-checked."""
    from coremltools.converters.mil.mil import types

    if types.is_str(var.dtype):
        return val
    target = np.dtype(types.nptype_from_builtin(var.dtype))
    if dtype is not None and target.kind == "f":
        target = np.dtype(dtype)
    arr = np.asarray(val)
    if arr.dtype != target:
        with np.errstate(over="ignore"):  # fp16 overflow to inf is what fp16 storage does
            arr = arr.astype(target)
    shape = tuple(var.shape) if types.is_tensor(var.sym_type) else ()
    if all(isinstance(d, (int, np.integer)) for d in shape) and arr.shape != tuple(int(d) for d in shape):
        raise RuntimeError(f"{where}: computed shape {arr.shape}, the program declares {shape} for {var.name!r}")
    return arr


def _int(v, default=None):
    if v is None:
        return default
    return int(np.asarray(v).reshape(()))


def _ints(v, default=None):
    if v is None:
        return default
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _float(v, default):
    return default if v is None else float(np.asarray(v).reshape(()))


def _bools(v, n):
    return [False] * n if v is None else [bool(b) for b in np.asarray(v).reshape(-1)]


def _axes(v, rank):
    """Sorted non-negative axes; None means every axis."""
    if v is None:
        return tuple(range(rank))
    return tuple(sorted(a % rank for a in _ints(v))) if rank else ()


# --------------------------------------------------------------------------- constants

@_op("const")
def _const(op, a):
    return _const_value(op)


@_op("identity")
def _identity(op, a):
    return a["x"]


@_op("cast")
def _cast(op, a):
    # the conversion itself is _coerce's astype to the output var's dtype (float->int
    # truncates toward zero, as numpy and coremltools' value inference do)
    return a["x"]


# --------------------------------------------------------------------------- elementwise

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide,
    "pow": np.power, "maximum": np.maximum, "minimum": np.minimum,
}


def _binary(op, a):
    return _BINARY[op.op_type](a["x"], a["y"])


for _name in _BINARY:
    _OPS[_name] = _binary


def _sigmoid_np(x):
    return 1.0 / (1.0 + np.exp(-x))


def _erf(x):
    try:
        from scipy.special import erf
    except ImportError:  # scipy comes with jax, but keep NumPy-only use working
        return np.vectorize(math.erf, otypes=[x.dtype])(x)
    return erf(x).astype(x.dtype, copy=False)


_UNARY = {
    "sqrt": np.sqrt, "exp": np.exp, "log": np.log, "abs": np.abs, "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, np.zeros((), x.dtype)), "sigmoid": _sigmoid_np,
    "silu": lambda x: x * _sigmoid_np(x), "erf": _erf, "sin": np.sin, "cos": np.cos,
}


def _unary(op, a):
    return _UNARY[op.op_type](a["x"])


for _name in _UNARY:
    _OPS[_name] = _unary


@_op("rsqrt")
def _rsqrt(op, a):
    return 1.0 / np.sqrt(a["x"] + _float(a.get("epsilon"), 1e-12))


@_op("gelu")
def _gelu(op, a):
    x, mode = a["x"], str(a.get("mode", "EXACT"))
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid_np(1.702 * x)
    raise ValueError(f"gelu: unknown mode {mode!r}")


@_op("softmax")
def _softmax(op, a):
    x, axis = a["x"], _int(a.get("axis"), -1)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


# --------------------------------------------------------------------------- reductions, norms

@_op("reduce_mean", "reduce_sum", "reduce_max", "reduce_min")
def _reduce(op, a):
    x = a["x"]
    fn = {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min}[op.op_type]
    keep = bool(a.get("keep_dims", False))
    return fn(x, axis=_axes(a.get("axes"), x.ndim), keepdims=keep)


def _normalize(x, axes, eps):
    mean = np.mean(x, axis=axes, keepdims=True)
    d = x - mean
    var = np.mean(d * d, axis=axes, keepdims=True)
    return d / np.sqrt(var + eps)


def _affine(y, gamma, beta, shape):
    if gamma is not None:
        y = y * gamma.reshape(shape)
    if beta is not None:
        y = y + beta.reshape(shape)
    return y


@_op("layer_norm")
def _layer_norm(op, a):
    x = a["x"]
    axes = _axes(a.get("axes"), x.ndim)
    y = _normalize(x, axes, _float(a.get("epsilon"), 1e-5))
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    return _affine(y, a.get("gamma"), a.get("beta"), shape)


@_op("instance_norm")
def _instance_norm(op, a):
    x = a["x"]
    y = _normalize(x, tuple(range(2, x.ndim)), _float(a.get("epsilon"), 1e-5))
    return _affine(y, a.get("gamma"), a.get("beta"), [1, x.shape[1]] + [1] * (x.ndim - 2))


@_op("batch_norm")
def _batch_norm(op, a):
    x = a["x"]
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    y = (x - a["mean"].reshape(shape)) / np.sqrt(a["variance"].reshape(shape) + _float(a.get("epsilon"), 1e-5))
    return _affine(y, a.get("gamma"), a.get("beta"), shape)


# --------------------------------------------------------------------------- linear algebra

def _swap_last(m, flag):
    return np.swapaxes(m, -1, -2) if flag and m.ndim >= 2 else m


@_op("matmul")
def _matmul(op, a):
    x = _swap_last(a["x"], bool(a.get("transpose_x", False)))
    y = _swap_last(a["y"], bool(a.get("transpose_y", False)))
    return np.matmul(x, y)


@_op("linear")
def _linear(op, a):
    out = np.matmul(a["x"], a["weight"].T)
    return out + a["bias"] if a.get("bias") is not None else out


@_op("einsum")
def _einsum(op, a):
    return np.einsum(str(a["equation"]), *a["values"], optimize=True)


@_op("conv")
def _conv(op, a):
    """Cross-correlation over 1-3 spatial dims, one strided slice of the padded input per
    kernel tap, each a batched (per group) matmul -- BLAS speed without an im2col copy."""
    x, w = a["x"], a["weight"]
    nsp = x.ndim - 2
    kernel = w.shape[2:]
    strides = _ints(a.get("strides"), [1] * nsp)
    dil = _ints(a.get("dilations"), [1] * nsp)
    groups = _int(a.get("groups"), 1)
    pad_type = str(a.get("pad_type", "valid"))
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    if pad_type == "valid":
        pads = [(0, 0)] * nsp
    elif pad_type == "custom":
        p = _ints(a.get("pad"), [0] * 2 * nsp)
        pads = [(p[2 * i], p[2 * i + 1]) for i in range(nsp)]
    elif pad_type in ("same", "same_lower"):
        pads = []
        for size, s, e in zip(x.shape[2:], strides, eff):
            total = max(0, (-(-size // s) - 1) * s + e - size)
            small = total // 2
            pads.append((small, total - small) if pad_type == "same" else (total - small, small))
    else:
        raise ValueError(f"conv: unknown pad_type {pad_type!r}")
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    out_sp = [(xp.shape[2 + i] - eff[i]) // strides[i] + 1 for i in range(nsp)]
    n, cin = x.shape[:2]
    cout = w.shape[0]
    cin_g, cout_g = cin // groups, cout // groups
    wg = w.reshape((groups, cout_g, cin_g) + tuple(kernel))
    npos = int(np.prod(out_sp))
    acc = np.zeros((n, groups, cout_g, npos), dtype=np.result_type(x, w))
    for taps in itertools.product(*[range(k) for k in kernel]):
        window = tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                       for t, d, o, s in zip(taps, dil, out_sp, strides))
        patch = xp[(slice(None), slice(None)) + window].reshape(n, groups, cin_g, npos)
        acc += np.matmul(wg[(Ellipsis,) + taps], patch)
    out = acc.reshape((n, cout) + tuple(out_sp))
    if a.get("bias") is not None:
        out = out + a["bias"].reshape((1, cout) + (1,) * nsp)
    return out


# --------------------------------------------------------------------------- shapes and indexing

@_op("reshape")
def _reshape(op, a):
    x, shape = a["x"], _ints(a["shape"])
    # 0 copies the input dim it lines up with counting from the right (iOS17; identical to
    # iOS15's rule in the only case iOS15 allows, len(shape) == rank), or 1 past the left end
    out = []
    for i, s in enumerate(shape):
        j = x.ndim - (len(shape) - i)
        out.append((x.shape[j] if j >= 0 else 1) if s == 0 else s)
    return x.reshape(out)


@_op("transpose")
def _transpose(op, a):
    return np.transpose(a["x"], _ints(a["perm"]))


@_op("expand_dims")
def _expand_dims(op, a):
    return np.expand_dims(a["x"], tuple(_ints(a["axes"])))


@_op("squeeze")
def _squeeze(op, a):
    x = a["x"]
    if a.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=_axes(a["axes"], x.ndim))


@_op("concat")
def _concat(op, a):
    values, axis = a["values"], _int(a["axis"])
    if not bool(a.get("interleave", False)):
        return np.concatenate(values, axis=axis)
    axis %= values[0].ndim
    stacked = np.stack(values, axis=axis + 1)  # [..., d, n, ...] -> rows of each input alternate
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


@_op("split")
def _split(op, a):
    x, axis = a["x"], _int(a["axis"])
    sizes = _ints(a.get("split_sizes"))
    if sizes is None:
        num = _int(a.get("num_splits"), len(op.outputs))
        return tuple(np.split(x, num, axis=axis))
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@_op("slice_by_index")
def _slice_by_index(op, a):
    x = a["x"]
    r = x.ndim
    begin, end = _ints(a["begin"]), _ints(a["end"])
    stride = _ints(a.get("stride"), [1] * r)
    bmask, emask, smask = (_bools(a.get(k), r) for k in ("begin_mask", "end_mask", "squeeze_mask"))
    index = []
    for i in range(r):
        if smask[i]:
            index.append(begin[i])  # a pure index (negative counts from the end), drops the dim
        else:
            index.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]))
    return x[tuple(index)]


@_op("slice_by_size")
def _slice_by_size(op, a):
    x = a["x"]
    begin, size = _ints(a["begin"]), _ints(a["size"])
    index = []
    for i, (b, s) in enumerate(zip(begin, size)):
        b %= x.shape[i] if x.shape[i] else 1
        index.append(slice(b, None if s == -1 else b + s))
    return x[tuple(index)]


def _gather(x, idx, axis, batch_dims):
    if batch_dims == 0:
        return np.take(x, idx, axis=axis)
    return np.stack([_gather(x[i], idx[i], axis - 1, batch_dims - 1) for i in range(x.shape[0])])


@_op("gather")
def _gather_op(op, a):
    x, idx = a["x"], a["indices"].astype(np.int64)
    axis = _int(a.get("axis"), 0) % x.ndim
    bd = _int(a.get("batch_dims"), 0)
    if bd < 0:
        bd += idx.ndim
    return _gather(x, idx, axis, bd)  # np.take: negative indices count from the end, out of range raises


@_op("upsample_nearest_neighbor")
def _upsample_nn(op, a):
    x = a["x"]
    out = x
    for axis, key in ((-2, "scale_factor_height"), (-1, "scale_factor_width")):
        s = float(np.asarray(a.get(key, 1)).reshape(()))
        n = x.shape[axis]
        if s == int(s):
            out = np.repeat(out, int(s), axis=axis)
        else:  # fractional: output row j reads input row floor(j / s)
            m = int(math.floor(n * s))
            src = np.minimum(np.floor(np.arange(m) / s).astype(np.int64), n - 1)
            out = np.take(out, src, axis=axis)
    return out


# --------------------------------------------------------------------------- compression (constexpr)

def _unpack_bits(packed, nbits, count):
    """``count`` nbits-wide unsigned ints packed LSB-first into bytes (the iOS16 LUT layout)."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[: nbits * count]
    weights = (1 << np.arange(nbits, dtype=np.int64))
    return bits.reshape(count, nbits).astype(np.int64) @ weights


@_op("constexpr_lut_to_dense")
def _lut_to_dense(op, a):
    lut, indices = a["lut"], a["indices"]
    if "shape" in a:  # iOS16: a 1-D LUT of 2**nbits entries, indices packed into uint8 bytes
        shape = _ints(a["shape"])
        nbits = int(round(math.log2(lut.shape[0])))
        idx = _unpack_bits(indices, nbits, int(np.prod(shape)))
        return lut[idx].reshape(shape)
    # iOS18: indices [*S] of uint1..uint8; lut [*G, 2**nbits, V]: one LUT per block of
    # S/G elements, V-vectors laid out along vector_axis
    idx = np.asarray(indices).astype(np.int64)
    groups = lut.shape[: idx.ndim]
    block = [s // g for s, g in zip(idx.shape, groups)]
    grid = tuple((np.arange(s) // b).reshape([-1 if j == i else 1 for j in range(idx.ndim)])
                 for i, (s, b) in enumerate(zip(idx.shape, block)))
    vals = lut[grid + (idx,)]  # [*S, V]
    vsize = lut.shape[-1]
    if vsize == 1:
        return vals[..., 0]
    axis = _int(a.get("vector_axis")) % idx.ndim
    vals = np.moveaxis(vals, -1, axis + 1)  # [..., S[axis], V, ...]
    shape = list(idx.shape)
    shape[axis] *= vsize
    return vals.reshape(shape)


def _broadcast_along(p, rank, axis):
    p = np.asarray(p)
    if p.ndim == 0 or p.ndim == rank:
        return p
    shape = [1] * rank
    shape[axis] = p.shape[0]
    return p.reshape(shape)


@_op("constexpr_affine_dequantize")
def _affine_dequantize(op, a):
    q, scale = a["quantized_data"], a["scale"]
    axis = _int(a["axis"]) % q.ndim
    ct = np.result_type(scale.dtype, np.float32)
    zp = _broadcast_along(a["zero_point"], q.ndim, axis).astype(ct)
    return (q.astype(ct) - zp) * _broadcast_along(scale, q.ndim, axis)


@_op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(op, a):
    data, scale, offset = a["data"], a["scale"], a.get("offset")
    ct = np.result_type(scale.dtype, np.float32)
    d = np.asarray(data).astype(ct)

    def spread(p):  # repeat each scale/offset over its block
        p = np.asarray(p).astype(ct)
        for axis, (n, m) in enumerate(zip(d.shape, p.shape)):
            if m != n:
                p = np.repeat(p, n // m, axis=axis)
        return p

    if offset is not None:
        d = d - spread(offset)
    return d * spread(scale)


@_op("constexpr_cast")
def _constexpr_cast(op, a):
    return a["source_val"]


for _more in ("interp_ops", "interp_quant"):  # register the ops of Apple's packages; quantize, dequantize, clip
    __import__(f"{__package__}.{_more}")
SUPPORTED_OPS = tuple(sorted(_OPS))
