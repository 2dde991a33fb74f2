"""The ops sdjax.coreml.interp_ops adds (those apple/ml-stable-diffusion's packages use and sdjax's
builders do not), each checked three ways on the same inputs: the interpreter running the op with
its tensors as program inputs, a NumPy statement written here, and coremltools' own value
inference (the op's ``value_inference``, code we did not write: the Builder folds an op whose
inputs are all consts). gather_nd has no value inference in coremltools 9: NumPy only. Then a
CLIP-pooling program of the new ops goes through ct.convert, is saved and read back, and runs."""
import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, Program, types  # noqa: E402

from sdjax.coreml import interp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

BUILTIN = {np.dtype(np.float32): types.fp32, np.dtype(np.int32): types.int32, np.dtype(np.bool_): types.bool}
rng = np.random.default_rng(0)


def run_both(build, opset=None, **arrays):
    """(the interpreter's result with ``arrays`` as program inputs, coremltools' value inference with
    them as consts; None when the op has none)."""
    opset = opset or ct.target.iOS16
    specs = {k: mb.TensorSpec(shape=v.shape, dtype=BUILTIN[v.dtype]) for k, v in arrays.items()}
    with Function(specs, opset_version=opset) as f:
        out = build(**{k: f.inputs[k] for k in arrays})
        f.set_outputs([out])
    prog = Program()
    prog.add_function("main", f)
    got = interp.run(prog, arrays)[out.name]
    with Function({}, opset_version=opset):
        inferred = build(**arrays).val
    return got, inferred


def check(build, numpy, opset=None, exact=True, **arrays):
    got, inferred = run_both(build, opset, **arrays)
    want = np.asarray(numpy)
    assert got.shape == want.shape
    cmp = np.testing.assert_array_equal if exact else (lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6))
    cmp(got, want)
    if inferred is not None:
        cmp(got, np.asarray(inferred).reshape(want.shape))
    return got, inferred


def ints(*shape, lo=-4, hi=5):
    return rng.integers(lo, hi, shape).astype(np.int32)


def floats(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name, fn", [("equal", np.equal), ("not_equal", np.not_equal), ("less", np.less),
                                      ("less_equal", np.less_equal), ("greater", np.greater),
                                      ("greater_equal", np.greater_equal)])
@pytest.mark.parametrize("make", [ints, floats])
def test_comparisons(name, fn, make):
    x, y = make(2, 3), make(1, 3)
    x[0, 0] = y[0, 0]  # one tie at least
    got, _ = check(lambda x, y: getattr(mb, name)(x=x, y=y), fn(x, y), x=x, y=y)
    assert got.dtype == np.bool_


@pytest.mark.parametrize("name, fn", [("logical_and", np.logical_and), ("logical_or", np.logical_or),
                                      ("logical_xor", np.logical_xor)])
def test_logical(name, fn):
    x, y = rng.random((3, 4)) > 0.5, rng.random((1, 4)) > 0.5
    check(lambda x, y: getattr(mb, name)(x=x, y=y), fn(x, y), x=x, y=y)
    check(lambda x: mb.logical_not(x=x), np.logical_not(x), x=x)


def test_equal_to_eos_id_as_clip_pools():
    ids = np.array([[49406, 320, 49407, 49407]], np.int32)
    check(lambda x: mb.equal(x=x, y=np.int32(49407)), ids == 49407, x=ids)


@pytest.mark.parametrize("name, fn", [("square", np.square), ("floor", np.floor), ("ceil", np.ceil), ("sign", np.sign),
                                      ("round", np.round)])
def test_unary(name, fn):
    x = np.array([[-2.5, -1.5, -0.5, 0.0, 0.5, 1.5, 2.5, 1.2, -3.7]], np.float32)
    check(lambda x: getattr(mb, name)(x=x), fn(x), x=x)
    if name == "round":  # coremltools documents "0.5 is rounded to 0": halves to even
        np.testing.assert_array_equal(run_both(lambda x: mb.round(x=x), x=x)[0][0, :7], [-2, -2, -0, 0, 0, 2, 2])
    if name == "square":
        i = ints(2, 3)
        check(lambda x: mb.square(x=x), i * i, x=i)


