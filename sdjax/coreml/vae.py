"""The AutoencoderKL decoder (``sdjax.vae.decode``) and encoder (``sdjax.vae.encode``) as Core ML
ML programs.

    from sdjax.coreml import vae
    vae.export_decoder(pipe.params["vae"], pipe.configs["vae"], "VAEDecoder.mlpackage",
                       compute_precision="float16")
    vae.export_encoder(pipe.params["vae"], pipe.configs["vae"], "VAEEncoder.mlpackage",
                       compute_precision="float16")

Decoder
-------

Input ``z`` float32 ``(1, latent_channels, h, w)`` (NCHW), output ``image`` ``(1, out_channels,
h*f, w*f)`` in about [-1, 1] (f = ``VAEConfig.scale_factor``), the names
apple/ml-stable-diffusion's Swift package reads.

Scaling convention: apple/ml-stable-diffusion's Swift ``Decoder`` divides the latents by a fixed
0.18215 (SD's scaling factor) before calling the model, and ``torch2coreml.convert_vae_decoder``
exports ``decoder(post_quant_conv(z))``. So the program's input is ``z = latents / 0.18215`` and
for a VAE with another ``scaling_factor`` (the embedded model's is 0.599) it first multiplies by
``0.18215 / scaling_factor``: the package then decodes right in the Swift pipeline, and
``run(z=latents / 0.18215)`` equals ``sdjax.vae.decode(latents / scaling_factor)``. For SD
(0.18215) nothing is added.

SDXL: apple/ml-stable-diffusion's Swift CLI sets both scale factors to 0.13025 for an XL pipeline
(``StableDiffusionCLI/main.swift``: ``scaleFactor = 0.13025`` with ``--xl``), and Apple's converted
SDXL decoder is ``decoder(post_quant_conv(z))`` as for SD. So ``sdjax export-coreml`` builds an SDXL
pipeline's VAE packages for ``swift_scaling_factor=SWIFT_XL_SCALING_FACTOR`` (0.13025: input
``z = latents / 0.13025``), which for SDXL's own VAE (``scaling_factor`` 0.13025) adds nothing, and
the rescaling below uses that factor in place of 0.18215. Apple converts SDXL's VAE in float32
(``torch2coreml.convert_vae_decoder/encoder``: ``compute_precision=FLOAT32`` for ``xl_version``
without a custom VAE), since SDXL's VAE overflows float16 (diffusers marks it ``force_upcast``);
``sdjax.coreml.export`` does the same when the VAE config's ``force_upcast`` is true.

Encoder
-------
Input ``x`` float32 ``(1, in_channels, H, W)`` (NCHW RGB in [-1, 1], H and W multiples of f),
output ``latent`` ``(1, 2 * latent_channels, H/f, W/f)``: the Gaussian's moments, mean channels
first, then log-variance, as ``torch2coreml.convert_vae_encoder`` exports them
(``quant_conv(encoder(x))``, input "x", output "latent"). apple/ml-stable-diffusion's Swift
``Encoder.encode`` (swift/StableDiffusion/pipeline/Encoder.swift) feeds the one input, found by
``inputDescriptionsByName.first`` and shape-checked against the image's planar RGB
``[1, 3, H, W]`` in [-1, 1]; it reads the first output and, as diffusers'
DiagonalGaussianDistribution, takes ``mean = out[0][0..<4]`` and ``logvar = out[0][4..<8]``
(four latent channels hard-coded), clamps logvar to [-30, 20], draws
``latent = mean + exp(logvar / 2) * N(0, 1)`` and multiplies it by ``scaleFactor``, the
configuration's ``encoderScaleFactor`` (default 0.18215, like ``decoderScaleFactor``).

Scaling convention, the counterpart of the decoder's: the package is made for the Swift
pipeline's default factor 0.18215, so Swift's ``0.18215 * sample`` must be the latents the model
wants, ``scaling_factor * sample_true``. With ``r = scaling_factor / 0.18215`` the program outputs
``r * mean`` and ``logvar + 2 ln r`` (so ``exp(logvar / 2)`` is ``r * std``): a draw from that
Gaussian times 0.18215 is a draw from the model's own times ``scaling_factor``, exactly what
diffusers' ``latent_dist.sample() * scaling_factor`` gives (for the embedded model, r = 3.29).
The logvar half is clamped to [-30, 20] in the program first (``sdjax.vae.encode``'s moments
exactly, then the shift), so ``latent`` is ``concat(r * mean, logvar + 2 ln r)`` of
``sdjax.vae.encode`` transposed to NCHW; for SD (r = 1) nothing but that clamp (which the Swift
clamp repeats) is added to Apple's ``quant_conv(encoder(x))``. The only departure for r != 1
is Swift's own clamp, now applied to the shifted logvar: on top of [-30, 20] it limits the
model's logvar to [-30 - 2 ln r, 20 - 2 ln r] (an upper bound of 17.6 for the embedded model,
a std of e^8.8: never met in practice).
Keep ``encoderScaleFactor`` at its default with such a package (setting it to the model's factor
as well would scale twice). The downsamplers are diffusers' stride-2 3x3 convs after a zero pad
of one row at the bottom and one column at the right (``pad=[0, 1, 0, 1]``).

Inside, activations are NCHW: convs take OIHW weights transposed from sdjax's HWIO on the stored
data (``mil.weight(..., perm=(3, 2, 0, 1))``: quantized weights stay constexpr with sdjax's
LUT), GroupNorm is a reshape to ``(B, G, C/G * H * W)`` + ``layer_norm`` over the last axis (no
affine) + per-channel scale and shift, the mid-block attention reshapes to the Neural Engine
layout ``(B, C, 1, H*W)`` for ``mil.linear_as_conv`` / ``mil.attention`` (one head).
"""
from __future__ import annotations


