"""Primitives the models are written in: linear, conv2d, norms, attention.

Arrays are NHWC. A weight is either a float array or a quantized weight type; the
primitives reach a quantized weight only through a small protocol so this module
never needs to know which quantization methods exist:

- ``w.dequantize(dtype)`` -> float array in sdjax layout (required);
- ``w.method`` -> the recipe method it represents ("palettize", "int8", ...), which
  ``quant.io`` and the Core ML exporter dispatch on (optional; the type's name otherwise);
- ``w.linear(x)`` / ``w.conv2d(x, stride, padding)`` (optional) for weight types with
  their own integer compute path; when present they replace dequantize-then-float.

Layouts: linear weights are ``(in, out)``, conv weights ``HWIO``.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

# Elements of one float32 score block (queries x keys of one head). 4M (16 MB) blocks, one
# head at a time, ran 2x faster on CPU than all heads at once (at 512x512: 4096 tokens, 16
# batch-heads, 1024 queries a block), and the full (batch*heads, 4096, 4096) score tensor
# never exists.
ATTENTION_CHUNK_ELEMENTS = 1 << 22


def is_quantized(w) -> bool:
    """True for a weight of the protocol above (a quantized type or a probe), False for arrays."""
    return hasattr(w, "dequantize")


class ShapedWeight:
    """``ndim`` and ``size`` from a weight type's ``shape`` (a mixin for quantized weight types whose
    stored arrays are not the weight's shape)."""

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))


def method_of(w) -> str:
    """The recipe method a weight represents: "float" for arrays, else its ``method``."""
    if not is_quantized(w):
        return "float"
    return getattr(w, "method", type(w).__name__)


def float_value(w, dtype=np.float32):
    """The float value of a weight or array as a host NumPy array of ``dtype``."""
    return np.asarray(w.dequantize(dtype) if is_quantized(w) else w, dtype)


def _dense(w, dtype):
    """The float value of a weight (a no-op for float arrays)."""
    if is_quantized(w):
        return w.dequantize(dtype)
    return w.astype(dtype) if w.dtype != dtype else w


def _zero_of(x):
    """A float32 zero XLA cannot fold away that depends on ``x``: ``x[0] * 0``, which is 0 or NaN
    (x[0] not finite), mapped to 0 so one bad input element cannot poison what it is added to."""
    return jnp.nan_to_num((x.reshape(-1)[0] * 0).astype(jnp.float32), nan=0.0)


def after(a, x):
    """``a`` (a float array), computed no earlier than ``x``: the same values with a data dependence
    on ``x``. For inputs that exist at the program start but are used deep inside it, such as a
    cross-attention's text context: XLA's CPU scheduler otherwise runs every layer's projection of
    it (and the float32 copies of their float16 weights) at the start and keeps them alive (1.26 GB
    of such temporaries in a full-size SDXL UNet's forward pass; experiments/quant_memory.py)."""
    return a + _zero_of(x).astype(a.dtype)


def remat(fun):
    """``fun`` (positional array or pytree arguments) with a rematerialising gradient: the forward pass
    keeps only the arguments, the backward pass recomputes ``fun`` from them. For training a full-size
    UNet, whose blocks' activations do not fit otherwise. ``jax.checkpoint`` does not do this on
    XLA:CPU: its optimization barrier is removed and the recomputation merged back into the forward
    pass (a full-size step's temporaries were the same with and without it;
    experiments/qat_full_size.py). Here the backward recomputes from the arguments plus a zero taken
    from the incoming cotangent, a data dependence XLA cannot merge away. Values and gradients are
    ``fun``'s."""
    @jax.custom_vjp
    def f(*args):
        return fun(*args)

    def fwd(*args):
        return fun(*args), args

    def bwd(args, g):
        g0 = jax.tree.leaves(g)[0]
        tied = jax.tree.map(lambda a: after(a, g0) if jnp.issubdtype(a.dtype, jnp.floating) else a, args)
        return jax.vjp(fun, *tied)[1](g)
    f.defvjp(fwd, bwd)
    return f


def _after_input(w, x):
    """Tie the expansion of a compressed weight to this layer's input.

    XLA's CPU scheduler otherwise hoists every dequantization (and every float32 copy of a float16
    weight) to the start of the program and keeps them all alive: a full-size SD 1.5 UNet in float16
    peaked at 5.5 GB RSS with 3.3 GB of such temporaries. Adding ``0 * x[0]`` to the weight's float
    parts (LUT, scales, the half array) is a data dependence XLA cannot fold away, so each weight is
    expanded when its layer runs: 335 MB of temporaries, 2.5 GB peak, same speed and outputs
    (experiments/quant_memory.py). ``lax.optimization_barrier`` does not do this on CPU: its expander
    pass removes the barrier. float32 weights are left alone: the addition would copy them.
    """
    if not is_quantized(w) and w.dtype == jnp.float32:
        return w
    dep = _zero_of(x)

    def tie(a):
        if jnp.issubdtype(a.dtype, jnp.floating):
            return a + dep.astype(a.dtype)
        # integer parts (packed indices, int8 data) too: XLA:GPU otherwise runs the part of an
        # expansion that reads only them (unpacking the indices) at the program start and keeps
        # every result alive (0.9 GB of temporaries for a 6-bit SD 1.5 UNet on an H100, 0.18 GB tied)
        return a + dep.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.integer) else a

    return jax.tree.map(tie, w)


