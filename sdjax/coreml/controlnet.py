"""A ControlNet (``sdjax.controlnet.apply``) as a Core ML ML program, in the interface
apple/ml-stable-diffusion's Swift pipeline runs.

    from sdjax.coreml import controlnet
    controlnet.export(params, config, "controlnet/canny.mlpackage", latent_shape=(64, 64))

Inputs, as ``swift/StableDiffusion/pipeline/ControlNet.swift`` feeds them (and
``torch2coreml.convert_controlnet`` declares them): ``sample`` float32 ``(batch, in_channels, h, w)``,
``timestep`` ``(batch,)``, ``encoder_hidden_states`` ``(batch, cross_attention_dim, 1, 77)`` (as the
UNet's) and ``controlnet_cond`` ``(batch, conditioning_channels, h * d, w * d)``, the control image
in [0, 1], NCHW (Swift: ``planarRGBShapedArray(minValue: 0.0, maxValue: 1.0)`` of the CGImage,
stacked twice for the guided batch), ``d`` the ControlNet's ``downscale`` (8 for SD's). Outputs
``additional_residual_0 .. _N`` (``torch2coreml``'s ``output_keys``): one residual per UNet skip
and the mid block's last, the names of the ControlledUnet's inputs (``unet.residual_shapes``):
Swift sums each name over its ControlNets (``ControlNet.execute``) and hands the sums to the
ControlledUnet by name.

The conditioning scale is 1: neither Apple's converter (its ControlNetModel has no scale) nor the
Swift pipeline (no scale input or multiplication) has one, so the outputs are
``sdjax.controlnet.apply(..., conditioning_scale=1.0)``'s. Apple's pipeline also has no guess mode
and no guidance window (every step runs every ControlNet).

Inside: the conditioning embedding on NCHW (``bgr`` ControlNets reverse the image's channels
with a ``gather`` first, as ``sdjax.controlnet.apply`` does), added to conv_in's output, then the
UNet builder's own down and mid walk (``unet.encoder_stages``, its time embedding and layout),
then a 1x1 "zero" conv per skip and for the mid block.

SDXL ControlNets (``text_time``), which Apple's tools do not convert: the XL UNet's two extra
inputs as well, ``time_ids`` ``(batch, n)`` and ``text_embeds`` ``(batch, P)`` (``unet.build``'s
``text_embeds_dim``). Apple's Swift SDXL pipeline runs no ControlNet (its CLI refuses
``--controlnet`` with ``--xl``); the packages are for an app's own loop.
"""
from __future__ import annotations

import numpy as np

from . import mil
from . import unet as cunet
from .text_encoder import export_program, opset

DIR = "controlnet"  # StableDiffusionPipeline+Resources.swift: controlnet/<name>.mlmodelc


def _mb():
    from coremltools.converters.mil import Builder as mb
    return mb


def _cond_embedding(cond, p, bgr, dtype):
    """``sdjax.controlnet.cond_embedding`` on NCHW: conv-silu, (conv-silu, stride-2 conv-silu) per
    level, conv_out (3x3 'same' convs; the strided ones halve even sizes, as torch's padding 1)."""
    mb = _mb()
    if bgr:
        c = int(cond.shape[1])
        cond = mb.gather(x=cond, indices=np.arange(c - 1, -1, -1, dtype=np.int32), axis=1, name="cond_bgr")
    h = mb.silu(x=mil.conv2d(cond, p["conv_in"], "cond_conv_in", dtype), name="cond_act_in")
    for i in range(len(p.get("blocks", {}))):
        h = mil.conv2d(h, p["blocks"][str(i)], f"cond_block{i}", dtype, stride=1 + i % 2, pad=1)
        h = mb.silu(x=h, name=f"cond_act{i}")
    return mil.conv2d(h, p["conv_out"], "cond_conv_out", dtype)


def input_specs(config, batch=2, latent_shape=(64, 64), context_len=77, text_embeds_dim=None) -> dict:
    """``{input name: shape}`` of the ControlNet program (module docstring)."""
    specs, (h, w) = cunet.input_specs(config.unet, batch, latent_shape, context_len, text_embeds_dim)
    d = config.downscale
    cond = {"controlnet_cond": (batch, config.conditioning_channels, h * d, w * d)}
    head = {k: specs[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    return head | cond | {k: v for k, v in specs.items() if k not in head}  # Apple's four, then SDXL's


def build(params, config, batch=2, latent_shape=(64, 64), context_len=77, attention="split_einsum_v2",
          dtype="float32", target=None, text_embeds_dim=None):
    """MIL Program computing ``sdjax.controlnet.apply(params, config, sample NHWC, timestep, context,
    controlnet_cond NHWC, conditioning_scale=1.0, added_cond=...)``: its residuals as the outputs
    ``additional_residual_i`` (NCHW). ``latent_shape`` (h, w) of the latents (a ControlNet config
    has no sample_size); other arguments as ``unet.build``'s (``text_embeds_dim`` for SDXL's)."""
    mb = _mb()
    cfg = config.unet
    cunet.check_config(cfg)
    dtype = mil.tables_dtype(dtype)
    if attention not in mil.ATTENTION_MODES:
        raise ValueError(f"attention {attention!r}; supported: {mil.ATTENTION_MODES}")
    specs = input_specs(config, batch, latent_shape, context_len, text_embeds_dim)
    bgr = config.controlnet_conditioning_channel_order == "bgr"

    def stem(s, ctx):
        cunet.embed_time(s, params, cfg, dtype)
        x = mil.conv2d(s["x"], params["conv_in"], "conv_in", dtype)
        e = _cond_embedding(s["cond"], params["controlnet_cond_embedding"], bgr, dtype)
        s["x"] = mb.add(x=x, y=e, name="conv_in_cond")
        s["skips"].append(s["x"])

    stem_params = {k: params[k] for k in ("time_embedding", "add_embedding", "conv_in", "controlnet_cond_embedding")
                   if k in params}
    stages = cunet.encoder_stages(params, cfg, attention, dtype, cunet.Stage("conv_in", stem_params, stem))

    def body(a):
        s = dict(cunet.initial_state(a), cond=a["controlnet_cond"])
        for st in stages:
            st.fn(s, a["encoder_hidden_states"])
        zero = params["controlnet_down_blocks"]
        if len(s["skips"]) != len(zero):
            raise ValueError(f"{len(s['skips'])} skips for {len(zero)} controlnet_down_blocks")
        outs = [mil.conv2d(v, zero[str(i)], cunet.residual_name(i), dtype, pad=0) for i, v in enumerate(s["skips"])]
        return outs + [mil.conv2d(s["x"], params["controlnet_mid_block"], cunet.residual_name(len(outs)), dtype,
                                  pad=0)]
    return mil.program(specs, body, opset(target))


def export(params, config, path, compute_precision="float32", minimum_deployment_target=None,
           overwrite=False, **build_kw):
    """Build, convert and save the ControlNet to ``path`` (an .mlpackage); returns the path.
    ``build_kw``: ``build``'s batch, latent_shape, context_len, attention, text_embeds_dim. As
    ``unet.export``: default target iOS16, refuses an existing ``path`` unless ``overwrite``,
    never leaves a half-written package at ``path``."""
    if "dtype" in build_kw:
        raise TypeError("dtype follows compute_precision; do not pass it")
    return export_program(lambda tables, target: build(params, config, dtype=tables, target=target, **build_kw),
                          path, compute_precision, minimum_deployment_target, overwrite)
