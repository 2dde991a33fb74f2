"""The UNet computes the same function as diffusers' UNet2DConditionModel (tiny random configs
saved with save_pretrained, loaded by sdjax, compared on random inputs in float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sdjax
from sdjax import configs, nn, unet
from tiny_models import TOL, in_torch_layout, nchw, nhwc, rel_err, torch_shapes, unet_io

STYLES = ["sd1", "sd2", "inpaint"]

unet_apply = jax.jit(unet.apply, static_argnums=1)


def _sdjax_unet(params, cfg, x, t, ctx):
    return nchw(unet_apply(params, cfg, jnp.asarray(nhwc(x.numpy())), jnp.asarray(t.numpy()),
                           jnp.asarray(ctx.numpy())))


@pytest.mark.parametrize("style", STYLES)
def test_unet_matches_diffusers(pipeline_dirs, style):
    folder, ref = pipeline_dirs(style)
    pipe = sdjax.load(folder, progress=False)
    x, t, ctx = unet_io(pipe.configs["unet"])
    with torch.no_grad():
        want = ref.unet(x, t, ctx).sample.numpy()
    assert rel_err(_sdjax_unet(pipe.params["unet"], pipe.configs["unet"], x, t, ctx), want) <= TOL


def test_unet_odd_latent_size_matches_diffusers(pipeline_dirs):
    # 40x56 latents halve to 20x28, 10x14: fine; 18x26 halves to 9x13 and the upsampler must
    # meet the skip at 18x26 (diffusers' forward_upsample_size path)
    folder, ref = pipeline_dirs("sd2")
    pipe = sdjax.load(folder, progress=False)
    x, t, ctx = unet_io(pipe.configs["unet"], h=18, w=26)
    with torch.no_grad():
        want = ref.unet(x, t, ctx).sample.numpy()
    assert rel_err(_sdjax_unet(pipe.params["unet"], pipe.configs["unet"], x, t, ctx), want) <= TOL


def test_perturbed_weight_fails_the_comparison(pipeline_dirs):
    """The parity measure is sharp enough to see one changed weight."""
    folder, ref = pipeline_dirs("sd1")
    pipe = sdjax.load(folder, progress=False)
    params = jax.tree_util.tree_map(lambda a: a, pipe.params["unet"])
    q = params["down_blocks"]["0"]["attentions"]["0"]["transformer_blocks"]["0"]["attn2"]["to_k"]
    q["weight"] = q["weight"].at[3, 5].add(0.5)
    x, t, ctx = unet_io(pipe.configs["unet"])
    with torch.no_grad():
        want = ref.unet(x, t, ctx).sample.numpy()
    assert rel_err(_sdjax_unet(params, pipe.configs["unet"], x, t, ctx), want) > TOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(pipeline_dirs, dtype):
    folder, _ = pipeline_dirs("sd1")
    p32 = sdjax.load(folder, progress=False)
    ph = sdjax.load(folder, dtype=dtype, progress=False)
    x, t, ctx = unet_io(p32.configs["unet"])
    args = (jnp.asarray(nhwc(x.numpy())), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    out32 = unet_apply(p32.params["unet"], p32.configs["unet"], *args)
    outh = unet_apply(ph.params["unet"], ph.configs["unet"], *args)
    assert outh.dtype == jnp.dtype(dtype)
    assert rel_err(np.asarray(outh, np.float32), out32) < 0.05


# --- full-size shapes, without allocating them -----------------------------------------

SD15_UNET = configs.PRESETS["sd15"]["unet"]
SD21_UNET = configs.PRESETS["sd21"]["unet"]


@pytest.mark.parametrize("kw", [SD15_UNET, SD21_UNET], ids=["sd15", "sd21"])
def test_full_size_unet_param_shapes_match_diffusers(kw):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        ref = UNet2DConditionModel(**kw)
    ours = in_torch_layout(unet.param_shapes(configs.unet_config(dict(ref.config))))
    assert ours == torch_shapes(ref)
    if kw is SD15_UNET:
        assert sum(int(np.prod(s)) for s in ours.values()) == 859_520_964


def test_init_params_is_deterministic_and_matches_shapes():
    cfg = configs.unet_config(dict(block_out_channels=[32, 64], norm_num_groups=8, cross_attention_dim=16,
                                   layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]))
    a, b = unet.init_params(cfg, seed=3), unet.init_params(cfg, seed=3)
    flat_a, flat_b = nn.flatten(a), nn.flatten(b)
    assert {k: v.shape for k, v in flat_a.items()} == unet.param_shapes(cfg)
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
    out = unet.apply(a, cfg, jnp.zeros((1, 16, 16, 4)), 10, jnp.zeros((1, 5, 16)))
    assert out.shape == (1, 16, 16, 4) and bool(jnp.isfinite(out).all())


def test_remat_gives_the_same_values_and_gradients():
    """``apply(..., remat=True)`` (each block recomputed in the backward pass, ``nn.remat``) computes
    the same loss and gradients, and its compiled backward does recompute: more convolutions."""
    cfg = configs.unet_config(dict(block_out_channels=[32, 64], norm_num_groups=8, cross_attention_dim=16,
                                   layers_per_block=1, attention_head_dim=2,
                                   down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]))
    params = unet.init_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4), dtype=np.float32))
    ctx = jnp.asarray(rng.standard_normal((2, 5, 16), dtype=np.float32))

    def loss(p, remat):
        return jnp.sum(jnp.square(unet.apply(p, cfg, x, jnp.array([10.0, 800.0]), ctx, remat=remat)))
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (v0, g0), (v1, g1) = grad(params, False), grad(params, True)
    assert float(v0) == pytest.approx(float(v1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert rel_err(b, a) < 1e-5
    convs = [grad.lower(params, r).compile().as_text().count("convolution(") for r in (False, True)]
    assert convs[1] > convs[0], convs
