"""ControlNet conditioning in the one generation loop, as diffusers' StableDiffusion{,XL}ControlNet{,Img2Img}Pipeline.

``Control`` holds what a run takes: the ControlNets, their control images, conditioning scales and
guidance windows, checked when made. ``prepare`` checks them against the pipeline before any work
and turns them into the loop's traced inputs; ``residuals`` runs every ControlNet inside the guided
step, on the same batch as the UNet (negative and positive rows: diffusers with guess_mode off), and
sums their outputs.

- Control images, as diffusers' control image processor (VaeImageProcessor with do_convert_rgb and
  no normalisation): PIL images resized with Lanczos to the output size, then RGB, in [0, 1];
  arrays (H, W, C) floats in [0, 1] (uint8 is divided by 255) resized by nearest neighbour as
  torch's ``interpolate`` does. The output size defaults to the init image's (img2img) or the
  first control image's, rounded down to a multiple of 8.
- A ControlNet's scale at model call i of N: ``conditioning_scale`` when
  ``start <= i / N`` and ``(i + 1) / N <= end``, else 0 (diffusers' ``controlnet_keep``; N counts
  the calls before an SDXL ``denoising_end`` cut); at 0 it is not run.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from . import controlnet as controlnet_model
from .configs import ControlNetConfig
from .images import ImageError, _to_array


class ControlError(ValueError):
    """Bad ControlNet arguments (names the argument and what was expected)."""


@dataclasses.dataclass(frozen=True)
class Control:
    """ControlNets and their inputs for one run: ``nets`` ((params, ControlNetConfig), ...); per net
    ``images`` (a tuple of one image, or of one per prompt), ``scales``, ``starts`` and ``ends``."""
    nets: tuple
    images: tuple
    scales: tuple
    starts: tuple
    ends: tuple

    @property
    def configs(self):
        return tuple(c for _, c in self.nets)


def _is_net(x):
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], ControlNetConfig)


def _per_net(name, value, n, default):
    """``value`` (a number or one per ControlNet) as a tuple of n floats."""
    value = default if value is None else value
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ControlError(f"{name}: {len(values)} values for {n} ControlNet{'s' * (n > 1)}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
            raise ControlError(f"{name}={value!r}: must be finite numbers")
        out.append(float(v))
    return tuple(out)


def _is_image(x):
    return isinstance(x, (str, os.PathLike, np.ndarray)) or hasattr(x, "convert") and hasattr(x, "size")


def make(controlnet, control_image, conditioning_scale=1.0, guidance_start=0.0, guidance_end=1.0) -> Control | None:
    """A checked ``Control`` from ``Pipeline.generate``'s arguments (None when ``controlnet`` is None).

    ``controlnet``: one (params, ControlNetConfig) pair or a list of them. ``control_image``, as
    diffusers takes it: for one ControlNet an image (path, PIL image, (H, W, C) array), a list with one
    per prompt or an (N, H, W, C) array; for several a list with one such image (or (N, H, W, C) array)
    per ControlNet, or a list with one list per prompt of an image per ControlNet. Scales and guidance
    start/end: a number or one per ControlNet."""
    if controlnet is None:
        if control_image is not None:
            raise ControlError("control_image: given without a controlnet")
        return None
    single = _is_net(controlnet)
    nets = (controlnet,) if single else tuple(controlnet) if isinstance(controlnet, (list, tuple)) else ()
    if not nets or not all(_is_net(n) for n in nets):
        raise ControlError("controlnet: expected a (params, ControlNetConfig) pair (sdjax.load_controlnet) or a "
                           f"list of them; got {type(controlnet).__name__}")
    if control_image is None:
        raise ControlError("control_image: a ControlNet needs a control image")
    n = len(nets)
    listed = isinstance(control_image, (list, tuple))
    if single:
        images = (tuple(control_image) if listed else (control_image,),)
    elif listed and control_image and all(isinstance(row, (list, tuple)) for row in control_image):
        if any(len(row) != n for row in control_image):  # one list per prompt, an image per ControlNet
            raise ControlError(f"control_image: lists of {sorted({len(r) for r in control_image})} images per "
                               f"prompt for {n} ControlNets")
        images = tuple(zip(*control_image))
    elif listed and len(control_image) == n:
        images = tuple((im,) for im in control_image)
    else:
        raise ControlError(f"control_image: {len(control_image) if listed else 1} given for {n} ControlNets (an "
                           "image per ControlNet, or per prompt a list of an image per ControlNet)")
    for ims in images:
        bad = [im for im in ims if not _is_image(im)]
        if bad or not ims:
            raise ControlError(f"control_image: expected a path, a PIL image or an (H, W, C) array; got "
                               f"{type(bad[0]).__name__ if bad else 'an empty list'}")
    scales = _per_net("controlnet_conditioning_scale", conditioning_scale, n, 1.0)
    starts = _per_net("control_guidance_start", guidance_start, n, 0.0)
    ends = _per_net("control_guidance_end", guidance_end, n, 1.0)
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise ControlError(f"control_guidance_start={s}, control_guidance_end={e}: need 0 <= start < end <= 1")
    return Control(nets, images, scales, starts, ends)


# --- control images -------------------------------------------------------------------

def _open(src, what):
    """A PIL image, or a float32 (H, W, C) array in [0, 1] (uint8 / 255)."""
    from PIL import Image
    im, name = _to_array(src, what)
    if isinstance(im, Image.Image):
        return im
    a = np.asarray(im)
    if a.ndim != 3:
        raise ImageError(f"{name}: expected an (H, W, C) array, got shape {a.shape}")
    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ImageError(f"{name}: holds NaN or Inf values")
    return a


def _size(im):
    return (im.height, im.width) if hasattr(im, "height") else tuple(im.shape[:2])


def _nearest(a, size):
    """torch.nn.functional.interpolate(mode="nearest") of (H, W, C) to ``size``: source index
    floor(i * in / out) in float32, as PyTorch computes it."""
    def idx(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
    return a[idx(a.shape[0], size[0])][:, idx(a.shape[1], size[1])]


def _resized(im, size, channels, name):
    """One control image as float32 (height, width, channels) in [0, 1]."""
    if hasattr(im, "convert"):
        from PIL import Image
        if channels != 3:
            raise ImageError(f"{name}: the ControlNet reads {channels}-channel control images; a PIL image "
                             "becomes RGB: pass an (H, W, C) array")
        if _size(im) != tuple(size):
            im = im.resize((size[1], size[0]), resample=Image.LANCZOS)
        return np.asarray(im.convert("RGB"), np.float32) / 255.0
    if im.shape[-1] != channels:
        raise ImageError(f"{name}: has {im.shape[-1]} channels, the ControlNet reads {channels} "
                         "(conditioning_channels)")
    return im if _size(im) == tuple(size) else _nearest(im, size)


def open_images(control: Control):
    """Each control image opened (PIL image or float array): per net a tuple, as ``control.images``, an
    (N, H, W, C) array counting as N images."""
    out = []
    for i, ims in enumerate(control.images):
        name = f"control image {i}" if len(control.images) > 1 else "control image"
        batch = [a for im in ims for a in (im if isinstance(im, np.ndarray) and im.ndim == 4 else [im])]
        out.append(tuple(_open(im, name) for im in batch))
    return tuple(out)


def default_size(opened, init_image, multiple):
    """(height, width) of ``init_image`` if given, else of the first control image (``opened``), each
    rounded down to ``multiple``: the output size diffusers' ControlNet pipelines default to."""
    h, w = _size(_open(init_image, "init image") if init_image is not None else opened[0][0])
    return h - h % multiple, w - w % multiple


