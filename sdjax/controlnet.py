"""ControlNetModel (SD 1.x / 2.x and SDXL ControlNets) as a pure function, NHWC.

A ControlNet is a copy of its UNet's conv_in, time embedding, down and mid blocks (run by the
same ``unet.encode`` walk) whose input gets the control image's embedding added after conv_in;
each skip and the mid output go through a 1x1 "zero" conv and are scaled by the conditioning
scale. ``unet.apply`` adds them to its own skips and mid output
(``down_block_additional_residuals``, ``mid_block_additional_residual``). Parameter names are
diffusers'.
"""
from __future__ import annotations

import jax.numpy as jnp

from . import nn, unet
from .configs import ControlNetConfig, UNetConfig
from .params import conv_shape as _conv, make_params


def cond_embedding(p, cond):
    """ControlNetConditioningEmbedding: conv-silu, then (conv-silu, stride-2 conv-silu) per level, conv_out."""
    h = nn.silu(nn.conv2d(cond, p["conv_in"]))
    for i in range(len(p.get("blocks", {}))):
        h = nn.silu(nn.conv2d(h, p["blocks"][str(i)], stride=1 + i % 2, padding=1))
    return nn.conv2d(h, p["conv_out"])


def apply(params, config: ControlNetConfig, sample, timesteps, encoder_hidden_states, controlnet_cond, *,
          conditioning_scale=1.0, added_cond=None):
    """The residuals a ControlNet adds to its UNet: ``(down_block_res_samples, mid_block_res_sample)``.

    sample (B, h, w, in_channels) NHWC latents; timesteps scalar or (B,); encoder_hidden_states
    (B, L, cross_attention_dim); controlnet_cond (B, h * downscale, w * downscale,
    conditioning_channels): the control image in [0, 1] (``config.downscale`` image pixels per
    latent pixel: 8 for SD's ControlNets). ``added_cond``: SDXL's ``{"text_embeds", "time_ids"}``
    as ``unet.apply`` takes them, for a text_time ControlNet. ``conditioning_scale`` (a number or a
    traced scalar) multiplies every residual. Returns a tuple of NHWC arrays, one per UNet skip
    (``unet.skip_channels``), and the mid residual, in the params' dtype.
    """
    cfg = config.unet
    dtype = params["conv_in"]["bias"].dtype  # biases are never quantized
    b = sample.shape[0]
    unet.check_inputs(cfg, b, encoder_hidden_states, added_cond)
    want = (b, sample.shape[1] * config.downscale, sample.shape[2] * config.downscale, config.conditioning_channels)
    if tuple(controlnet_cond.shape) != want:
        raise ValueError(f"controlnet_cond has shape {tuple(controlnet_cond.shape)}: expected {want} (NHWC, "
                         f"{config.downscale}x the latent size, conditioning_channels {config.conditioning_channels})")
    cond = controlnet_cond.astype(dtype)
    if config.controlnet_conditioning_channel_order == "bgr":
        cond = cond[..., ::-1]
    ctx = encoder_hidden_states.astype(dtype)
    temb = unet.embed_time(params, cfg, timesteps, b, dtype, added_cond)
    x = nn.conv2d(sample.astype(dtype), params["conv_in"]) + cond_embedding(params["controlnet_cond_embedding"], cond)
    x, skips = unet.encode(params, cfg, x, temb, ctx)
    scale = jnp.asarray(conditioning_scale, dtype)
    down = tuple(nn.conv2d(s, params["controlnet_down_blocks"][str(i)], padding=0) * scale
                 for i, s in enumerate(skips))
    return down, nn.conv2d(x, params["controlnet_mid_block"], padding=0) * scale


def check_fits(config: ControlNetConfig, unet_config: UNetConfig, latent_channels: int, source="controlnet"):
    """ValueError naming what differs when this ControlNet's residuals cannot be added to this UNet's
    skips (block channels, layers, levels), or it reads other inputs (cross-attention width, SDXL's
    text_time conditioning, latent channels)."""
    errs = []
    if config.in_channels != latent_channels:
        errs.append(f"it reads {config.in_channels}-channel latents, the pipeline's are {latent_channels}-channel")
    if config.cross_attention_dim != unet_config.cross_attention_dim:
        errs.append(f"cross_attention_dim {config.cross_attention_dim}, the UNet's is {unet_config.cross_attention_dim}"
                    " (a ControlNet for another model family: SD 1.x 768, SD 2.x 1024, SDXL 2048)")
    if config.is_sdxl != unet_config.is_sdxl:
        errs.append("it takes SDXL's text_time conditioning and the UNet does not" if config.is_sdxl else
                    "the UNet is an SDXL UNet (text_time conditioning) and the ControlNet is not")
    elif config.is_sdxl:
        for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if getattr(config, name) != getattr(unet_config, name):
                errs.append(f"{name} {getattr(config, name)}, the UNet's is {getattr(unet_config, name)}")
    mine, theirs = unet.skip_channels(config.unet), unet.skip_channels(unet_config)
    if mine != theirs:
        def show(c, s):
            return (f"block_out_channels {list(c.block_out_channels)}, layers_per_block {c.layers_per_block}: "
                    f"{len(s) - 1} skips of channels {[ch for ch, _ in s[:-1]]} at levels {[lv for _, lv in s[:-1]]}"
                    f", mid {s[-1][0]}")
        errs.append(f"its residuals do not fit the UNet's skips ({show(config, mine)}; the UNet: "
                    f"{show(unet_config, theirs)})")
    if errs:
        raise ValueError(f"{source}: this ControlNet does not fit the UNet: " + "; ".join(errs))


# --- parameters -----------------------------------------------------------------------

def param_shapes(config: ControlNetConfig) -> dict:
    """{dotted diffusers name: shape} of every parameter, in sdjax layout."""
    cfg = config.unet
    s = unet.encoder_shapes({}, cfg)
    ce = config.conditioning_embedding_out_channels
    _conv(s, "controlnet_cond_embedding.conv_in", config.conditioning_channels, ce[0])
    for i in range(len(ce) - 1):
        _conv(s, f"controlnet_cond_embedding.blocks.{2 * i}", ce[i], ce[i])
        _conv(s, f"controlnet_cond_embedding.blocks.{2 * i + 1}", ce[i], ce[i + 1])
    _conv(s, "controlnet_cond_embedding.conv_out", ce[-1], cfg.block_out_channels[0])
    for i, (ch, _) in enumerate(unet.skip_channels(cfg)[:-1]):
        _conv(s, f"controlnet_down_blocks.{i}", ch, ch, k=1)
    _conv(s, "controlnet_mid_block", cfg.block_out_channels[-1], cfg.block_out_channels[-1], k=1)
    return s


def init_params(config: ControlNetConfig, seed: int = 0, dtype="float32"):
    """Random parameters for ``config`` (its zero convs random too, unlike a fresh diffusers ControlNet)."""
    return make_params(param_shapes(config), seed, dtype)
