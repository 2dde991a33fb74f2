"""The UNet2DConditionModel (``sdjax.unet.apply``) as a Core ML ML program.

    from sdjax.coreml import unet
    unet.export(pipe.params["unet"], pipe.configs["unet"], "Unet.mlpackage", compute_precision="float16")

Inputs and output are named and laid out as apple/ml-stable-diffusion's Swift package feeds
them (``torch2coreml.convert_unet``'s ``sample_unet_inputs``): ``sample`` float32
``(batch, in_channels, h, w)`` (NCHW latents), ``timestep`` float32 ``(batch,)``,
``encoder_hidden_states`` float32 ``(batch, cross_attention_dim, 1, context_len)`` (the text
embeddings in the Neural Engine layout); output ``noise_pred`` ``(batch, out_channels, h, w)``.
``run`` of it equals ``sdjax.unet.apply(params, config, sample NHWC, timestep, context (B, L, D))``
transposed to NCHW.

Inside, convolutions run on NCHW with OIHW weights transposed from sdjax's HWIO on the stored
data (``mil.weight``: quantized weights stay constexpr with sdjax's tables), GroupNorm is a
reshape + ``layer_norm`` + affine (``vae``'s helper, with the UNet's eps), and the transformer
blocks work in the ``(B, C, 1, H*W)`` layout with linear layers as 1x1 convs
(``mil.linear_as_conv``), LayerNorm over channels and ``mil.attention`` ("split_einsum_v2" or
"original"). The time embedding is computed in the program from ``timestep`` (``sin``/``cos`` of
``t * freqs``, as diffusers' ``get_timestep_embedding``), then the time MLP and every resnet's
``time_emb_proj`` run as 1x1 convs on ``(B, D, 1, 1)``.

SDXL UNets (``config.is_sdxl``, "text_time" conditioning) take two more inputs, as
apple/ml-stable-diffusion's XL conversion names and orders them (``torch2coreml.convert_unet``
with ``xl_version``: ``sample``, ``timestep``, ``encoder_hidden_states``, ``time_ids``,
``text_embeds``) and ``swift/StableDiffusion/pipeline/Unet.swift``'s XL ``predictNoise`` feeds
them: ``time_ids`` float32 ``(batch, n)`` (6 for the base: original size, crop top-left, target
size; 5 for the refiner, whose last id is the aesthetic score: ``StableDiffusionXLPipeline.swift``
tells the refiner by ``time_ids``' last dimension being 5) and ``text_embeds`` float32 ``(batch,
P)``, text_encoder_2's pooled projected output (``build``'s ``text_embeds_dim``; Apple's converter
writes text_encoder_2's hidden_size there, equal to its projection_dim for SDXL's ViT-bigG, 1280).
``encoder_hidden_states`` is ``(batch, 2048, 1, 77)`` for the base (the two encoders' penultimate
states side by side) and ``(batch, 1280, 1, 77)`` for the refiner. Inside, each time id's
sinusoidal embedding (``addition_time_embed_dim`` wide, as the timestep's) is concatenated after
``text_embeds``, goes through ``add_embedding`` (two 1x1 convs with silu between) and is added to the
time embedding before its silu, as ``sdjax.unet._added_embedding``. Transformer depths are per
attention (``UNetConfig.transformer_depths``: SDXL's first block has no attention, the others
2 and 10 blocks deep).

ControlledUnet (``build(residuals=True)``, written as ``ControlledUnet.mlpackage`` or
``ControlledUnetChunk1/2``): the same program with apple/ml-stable-diffusion's extra inputs for
ControlNet residuals, ``additional_residual_0 .. _N`` after the others (``torch2coreml.convert_unet``
with ``unet_support_controlnet``: one per skip, ``(batch, channels, h, w)`` at the skip's size,
in the order the down walk pushes them, then the mid block's); the Swift pipeline feeds it the
summed outputs of its ControlNets under the same names (``ControlNet.swift``,
``Unet.swift``'s ``additionalResiduals``). The down and mid walk (``encoder_stages``) is the
ControlNet builder's too (``sdjax.coreml.controlnet``), as ``sdjax.unet.encode`` is.

Config features outside the SD 1.x/2.x/XL architectures raise NotImplementedError.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from . import mil
from .. import unet as sdjax_unet
from ..configs import ConfigError
from .text_encoder import export_program, opset

TRANSFORMER_GN_EPS = 1e-6  # sdjax.unet.transformer_2d
LAYER_NORM_EPS = 1e-5      # sdjax.unet.transformer_block


def _mb():
    from coremltools.converters.mil import Builder as mb
    return mb


def check_config(cfg):
    """The exporter builds every block sdjax.unet.apply does: the config's own validation is its
    check (a config made with dataclasses.replace has not been through it)."""
    try:
        cfg.validate("Core ML UNet export")
    except ConfigError as e:
        raise NotImplementedError(str(e)) from None


def _resnet(x, p, temb_act, groups, eps, out_scale, name, dtype):
    """``sdjax.unet.resnet``; ``temb_act`` is silu(temb) as ``(B, D, 1, 1)``."""
    mb = _mb()
    h = mb.silu(x=mil.group_norm(x, p["norm1"], groups, eps, name + "_norm1"), name=name + "_act1")
    h = mil.conv2d(h, p["conv1"], name + "_conv1", dtype)
    if "time_emb_proj" in p:
        tp = p["time_emb_proj"]
        t = mil.linear_as_conv(temb_act, tp["weight"], tp.get("bias"), name + "_temb", dtype)  # (B, C, 1, 1)
        h = mb.add(x=h, y=t, name=name + "_h_t")
    h = mb.silu(x=mil.group_norm(h, p["norm2"], groups, eps, name + "_norm2"), name=name + "_act2")
    h = mil.conv2d(h, p["conv2"], name + "_conv2", dtype)
    if "conv_shortcut" in p:
        x = mil.conv2d(x, p["conv_shortcut"], name + "_shortcut", dtype, pad=[0, 0, 0, 0])
    if out_scale != 1.0:
        out = mb.add(x=x, y=h, name=name + "_sum")
        return mb.mul(x=out, y=np.float32(1.0 / out_scale), name=name)
    return mb.add(x=x, y=h, name=name)


def _attn(x, ctx, p, heads, mode, name, dtype):
    q = mil.linear_as_conv(x, p["to_q"]["weight"], p["to_q"].get("bias"), name + "_q", dtype)
    k = mil.linear_as_conv(ctx, p["to_k"]["weight"], p["to_k"].get("bias"), name + "_k", dtype)
    v = mil.linear_as_conv(ctx, p["to_v"]["weight"], p["to_v"].get("bias"), name + "_v", dtype)
    o = mil.attention(q, k, v, heads, mode=mode, name=name + "_sdpa")
    po = p["to_out"]["0"]
    return mil.linear_as_conv(o, po["weight"], po.get("bias"), name + "_out", dtype)


def _transformer_block(x, ctx, p, heads, mode, name, dtype):
    """``sdjax.unet.transformer_block`` on ``(B, C, 1, S)``; ``ctx`` is ``(B, D, 1, L)``."""
    mb = _mb()
    ln = mil.layer_norm_channels
    h = ln(x, p["norm1"]["weight"], p["norm1"]["bias"], LAYER_NORM_EPS, name + "_norm1")
    x = mb.add(x=x, y=_attn(h, h, p["attn1"], heads, mode, name + "_attn1", dtype), name=name + "_res1")
    h = ln(x, p["norm2"]["weight"], p["norm2"]["bias"], LAYER_NORM_EPS, name + "_norm2")
    x = mb.add(x=x, y=_attn(h, ctx, p["attn2"], heads, mode, name + "_attn2", dtype), name=name + "_res2")
    h = ln(x, p["norm3"]["weight"], p["norm3"]["bias"], LAYER_NORM_EPS, name + "_norm3")
    proj = p["ff"]["net"]["0"]["proj"]
    h = mil.linear_as_conv(h, proj["weight"], proj.get("bias"), name + "_ff_proj", dtype)
    inner = int(h.shape[1]) // 2
    hh, gate = mb.split(x=h, num_splits=2, axis=1, name=name + "_geglu_split")
    if int(hh.shape[1]) != inner:
        raise ValueError(f"{name}: GEGLU split gave {hh.shape}")
    h = mb.mul(x=hh, y=mb.gelu(x=gate, mode="EXACT", name=name + "_gelu"), name=name + "_geglu")
    out = p["ff"]["net"]["2"]
    h = mil.linear_as_conv(h, out["weight"], out.get("bias"), name + "_ff_out", dtype)
    return mb.add(x=x, y=h, name=name)


def _transformer_2d(x, ctx, p, heads, layers, groups, linear_projection, mode, name, dtype):
    """``sdjax.unet.transformer_2d`` on NCHW, blocks in the ``(B, C, 1, H*W)`` layout."""
    mb = _mb()
    b, c, hh, ww = (int(d) for d in x.shape)
    t = mil.group_norm(x, p["norm"], groups, TRANSFORMER_GN_EPS, name + "_gn")
    if linear_projection:
        t = mb.reshape(x=t, shape=[b, c, 1, hh * ww], name=name + "_bc1s")
        t = mil.linear_as_conv(t, p["proj_in"]["weight"], p["proj_in"].get("bias"), name + "_proj_in", dtype)
    else:
        t = mil.conv2d(t, p["proj_in"], name + "_proj_in", dtype, pad=[0, 0, 0, 0])
        t = mb.reshape(x=t, shape=[b, int(t.shape[1]), 1, hh * ww], name=name + "_bc1s")
    for i in range(layers):
        t = _transformer_block(t, ctx, p["transformer_blocks"][str(i)], heads, mode, f"{name}_tb{i}", dtype)
    if linear_projection:
        t = mil.linear_as_conv(t, p["proj_out"]["weight"], p["proj_out"].get("bias"), name + "_proj_out", dtype)
        t = mb.reshape(x=t, shape=[b, c, hh, ww], name=name + "_bchw")
    else:
        t = mb.reshape(x=t, shape=[b, int(t.shape[1]), hh, ww], name=name + "_bchw")
        t = mil.conv2d(t, p["proj_out"], name + "_proj_out", dtype, pad=[0, 0, 0, 0])
    return mb.add(x=t, y=x, name=name)


def _sinusoid(t, dim, cfg, name):
    """diffusers' ``get_timestep_embedding`` of ``t`` ``(B, n)`` -> ``(B, n, dim)`` (``dim`` values
    per entry: [cos, sin] or [sin, cos] halves, a zero pad when ``dim`` is odd)."""
    mb = _mb()
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float32) / (half - cfg.freq_shift)).astype(np.float32)
    b, n = (int(d) for d in t.shape)
    tt = mb.reshape(x=t, shape=[b, n, 1], name=name + "_t")
    arg = mb.mul(x=tt, y=freqs.reshape(1, 1, half), name=name + "_arg")  # (B, n, half)
    cos, sin = mb.cos(x=arg, name=name + "_cos"), mb.sin(x=arg, name=name + "_sin")
    parts = [cos, sin] if cfg.flip_sin_to_cos else [sin, cos]
    if dim % 2:
        parts.append(mb.const(val=np.zeros((b, n, 1), np.float32), name=name + "_pad"))
    return mb.concat(values=parts, axis=2, name=name + "_sincos")


def _mlp(e, p, name, dtype):
    """diffusers' TimestepEmbedding (linear_1, silu, linear_2) on ``(B, C, 1, 1)``."""
    e = mil.linear_as_conv(e, p["linear_1"]["weight"], p["linear_1"].get("bias"), name + "_linear_1", dtype)
    e = _mb().silu(x=e, name=name + "_silu1")
    return mil.linear_as_conv(e, p["linear_2"]["weight"], p["linear_2"].get("bias"), name + "_linear_2", dtype)


