"""Images in and out: init images and masks for img2img/inpainting, PNGs with their parameters."""
from __future__ import annotations

import os

import numpy as np

from .files import atomic_save_image, atomic_save_npy


class ImageError(ValueError):
    """An image argument that cannot be used (names it and what was expected)."""


def _to_array(src, what):
    from PIL import Image, UnidentifiedImageError
    if isinstance(src, (str, os.PathLike)):
        try:
            with Image.open(src) as im:
                im.load()
                return im.copy(), str(src)
        except FileNotFoundError:
            raise ImageError(f"{what} {src}: file not found") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{what} {src}: not a readable image ({e})") from None
    return src, what


def load_rgb(src, size=None, what="init image") -> np.ndarray:
    """A path, PIL image or array (H, W, 3; uint8, or float in [0, 1]) -> float32 (H, W, 3) in [0, 1].

    ``size`` = (height, width) the image must have."""
    from PIL import Image
    im, name = _to_array(src, what)
    if isinstance(im, Image.Image):
        a = np.asarray(im.convert("RGB"), np.float32) / 255.0
    else:
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ImageError(f"{name}: expected an (H, W, 3) RGB array, got shape {a.shape}")
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    _check_size(a, size, name)
    return a


def load_mask(src, size=None, what="mask") -> np.ndarray:
    """A path, PIL image or array -> float32 (H, W, 1) of 0 and 1; 1 (white) is repainted.

    Binarised at 0.5, as diffusers' mask processor does."""
    from PIL import Image
    im, name = _to_array(src, what)
    if isinstance(im, Image.Image):
        a = np.asarray(im.convert("L"), np.float32) / 255.0
    else:
        a = np.asarray(im)
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
        if a.ndim == 3 and a.shape[-1] in (1, 3):
            a = a.mean(-1)
        if a.ndim != 2:
            raise ImageError(f"{name}: expected an (H, W) mask, got shape {np.shape(im)}")
    _check_size(a, size, name)
    return (a >= 0.5).astype(np.float32)[..., None]


def _check_size(a, size, name):
    if size is not None and tuple(a.shape[:2]) != tuple(size):
        raise ImageError(f"{name}: is {a.shape[0]}x{a.shape[1]} (height x width), expected "
                         f"{size[0]}x{size[1]}; resize it or pass matching --height/--width")


def to_pil(images):
    """float (B, H, W, 3) in [0, 1] -> list of PIL images (diffusers' rounding)."""
    from PIL import Image
    a = (np.clip(np.asarray(images, np.float32), 0, 1) * 255).round().astype(np.uint8)
    return [Image.fromarray(x) for x in a]


def save_png(image, path, metadata: dict):
    """Write a PIL image as PNG with ``metadata`` as text chunks; atomically (temp name, rename)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(str(k), str(v))
    atomic_save_image(image, path, pnginfo=info)


def save_npy(array, path):
    """Write an array as .npy atomically."""
    atomic_save_npy(path, array)
