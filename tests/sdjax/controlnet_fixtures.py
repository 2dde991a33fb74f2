"""Tiny random diffusers ControlNets for the ControlNet tests: ``ControlNetModel.from_unet`` of a tiny
UNet with noise on every weight, the zero convs and the conditioning embedding's zero conv_out
included (a fresh ControlNet's residuals are all zero, which would hide any mistake)."""
from __future__ import annotations

import numpy as np
import torch


def build_controlnet(unet, folder, seed=0, cond_channels=(8, 16), noise=0.05, **from_unet):
    """A ControlNetModel of ``unet`` (diffusers) saved with ``save_pretrained`` into ``folder``, read back.

    ``cond_channels``: conditioning_embedding_out_channels; its length sets how many times the control
    image is halved (2 levels: once, as the tiny VAEs halve images; 4: 8x, SD's); ``from_unet``: more
    keywords of ``ControlNetModel.from_unet``."""
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(cond_channels), **from_unet)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn_like(p) * noise)
    cn.save_pretrained(folder)
    return ControlNetModel.from_pretrained(folder)


def build_controlnet_one_thread(unet, folder, **kw):
    """``build_controlnet`` with torch on one thread (the Core ML tests' fixtures build theirs so), the
    thread count restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_controlnet(unet, folder, **kw)
    finally:
        torch.set_num_threads(n)


def control_image(h, w, seed=0, block=4):
    """A blocky random RGB PIL image (edges a resize must get right)."""
    from PIL import Image
    g = np.random.default_rng(seed)
    small = (g.random((h // block, w // block, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.NEAREST)


def controlnet_inputs(cfg, seed=0, h=8, w=12, scale=2):
    """Random ControlNet inputs as torch tensors: NCHW latents (2 rows), timesteps, context, and a
    control image ``scale`` times the latent size in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, h, w, generator=g)
    t = torch.tensor([3.0, 741.0])
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    cond = torch.rand(2, cfg.conditioning_channels, h * scale, w * scale, generator=g)
    return x, t, ctx, cond
