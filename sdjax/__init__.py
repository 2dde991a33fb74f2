"""sdjax: Stable Diffusion as pure JAX functions.

    import sdjax
    pipe = sdjax.load("path/to/diffusers-folder-or-file.safetensors")
    pipe.params["unet"], pipe.configs["unet"]

The pipeline (``load``, ``Pipeline``, ``reference_model_path``) is imported on first use, so
importing a model-core module (``from sdjax import nn``) does not load the pipeline above it.
"""
from .version import __version__  # noqa: F401

_PIPELINE_NAMES = ("Pipeline", "load", "load_controlnet", "reference_model_path")
_MODULES = ("clip", "controlnet", "unet", "vae")


def __getattr__(name):
    import importlib
    if name in _PIPELINE_NAMES:
        return getattr(importlib.import_module(".pipeline", __name__), name)
    if name in _MODULES:
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PIPELINE_NAMES) + list(_MODULES))