def _time_embedding(t, params, cfg, name, dtype, added=None):
    """The timestep's sinusoid + TimestepEmbedding MLP (plus SDXL's ``added`` embedding, when
    given) -> silu(temb) ``(B, D, 1, 1)`` (every consumer of temb applies silu first)."""
    mb = _mb()
    dim = cfg.block_out_channels[0]
    b = int(t.shape[0])
    e = _sinusoid(mb.reshape(x=t, shape=[b, 1], name=name + "_bt"), dim, cfg, name)   # (B, 1, dim)
    e = mb.reshape(x=e, shape=[b, dim, 1, 1], name=name + "_b111")
    e = _mlp(e, params["time_embedding"], name, dtype)
    if added is not None:
        e = mb.add(x=e, y=added, name=name + "_text_time")
    return mb.silu(x=e, name=name + "_act")


def _added_embedding(text_embeds, time_ids, params, cfg, name, dtype):
    """SDXL's "text_time" embedding (``sdjax.unet._added_embedding``): [text_embeds, sinusoid of
    each time id] through ``add_embedding`` -> ``(B, D, 1, 1)``, added to temb before its silu."""
    mb = _mb()
    b, n = (int(d) for d in time_ids.shape)
    td = cfg.addition_time_embed_dim
    t = mb.reshape(x=_sinusoid(time_ids, td, cfg, name + "_ids"), shape=[b, n * td], name=name + "_ids_flat")
    x = mb.concat(values=[text_embeds, t], axis=1, name=name + "_in")          # (B, P + n * td)
    x = mb.reshape(x=x, shape=[b, int(x.shape[1]), 1, 1], name=name + "_in_b111")
    return _mlp(x, params["add_embedding"], name, dtype)


