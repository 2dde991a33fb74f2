"""The models compute the same function as diffusers/transformers (tiny random configs,
saved with save_pretrained, loaded by sdjax, compared on random inputs in float32)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sdjax
from sdjax import clip, configs, nn, unet, vae
from tiny_models import nchw, nhwc, rel_err

TOL = 1e-4  # max|diff| <= 1e-4 x max|ref|
STYLES = ["sd1", "sd2", "inpaint"]

unet_apply = jax.jit(unet.apply, static_argnums=1)


def _unet_io(cfg, seed=0, h=16, w=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, h, w, generator=g)
    t = torch.tensor([3.0, 741.0])
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    return x, t, ctx


def _sdjax_unet(params, cfg, x, t, ctx):
    return nchw(unet_apply(params, cfg, jnp.asarray(nhwc(x.numpy())), jnp.asarray(t.numpy()),
                           jnp.asarray(ctx.numpy())))


@pytest.mark.parametrize("style", STYLES)
def test_unet_matches_diffusers(pipeline_dirs, style):
    folder, ref = pipeline_dirs(style)
    pipe = sdjax.load(folder, progress=False)
    x, t, ctx = _unet_io(pipe.configs["unet"])
    with torch.no_grad():
        want = ref.unet(x, t, ctx).sample.numpy()
    assert rel_err(_sdjax_unet(pipe.params["unet"], pipe.configs["unet"], x, t, ctx), want) <= TOL


def test_unet_odd_latent_size_matches_diffusers(pipeline_dirs):
    # 40x56 latents halve to 20x28, 10x14: fine; 18x26 halves to 9x13 and the upsampler must
    # meet the skip at 18x26 (diffusers' forward_upsample_size path)
    folder, ref = pipeline_dirs("sd2")
    pipe = sdjax.load(folder, progress=False)
    x, t, ctx = _unet_io(pipe.configs["unet"], h=18, w=26)
    with torch.no_grad():
        want = ref.unet(x, t, ctx).sample.numpy()
    assert rel_err(_sdjax_unet(pipe.params["unet"], pipe.configs["unet"], x, t, ctx), want) <= TOL


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


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_clip_matches_transformers(pipeline_dirs, style):
    folder, ref = pipeline_dirs(style)
    pipe = sdjax.load(folder, progress=False)
    ids = ref.tokenizer(["a red circle", "the small blue square of a cat photo"], padding="max_length",
                        max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = ref.text_encoder(ids, output_hidden_states=True)
    last, hidden, pooled = clip.apply(pipe.params["text_encoder"], pipe.configs["text_encoder"],
                                      jnp.asarray(ids.numpy()))
    assert rel_err(last, out.last_hidden_state.numpy()) <= TOL
    assert rel_err(pooled, out.pooler_output.numpy()) <= TOL
    assert len(hidden) == len(out.hidden_states)
    for got, want in zip(hidden, out.hidden_states):
        assert rel_err(got, want.numpy()) <= TOL


def test_perturbed_weight_fails_the_comparison(pipeline_dirs):
    """The parity measure is sharp enough to see one changed weight."""
    folder, ref = pipeline_dirs("sd1")
    pipe = sdjax.load(folder, progress=False)
    params = jax.tree_util.tree_map(lambda a: a, pipe.params["unet"])
    q = params["down_blocks"]["0"]["attentions"]["0"]["transformer_blocks"]["0"]["attn2"]["to_k"]
    q["weight"] = q["weight"].at[3, 5].add(0.5)
    x, t, ctx = _unet_io(pipe.configs["unet"])
    with torch.no_grad():
        want = ref.unet(x, t, ctx).sample.numpy()
    assert rel_err(_sdjax_unet(params, pipe.configs["unet"], x, t, ctx), want) > TOL


def test_chunked_attention_equals_unchunked():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(k1, (2, 300, 32))
    k = jax.random.normal(k2, (2, 77, 32))
    v = jax.random.normal(k3, (2, 77, 32))
    full = nn.attention(q, k, v, heads=4, chunk_elements=1 << 30)
    chunked = nn.attention(q, k, v, heads=4, chunk_elements=64 * 77)  # 64 queries; 300 is no multiple
    assert nn.query_chunk(8, 300, 77, 64 * 77) == 64 and nn.query_chunk(8, 300, 77, 1 << 30) is None
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-5, atol=1e-6)


def test_chunked_attention_never_materialises_full_scores():
    """At 4096 tokens the compiled program holds no (B, heads, 4096, 4096) array."""
    q = jnp.zeros((2, 4096, 320))
    hlo = jax.jit(lambda q: nn.attention(q, q, q, heads=8)).lower(q).as_text()
    c = nn.query_chunk(16, 4096, 4096)
    assert c < 4096 and "4096x4096" not in hlo
    assert f"[{c},4096]" in hlo or f"{c}x4096" in hlo


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(pipeline_dirs, dtype):
    folder, _ = pipeline_dirs("sd1")
    p32 = sdjax.load(folder, progress=False)
    ph = sdjax.load(folder, dtype=dtype, progress=False)
    x, t, ctx = _unet_io(p32.configs["unet"])
    args = (jnp.asarray(nhwc(x.numpy())), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    out32 = unet_apply(p32.params["unet"], p32.configs["unet"], *args)
    outh = unet_apply(ph.params["unet"], ph.configs["unet"], *args)
    assert outh.dtype == jnp.dtype(dtype)
    assert rel_err(np.asarray(outh, np.float32), out32) < 0.05


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0.0, 1.0, 499.0, 999.0])
    for flip, shift in [(True, 0), (False, 1)]:
        want = get_timestep_embedding(t, 320, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
        got = nn.timestep_embedding(jnp.asarray(t.numpy()), 320, flip, shift)
        # one ulp of exp() in the frequencies, times t=999, moves the phase by ~6e-5
        np.testing.assert_allclose(np.asarray(got), want, atol=TOL)


# --- full-size shapes, without allocating them -----------------------------------------

SD15_UNET = configs.PRESETS["sd15"]["unet"]
SD21_UNET = configs.PRESETS["sd21"]["unet"]


def _torch_shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _ours_in_torch_layout(shapes):
    from sdjax.params import sdjax_to_torch
    return {k: sdjax_to_torch(k, np.broadcast_to(np.empty((), bool), s)).shape for k, s in shapes.items()}


@pytest.mark.parametrize("kw", [SD15_UNET, SD21_UNET], ids=["sd15", "sd21"])
def test_full_size_unet_param_shapes_match_diffusers(kw):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        ref = UNet2DConditionModel(**kw)
    ours = _ours_in_torch_layout(unet.param_shapes(configs.unet_config(dict(ref.config))))
    assert ours == _torch_shapes(ref)
    if kw is SD15_UNET:
        assert sum(int(np.prod(s)) for s in ours.values()) == 859_520_964


def test_full_size_vae_and_clip_param_shapes_match():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel
    vae_kw = configs.PRESETS["sd15"]["vae"]
    with torch.device("meta"):
        ref_vae = AutoencoderKL(**vae_kw)
        ref_clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, projection_dim=768))
    assert _ours_in_torch_layout(vae.param_shapes(configs.vae_config(dict(ref_vae.config)))) == _torch_shapes(ref_vae)
    clip_shapes = {k.removeprefix("text_model."): s for k, s in _torch_shapes(ref_clip).items()
                   if not k.endswith("position_ids")}
    assert _ours_in_torch_layout(clip.param_shapes(configs.CLIPConfig())) == clip_shapes


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


# --- configs ---------------------------------------------------------------------------

@pytest.mark.parametrize("option,value", [("class_embed_type", "timestep"), ("resnet_time_scale_shift", "scale_shift"),
                                          ("time_cond_proj_dim", 256), ("addition_embed_type", "text_time")])
def test_unimplemented_unet_option_is_refused_by_name(option, value):
    with pytest.raises(configs.ConfigError, match=option):
        configs.unet_config({option: value}, source="x/unet/config.json")


def test_unknown_block_type_and_option_are_refused():
    with pytest.raises(configs.ConfigError, match="SimpleCrossAttnDownBlock2D"):
        configs.unet_config({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})
    with pytest.raises(configs.ConfigError, match="frobnicate"):
        configs.unet_config({"frobnicate": 1})
    with pytest.raises(configs.ConfigError, match="hidden_act"):
        configs.clip_config({"hidden_act": "relu"})
    # default values of options we do not implement are fine, as diffusers writes them all
    assert configs.unet_config({"class_embed_type": None, "_diffusers_version": "0.42"}).in_channels == 4


@pytest.mark.parametrize("x_shape,w_shape,stride,padding", [
    ((2, 8, 8, 64), (3, 3, 64, 32), 1, ((1, 1), (1, 1))),
    ((2, 9, 7, 64), (3, 3, 64, 32), 2, ((0, 1), (0, 1))),   # VAE downsampler padding, odd sizes
    ((1, 16, 16, 16), (3, 3, 16, 8), 2, ((1, 1), (1, 1))),
    ((2, 16, 16, 64), (1, 1, 64, 32), 1, ((0, 0), (0, 0))),
])
def test_conv_as_matmul_equals_xla_convolution(x_shape, w_shape, stride, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    w = jax.random.normal(jax.random.PRNGKey(1), w_shape)
    want = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert rel_err(nn._conv_as_matmul(x, w, stride, padding), want) < 1e-6