import numpy as np

from . import mil

SWIFT_SCALING_FACTOR = 0.18215  # what apple/ml-stable-diffusion's Decoder.swift divides latents by
SWIFT_XL_SCALING_FACTOR = 0.13025  # what Apple's Swift CLI sets for SDXL (decoder and encoder)
from .text_encoder import export_program, opset

EPS = 1e-6  # sdjax.vae.EPS


def default_latent_shape(config):
    """(h, w) of the latents for the VAE's own ``sample_size`` (16x16 for the reference model,
    64x64 for SD 1.x's 512-pixel VAE)."""
    f = config.scale_factor
    size = config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any(int(d) % f for d in hw):
        raise ValueError(f"VAE sample_size {size!r} is not a multiple of the scale factor {f}")
    return int(hw[0]) // f, int(hw[1]) // f


def _gn_silu(x, p, groups, name):
    from coremltools.converters.mil import Builder as mb
    return mb.silu(x=mil.group_norm(x, p, groups, EPS, name), name=name + "_act")


def _resnet(x, p, groups, name, dtype):
    """``sdjax.unet.resnet`` without a time embedding."""
    from coremltools.converters.mil import Builder as mb
    h = mil.conv2d(_gn_silu(x, p["norm1"], groups, name + "_norm1"), p["conv1"], name + "_conv1", dtype)
    h = mil.conv2d(_gn_silu(h, p["norm2"], groups, name + "_norm2"), p["conv2"], name + "_conv2", dtype)
    if "conv_shortcut" in p:
        x = mil.conv2d(x, p["conv_shortcut"], name + "_shortcut", dtype, pad=0)
    return mb.add(x=x, y=h, name=name)


def _mid_attention(x, p, groups, name, dtype, mode):
    """``sdjax.vae._mid_attention``: GroupNorm, single-head attention over H*W tokens, residual."""
    from coremltools.converters.mil import Builder as mb
    b, c, h, w = (int(d) for d in x.shape)
    t = mil.group_norm(x, p["group_norm"], groups, EPS, name + "_gn")
    t = mb.reshape(x=t, shape=[b, c, 1, h * w], name=name + "_bc1s")
    q, k, v = (mil.linear_as_conv(t, p[m]["weight"], p[m].get("bias"), f"{name}_{m}", dtype)
               for m in ("to_q", "to_k", "to_v"))
    o = mil.attention(q, k, v, 1, mode=mode, name=name + "_attn")
    po = p["to_out"]["0"]
    o = mil.linear_as_conv(o, po["weight"], po.get("bias"), name + "_to_out", dtype)
    o = mb.reshape(x=o, shape=[b, c, h, w], name=name + "_bchw")
    return mb.add(x=x, y=o, name=name)