class Stage(NamedTuple):
    """One step of a builder's walk: ``fn(state, ctx)`` updates ``state`` (MIL values) in place;
    ``params`` are the weights it reads (``stage_bytes``); ``residuals`` the indices ``i`` of the
    ``additional_residual_i`` inputs it reads (a ControlledUnet's)."""
    name: str
    params: dict
    fn: Callable
    residuals: tuple = ()


def embed_time(s, params, cfg, dtype):
    """``s["temb"]`` (the timestep input) -> silu of the time embedding, plus SDXL's text_time
    embedding of ``s["text_embeds"]``/``s["time_ids"]`` (``sdjax.unet.embed_time``)."""
    added = None
    if cfg.is_sdxl:
        added = _added_embedding(s["text_embeds"], s["time_ids"], params, cfg, "add_emb", dtype)
    s["temb"] = _time_embedding(s["temb"], params, cfg, "time", dtype, added)


def _block_fns(cfg, attention, dtype):
    """(res, attn, seq): stage-function factories for resnets, transformers and sequences of them."""
    groups, eps, lin = cfg.norm_num_groups, cfg.norm_eps, cfg.use_linear_projection

    def res(p, name, out_scale=cfg.resnet_out_scale_factor):
        def fn(s, ctx):
            s["x"] = _resnet(s["x"], p, s["temb"], groups, eps, out_scale, name, dtype)
        return fn

    def attn(p, h, n, name):
        def fn(s, ctx):
            s["x"] = _transformer_2d(s["x"], ctx, p, h, n, groups, lin, attention, name, dtype)
        return fn

    def seq(*fns):
        def fn(s, ctx):
            for f in fns:
                f(s, ctx)
        return fn
    return res, attn, seq


