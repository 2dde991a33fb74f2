"""sdjax's UNet function compiled by OpenVINO's JAX frontend and run on its CPU plugin.

``compile_unet(params, config, example_shapes, precision)`` traces ``sdjax.unet.apply`` with the
weights closed over (they become constants of the OpenVINO model), rewrites the jaxpr into
primitives the frontend converts (``rewrite``), leaves the timestep embedding (``iota``, ``sin``,
``cos`` of ``t``: no frontend rule) to a small jitted JAX prefix whose result is an extra model
input, converts, and compiles for "CPU":

- ``"f32"``: ``INFERENCE_PRECISION_HINT=f32``;
- ``"bf16"``: ``INFERENCE_PRECISION_HINT=bf16`` (oneDNN's avx512_bf16 or AMX kernels where the
  CPU has them; the plugin silently keeps f32 on CPUs without bf16 support: ``compiled.precision``
  records what it reports);
- ``"w8a8"``: params holding sdjax's W8A8 ``Int8Weight``s (per-tensor activation scales) become
  FakeQuantize + i8-weight layers (``w8a8``), run by int8 kernels; other layers run in f32.

Attention is traced without query chunking (one ``(B*heads, Lq, Lk)`` score tensor per layer):
chunking is a ``fori_loop`` that OpenVINO would see unrolled into hundreds of small products, and
OpenVINO plans its own memory.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import nn, unet
from sdjax.openvino import rewrite, w8a8

PRECISIONS = ("f32", "bf16", "w8a8")
INSTALL_HINT = 'pip install -e ".[bench]"'


def require_openvino():
    """The ``openvino`` module, or an ImportError that says how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise ImportError(f"sdjax.openvino needs OpenVINO, a benchmark-only extra: {INSTALL_HINT} "
                          f"({e})") from e
    if not hasattr(openvino, "convert_model"):   # a folder named openvino on sys.path, not the package
        where = list(getattr(openvino, "__path__", [])) or getattr(openvino, "__file__", "?")
        raise ImportError(f"sdjax.openvino needs OpenVINO, but 'import openvino' found {where}, which is not "
                          f"the OpenVINO package: {INSTALL_HINT}")
    return openvino


def trace(fn, example_args, host_argnums=()):
    """``(prefix, main, device_argnums)``: ``fn`` traced at ``example_args`` (arrays or
    ShapeDtypeStructs), flattened by ``rewrite.flatten`` and cut by ``rewrite.split_host``."""
    args = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in example_args]
    with nn.attention_chunk_elements(1 << 62):   # no query chunks while tracing
        closed = jax.make_jaxpr(fn)(*args)
    flat = rewrite.flatten(closed)
    return rewrite.split_host(flat, tuple(host_argnums))


class OVFloatWeight(nn.ShapedWeight):
    """A float conv/linear weight held as a NumPy array in the layout OpenVINO's own op takes (OIHW;
    ``(out, in)``), so that no Transpose of a weight constant is folded into a second copy of it."""

    method = "float"

    def __init__(self, w):
        w = np.asarray(w)
        self.shape, self.dtype = w.shape, w.dtype
        self.w = np.ascontiguousarray(w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T)

    def dequantize(self, dtype=jnp.float32):
        return jnp.asarray(self.w.transpose(2, 3, 1, 0) if self.w.ndim == 4 else self.w.T, dtype)

    def linear(self, x):
        return jax.lax.dot_general(x, self.w, (((x.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32).astype(x.dtype)

    def conv2d(self, x, stride, padding):
        return jax.lax.conv_general_dilated(x, self.w, (stride, stride), [tuple(p) for p in padding],
                                            dimension_numbers=("NHWC", "OIHW", "NHWC"),
                                            preferred_element_type=jnp.float32).astype(x.dtype)


jax.tree_util.register_pytree_node(OVFloatWeight, lambda w: ((), w), lambda aux, _: aux)


def _host_layout(box):
    """``params`` with float conv/linear weights as ``OVFloatWeight`` and other float leaves as NumPy
    views (shared by the frontend's Constants: a jax.Array constant is first copied into NumPy).
    ``box``: a one-element list holding the params, emptied here, so that leaves converted one at a
    time free the originals when nothing else holds them."""
    from quant.calibrate import layer_names

    params = box.pop()
    weights = {n + ".weight" for n in layer_names(params)}
    flat = nn.flatten(params)
    del params
    for key in list(flat):
        w = flat.pop(key)
        if key in weights and not nn.is_quantized(w) and w.dtype == np.float32:
            flat[key] = OVFloatWeight(w)
        else:
            flat[key] = np.asarray(w) if isinstance(w, jax.Array) else w
        del w
    return nn.unflatten(flat)


class OVFunction:
    """A compiled function on OpenVINO: ``run(*args)`` -> its result (NumPy); ``precision``,
    ``inference_precision`` (what the plugin reports), ``timings`` (seconds per stage) and
    ``compiled`` (the ov.CompiledModel) for reports."""

    def __init__(self, compiled, prefix, device_argnums, n_args, precision, timings, marks):
        self.compiled, self.prefix, self.device_argnums = compiled, prefix, device_argnums
        self.n_args, self.precision, self.timings, self.marks = n_args, precision, timings, marks
        self.request = compiled.create_infer_request()
        self.inference_precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))

        self.input_dtypes = [np.dtype(p.get_element_type().to_dtype()) for p in compiled.inputs]

    def run(self, *args):
        if len(args) != self.n_args:
            raise ValueError(f"this compiled function takes {self.n_args} inputs; got {len(args)}")
        host = [args[i] for i in range(len(args)) if i not in self.device_argnums]
        inputs = [args[i] for i in self.device_argnums] + list(self.prefix(*host))
        inputs = [np.ascontiguousarray(a, dt) for a, dt in zip(inputs, self.input_dtypes)]
        out = self.request.infer(inputs, share_inputs=True)
        return np.asarray(out[0]).copy()


class OVUNet(OVFunction):
    """``(sample, timesteps, encoder_hidden_states, added_cond=None) -> eps`` on OpenVINO, NHWC
    arrays like ``sdjax.unet.apply``."""

    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond=None):
        args = [sample, jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (np.shape(sample)[0],)),
                encoder_hidden_states]
        if added_cond is not None:
            args += [added_cond["text_embeds"], added_cond["time_ids"]]
        if len(args) != self.n_args:
            raise ValueError(f"this compiled UNet takes {self.n_args} inputs; got {len(args)} "
                             "(added_cond only for SDXL UNets)")
        return self.run(*args)


