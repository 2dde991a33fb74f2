"""UNet2DConditionModel (SD 1.x / 2.x, inpainting, SDXL base and refiner) as a pure function, NHWC.

Parameter names are diffusers' module names; ``param_shapes`` lists them all for a config
and is the single statement of the architecture's parameters (init, load checks). SDXL's
"text_time" conditioning (pooled text embeds and size/crop/aesthetic time_ids) comes in as
``added_cond`` and is checked against the config before anything runs.
"""
from __future__ import annotations

import jax.numpy as jnp

from . import nn
from .configs import SDXL_TIME_IDS, UNetConfig
from .params import make_params, conv_shape as _conv, linear_shape as _lin, norm_shape as _norm


# --- blocks ---------------------------------------------------------------------------

def resnet(x, p, temb, groups, eps, out_scale=1.0):
    """ResnetBlock2D: GN-SiLU-conv, + time projection, GN-SiLU-conv, + (1x1 conv) shortcut."""
    h = nn.conv2d(nn.silu(nn.group_norm(x, p["norm1"], groups, eps)), p["conv1"])
    if temb is not None:
        h = h + nn.linear(nn.silu(temb), p["time_emb_proj"])[:, None, None, :]
    h = nn.conv2d(nn.silu(nn.group_norm(h, p["norm2"], groups, eps)), p["conv2"])
    if "conv_shortcut" in p:
        x = nn.conv2d(x, p["conv_shortcut"], padding=0)
    out = x + h
    return out / out_scale if out_scale != 1.0 else out


def _attn(x, ctx, p, heads):
    if ctx is not x:  # cross-attention: project the context when this layer runs (nn.after)
        ctx = nn.after(ctx, x)
    q, k, v = nn.linear(x, p["to_q"]), nn.linear(ctx, p["to_k"]), nn.linear(ctx, p["to_v"])
    return nn.linear(nn.attention(q, k, v, heads), p["to_out"]["0"])


def transformer_block(x, ctx, p, heads):
    """BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward (pre-LN)."""
    h = nn.layer_norm(x, p["norm1"], 1e-5)
    x = x + _attn(h, h, p["attn1"], heads)
    x = x + _attn(nn.layer_norm(x, p["norm2"], 1e-5), ctx, p["attn2"], heads)
    h = nn.linear(nn.layer_norm(x, p["norm3"], 1e-5), p["ff"]["net"]["0"]["proj"])
    h, gate = jnp.split(h, 2, axis=-1)
    return x + nn.linear(h * nn.gelu(gate), p["ff"]["net"]["2"])


def transformer_2d(x, ctx, p, heads, layers, groups, linear_projection):
    """Transformer2DModel: GroupNorm, project in, transformer blocks over the H*W tokens, project out."""
    n, h, w, c = x.shape
    res = x
    x = nn.group_norm(x, p["norm"], groups, 1e-6)
    if linear_projection:
        x = nn.linear(x.reshape(n, h * w, c), p["proj_in"])
    else:
        x = nn.conv2d(x, p["proj_in"], padding=0)
        x = x.reshape(n, h * w, x.shape[-1])
    for i in range(layers):
        x = transformer_block(x, ctx, p["transformer_blocks"][str(i)], heads)
    if linear_projection:
        x = nn.linear(x, p["proj_out"]).reshape(n, h, w, c)
    else:
        x = nn.conv2d(x.reshape(n, h, w, x.shape[-1]), p["proj_out"], padding=0)
    return x + res


# --- the model ------------------------------------------------------------------------