def encoder_stages(params, cfg, attention, dtype, stem):
    """``stem`` (a Stage: the time embedding and conv_in's output pushed as the first skip), then
    the down blocks (each resnet/attention pair and downsampler pushing its output onto
    ``state["skips"]``) and the mid block: ``sdjax.unet.encode``'s walk, which a UNet and a
    ControlNet share."""
    heads, layers = cfg.heads, cfg.layers
    down_depth, mid_depth, _ = cfg.transformer_depths  # per attention (SDXL: 0, 2, 10 deep)
    pad = cfg.downsample_padding
    down_pad = [0, 1, 0, 1] if not pad else [int(pad)] * 4  # diffusers pads right/bottom when 0
    res, attn, seq = _block_fns(cfg, attention, dtype)

    def push(s, ctx):
        s["skips"].append(s["x"])

    stages = [stem]
    for i, kind in enumerate(cfg.down_block_types):
        p = params["down_blocks"][str(i)]
        for j in range(layers[i]):
            fns = [res(p["resnets"][str(j)], f"down{i}_res{j}")]
            sub = {"resnet": p["resnets"][str(j)]}
            if kind == "CrossAttnDownBlock2D":
                fns.append(attn(p["attentions"][str(j)], heads[i], down_depth[i][j], f"down{i}_attn{j}"))
                sub["attention"] = p["attentions"][str(j)]
            stages.append(Stage(f"down_blocks.{i}.{j}", sub, seq(*fns, push)))
        if "downsamplers" in p:
            conv = p["downsamplers"]["0"]["conv"]

            def down(s, ctx, conv=conv, i=i):
                s["x"] = mil.conv2d(s["x"], conv, f"down{i}_downsample", dtype, stride=2, pad=down_pad)
            stages.append(Stage(f"down_blocks.{i}.downsamplers", conv, seq(down, push)))

    p = params["mid_block"]
    mid_scale = cfg.mid_block_scale_factor  # diffusers' output_scale_factor of the mid block's resnets
    stages.append(Stage("mid_block", p, seq(res(p["resnets"]["0"], "mid_res0", mid_scale),
                                            attn(p["attentions"]["0"], heads[-1], mid_depth, "mid_attn0"),
                                            res(p["resnets"]["1"], "mid_res1", mid_scale))))
    return stages


