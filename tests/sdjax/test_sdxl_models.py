"""SDXL's model functions against diffusers/transformers in float32: the UNet with "text_time"
conditioning (base: 6 time ids, refiner: 5 with the aesthetic score), per-block and per-layer
transformer depths, CLIPTextModelWithProjection (text_encoder_2), the full-size shapes of the
"sdxl" preset, and the clear errors for inputs that do not fit the config.

Params come straight from the torch modules (``tiny_models.params_from_torch``): loading SDXL
folders through ``sdjax.load`` is tested with the checkpoint code."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import clip, configs, nn, unet, vae
from tiny_models import (SDXL_STYLES, TOL, in_torch_layout, nchw, nhwc, params_from_torch, rel_err,
                         torch_shapes, unet_io)

unet_apply = jax.jit(unet.apply, static_argnums=1)

# micro-conditioning as SDXL's pipelines build it: original size, crop top-left, then target size
# (base) or aesthetic score (refiner)
TIME_IDS = {6: [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 64.0, 32.0, 1024.0, 1024.0]],
            5: [[1024.0, 1024.0, 0.0, 0.0, 6.0], [768.0, 1344.0, 64.0, 32.0, 2.5]]}


def added_cond(text_dim, n, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return {"text_embeds": torch.randn(2, text_dim, generator=g), "time_ids": torch.tensor(TIME_IDS[n])}


def run_both(ref_unet, params, cfg, cond, h=16, w=24):
    """(sdjax, diffusers) outputs, NCHW, on the same random inputs."""
    x, t, ctx = unet_io(cfg, h=h, w=w)
    with torch.no_grad():
        want = ref_unet(x, t, ctx, added_cond_kwargs=cond).sample.numpy()
    got = unet_apply(params, cfg, jnp.asarray(nhwc(x.numpy())), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()),
                     added_cond={k: jnp.asarray(v.numpy()) for k, v in cond.items()})
    return nchw(got), want


def sdxl_unet(pipeline_dirs, style):
    _, ref = pipeline_dirs(style)
    return ref, params_from_torch(ref.unet), configs.unet_config(dict(ref.unet.config))


# --- UNet parity ------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["sdxl", "sdxl-refiner"])
def test_sdxl_unet_matches_diffusers(pipeline_dirs, style):
    ref, params, cfg = sdxl_unet(pipeline_dirs, style)
    n, width = SDXL_STYLES[style]["time_ids"], SDXL_STYLES[style]["clip_2"]["projection_dim"]
    assert cfg.is_sdxl and cfg.time_ids_length(width) == n
    got, want = run_both(ref.unet, params, cfg, added_cond(width, n))
    assert rel_err(got, want) <= TOL


def test_asymmetric_transformer_depths_match_diffusers():
    """Per-layer transformer counts with reverse_transformer_layers_per_block (SSD-1B style): the up
    blocks take the reverse list, the mid block the first count of the last down block's list."""
    from diffusers import UNet2DConditionModel
    kw = dict(SDXL_STYLES["sdxl"]["unet"], transformer_layers_per_block=[1, [2, 1]],
              reverse_transformer_layers_per_block=[[1, 3, 2], 1], block_out_channels=(16, 32),
              cross_attention_dim=24, projection_class_embeddings_input_dim=6 * 8 + 12)
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = configs.unet_config(dict(ref.config))
    assert cfg.transformer_depths == (((0, 0), (2, 1)), 2, ((1, 3, 2), (0, 0, 0)))
    assert in_torch_layout(unet.param_shapes(cfg)) == torch_shapes(ref)
    got, want = run_both(ref, params_from_torch(ref), cfg, added_cond(12, 6), h=8, w=12)
    assert rel_err(got, want) <= TOL


def test_perturbed_add_embedding_fails_the_comparison(pipeline_dirs):
    """The measure sees one changed weight of the added embedding (the path no SD 1.x test covers)."""
    ref, params, cfg = sdxl_unet(pipeline_dirs, "sdxl")
    w = params["add_embedding"]["linear_1"]["weight"]
    params["add_embedding"]["linear_1"]["weight"] = w.at[-3, 5].add(0.5)  # a time-id input row
    got, want = run_both(ref.unet, params, cfg, added_cond(40, 6))
    assert rel_err(got, want) > TOL


