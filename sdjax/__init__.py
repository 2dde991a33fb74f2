"""sdjax: Stable Diffusion as pure JAX functions.

    import sdjax
    pipe = sdjax.load("path/to/diffusers-folder-or-file.safetensors")
    pipe.params["unet"], pipe.configs["unet"]
"""
__version__ = "0.1.0"

from .pipeline import Pipeline, load, reference_model_path  # noqa: E402,F401
from . import clip, unet, vae  # noqa: E402,F401