RESIDUAL_PREFIX = "additional_residual_"  # torch2coreml.convert_unet / convert_controlnet's names


def residual_name(i: int) -> str:
    """The name of a ControlledUnet's ``i``-th residual input (and a ControlNet's ``i``-th output):
    the skips in ``sdjax.unet.skip_channels`` order, the mid block's last."""
    return f"{RESIDUAL_PREFIX}{i}"


def residual_shapes(cfg, batch, latent_shape) -> dict:
    """``{additional_residual_i: (batch, channels, h, w)}`` for a UNet (or ControlNet) config at
    latents of ``latent_shape``: one per skip, then the mid block's."""
    h, w = (int(d) for d in latent_shape)
    return {residual_name(i): (batch, ch, h >> level, w >> level)
            for i, (ch, level) in enumerate(sdjax_unet.skip_channels(cfg))}


def _stages(params, cfg, attention, dtype, residuals=False):
    """The UNet as a list of Stages run in order; ``fn(state, ctx)`` updates ``state = {"x",
    "skips", "temb", ...}`` in place (MIL values). ``--chunk-unet`` cuts between two of them.
    ``residuals``: a ControlledUnet, adding ``state["res"][i]`` (its ``additional_residual_i``
    inputs) to skip ``i`` where the up blocks take it, and the last to the mid block's output, as
    ``sdjax.unet.apply`` adds a ControlNet's residuals (the same sums, done where each is used, so
    each chunk reads only its own residuals)."""
    mb = _mb()
    groups, eps = cfg.norm_num_groups, cfg.norm_eps
    heads, layers = cfg.heads, cfg.layers
    _, _, up_depth = cfg.transformer_depths
    res, attn, seq = _block_fns(cfg, attention, dtype)

    def stem(s, ctx):
        x = s["x"]
        if cfg.center_input_sample:
            x = mb.sub(x=mb.mul(x=x, y=np.float32(2), name="center_mul"), y=np.float32(1), name="center")
        embed_time(s, params, cfg, dtype)
        s["x"] = mil.conv2d(x, params["conv_in"], "conv_in", dtype)
        s["skips"].append(s["x"])

    stages = encoder_stages(params, cfg, attention, dtype, Stage(
        "conv_in", {k: params[k] for k in ("time_embedding", "add_embedding", "conv_in") if k in params}, stem))
    n_skips = len(sdjax_unet.skip_channels(cfg)) - 1
    if residuals:
        mid = stages[-1]

        def mid_fn(s, ctx, f=mid.fn):
            f(s, ctx)
            s["x"] = mb.add(x=s["x"], y=s["res"][n_skips], name="mid_block_residual")
        stages[-1] = mid._replace(fn=mid_fn, residuals=(n_skips,))

    depth = n_skips  # skips on the stack: each up resnet takes the top one
    up_heads, up_layers = heads[::-1], layers[::-1]
    for i, kind in enumerate(cfg.up_block_types):
        p = params["up_blocks"][str(i)]
        for j in range(up_layers[i] + 1):
            depth -= 1

            def cat(s, ctx, name=f"up{i}_cat{j}", k=depth):
                if len(s["skips"]) != k + 1:
                    raise AssertionError(f"{name}: skip {len(s['skips']) - 1} on top, expected {k}")
                skip = s["skips"].pop()
                if residuals:
                    skip = mb.add(x=skip, y=s["res"][k], name=f"skip{k}_residual")
                s["x"] = mb.concat(values=[s["x"], skip], axis=1, name=name)
            fns = [cat, res(p["resnets"][str(j)], f"up{i}_res{j}")]
            sub = {"resnet": p["resnets"][str(j)]}
            if kind == "CrossAttnUpBlock2D":
                fns.append(attn(p["attentions"][str(j)], up_heads[i], up_depth[i][j], f"up{i}_attn{j}"))
                sub["attention"] = p["attentions"][str(j)]
            stages.append(Stage(f"up_blocks.{i}.{j}", sub, seq(*fns), (depth,) if residuals else ()))
        if "upsamplers" in p:
            conv = p["upsamplers"]["0"]["conv"]

            def up(s, ctx, conv=conv, i=i):
                x = mb.upsample_nearest_neighbor(x=s["x"], scale_factor_height=2, scale_factor_width=2,
                                                 name=f"up{i}_upsample")
                s["x"] = mil.conv2d(x, conv, f"up{i}_upconv", dtype)
            stages.append(Stage(f"up_blocks.{i}.upsamplers", conv, up))

    def head(s, ctx):
        x = mb.silu(x=mil.group_norm(s["x"], params["conv_norm_out"], groups, eps, "norm_out"), name="norm_out_act")
        s["x"] = mil.conv2d(x, params["conv_out"], "noise_pred", dtype)
    stages.append(Stage("conv_out", {k: params[k] for k in ("conv_norm_out", "conv_out")}, head))
    return stages