# --- text encoders ----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["text_encoder", "text_encoder_2"])
def test_sdxl_text_encoders_match_transformers(pipeline_dirs, which):
    _, ref = pipeline_dirs("sdxl")
    model, tok = getattr(ref, which), ref.tokenizer if which == "text_encoder" else ref.tokenizer_2
    ids = tok(["a red circle", "the small blue square of a cat photo"], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids
    pad = 0 if which == "text_encoder_2" else tok.eos_token_id  # "!" vs <|endoftext|>, as SDXL pads
    assert int(ids[0, -1]) == pad and model.config.eos_token_id == 2  # transformers' argmax pooling
    cfg = configs.clip_config(model.config.to_dict())
    assert cfg.with_projection == (which == "text_encoder_2")
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    last, hidden, pooled = clip.apply(params_from_torch(model, "text_model."), cfg, jnp.asarray(ids.numpy()))
    assert rel_err(last, out.last_hidden_state.numpy()) <= TOL
    want = out.text_embeds if cfg.with_projection else out.pooler_output
    assert pooled.shape == tuple(want.shape) and rel_err(pooled, want.numpy()) <= TOL
    assert len(hidden) == len(out.hidden_states)
    for got, want in zip(hidden, out.hidden_states):
        assert rel_err(got, want.numpy()) <= TOL


def test_clip_with_projection_config_round_trips_through_transformers(pipeline_dirs, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    folder, ref = pipeline_dirs("sdxl")
    cfg = configs.read("text_encoder_2", f"{folder}/text_encoder_2/config.json")
    assert cfg.with_projection and cfg.projection_dim == ref.text_encoder_2.config.projection_dim
    d = configs.to_dict(cfg)
    assert d["architectures"] == ["CLIPTextModelWithProjection"] and "with_projection" not in d
    assert configs.clip_config(json.loads(json.dumps(d))) == cfg
    (tmp_path / "config.json").write_text(json.dumps(d))
    with torch.device("meta"):
        again = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(tmp_path))
    assert torch_shapes(again) == torch_shapes(ref.text_encoder_2)
    plain = configs.to_dict(configs.read("text_encoder", f"{folder}/text_encoder/config.json"))
    assert plain["architectures"] == ["CLIPTextModel"]
    u = configs.read("unet", f"{folder}/unet/config.json")
    assert configs.unet_config(json.loads(json.dumps(configs.to_dict(u)))) == u


# --- full-size shapes, without allocating them -------------------------------------------

SDXL = configs.PRESETS["sdxl"]
SDXL_REFINER_UNET = dict(
    sample_size=128, block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=4, cross_attention_dim=1280, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560)


@pytest.mark.parametrize("kw", [SDXL["unet"], SDXL_REFINER_UNET], ids=["base", "refiner"])
def test_full_size_sdxl_unet_param_shapes_match_diffusers(kw):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        ref = UNet2DConditionModel(**kw)
    cfg = configs.unet_config(dict(ref.config))
    ours = in_torch_layout(unet.param_shapes(cfg))
    assert ours == torch_shapes(ref)
    count = sum(int(np.prod(s)) for s in ours.values())
    assert count == sum(p.numel() for p in ref.parameters())
    if kw is SDXL["unet"]:
        assert count == 2_567_463_684 and cfg.time_ids_length(1280) == 6
    else:
        assert cfg.time_ids_length(1280) == 5


def test_full_size_sdxl_text_encoders_and_vae_match():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    p = configs.preset("sdxl")
    # CLIP ViT-L/14's text tower and OpenCLIP ViT-bigG's with its projection, as SDXL ships them
    counts = {"text_encoder": (CLIPTextModel, 123_060_480), "text_encoder_2": (CLIPTextModelWithProjection, 694_659_840)}
    for comp, (cls, count) in counts.items():
        d = configs.to_dict(p[comp])
        assert d["architectures"] == [cls.__name__]
        with torch.device("meta"):
            ref = cls(CLIPTextConfig.from_dict(d))
        want = {k.removeprefix("text_model."): s for k, s in torch_shapes(ref).items()
                if not k.endswith("position_ids")}
        assert in_torch_layout(clip.param_shapes(p[comp])) == want, comp
        assert sum(int(np.prod(s)) for s in want.values()) == count, comp
    with torch.device("meta"):
        ref = AutoencoderKL(**SDXL["vae"])
    assert in_torch_layout(vae.param_shapes(p["vae"])) == torch_shapes(ref)
    assert p["vae"].scaling_factor == 0.13025 and p["unet"].cross_attention_dim == (
        p["text_encoder"].hidden_size + p["text_encoder_2"].hidden_size)


# --- inputs and configs that do not fit ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sdxl():
    """Random params of the tiny base and refiner configs (the checks run before any compute)."""
    out = {}
    for style in ("sdxl", "sdxl-refiner"):
        cfg = configs.unet_config(SDXL_STYLES[style]["unet"])
        out[style] = (unet.init_params(cfg), cfg)
    return out


def call(params, cfg, ctx_dim=None, **kw):
    ctx = jnp.zeros((2, 7, ctx_dim or cfg.cross_attention_dim))
    return unet.apply(params, cfg, jnp.zeros((2, 8, 8, 4)), 10, ctx, **kw)


def cond(width=40, n=6, batch=2):
    return {"text_embeds": jnp.zeros((batch, width)), "time_ids": jnp.ones((batch, n))}


@pytest.mark.parametrize("kw,match", [
    ({}, r"needs added_cond=\{'text_embeds'.*got none"),
    (dict(added_cond={"text_embeds": jnp.zeros((2, 40))}), r"needs added_cond.*got \['text_embeds'\]"),
    (dict(added_cond=cond(n=5)), r"time_ids has 5 values per sample: this UNet expects 6 \(SDXL base: .*target size"
                                 r".*5 is the form of SDXL refiner"),
    (dict(added_cond=cond(width=32)), r"text_embeds has width 32: with 6 time_ids this UNet expects 40 "
                                      r".*text_encoder_2"),
    (dict(added_cond=cond(batch=1)), r"added_cond\['text_embeds'\] has shape \(1, 40\): expected \(2, n\)"),
    (dict(added_cond=cond(), ctx_dim=32), r"last dimension 32: expected 80 \(the UNet's cross_attention_dim\); "
                                          r"SDXL concatenates both text encoders' penultimate states"),
])
def test_bad_sdxl_base_inputs_are_named(tiny_sdxl, kw, match):
    params, cfg = tiny_sdxl["sdxl"]
    with pytest.raises(ValueError, match=match):
        call(params, cfg, **kw)


def test_bad_refiner_and_sd_inputs_are_named(tiny_sdxl):
    params, cfg = tiny_sdxl["sdxl-refiner"]
    with pytest.raises(ValueError, match=r"expects 5 \(SDXL refiner: .*aesthetic score\); 6 is the form of SDXL base"):
        call(params, cfg, added_cond=cond(n=6))
    assert call(params, cfg, added_cond=cond(n=5)).shape == (2, 8, 8, 4)
    sd = configs.unet_config(dict(block_out_channels=[32, 64], norm_num_groups=8, cross_attention_dim=16,
                                  layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]))
    sd_params = unet.init_params(sd)
    assert not sd.is_sdxl and "add_embedding" not in sd_params
    with pytest.raises(ValueError, match="added_cond given to a UNet without SDXL conditioning"):
        call(sd_params, sd, added_cond=cond())
    with pytest.raises(ValueError, match=r"last dimension 768: expected 16 \(the UNet's cross_attention_dim\)$"):
        call(sd_params, sd, ctx_dim=768)
    with pytest.raises(ValueError, match="takes no time_ids"):
        sd.time_ids_length(1280)
    with pytest.raises(ValueError, match="text_embeds of width 100 do not fit"):
        cfg.time_ids_length(100)