def check_inputs(cfg: UNetConfig, b, encoder_hidden_states, added_cond):
    """ValueErrors naming what was expected, for inputs that would otherwise fail deep inside."""
    got = encoder_hidden_states.shape[-1]
    if got != cfg.cross_attention_dim:
        why = ("; SDXL concatenates both text encoders' penultimate states (the refiner takes "
               "text_encoder_2's alone)" if cfg.is_sdxl else "")
        raise ValueError(f"encoder_hidden_states has last dimension {got}: expected {cfg.cross_attention_dim} "
                         f"(the UNet's cross_attention_dim){why}")
    if not cfg.is_sdxl:
        if added_cond is not None:
            raise ValueError("added_cond given to a UNet without SDXL conditioning "
                             f"(addition_embed_type is {cfg.addition_embed_type!r})")
        return
    want = "added_cond={'text_embeds': (B, pooled width), 'time_ids': (B, n)}"
    if not isinstance(added_cond, dict) or {"text_embeds", "time_ids"} - set(added_cond):
        have = "none" if added_cond is None else sorted(added_cond) if isinstance(added_cond, dict) else added_cond
        raise ValueError(f"this SDXL UNet (addition_embed_type 'text_time') needs {want}; got {have}")
    te, ids = added_cond["text_embeds"], added_cond["time_ids"]
    for name, a in (("text_embeds", te), ("time_ids", ids)):
        if len(a.shape) != 2 or a.shape[0] != b:
            raise ValueError(f"added_cond[{name!r}] has shape {tuple(a.shape)}: expected ({b}, n) for a batch of {b}")
    width, n = te.shape[1], ids.shape[1]
    total, per_id = cfg.projection_class_embeddings_input_dim, cfg.addition_time_embed_dim
    if width + n * per_id == total:
        return
    rest = total - width
    if rest > 0 and rest % per_id == 0 and rest // per_id in SDXL_TIME_IDS:
        k = rest // per_id
        raise ValueError(f"time_ids has {n} values per sample: this UNet expects {k} ({SDXL_TIME_IDS[k]})"
                         + (f"; {n} is the form of {SDXL_TIME_IDS[n].split(':')[0]}" if n in SDXL_TIME_IDS else ""))
    raise ValueError(f"text_embeds has width {width}: with {n} time_ids this UNet expects {total - n * per_id} "
                     f"(projection_class_embeddings_input_dim {total} - {n} x addition_time_embed_dim {per_id}; "
                     "the pooled, projected output of text_encoder_2)")


def _added_embedding(params, cfg: UNetConfig, added_cond, dtype):
    """SDXL's "text_time" embedding: [text_embeds, sinusoid of each time id] -> add_embedding."""
    te, ids = added_cond["text_embeds"], added_cond["time_ids"]
    b, n = ids.shape
    t = nn.timestep_embedding(jnp.asarray(ids).reshape(-1), cfg.addition_time_embed_dim,
                              cfg.flip_sin_to_cos, cfg.freq_shift).reshape(b, -1)
    x = jnp.concatenate([jnp.asarray(te).astype(jnp.float32), t], axis=-1).astype(dtype)
    ae = params["add_embedding"]
    return nn.linear(nn.silu(nn.linear(x, ae["linear_1"])), ae["linear_2"])


def _remat_blocks(remat):
    """The (resnet, transformer_2d) an ``apply`` runs: as they are, or each under ``nn.remat``."""
    if not remat:
        return resnet, transformer_2d

    def res(x, p, temb, *static):
        return nn.remat(lambda x, p, temb: resnet(x, p, temb, *static))(x, p, temb)

    def tr(x, ctx, p, *static):
        return nn.remat(lambda x, ctx, p: transformer_2d(x, ctx, p, *static))(x, ctx, p)
    return res, tr


def embed_time(params, cfg: UNetConfig, timesteps, b, dtype, added_cond=None):
    """The time embedding (B, time_embed_dim) of ``timesteps`` (scalar or (B,)), plus SDXL's text_time
    embedding of ``added_cond`` for a text_time config."""
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
    temb = nn.timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    te = params["time_embedding"]
    temb = nn.linear(nn.silu(nn.linear(temb.astype(dtype), te["linear_1"])), te["linear_2"])
    if cfg.is_sdxl:
        temb = temb + _added_embedding(params, cfg, added_cond, dtype)
    return temb


def encode(params, cfg: UNetConfig, x, temb, ctx, blocks=(resnet, transformer_2d)):
    """The down blocks and the mid block, from conv_in's output ``x`` (B, H, W, C0): ``(mid output,
    skips)``, skips being ``x`` and every down resnet/attention and downsampler output, in order.
    The walk a UNet and a ControlNet share; ``blocks`` is the (resnet, transformer_2d) pair to run."""
    resnet, transformer_2d = blocks
    groups, eps, heads, lin = cfg.norm_num_groups, cfg.norm_eps, cfg.heads, cfg.use_linear_projection
    down_depth, mid_depth, _ = cfg.transformer_depths
    skips = [x]
    for i, kind in enumerate(cfg.down_block_types):
        p = params["down_blocks"][str(i)]
        for j in range(cfg.layers[i]):
            x = resnet(x, p["resnets"][str(j)], temb, groups, eps, cfg.resnet_out_scale_factor)
            if kind == "CrossAttnDownBlock2D":
                x = transformer_2d(x, ctx, p["attentions"][str(j)], heads[i], down_depth[i][j], groups, lin)
            skips.append(x)
        if "downsamplers" in p:
            pad = cfg.downsample_padding or ((0, 1), (0, 1))  # diffusers pads right/bottom when 0
            x = nn.conv2d(x, p["downsamplers"]["0"]["conv"], stride=2, padding=pad)
            skips.append(x)

    p = params["mid_block"]
    x = resnet(x, p["resnets"]["0"], temb, groups, eps, cfg.mid_block_scale_factor)
    x = transformer_2d(x, ctx, p["attentions"]["0"], heads[-1], mid_depth, groups, lin)
    x = resnet(x, p["resnets"]["1"], temb, groups, eps, cfg.mid_block_scale_factor)
    return x, skips