def stage_bytes(params, config):
    """``[(stage name, stored weight bytes)]`` of the UNet's stages in program order (``_stages``);
    quantized weights count as stored (packed indices + tables), float ones at their dtype."""
    from quant import size_bytes
    return [(st.name, int(size_bytes(st.params))) for st in _stages(params, config, "original", np.float32)]


def chunk_split(params, config) -> int:
    """The stage index where ``--chunk-unet`` cuts: chunk 1 runs stages ``[:k]``, chunk 2 ``[k:]``,
    with ``k`` the boundary whose cumulative weight bytes are closest to half the total (Apple's
    chunk_mlprogram bisects by weight size likewise, at op granularity)."""
    sizes = np.cumsum([b for _, b in stage_bytes(params, config)])
    return int(np.argmin(np.abs(sizes[:-1] - sizes[-1] / 2))) + 1


CHUNK_PREFIX = "chunk_"  # names of the tensors chunk 1 hands to chunk 2


def input_specs(cfg, batch, latent_shape, context_len, text_embeds_dim):
    """``({input name: shape}, (h, w))``: the inputs a UNet (or a ControlNet, through its ``unet``
    view) takes in apple/ml-stable-diffusion's names and order (module docstring), the latent size
    checked against the downsamplings."""
    if latent_shape is None:
        size = cfg.sample_size
        if size is None:
            raise ValueError("config has no sample_size: pass latent_shape")
        latent_shape = (size, size) if isinstance(size, int) else tuple(size)
    h, w = (int(d) for d in latent_shape)
    n_down = len(cfg.block_out_channels) - 1
    if h % (2 ** n_down) or w % (2 ** n_down):
        raise NotImplementedError(f"latent shape {(h, w)} not divisible by {2 ** n_down} (odd sizes inside "
                                  "the UNet, which sdjax handles by resizing, are not exported)")
    specs = {"sample": (batch, cfg.in_channels, h, w), "timestep": (batch,),
             "encoder_hidden_states": (batch, cfg.cross_attention_dim, 1, context_len)}
    if cfg.is_sdxl:  # Apple's order: time_ids, then text_embeds
        if text_embeds_dim is None:
            raise ValueError("an SDXL UNet (addition_embed_type 'text_time') needs text_embeds_dim: the width "
                             "of text_encoder_2's pooled projected output (its projection_dim)")
        specs["time_ids"] = (batch, cfg.time_ids_length(int(text_embeds_dim)))
        specs["text_embeds"] = (batch, int(text_embeds_dim))
    elif text_embeds_dim is not None:
        raise ValueError("text_embeds_dim is for SDXL UNets (addition_embed_type 'text_time') only")
    return specs, (h, w)