# --- into the loop --------------------------------------------------------------------

def check(control: Control, unet_config, latent_channels, source):
    """ControlError naming each ControlNet that does not fit the UNet (``controlnet.check_fits``)."""
    for i, (_, cfg) in enumerate(control.nets):
        try:
            controlnet_model.check_fits(cfg, unet_config, latent_channels, f"controlnet {i}" if len(control.nets) > 1
                                        else "controlnet")
        except ValueError as e:
            raise ControlError(f"{e} ({source})") from None


def keep(control: Control, calls: int, total: int):
    """(calls, nets) float32: each ControlNet's scale at each model call, out of ``total`` calls
    (diffusers' controlnet_keep times the conditioning scale)."""
    i = np.arange(calls, dtype=np.float64)[:, None]
    s, e = np.asarray(control.starts)[None], np.asarray(control.ends)[None]
    on = ~((i / total < s) | ((i + 1) / total > e))
    return (on * np.asarray(control.scales)[None]).astype(np.float32)


def inputs(control: Control, opened, b, size, latent_size, calls, total):
    """The loop's traced ControlNet inputs: {"params", "images" (per net (2B, H, W, C): the negative
    and positive rows), "scales" (calls, nets)}."""
    images = []
    for i, ((_, cfg), ims) in enumerate(zip(control.nets, opened)):
        name = f"control image {i}" if len(opened) > 1 else "control image"
        if len(ims) not in (1, b):
            raise ControlError(f"{name}: {len(ims)} images for {b} prompts (give one, or one per prompt)")
        want = tuple(n * cfg.downscale for n in latent_size)
        if tuple(size) != want:
            raise ControlError(f"{name}: the ControlNet downscales control images {cfg.downscale}x, so "
                               f"{size[0]}x{size[1]} images need {size[0] // cfg.downscale}x{size[1] // cfg.downscale}"
                               f" latents, the VAE's are {latent_size[0]}x{latent_size[1]}")
        a = np.stack([_resized(im, size, cfg.conditioning_channels, name) for im in ims])
        a = np.broadcast_to(a, (b,) + a.shape[1:])
        images.append(jnp.asarray(np.concatenate([a, a])))
    return {"params": tuple(p for p, _ in control.nets), "images": tuple(images),
            "scales": jnp.asarray(keep(control, calls, total))}


def residuals(configs, control, sample, timesteps, context, added_cond, index):
    """The summed residuals of every ControlNet at model call ``index``: the keyword arguments
    ``unet.apply`` takes them as. A ControlNet whose scale is 0 at this call (outside its guidance
    window) is not run: its residuals are zeros (diffusers runs it and multiplies by 0)."""
    down = mid = None
    for i, cfg in enumerate(configs):
        scale = control["scales"][index, i]

        def run(_, i=i, cfg=cfg, scale=scale):
            return controlnet_model.apply(control["params"][i], cfg, sample, timesteps, context, control["images"][i],
                                          conditioning_scale=scale, added_cond=added_cond)

        def skip(_, run=run):
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run, None))
        d, m = jax.lax.cond(scale != 0, run, skip, None)
        down = d if down is None else tuple(a + r for a, r in zip(down, d))
        mid = m if mid is None else mid + m
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
