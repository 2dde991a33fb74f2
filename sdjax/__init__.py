"""sdjax: Stable Diffusion as pure JAX functions."""
__version__ = "0.1.0"