def initial_state(a, residuals=()):
    """The walk's state from a program's inputs ``a``: ``residuals`` the indices of the
    ``additional_residual_i`` inputs read."""
    return {"x": a["sample"], "skips": [], "temb": a["timestep"], "text_embeds": a.get("text_embeds"),
            "time_ids": a.get("time_ids"), "res": {i: a[residual_name(i)] for i in residuals}}


def build(params, config, batch=2, latent_shape=None, context_len=77, attention="split_einsum_v2",
          dtype="float32", target=None, chunk=None, live_shapes=None, text_embeds_dim=None, residuals=False):
    """MIL Program computing ``sdjax.unet.apply`` with apple/ml-stable-diffusion's input and output
    names and layouts (module docstring).

    batch: the batch the Swift pipeline runs (2 for classifier-free guidance; Apple's XL pipeline
    always feeds 2).
    latent_shape: (h, w) of the latents, default the config's ``sample_size`` (even sizes only).
    attention: ``mil.ATTENTION_MODES``.
    dtype: the float type quantization tables are written in ("float16" for an fp16 export).
    target: the ``ct.target`` whose opset the program uses (``text_encoder.opset``).
    chunk: None for the whole UNet, or 1 / 2 for the halves ``--chunk-unet`` writes (split at
    ``chunk_split``): chunk 1 takes the UNet's inputs and returns the tensors live at the cut
    (``chunk_x``, ``chunk_temb``, ``chunk_skip0``, ...); chunk 2 takes those (plus
    ``encoder_hidden_states`` when it has attention) and returns ``noise_pred``. The Swift package
    feeds chunk 2 the union of the UNet's inputs and chunk 1's outputs (``ManagedMLModel.swift``).
    live_shapes: for chunk 2, chunk 1's ``{output name: shape}`` (``chunk_outputs``); built from
    chunk 1 when None.
    text_embeds_dim: SDXL UNets only (required there): the width P of the ``text_embeds`` input,
    text_encoder_2's ``projection_dim``; the ``time_ids`` input then has
    ``config.time_ids_length(P)`` values per sample (6 base, 5 refiner).
    residuals: the ControlledUnet apple/ml-stable-diffusion's Swift pipeline runs beside
    ControlNets (``torch2coreml.convert_unet`` with ``unet_support_controlnet``): after the
    inputs above, ``additional_residual_0 .. _N`` (``residual_shapes``: one per skip, in
    ``sdjax.unet.skip_channels`` order, then the mid block's), as
    ``sdjax.unet.apply(down_block_additional_residuals=..., mid_block_additional_residual=...)``
    takes them. Chunks take the residuals their stages use (Swift feeds every chunk the UNet's
    inputs, residuals included)."""
    mb = _mb()

    cfg = config
    check_config(cfg)
    dtype = mil.tables_dtype(dtype)
    if attention not in mil.ATTENTION_MODES:
        raise ValueError(f"attention {attention!r}; supported: {mil.ATTENTION_MODES}")
    if chunk not in (None, 1, 2):
        raise ValueError(f"chunk must be None, 1 or 2, got {chunk!r}")
    specs, (h, w) = input_specs(cfg, batch, latent_shape, context_len, text_embeds_dim)
    res_specs = residual_shapes(cfg, batch, (h, w)) if residuals else {}
    stages = _stages(params, cfg, attention, dtype, residuals)
    if chunk is None:
        lo, hi = 0, len(stages)
    else:
        k = chunk_split(params, cfg)
        lo, hi = (0, k) if chunk == 1 else (k, len(stages))
    used = sorted(i for st in stages[lo:hi] for i in st.residuals)
    used_specs = {residual_name(i): res_specs[residual_name(i)] for i in used}

    def run(state, ctx):
        for st in stages[lo:hi]:
            st.fn(state, ctx)
        return state

    if lo == 0:
        def body(a):
            s = run(initial_state(a, used), a["encoder_hidden_states"])
            if hi == len(stages):
                return [s["x"]]
            outs = [mb.identity(x=s["x"], name=CHUNK_PREFIX + "x"),
                    mb.identity(x=s["temb"], name=CHUNK_PREFIX + "temb")]
            return outs + [mb.identity(x=v, name=f"{CHUNK_PREFIX}skip{i}") for i, v in enumerate(s["skips"])]
        return mil.program(specs | used_specs, body, opset(target))

    # chunk 2: the live tensors at the cut are its inputs; their shapes come from chunk 1
    live = live_shapes or chunk_outputs(build(params, cfg, batch, (h, w), context_len, attention, dtype, target,
                                              chunk=1, text_embeds_dim=text_embeds_dim, residuals=residuals))
    needs_ctx = any("attention" in st.params or "attentions" in st.params
                    for st in stages[lo:hi] if isinstance(st.params, dict))
    specs2 = ({"encoder_hidden_states": specs["encoder_hidden_states"]} if needs_ctx else {}) | dict(live) | used_specs

    def body2(a):
        state = {"x": a[CHUNK_PREFIX + "x"], "temb": a[CHUNK_PREFIX + "temb"],
                 "skips": [a[f"{CHUNK_PREFIX}skip{i}"] for i in range(len(live) - 2)],
                 "res": {i: a[residual_name(i)] for i in used}}
        return [run(state, a.get("encoder_hidden_states"))["x"]]
    return mil.program(specs2, body2, opset(target))