@pytest.mark.parametrize("change,match", [
    (dict(addition_embed_type="text"), r"addition_embed_type 'text' is not implemented \(only 'text_time'"),
    (dict(addition_time_embed_dim=None), "'text_time' needs addition_time_embed_dim"),
    (dict(projection_class_embeddings_input_dim="88"), "'text_time' needs projection_class_embeddings_input_dim"),
    (dict(transformer_layers_per_block=[1, [2, 1]]), "needs reverse_transformer_layers_per_block"),
    (dict(transformer_layers_per_block=[1, [2, 1, 1]], reverse_transformer_layers_per_block=[[1, 1, 1], 1]),
     r"entry \(2, 1, 1\): expected a count or a list of 2 counts"),
])
def test_bad_sdxl_unet_configs_are_refused_by_name(change, match):
    with pytest.raises(configs.ConfigError, match=match):
        configs.unet_config(dict(SDXL_STYLES["sdxl"]["unet"], **change), source="x/unet/config.json")


def test_clip_architectures():
    with pytest.raises(configs.ConfigError, match="CLIPVisionModelWithProjection"):
        configs.clip_config({"architectures": ["CLIPVisionModelWithProjection"]})
    with pytest.raises(configs.ConfigError, match="needs projection_dim"):
        configs.clip_config({"architectures": ["CLIPTextModelWithProjection"], "projection_dim": None})
    c = configs.clip_config({"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 32,
                             "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 8})
    assert c.projection_dim == 512  # transformers' default
    params = clip.init_params(c)
    assert params["text_projection"]["weight"].shape == (32, 512)
    last, _, pooled = clip.apply(params, c, jnp.array([[5, 49407, 0]]))
    assert last.shape == (1, 3, 32) and pooled.shape == (1, 512)
    assert {k for k in nn.flatten(params)} == set(clip.param_shapes(c))