def skip_channels(cfg: UNetConfig):
    """[(channels, level)] of each skip ``encode`` returns (level: how many times it was halved),
    then the mid output's: what a ControlNet's residuals must match."""
    ch = cfg.block_out_channels
    out = [(ch[0], 0)]
    for i in range(len(ch)):
        out += [(ch[i], i)] * cfg.layers[i] + ([(ch[i], i + 1)] if i < len(ch) - 1 else [])
    return out + [(ch[-1], len(ch) - 1)]


def apply(params, config: UNetConfig, sample, timesteps, encoder_hidden_states, *, added_cond=None, remat=False,
          down_block_additional_residuals=None, mid_block_additional_residual=None):
    """Noise (or v) prediction.

    sample (B, H, W, in_channels) NHWC; timesteps scalar or (B,); encoder_hidden_states
    (B, L, cross_attention_dim). SDXL UNets (``config.is_sdxl``) also take ``added_cond``
    ``{"text_embeds": (B, P), "time_ids": (B, n)}``: text_encoder_2's pooled, projected output and
    n = ``config.time_ids_length(P)`` micro-conditioning values (6 for base, 5 for the refiner:
    ``configs.SDXL_TIME_IDS``); other UNets take none. Inputs that do not fit the config raise
    ValueError. Returns (B, H, W, out_channels) in the params' dtype. ``remat``: under ``jax.grad``,
    recompute each ResnetBlock2D's and Transformer2DModel's activations in the backward pass instead
    of keeping them (training a full-size UNet; the values are the same).
    ``down_block_additional_residuals`` (one NHWC array per skip, ``skip_channels``) and
    ``mid_block_additional_residual``: a ControlNet's outputs, added to the skips and to the mid
    block's output as diffusers does.
    """
    blocks = _remat_blocks(remat)
    resnet, transformer_2d = blocks
    cfg = config
    dtype = params["conv_in"]["bias"].dtype  # biases are never quantized
    groups, eps = cfg.norm_num_groups, cfg.norm_eps
    heads, layers = cfg.heads, cfg.layers
    _, _, up_depth = cfg.transformer_depths
    lin = cfg.use_linear_projection
    b = sample.shape[0]
    check_inputs(cfg, b, encoder_hidden_states, added_cond)
    x = sample.astype(dtype)
    if cfg.center_input_sample:
        x = 2 * x - 1.0
    ctx = encoder_hidden_states.astype(dtype)
    temb = embed_time(params, cfg, timesteps, b, dtype, added_cond)

    x, skips = encode(params, cfg, nn.conv2d(x, params["conv_in"]), temb, ctx, blocks)
    if down_block_additional_residuals is not None:
        if len(down_block_additional_residuals) != len(skips):
            raise ValueError(f"down_block_additional_residuals: {len(down_block_additional_residuals)} given, "
                             f"this UNet has {len(skips)} skips")
        skips = [s + r.astype(dtype) for s, r in zip(skips, down_block_additional_residuals)]
    if mid_block_additional_residual is not None:
        x = x + mid_block_additional_residual.astype(dtype)

    up_heads, up_layers = heads[::-1], layers[::-1]
    for i, kind in enumerate(cfg.up_block_types):
        p = params["up_blocks"][str(i)]
        for j in range(up_layers[i] + 1):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = resnet(x, p["resnets"][str(j)], temb, groups, eps, cfg.resnet_out_scale_factor)
            if kind == "CrossAttnUpBlock2D":
                x = transformer_2d(x, ctx, p["attentions"][str(j)], up_heads[i], up_depth[i][j], groups, lin)
        if "upsamplers" in p:
            # upsample to the size of the skip it meets next (odd latent sizes round up there)
            size = skips[-1].shape[1:3] if skips else (2 * x.shape[1], 2 * x.shape[2])
            x = nn.conv2d(nn.upsample_nearest(x, size), p["upsamplers"]["0"]["conv"])

    x = nn.silu(nn.group_norm(x, params["conv_norm_out"], groups, eps))
    return nn.conv2d(x, params["conv_out"])


# --- parameters -----------------------------------------------------------------------