def _mid(x, p, cfg, name, dtype, mode):
    g = cfg.norm_num_groups
    x = _resnet(x, p["resnets"]["0"], g, name + "_res0", dtype)
    if cfg.mid_block_add_attention:
        x = _mid_attention(x, p["attentions"]["0"], g, name + "_attn0", dtype, mode)
    return _resnet(x, p["resnets"]["1"], g, name + "_res1", dtype)


def build_decoder(params, config, latent_shape=None, dtype="float32", attention="original", target=None,
                  swift_scaling_factor=SWIFT_SCALING_FACTOR):
    """MIL Program computing ``sdjax.vae.decode(params, config, latents / scaling_factor)``
    (transposed to NCHW) from the input ``z = latents / 0.18215`` the Swift package feeds, of
    shape ``(1, latent_channels, *latent_shape)`` (see the module docstring).

    latent_shape: (h, w), default ``default_latent_shape(config)``.
    dtype: the float type quantization tables are written in ("float32" for a float32 export,
    "float16" for a float16 one; see ``export_decoder``).
    attention: ``mil.ATTENTION_MODES`` for the mid-block attention ("original", as Apple's
    exported decoder; "split_einsum_v2" chunks the H*W queries by 512).
    target: the ``ct.target`` whose opset the program uses (``text_encoder.opset``).
    swift_scaling_factor: the factor the Swift pipeline divides latents by (0.18215, or
    ``SWIFT_XL_SCALING_FACTOR`` for SDXL; module docstring)."""
    from coremltools.converters.mil import Builder as mb

    dtype = mil.tables_dtype(dtype)
    if attention not in mil.ATTENTION_MODES:
        raise ValueError(f"attention {attention!r}; supported: {mil.ATTENTION_MODES}")
    cfg = config
    h, w = default_latent_shape(cfg) if latent_shape is None else (int(d) for d in latent_shape)
    g = cfg.norm_num_groups

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, cfg.latent_channels, h, w))],
                opset_version=opset(target))
    def prog(z):
        x = z
        if swift_scaling_factor != cfg.scaling_factor:  # z = latents / 0.18215, the Swift Decoder's division
            x = mb.mul(x=x, y=np.float32(swift_scaling_factor / cfg.scaling_factor), name="rescale")
        if cfg.use_post_quant_conv:
            x = mil.conv2d(x, params["post_quant_conv"], "post_quant_conv", dtype, pad=0)
        p = params["decoder"]
        x = mil.conv2d(x, p["conv_in"], "conv_in", dtype)
        x = _mid(x, p["mid_block"], cfg, "mid", dtype, attention)
        for i in range(len(cfg.block_out_channels)):
            b = p["up_blocks"][str(i)]
            for j in range(cfg.layers_per_block + 1):
                x = _resnet(x, b["resnets"][str(j)], g, f"up{i}_res{j}", dtype)
            if "upsamplers" in b:
                x = mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=2,
                                                 name=f"up{i}_upsample")
                x = mil.conv2d(x, b["upsamplers"]["0"]["conv"], f"up{i}_upconv", dtype)
        x = _gn_silu(x, p["conv_norm_out"], g, "norm_out")
        return mil.conv2d(x, p["conv_out"], "image", dtype)

    return prog


def export_decoder(params, config, path, compute_precision="float32", minimum_deployment_target=None,
                   overwrite=False, latent_shape=None, attention="original", swift_scaling_factor=SWIFT_SCALING_FACTOR):
    """Build, convert and save the VAE decoder to ``path`` (an .mlpackage); returns the path.

    As ``text_encoder.export``: default target iOS16, refuses an existing ``path`` unless
    ``overwrite``, never leaves a half-written package at ``path``."""
    return export_program(lambda tables, target: build_decoder(params, config, latent_shape=latent_shape, dtype=tables,
                                                               attention=attention, target=target,
                                                               swift_scaling_factor=swift_scaling_factor),
                          path, compute_precision, minimum_deployment_target, overwrite)