def compile_unet(params, config, example_shapes=None, precision="f32", *, config_overrides=None):
    """Compile ``sdjax.unet.apply(params, config, ...)`` for OpenVINO's CPU plugin.

    params: the UNet's params, or a function returning them: then nothing else holds them and each
    weight's memory is freed once OpenVINO's copy exists (a full-size SD 1.5 UNet in float32 peaked
    above 11 GiB with the caller's copy, the frontend's and the plugin's all alive).
    example_shapes: ``{"sample": (B, H, W, C), "encoder_hidden_states": (B, L, D)}`` (plus
    ``"text_embeds"``, ``"time_ids"`` for SDXL); the model is compiled for these static shapes
    (default: batch 2, 64x64 latents, 77 tokens). precision: "f32", "bf16" or "w8a8" (params with
    sdjax W8A8 weights). config_overrides: extra OpenVINO CPU properties. Returns an ``OVUNet``.
    """
    require_openvino()
    if callable(params):
        params = params()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    shapes = dict(example_shapes or {})
    b = shapes.get("sample", (2, 64, 64, config.in_channels))[0]
    shapes.setdefault("sample", (b, 64, 64, config.in_channels))
    shapes.setdefault("encoder_hidden_states", (b, 77, config.cross_attention_dim))
    if precision == "w8a8":
        params, marks = w8a8.mark(params)
        if not marks:
            raise ValueError("precision='w8a8' needs params with W8A8 int8 weights (quant.int8.quantize with "
                             "act_scale); none found")
    else:
        params, marks = params, {}
        if any(nn.is_quantized(w) for w in jax.tree.leaves(params, is_leaf=nn.is_quantized)):
            raise ValueError(f"precision={precision!r} takes float params; quantized weights found "
                             "(W8A8 params: precision='w8a8')")
    box = [params]
    del params
    params = _host_layout(box)
    names = ["sample", "timesteps", "encoder_hidden_states"]
    if config.is_sdxl:
        names += ["text_embeds", "time_ids"]
        for n in ("text_embeds", "time_ids"):
            if n not in shapes:
                raise ValueError(f"example_shapes needs {n!r} for an SDXL UNet")
    shapes["timesteps"] = (b,)
    example = [jax.ShapeDtypeStruct(tuple(shapes[n]), jnp.float32) for n in names]

    def fn(x, t, ctx, *added):
        cond = dict(zip(("text_embeds", "time_ids"), added)) if added else None
        return unet.apply(params, config, x, t, ctx, added_cond=cond)

    # the SDXL time ids' embedding is sinusoidal too: it goes to the JAX prefix with the timesteps
    host_argnums = (1, 4) if config.is_sdxl else (1,)
    return compile_function(fn, example, host_argnums, precision, marks, config_overrides, wrapper=OVUNet)


def compile_function(fn, example, host_argnums=(), precision="f32", marks=None, config_overrides=None,
                     wrapper=None):
    """Compile any sdjax function of arrays ``fn(*args)`` (one array result) for OpenVINO's CPU
    plugin: ``example`` gives the static shapes, ``host_argnums`` the inputs whose dependent
    computations run in a JAX prefix, ``marks`` the W8A8 layers (``w8a8.mark``) when the function
    closes over marked params. Returns an ``OVFunction`` (or ``wrapper``, a subclass)."""
    ov = require_openvino()
    timings = {}
    t0 = time.perf_counter()
    prefix, main, device_argnums = trace(fn, example, host_argnums)
    timings["trace_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = ov.convert_model(main)
    del main
    if marks:
        w8a8.to_fake_quantize(model, marks)
    timings["convert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    props = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
             "PERFORMANCE_HINT": "LATENCY",
             # else FullyConnected layers with i8 weights and float inputs quantize their inputs to int8
             # on the fly (groups of 32): a W8A16 layer would not compute what sdjax computes
             "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    props.update(config_overrides or {})
    compiled = ov.Core().compile_model(model, "CPU", props)
    del model
    timings["compile_s"] = time.perf_counter() - t0
    return (wrapper or OVFunction)(compiled, prefix, device_argnums, len(example), precision, timings, marks or {})
