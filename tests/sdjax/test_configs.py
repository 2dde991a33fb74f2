"""Configs: diffusers'/transformers' own config.json read into frozen dataclasses; options the
models do not implement, unknown options, mistyped values and unreadable files refused by name."""
import json

import pytest

from sdjax import configs


@pytest.mark.parametrize("option,value", [("class_embed_type", "timestep"), ("resnet_time_scale_shift", "scale_shift"),
                                          ("time_cond_proj_dim", 256), ("addition_embed_type", "text")])
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


def test_saved_diffusers_and_transformers_configs_read_back(pipeline_dirs):
    """What save_pretrained wrote is read field for field; to_dict writes it back."""
    folder, ref = pipeline_dirs("sd2")
    u = configs.read("unet", f"{folder}/unet/config.json")
    assert u.block_out_channels == tuple(ref.unet.config.block_out_channels)
    assert u.attention_head_dim == tuple(ref.unet.config.attention_head_dim)
    assert u.use_linear_projection and u.upcast_attention
    c = configs.read("text_encoder", f"{folder}/text_encoder/config.json")
    assert (c.hidden_size, c.hidden_act) == (ref.text_encoder.config.hidden_size, ref.text_encoder.config.hidden_act)
    v = configs.read("vae", f"{folder}/vae/config.json")
    assert v.scaling_factor == ref.vae.config.scaling_factor
    for cfg, reader in ((u, configs.unet_config), (v, configs.vae_config), (c, configs.clip_config)):
        assert reader(json.loads(json.dumps(configs.to_dict(cfg)))) == cfg


def test_diffusers_builds_the_model_to_dict_describes(pipeline_dirs):
    from diffusers import UNet2DConditionModel
    folder, ref = pipeline_dirs("sd1")
    d = configs.to_dict(configs.read("unet", f"{folder}/unet/config.json"))
    again = UNet2DConditionModel.from_config(d)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in ref.unet.parameters())


def test_unreadable_config_files_name_the_file(tmp_path):
    with pytest.raises(configs.ConfigError, match="missing config file for unet"):
        configs.read("unet", str(tmp_path / "nope.json"))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(configs.ConfigError, match=f"{bad}: not valid JSON"):
        configs.read("vae", str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(configs.ConfigError, match="must be a JSON object.*not a list"):
        configs.read("unet", str(bad))


@pytest.mark.parametrize("reader,option,value,expected", [
    (configs.vae_config, "layers_per_block", "two", "an integer"),
    (configs.vae_config, "layers_per_block", True, "an integer"),
    (configs.vae_config, "scaling_factor", float("nan"), "a finite number"),
    (configs.clip_config, "layer_norm_eps", "1e-5", "a finite number"),
    (configs.vae_config, "block_out_channels", [32, "64"], "a list of int"),
])
def test_mistyped_option_is_refused_by_name(reader, option, value, expected):
    with pytest.raises(configs.ConfigError, match=f"{option}=.*expected {expected}"):
        reader({option: value}, source="f/config.json")


def test_clip_architecture_and_presets():
    with pytest.raises(configs.ConfigError, match="CLIPVisionModel"):
        configs.clip_config({"architectures": ["CLIPVisionModel"]})
    with pytest.raises(configs.ConfigError, match="unknown preset 'sd3'.*sd15"):
        configs.preset("sd3")
    p = configs.preset("sd21")
    assert p["unet"].cross_attention_dim == p["text_encoder"].hidden_size == 1024
    assert p["vae"].scale_factor == 8