def chunk_outputs(prog) -> dict:
    """``{name: shape}`` of a chunk-1 program's outputs (chunk 2's inputs besides the context)."""
    return {o.name: tuple(int(d) for d in o.shape) for o in prog.functions["main"].outputs}


def export(params, config, path, compute_precision="float32", minimum_deployment_target=None,
           overwrite=False, **build_kw):
    """Build, convert and save the UNet to ``path`` (an .mlpackage); returns the path.

    ``build_kw``: ``build``'s batch, latent_shape, context_len, attention, text_embeds_dim (SDXL),
    residuals (a ControlledUnet). As ``text_encoder.export``: default target iOS16, refuses an
    existing ``path`` unless ``overwrite``, never leaves a half-written package at ``path``."""
    if "dtype" in build_kw:
        raise TypeError("dtype follows compute_precision; do not pass it")
    return export_program(lambda tables, target: build(params, config, dtype=tables, target=target, **build_kw),
                          path, compute_precision, minimum_deployment_target, overwrite)


# what the Swift package looks for (compiled to .mlmodelc): StableDiffusionPipeline+Resources.swift and,
# for the SDXL refiner beside a base, StableDiffusionXL+Resources.swift
NAME = "Unet.mlpackage"
CHUNK_NAMES = ("UnetChunk1.mlpackage", "UnetChunk2.mlpackage")
REFINER_NAME = "UnetRefiner.mlpackage"
REFINER_CHUNK_NAMES = ("UnetRefinerChunk1.mlpackage", "UnetRefinerChunk2.mlpackage")
# the UNet StableDiffusionPipeline+Resources.swift loads instead when ControlNets are named
CONTROLLED_NAME = "ControlledUnet.mlpackage"
CONTROLLED_CHUNK_NAMES = ("ControlledUnetChunk1.mlpackage", "ControlledUnetChunk2.mlpackage")


def export_chunks(params, config, paths, compute_precision="float32", minimum_deployment_target=None,
                  overwrite=False, **build_kw):
    """``--chunk-unet``: the UNet as two packages split by weight size (``chunk_split``), saved to
    ``paths`` (two .mlpackage paths, by default named ``CHUNK_NAMES``). Chunk 1 is built, converted
    and saved before chunk 2 is built, so only one half's program is in memory at a time."""
    if "dtype" in build_kw or "chunk" in build_kw:
        raise TypeError("dtype follows compute_precision and chunk is set here; do not pass them")
    live = {}

    def first(tables, target):
        prog = build(params, config, dtype=tables, target=target, chunk=1, **build_kw)
        live.update(chunk_outputs(prog))
        return prog

    p1 = export_program(first, paths[0], compute_precision, minimum_deployment_target, overwrite)
    p2 = export_program(lambda tables, target: build(params, config, dtype=tables, target=target, chunk=2,
                                                     live_shapes=live, **build_kw),
                        paths[1], compute_precision, minimum_deployment_target, overwrite)
    return p1, p2