def linear(x, p):
    """``x @ W + b`` with ``p = {"weight": (in, out), "bias": (out,) optional}``."""
    w = _after_input(p["weight"], x)
    if hasattr(w, "linear"):
        y = w.linear(x)
    else:
        # float32 accumulation: more accurate for half inputs, and XLA's CPU bfloat16 dot
        # with a float32 result runs 2.5x faster than one with a bfloat16 result
        y = jnp.matmul(x, _dense(w, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def conv2d(x, p, stride=1, padding=None):
    """2-D convolution, NHWC input, HWIO weight. ``padding`` defaults to 'same' for odd kernels.

    ``padding`` is an int (symmetric) or ``((top, bottom), (left, right))``.
    """
    w = _after_input(p["weight"], x)
    if padding is None:
        padding = w.shape[0] // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    if hasattr(w, "conv2d"):
        y = w.conv2d(x, stride, padding)
    else:
        wd = _dense(w, x.dtype)
        if _im2col_is_faster(x.shape, wd.shape, stride):
            y = _conv_as_matmul(x, wd, stride, padding)
        else:
            y = jax.lax.conv_general_dilated(
                x, wd, window_strides=(stride, stride), padding=padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
        y = y.astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def _im2col_is_faster(x_shape, w_shape, stride):
    """On CPU, a convolution with few output pixels and many input features runs faster as
    one matmul over gathered patches than as XLA's convolution (measured on SD's 8x8 and
    16x16 1280-channel convs: 2.6x and 1.4x), and 1x1 convolutions are matmuls anyway."""
    if jax.default_backend() != "cpu":
        return False
    kh, kw, cin, _ = w_shape
    if kh == kw == 1 and stride == 1:
        return True
    n, h, wd, _ = x_shape
    return n * (h // stride) * (wd // stride) * 8 <= kh * kw * cin


def im2col(x, kh, kw, stride, padding):
    """The patches a ``kh x kw`` HWIO convolution multiplies: ``(N, oh, ow, kh*kw*cin)``, features
    ordered (dy, dx, channel) like ``w.reshape(kh*kw*cin, cout)``. ``padding``: ((top, bottom), (left, right))."""
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    _, hp, wp, _ = xp.shape
    oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    cols = [xp[:, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
            for dy in range(kh) for dx in range(kw)]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _conv_as_matmul(x, w, stride, padding):
    kh, kw, cin, cout = w.shape
    return jnp.matmul(im2col(x, kh, kw, stride, padding), w.reshape(kh * kw * cin, cout),
                      preferred_element_type=jnp.float32)


def group_norm(x, p, groups, eps):
    """GroupNorm over NHWC, statistics in float32 (two passes: mean, then centred variance).

    Reducing over the spatial axis first and then over each group's channels ran 1.5x
    faster on CPU than one reduction over (spatial, channels-in-group)."""
    n, h, w, c = x.shape
    per = c // groups
    xf = x.astype(jnp.float32).reshape(n, h * w, c)
    count = h * w * per

    def group_mean(v):  # (N, C) channel sums -> (N, C) mean of each channel's group
        return jnp.repeat(v.reshape(n, groups, per).sum(-1) / count, per, axis=1)
    mean = group_mean(xf.sum(1))[:, None]
    var = group_mean(jnp.square(xf - mean).sum(1))
    scale = jax.lax.rsqrt(var + eps) * p["weight"].astype(jnp.float32)
    shift = p["bias"].astype(jnp.float32) - mean[:, 0] * scale
    return (xf * scale[:, None] + shift[:, None]).reshape(n, h, w, c).astype(x.dtype)


def layer_norm(x, p, eps):
    """LayerNorm over the last axis, statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    y = y * p["weight"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def silu(x):
    return x * jax.nn.sigmoid(x)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
    """Exact (erf) GELU, as torch's default."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"silu": silu, "swish": silu, "quick_gelu": quick_gelu, "gelu": gelu,
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def activation(name):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


_chunking = {"elements": ATTENTION_CHUNK_ELEMENTS}


@contextlib.contextmanager
def attention_chunk_elements(elements):
    """Within the block, ``attention`` called without ``chunk_elements`` chunks at ``elements``
    (a very large number: no chunks, as a backend with its own attention kernel wants when tracing)."""
    before = _chunking["elements"]
    _chunking["elements"] = int(elements)
    try:
        yield
    finally:
        _chunking["elements"] = before


def attention(q, k, v, heads, mask=None, chunk_elements=None):
    """Multi-head scaled dot-product attention.

    q: (B, Lq, D), k/v: (B, Lk, D) -> (B, Lq, D). ``mask`` is additive, broadcastable to
    (B*heads, Lq, Lk). Scores, softmax and its normalisation are float32 whatever the input
    dtype. When the scores would exceed ``chunk_elements``, they are computed one head and
    ``query_chunk`` queries at a time, sequentially in a ``lax.fori_loop`` (or, when a head's
    queries fit in one chunk, as many whole heads at a time as fit).
    """
    if chunk_elements is None:
        chunk_elements = _chunking["elements"]
    b, lq, d = q.shape
    lk = k.shape[1]
    hd = d // heads
    bh = b * heads
    q = q.reshape(b, lq, heads, hd).transpose(0, 2, 1, 3).reshape(bh, lq, hd)
    k = k.reshape(b, lk, heads, hd).transpose(0, 2, 3, 1).reshape(bh, hd, lk)
    v = v.reshape(b, lk, heads, hd).transpose(0, 2, 1, 3).reshape(bh, lk, hd)
    scale = np.float32(1.0 / np.sqrt(hd))

    def block(qc, kc, vc, mc=None):  # (..., c, hd) x (..., hd, Lk) x (..., Lk, hd) -> (..., c, hd)
        s = jnp.matmul(qc, kc, preferred_element_type=jnp.float32) * scale
        if mc is not None:
            s = s + mc
        e = jnp.exp(s - s.max(-1, keepdims=True))
        o = jnp.matmul(e.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
        return (o / e.sum(-1, keepdims=True)).astype(vc.dtype)

    c = query_chunk(bh, lq, lk, chunk_elements)
    if c is None or mask is not None:
        out = block(q, k, v, mask)
    else:
        n = -(-lq // c)                         # query chunks per head
        # short sequences: a step takes as many whole heads as fit, not one (a loop over thousands of
        # tiny blocks is slow); long ones take one head's chunk of queries
        g = max(1, min(bh, chunk_elements // (c * lk))) if n == 1 else 1
        m = -(-bh // g)                         # steps' head groups
        qb = jnp.pad(q, ((0, m * g - bh), (0, n * c - lq), (0, 0)))
        qb = qb.reshape(m, g, n, c, hd).transpose(0, 2, 1, 3, 4).reshape(m * n, g, c, hd)
        kb = jnp.pad(k, ((0, m * g - bh), (0, 0), (0, 0))).reshape(m, g, hd, lk)
        vb = jnp.pad(v, ((0, m * g - bh), (0, 0), (0, 0))).reshape(m, g, lk, hd)
        if g == 1:
            qb, kb, vb = qb[:, 0], kb[:, 0], vb[:, 0]

        # differentiated (fine-tuning), each chunk's scores are recomputed in the backward pass instead of
        # every chunk's float32 scores and exponentials being stacked for it (2 x 1 GiB per 64x64
        # self-attention of a full-size UNet at batch 2); the forward pass is unchanged
        chunk = jax.checkpoint(block)

        def step(i, out):
            h = i // n
            return jax.lax.dynamic_update_index_in_dim(out, chunk(qb[i], kb[h], vb[h]), i, 0)
        # the output buffer is made from the queries (``after``), not as a constant: XLA's CPU
        # scheduler otherwise creates every attention's buffer at the program start and keeps them
        # all (with lax.map: 0.4 GB in a full-size SDXL UNet's forward pass)
        out = jax.lax.fori_loop(0, m * n, step, after(jnp.zeros(qb.shape, v.dtype), qb))
        out = out.reshape(m, n, g, c, hd).transpose(0, 2, 1, 3, 4).reshape(m * g, n * c, hd)[:bh, :lq]
    return out.reshape(b, heads, lq, hd).transpose(0, 2, 1, 3).reshape(b, lq, d)


def query_chunk(batch_heads, lq, lk, chunk_elements=ATTENTION_CHUNK_ELEMENTS):
    """Queries per block when attention is chunked, or None when all scores fit (2x)
    ``chunk_elements`` at once. A power of two, at least 16."""
    if batch_heads * lq * lk <= 2 * chunk_elements:
        return None
    return min(lq, max(16, 1 << int(np.log2(max(1, chunk_elements // lk)))))


def upsample_nearest(x, size):
    """Nearest-neighbour resize of NHWC to ``size=(H, W)`` with torch's index rule floor(i*in/out)."""
    n, h, w, c = x.shape
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (np.arange(oh) * h) // oh
    cols = (np.arange(ow) * w) // ow
    return x[:, rows][:, :, cols]


def timestep_embedding(t, dim, flip_sin_to_cos, freq_shift, max_period=10000.0):
    """Sinusoidal embedding of (B,) timesteps, float32 (diffusers' get_timestep_embedding)."""
    half = dim // 2
    exponent = -np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    e = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    e = jnp.concatenate([jnp.cos(e), jnp.sin(e)] if flip_sin_to_cos else [jnp.sin(e), jnp.cos(e)], -1)
    if dim % 2:
        e = jnp.pad(e, ((0, 0), (0, 1)))
    return e


def child(p, path):
    """``child(p, "down_blocks.0.resnets")`` -> the nested dict at that dotted path."""
    for part in path.split("."):
        p = p[part]
    return p


def flatten(tree, prefix=""):
    """Nested dict -> {"dotted.path": leaf}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat):
    """{"dotted.path": leaf} -> nested dict."""
    tree = {}
    for key, v in flat.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = v
    return tree
