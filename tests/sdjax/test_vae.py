"""The VAE computes the same function as diffusers' AutoencoderKL (tiny random configs saved with
save_pretrained, loaded by sdjax, compared on random inputs in float32)."""
import jax.numpy as jnp
import pytest
import torch

import sdjax
from sdjax import configs, vae
from tiny_models import TOL, in_torch_layout, nchw, nhwc, rel_err, torch_shapes


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_vae_matches_diffusers(pipeline_dirs, style):
    folder, ref = pipeline_dirs(style)
    pipe = sdjax.load(folder, progress=False)
    p, cfg = pipe.params["vae"], pipe.configs["vae"]
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    z = torch.randn(2, 4, 16, 24, generator=g)
    with torch.no_grad():
        dist = ref.vae.encode(img).latent_dist
        dec = ref.vae.decode(z).sample.numpy()
    mean, logvar = vae.encode(p, cfg, jnp.asarray(nhwc(img.numpy())))
    assert rel_err(nchw(mean), dist.mean.numpy()) <= TOL
    assert rel_err(nchw(logvar), dist.logvar.numpy()) <= TOL
    assert rel_err(nchw(vae.decode(p, cfg, jnp.asarray(nhwc(z.numpy())))), dec) <= TOL
    assert cfg.scaling_factor == ref.vae.config.scaling_factor
    # pixels per latent pixel, as the diffusers pipeline computes it
    assert cfg.scale_factor == ref.vae_scale_factor


def test_full_size_vae_param_shapes_match_diffusers():
    from diffusers import AutoencoderKL
    vae_kw = configs.PRESETS["sd15"]["vae"]
    with torch.device("meta"):
        ref = AutoencoderKL(**vae_kw)
    cfg = configs.vae_config(dict(ref.config))
    assert in_torch_layout(vae.param_shapes(cfg)) == torch_shapes(ref)
    assert cfg.scale_factor == 8
