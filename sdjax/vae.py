"""AutoencoderKL (the SD VAE) as pure functions, NHWC."""
from __future__ import annotations

import jax.numpy as jnp

from . import nn
from .configs import VAEConfig
from .params import make_params, conv_shape as _conv, linear_shape as _lin, norm_shape as _norm
from .unet import resnet, resnet_shapes

EPS = 1e-6


def _mid_attention(x, p, groups):
    """Single-head self-attention over H*W with GroupNorm and a residual."""
    n, h, w, c = x.shape
    t = nn.group_norm(x, p["group_norm"], groups, EPS).reshape(n, h * w, c)
    q, k, v = nn.linear(t, p["to_q"]), nn.linear(t, p["to_k"]), nn.linear(t, p["to_v"])
    out = nn.linear(nn.attention(q, k, v, 1), p["to_out"]["0"])
    return x + out.reshape(n, h, w, c)


def _mid(x, p, cfg):
    g = cfg.norm_num_groups
    x = resnet(x, p["resnets"]["0"], None, g, EPS)
    if cfg.mid_block_add_attention:
        x = _mid_attention(x, p["attentions"]["0"], g)
    return resnet(x, p["resnets"]["1"], None, g, EPS)


def _dtype(params):
    return params["encoder"]["conv_in"]["bias"].dtype if "encoder" in params \
        else params["decoder"]["conv_in"]["bias"].dtype


def encode(params, config: VAEConfig, images):
    """images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels)."""
    cfg, g = config, config.norm_num_groups
    p = params["encoder"]
    x = nn.conv2d(images.astype(_dtype(params)), p["conv_in"])
    for i in range(len(cfg.block_out_channels)):
        b = p["down_blocks"][str(i)]
        for j in range(cfg.layers_per_block):
            x = resnet(x, b["resnets"][str(j)], None, g, EPS)
        if "downsamplers" in b:  # stride-2 conv after a right/bottom pad, as diffusers
            x = nn.conv2d(x, b["downsamplers"]["0"]["conv"], stride=2, padding=((0, 1), (0, 1)))
    x = _mid(x, p["mid_block"], cfg)
    x = nn.conv2d(nn.silu(nn.group_norm(x, p["conv_norm_out"], g, EPS)), p["conv_out"])
    if cfg.use_quant_conv:
        x = nn.conv2d(x, params["quant_conv"], padding=0)
    mean, logvar = jnp.split(x, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def decode(params, config: VAEConfig, latents):
    """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, 3) in about [-1, 1]."""
    cfg, g = config, config.norm_num_groups
    x = latents.astype(_dtype(params))
    if cfg.use_post_quant_conv:
        x = nn.conv2d(x, params["post_quant_conv"], padding=0)
    p = params["decoder"]
    x = nn.conv2d(x, p["conv_in"])
    x = _mid(x, p["mid_block"], cfg)
    for i in range(len(cfg.block_out_channels)):
        b = p["up_blocks"][str(i)]
        for j in range(cfg.layers_per_block + 1):
            x = resnet(x, b["resnets"][str(j)], None, g, EPS)
        if "upsamplers" in b:
            x = nn.conv2d(nn.upsample_nearest(x, (2 * x.shape[1], 2 * x.shape[2])), b["upsamplers"]["0"]["conv"])
    x = nn.silu(nn.group_norm(x, p["conv_norm_out"], g, EPS))
    return nn.conv2d(x, p["conv_out"])


def _mid_shapes(s, name, c, cfg):
    resnet_shapes(s, f"{name}.resnets.0", c, c, 0)
    if cfg.mid_block_add_attention:
        a = f"{name}.attentions.0"
        _norm(s, f"{a}.group_norm", c)
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            _lin(s, f"{a}.{n}", c, c)
    resnet_shapes(s, f"{name}.resnets.1", c, c, 0)


def param_shapes(config: VAEConfig) -> dict:
    """{dotted diffusers name: shape} of every parameter, in sdjax layout."""
    cfg, s = config, {}
    ch, lat, n = cfg.block_out_channels, cfg.latent_channels, len(cfg.block_out_channels)
    _conv(s, "encoder.conv_in", cfg.in_channels, ch[0])
    cout = ch[0]
    for i in range(n):
        cin, cout = cout, ch[i]
        for j in range(cfg.layers_per_block):
            resnet_shapes(s, f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout, 0)
        if i < n - 1:
            _conv(s, f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout)
    _mid_shapes(s, "encoder.mid_block", ch[-1], cfg)
    _norm(s, "encoder.conv_norm_out", ch[-1])
    _conv(s, "encoder.conv_out", ch[-1], 2 * lat)
    if cfg.use_quant_conv:
        _conv(s, "quant_conv", 2 * lat, 2 * lat, k=1)
    if cfg.use_post_quant_conv:
        _conv(s, "post_quant_conv", lat, lat, k=1)
    rch = ch[::-1]
    _conv(s, "decoder.conv_in", lat, rch[0])
    _mid_shapes(s, "decoder.mid_block", rch[0], cfg)
    cout = rch[0]
    for i in range(n):
        cin, cout = cout, rch[i]
        for j in range(cfg.layers_per_block + 1):
            resnet_shapes(s, f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout, 0)
        if i < n - 1:
            _conv(s, f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout)
    _norm(s, "decoder.conv_norm_out", rch[-1])
    _conv(s, "decoder.conv_out", rch[-1], cfg.out_channels)
    return s


def init_params(config: VAEConfig, seed: int = 0, dtype="float32"):
    """Random parameters for ``config`` (the full SD VAE included)."""
    return make_params(param_shapes(config), seed, dtype)