def resnet_shapes(s, name, cin, cout, temb_dim):
    _norm(s, f"{name}.norm1", cin)
    _conv(s, f"{name}.conv1", cin, cout)
    if temb_dim:
        _lin(s, f"{name}.time_emb_proj", temb_dim, cout)
    _norm(s, f"{name}.norm2", cout)
    _conv(s, f"{name}.conv2", cout, cout)
    if cin != cout:
        _conv(s, f"{name}.conv_shortcut", cin, cout, k=1)


def _transformer_shapes(s, name, c, ctx_dim, layers, linear_projection):
    _norm(s, f"{name}.norm", c)
    proj = _lin if linear_projection else (lambda s, n, a, b: _conv(s, n, a, b, k=1))
    proj(s, f"{name}.proj_in", c, c)
    for i in range(layers):
        b = f"{name}.transformer_blocks.{i}"
        for n in ("norm1", "norm2", "norm3"):
            _norm(s, f"{b}.{n}", c)
        for attn, kv in (("attn1", c), ("attn2", ctx_dim)):
            _lin(s, f"{b}.{attn}.to_q", c, c, bias=False)
            _lin(s, f"{b}.{attn}.to_k", kv, c, bias=False)
            _lin(s, f"{b}.{attn}.to_v", kv, c, bias=False)
            _lin(s, f"{b}.{attn}.to_out.0", c, c)
        _lin(s, f"{b}.ff.net.0.proj", c, 8 * c)
        _lin(s, f"{b}.ff.net.2", 4 * c, c)
    proj(s, f"{name}.proj_out", c, c)


def encoder_shapes(s, cfg: UNetConfig):
    """Add the shapes of conv_in, the time embeddings, the down and mid blocks to ``s``: the
    parameters a ControlNet shares with its UNet."""
    ch, td, ctx = cfg.block_out_channels, cfg.time_embed_dim, cfg.cross_attention_dim
    layers, lin = cfg.layers, cfg.use_linear_projection
    down_depth, mid_depth, _ = cfg.transformer_depths
    _conv(s, "conv_in", cfg.in_channels, ch[0])
    _lin(s, "time_embedding.linear_1", ch[0], td)
    _lin(s, "time_embedding.linear_2", td, td)
    if cfg.is_sdxl:
        _lin(s, "add_embedding.linear_1", cfg.projection_class_embeddings_input_dim, td)
        _lin(s, "add_embedding.linear_2", td, td)
    cout = ch[0]
    for i, kind in enumerate(cfg.down_block_types):
        cin, cout = cout, ch[i]
        for j in range(layers[i]):
            resnet_shapes(s, f"down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout, td)
            if kind == "CrossAttnDownBlock2D":
                _transformer_shapes(s, f"down_blocks.{i}.attentions.{j}", cout, ctx, down_depth[i][j], lin)
        if i < len(ch) - 1:
            _conv(s, f"down_blocks.{i}.downsamplers.0.conv", cout, cout)
    resnet_shapes(s, "mid_block.resnets.0", ch[-1], ch[-1], td)
    _transformer_shapes(s, "mid_block.attentions.0", ch[-1], ctx, mid_depth, lin)
    resnet_shapes(s, "mid_block.resnets.1", ch[-1], ch[-1], td)
    return s


def param_shapes(config: UNetConfig) -> dict:
    """{dotted diffusers name: shape} of every parameter, in sdjax layout."""
    cfg = config
    s = encoder_shapes({}, cfg)
    ch, td, ctx = cfg.block_out_channels, cfg.time_embed_dim, cfg.cross_attention_dim
    layers, lin = cfg.layers, cfg.use_linear_projection
    _, _, up_depth = cfg.transformer_depths
    rch, rlayers = ch[::-1], layers[::-1]
    prev = rch[0]
    for i, kind in enumerate(cfg.up_block_types):
        cout = rch[i]
        skip_in = rch[min(i + 1, len(ch) - 1)]
        for j in range(rlayers[i] + 1):
            skip = skip_in if j == rlayers[i] else cout
            cin = prev if j == 0 else cout
            resnet_shapes(s, f"up_blocks.{i}.resnets.{j}", cin + skip, cout, td)
            if kind == "CrossAttnUpBlock2D":
                _transformer_shapes(s, f"up_blocks.{i}.attentions.{j}", cout, ctx, up_depth[i][j], lin)
        if i < len(ch) - 1:
            _conv(s, f"up_blocks.{i}.upsamplers.0.conv", cout, cout)
        prev = cout
    _norm(s, "conv_norm_out", ch[0])
    _conv(s, "conv_out", ch[0], cfg.out_channels)
    return s


def init_params(config: UNetConfig, seed: int = 0, dtype="float32"):
    """Random parameters for ``config`` (full-size SD 1.5 and SDXL included)."""
    return make_params(param_shapes(config), seed, dtype)