LOGVAR_RANGE = (-30.0, 20.0)  # sdjax.vae.encode's clamp, also Encoder.swift's


def default_image_shape(config):
    """(H, W) of the images the VAE was made for: ``default_latent_shape`` times the scale
    factor (64x64 for the reference model, 512x512 for SD 1.x)."""
    f = config.scale_factor
    return tuple(d * f for d in default_latent_shape(config))


def build_encoder(params, config, image_shape=None, dtype="float32", attention="original", target=None,
                  swift_scaling_factor=SWIFT_SCALING_FACTOR):
    """MIL Program computing ``sdjax.vae.encode(params, config, x)``'s moments (transposed to NCHW,
    concatenated on channels as ``latent``) rescaled for the Swift pipeline's fixed 0.18215: see
    the module docstring. The input ``x`` is ``(1, in_channels, *image_shape)`` in [-1, 1].

    image_shape: (H, W), multiples of the VAE's scale factor; default ``default_image_shape(config)``.
    dtype, attention, target, swift_scaling_factor: as ``build_decoder`` (the factor Swift
    multiplies the sample by, in place of 0.18215 below)."""
    from coremltools.converters.mil import Builder as mb

    dtype = mil.tables_dtype(dtype)
    if attention not in mil.ATTENTION_MODES:
        raise ValueError(f"attention {attention!r}; supported: {mil.ATTENTION_MODES}")
    cfg = config
    f = cfg.scale_factor
    h, w = default_image_shape(cfg) if image_shape is None else (int(d) for d in image_shape)
    if h % f or w % f or h <= 0 or w <= 0:
        raise ValueError(f"image shape {(h, w)} is not a positive multiple of the VAE scale factor {f}")
    g = cfg.norm_num_groups
    r = cfg.scaling_factor / swift_scaling_factor

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, cfg.in_channels, h, w))],
                opset_version=opset(target))
    def prog(x):
        p = params["encoder"]
        t = mil.conv2d(x, p["conv_in"], "conv_in", dtype)
        for i in range(len(cfg.block_out_channels)):
            b = p["down_blocks"][str(i)]
            for j in range(cfg.layers_per_block):
                t = _resnet(t, b["resnets"][str(j)], g, f"down{i}_res{j}", dtype)
            if "downsamplers" in b:  # diffusers pads one row at the bottom and one column at the right
                t = mil.conv2d(t, b["downsamplers"]["0"]["conv"], f"down{i}_downconv", dtype,
                               stride=2, pad=[0, 1, 0, 1])
        t = _mid(t, p["mid_block"], cfg, "mid", dtype, attention)
        t = _gn_silu(t, p["conv_norm_out"], g, "norm_out")
        t = mil.conv2d(t, p["conv_out"], "conv_out", dtype)
        if cfg.use_quant_conv:
            t = mil.conv2d(t, params["quant_conv"], "quant_conv", dtype, pad=0)
        mean, logvar = mb.split(x=t, num_splits=2, axis=1, name="moments")
        lo, hi = LOGVAR_RANGE
        logvar = mb.minimum(x=mb.maximum(x=logvar, y=np.float32(lo), name="logvar_lo"),
                            y=np.float32(hi), name="logvar_clamped")
        if r != 1:  # Swift multiplies by 0.18215: hand it the model's Gaussian scaled by r
            mean = mb.mul(x=mean, y=np.float32(r), name="mean_rescaled")
            logvar = mb.add(x=logvar, y=np.float32(2 * np.log(r)), name="logvar_rescaled")
        return mb.concat(values=[mean, logvar], axis=1, name="latent")

    return prog


def export_encoder(params, config, path, compute_precision="float32", minimum_deployment_target=None,
                   overwrite=False, image_shape=None, attention="original", swift_scaling_factor=SWIFT_SCALING_FACTOR):
    """Build, convert and save the VAE encoder to ``path`` (an .mlpackage, VAEEncoder.mlpackage for
    the Swift package); returns the path. As ``export_decoder``."""
    return export_program(lambda tables, target: build_encoder(params, config, image_shape=image_shape, dtype=tables,
                                                               attention=attention, target=target,
                                                               swift_scaling_factor=swift_scaling_factor),
                          path, compute_precision, minimum_deployment_target, overwrite)