def test_floor_div():
    x, y = floats(2, 5) * 4, np.array([[1.5, -2.0, 3.0, -0.7, 2.0]], np.float32)
    check(lambda x, y: mb.floor_div(x=x, y=y), np.floor_divide(x, y), x=x, y=y)
    a, b = ints(2, 4, lo=-9, hi=9), np.array([[2, -3, 4, 5]], np.int32)
    check(lambda x, y: mb.floor_div(x=x, y=y), a // b, x=a, y=b)


def test_inverse_and_clip():
    x = floats(3, 4)
    check(lambda x: mb.inverse(x=x, epsilon=np.float32(0.25)), 1.0 / (x + np.float32(0.25)), exact=False, x=x)
    check(lambda x: mb.inverse(x=x), 1.0 / (x + np.float32(1e-4)), exact=False, x=x)  # default epsilon 1e-4
    check(lambda x: mb.clip(x=x, alpha=np.float32(-0.5), beta=np.float32(0.7)), np.clip(x, -0.5, 0.7), x=x)


def test_select():
    c, a, b = rng.random((2, 1, 4)) > 0.5, floats(2, 3, 4), floats(1, 3, 1)
    check(lambda c, a, b: mb.select(cond=c, a=a, b=b), np.where(c, a, b), c=c, a=a, b=b)


@pytest.mark.parametrize("name", ["reduce_argmax", "reduce_argmin"])
@pytest.mark.parametrize("axis, keep", [(-1, False), (0, True), (1, False)])
def test_reduce_arg_first_of_ties(name, axis, keep):
    x = ints(3, 4, 5, lo=0, hi=3)  # many ties
    fn = np.argmax if name == "reduce_argmax" else np.argmin
    want = fn(x, axis=axis)
    want = np.expand_dims(want, axis) if keep else want
    got, _ = check(lambda x: getattr(mb, name)(x=x, axis=axis, keep_dims=keep), want, x=x)
    assert got.dtype == np.int32
    f = floats(2, 6)
    check(lambda x: getattr(mb, name)(x=x, axis=-1), fn(f, axis=-1), x=f)


def test_reduce_argmax_default_axis_is_last():
    x = floats(2, 3, 4)
    check(lambda x: mb.reduce_argmax(x=x), np.argmax(x, axis=-1), x=x)


def test_reduce_prod():
    x = floats(2, 3, 4)
    check(lambda x: mb.reduce_prod(x=x, axes=[0, -1], keep_dims=True), np.prod(x, axis=(0, 2), keepdims=True),
          exact=False, x=x)


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_stack(axis):
    a, b, c = floats(2, 3), floats(2, 3), floats(2, 3)
    check(lambda a, b, c: mb.stack(values=[a, b, c], axis=axis), np.stack([a, b, c], axis=axis), a=a, b=b, c=c)
    i, j = ints(4), ints(4)
    check(lambda a, b: mb.stack(values=[a, b], axis=1), np.stack([i, j], axis=1), a=i, b=j)


def test_tile_fill_range():
    x = floats(2, 3)
    check(lambda x: mb.tile(x=x, reps=[2, 1]), np.tile(x, (2, 1)), x=x)
    shape = np.array([2, 3], np.int32)
    check(lambda s: mb.fill(shape=s, value=np.float32(1.5)), np.full((2, 3), 1.5, np.float32), s=shape)
    start, end, step = (np.array(v, np.int32) for v in ([1], [10], [3]))
    check(lambda a, b, c: mb.range_1d(start=mb.squeeze(x=a), end=mb.squeeze(x=b), step=mb.squeeze(x=c)),
          np.arange(1, 10, 3), a=start, b=end, c=step)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
@pytest.mark.parametrize("pad", [[1, 2], [0, 1, 2, 0], [1, 0, 0, 2, 1, 1]])
def test_pad(mode, pad):
    x = floats(2, 3, 4)
    n = len(pad) // 2
    widths = [(0, 0)] * (3 - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if mode == "constant":
        want = np.pad(x, widths, constant_values=np.float32(0.5))
        build = lambda x: mb.pad(x=x, pad=np.array(pad, np.int32), mode=mode, constant_val=np.float32(0.5))  # noqa: E731
    else:
        want = np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
        build = lambda x: mb.pad(x=x, pad=np.array(pad, np.int32), mode=mode)  # noqa: E731
    check(build, want, x=x)


def test_pad_default_is_zeros():
    x = floats(1, 2, 3)
    check(lambda x: mb.pad(x=x, pad=np.array([2, 1], np.int32)), np.pad(x, [(0, 0), (0, 0), (2, 1)]), x=x)


def test_gather_nd():
    x = floats(3, 4, 5)
    idx = np.array([[[0, 1], [2, 3]], [[1, 0], [2, 2]]], np.int32)  # (2, 2, 2): pairs into x's first two axes
    want = np.stack([np.stack([x[tuple(p)] for p in row]) for row in idx])
    got, inferred = run_both(lambda x, i: mb.gather_nd(x=x, indices=i), x=x, i=idx)
    assert inferred is None  # no value inference in coremltools 9: NumPy is the reference
    np.testing.assert_array_equal(got, want)
    full = np.array([[0, 1, 2], [2, 3, 4]], np.int32)  # depth == rank: scalars
    np.testing.assert_array_equal(run_both(lambda x, i: mb.gather_nd(x=x, indices=i), x=x, i=full)[0],
                                  [x[0, 1, 2], x[2, 3, 4]])


def test_gather_nd_batch_dims_as_clip_pools():
    """torch's ``last[arange(B), pos]`` as the frontend writes it: indices [[b, pos_b]] (batch_dims 0) and
    iOS16's batch_dims=1 form."""
    last = floats(2, 7, 4)
    pos = np.array([3, 6], np.int32)
    idx = np.stack([np.arange(2, dtype=np.int32), pos], axis=1)
    got, _ = run_both(lambda x, i: mb.gather_nd(x=x, indices=i), x=last, i=idx)
    np.testing.assert_array_equal(got, last[np.arange(2), pos])
    got, _ = run_both(lambda x, i: mb.gather_nd(x=x, indices=i, batch_dims=1), x=last, i=pos[:, None])
    np.testing.assert_array_equal(got, last[np.arange(2), pos])


@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_scaled_dot_product_attention(mask):
    q, k, v = floats(2, 3, 5, 8), floats(2, 3, 6, 8), floats(2, 3, 6, 4)
    m = None
    if mask == "float":
        m = floats(5, 6)
    elif mask == "bool":
        m = rng.random((1, 5, 6)) > 0.3
        m[..., 0] = True  # every query sees a key
    arrays = dict(q=q, k=k, v=v) | ({} if m is None else {"m": m})

    def build(q, k, v, m=None):
        kw = {} if m is None else {"attn_mask": m}
        return mb.scaled_dot_product_attention(query=q, key=k, value=v, **kw)
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(8)
    if m is not None:
        s = s + m if m.dtype != bool else np.where(m, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    check(build, (w / w.sum(-1, keepdims=True)) @ v, ct.target.iOS18, exact=False, **arrays)


def test_clip_pooling_through_a_saved_package(tmp_path):
    """Apple's text encoder pools with equal -> cast -> reduce_argmax -> stack -> gather_nd (what the
    torch frontend makes of ``last[arange(B), (ids == eos).int().argmax(-1)]``); the same ops converted,
    saved and read back from the package run as NumPy says."""
    eos = 9

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 6)), mb.TensorSpec(shape=(2, 6, 3))],
                opset_version=ct.target.iOS16)
    def prog(ids, last):
        hit = mb.cast(x=mb.equal(x=mb.cast(x=ids, dtype="int32"), y=np.int32(eos)), dtype="int32")
        pos = mb.reduce_argmax(x=hit, axis=-1)
        idx = mb.stack(values=[np.arange(2, dtype=np.int32), pos], axis=1)
        out = mb.gather_nd(x=last, indices=idx, name="pooled")
        sq = mb.square(x=mb.pad(x=last, pad=np.array([1, 1], np.int32), mode="replicate"), name="padded_sq")
        return out, sq
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                       skip_model_load=True)
    path = tmp_path / "pool.mlpackage"
    model.save(str(path))
    loaded = interp.load_program(path)
    assert {"equal", "reduce_argmax", "stack", "gather_nd", "pad", "square"} <= {
        op.op_type for op in loaded.functions["main"].operations}
    ids = np.array([[1, 4, eos, eos, eos, eos], [1, 2, 3, 4, eos, eos]], np.float32)
    last = floats(2, 6, 3)
    out = interp.run(loaded, {"ids": ids, "last": last})
    np.testing.assert_array_equal(out["pooled"], last[[0, 1], [2, 4]])
    np.testing.assert_allclose(out["padded_sq"], np.square(np.pad(last, [(0, 0), (0, 0), (1, 1)], mode="edge")),
                               rtol=1e-6)


def test_every_op_of_apples_packages_is_supported():
    """The op types apple/ml-stable-diffusion's torch2coreml (coremltools 9's torch frontend) emitted for
    tiny SD 1.x, SD 2.x and SDXL pipelines, a ControlNet and ControlledUnet, chunked UNets, and the
    ORIGINAL, SPLIT_EINSUM and SPLIT_EINSUM_V2 attentions (listed by reading the packages back)."""
    apple = {"add", "batch_norm", "cast", "concat", "const", "conv", "cos", "einsum", "equal", "expand_dims",
             "gather", "gather_nd", "gelu", "layer_norm", "linear", "matmul", "mul", "pad", "real_div",
             "reduce_argmax", "reduce_mean", "reshape", "sigmoid", "silu", "sin", "slice_by_index", "softmax",
             "split", "sqrt", "square", "stack", "sub", "transpose", "upsample_nearest_neighbor"}
    assert apple <= set(interp.SUPPORTED_OPS), sorted(apple - set(interp.SUPPORTED_OPS))
