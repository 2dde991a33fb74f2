"""Single-file (CompVis/LDM) checkpoints: diffusers' own ``from_single_file`` is the oracle.

Each tiny pipeline is written as an LDM file with ``diffusers_to_ldm`` (weights shifted by 1 so
that a loader reading the diffusers folder instead of the file could not pass), then
``convert_ldm.plan`` + transforms must give bit for bit the state dicts diffusers' loader
builds from that file, and configs equal to the saved ones.
"""
import json
import os

import numpy as np
import torch
import pytest

import ldm_fixtures as fx
from sdjax import convert_ldm, tokenizer
from sdjax.params import CheckpointError

# tensors real checkpoints carry that belong to no component
EXTRA = {
    "sd1": {"model_ema.decay": np.array(0.9999, np.float32),
            "model_ema.diffusion_modelinput_blocks00weight": np.zeros((32, 4, 3, 3), np.float32),
            "alphas_cumprod": np.linspace(1, 0, 1000, dtype=np.float32),
            "first_stage_model.loss.logvar": np.zeros((), np.float32),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77)[None]},
    "sd2": {"cond_stage_model.model.logit_scale": np.array(4.6, np.float32),
            "cond_stage_model.model.visual.proj": np.zeros((64, 32), np.float32),
            "betas": np.linspace(0, 1, 1000, dtype=np.float32)},
}
CASES = [("sd1", ".safetensors"), ("sd2", ".safetensors"), ("inpaint", ".ckpt")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(style):
        if style not in cache:
            folder = str(tmp_path_factory.mktemp(f"ldm-{style}"))
            fx.build_pipeline(folder, style)
            cache[style] = folder
        return cache[style]
    return get


def _convert(path):
    """(configs, {component: {diffusers_key: array}}, skipped) of a single file, one tensor read
    per LDM key as the streaming loader does."""
    tensors = fx.read_single_file(path)
    configs, mapping, skipped = convert_ldm.plan({k: a.shape for k, a in tensors.items()})
    out = {c: {} for c in fx.COMPONENTS}
    for ldm_key, targets in mapping:
        a = tensors[ldm_key]
        for comp, key, fn in targets:
            assert key not in out[comp], key
            out[comp][key] = fn(a)
    return configs, out, skipped


@pytest.mark.parametrize("style,suffix", CASES)
def test_plan_matches_diffusers_single_file_loader(folders, tmp_path, style, suffix):
    from diffusers import StableDiffusionPipeline

    folder = folders(style)
    kind = fx.STYLES[style]["kind"]
    shifted = {c: {k: a + np.ones((), a.dtype) for k, a in sd.items()} for c, sd in fx.read_state_dicts(folder).items()}
    tensors = convert_ldm.diffusers_to_ldm(shifted, kind)
    extra = EXTRA[kind]
    path = str(tmp_path / f"model{suffix}")
    fx.save_single_file({**tensors, **extra}, path)

    configs, ours, skipped = _convert(path)
    theirs = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True)

    assert configs["kind"] == kind
    unused = set(extra)
    if kind == "sd2":  # OpenCLIP's last block (SD 2 conditions on the penultimate) and projection
        unused |= {k for k in tensors if k.startswith("cond_stage_model.model.transformer.resblocks.23.")}
        unused.add("cond_stage_model.model.text_projection")
    assert set(skipped) == unused
    for comp in fx.COMPONENTS:
        want = {k: t.numpy() for k, t in getattr(theirs, comp).state_dict().items()}
        assert ours[comp].keys() == want.keys() == shifted[comp].keys(), comp
        for k, a in want.items():
            assert ours[comp][k].dtype == a.dtype and ours[comp][k].shape == a.shape, k
            assert np.array_equal(ours[comp][k], a), f"{comp}: {k}"
            assert np.array_equal(a, shifted[comp][k]), f"{comp}: {k}"  # the oracle read the file
        with open(os.path.join(folder, comp, "config.json")) as f:
            saved = json.load(f)
        inferred = {k: v for k, v in configs[comp].items() if not k.startswith("_")}
        assert inferred == {k: saved[k] for k in inferred}, comp

    # the mapping read backwards gives the file again
    back = convert_ldm.diffusers_to_ldm(ours, kind)
    assert back.keys() == tensors.keys()
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)


def test_sdjax_load_reads_single_file_like_the_folder(folders, tmp_path, monkeypatch):
    import sdjax
    from sdjax.nn import flatten

    monkeypatch.setenv("SDJAX_CACHE", str(tmp_path / "cache"))  # where the tokenizer is written

    folder = folders("sd2")
    path = str(tmp_path / "sd2.safetensors")
    fx.write_single_file(folder, path)
    single, ref = sdjax.load(path, progress=False), sdjax.load(folder, progress=False)
    for comp in fx.COMPONENTS:
        a, b = flatten(single.params[comp]), flatten(ref.params[comp])
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), comp
        assert single.configs[comp] == ref.configs[comp]


# full-size architectures as their hub configs state them
FULL = {
    "sd1": dict(unet=dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                          attention_head_dim=8, use_linear_projection=False, upcast_attention=False, sample_size=64,
                          down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
                vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                         sample_size=512),
                text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, hidden_act="quick_gelu", vocab_size=49408)),
    "sd2": dict(unet=dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=1024,
                          attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True,
                          sample_size=96, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
                vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                         sample_size=768),
                text_encoder=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                  num_attention_heads=16, hidden_act="gelu", vocab_size=49408)),
}


@pytest.mark.parametrize("kind,n_keys", [("sd1", 1130), ("sd2", 1227)])
def test_full_size_layouts_by_shape_alone(kind, n_keys):
    """SD 1.5 / SD 2.1 shapes (meta tensors, no weights): the inferred configs are the hub
    configs, and diffusers' own model-type detection recognises the files we would write."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel

    full = FULL[kind]
    n = len(full["vae"]["block_out_channels"])
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**full["unet"]),
                  "vae": AutoencoderKL(**full["vae"], down_block_types=["DownEncoderBlock2D"] * n,
                                       up_block_types=["UpDecoderBlock2D"] * n),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**full["text_encoder"]))}
    zero = np.zeros((), np.float16)
    sd = {c: {k: np.broadcast_to(zero, tuple(t.shape)) for k, t in m.state_dict().items()} for c, m in models.items()}
    ldm = convert_ldm.diffusers_to_ldm(sd, kind)
    assert len(ldm) == n_keys
    assert infer_diffusers_model_type(ldm) == {"sd1": "v1", "sd2": "v2"}[kind]
    configs, _, _ = convert_ldm.plan({k: a.shape for k, a in ldm.items()})
    for comp, want in full.items():
        assert {k: configs[comp][k] for k in want} == want, comp


@pytest.fixture(scope="module")
def sd1_shapes(folders):
    tensors = convert_ldm.diffusers_to_ldm(fx.read_state_dicts(folders("sd1")), "sd1")
    return {k: a.shape for k, a in tensors.items()}


def _error(shapes):
    with pytest.raises(CheckpointError) as e:
        convert_ldm.plan(shapes)
    return str(e.value)


def test_missing_and_renamed_keys_are_all_named(sd1_shapes):
    shapes = dict(sd1_shapes)
    gone = ["first_stage_model.decoder.up.0.block.1.conv2.bias",
            "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.bias"]
    for k in gone:
        del shapes[k]
    old = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    new = old.replace("to_k", "to_key")
    shapes[new] = shapes.pop(old)
    shapes["control_model.input_hint_block.0.weight"] = (16, 3, 3, 3)
    msg = _error(shapes)
    for k in gone + [old, new, "control_model.input_hint_block.0.weight"]:
        assert k in msg, k


def test_structural_key_missing_is_named(sd1_shapes):
    shapes = dict(sd1_shapes)
    del shapes["model.diffusion_model.out.2.weight"], shapes["first_stage_model.decoder.conv_in.weight"]
    msg = _error(shapes)
    assert "model.diffusion_model.out.2.weight" in msg and "first_stage_model.decoder.conv_in.weight" in msg


def test_not_a_stable_diffusion_file(sd1_shapes):
    assert "text encoder" in _error({k: s for k, s in sd1_shapes.items() if not k.startswith("cond_stage_model.")})
    assert "VAE" in _error({k: s for k, s in sd1_shapes.items() if not k.startswith("first_stage_model.")})
    sdxl = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
            "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    assert "SDXL" in _error(sdxl)


def test_diffusers_to_ldm_names_keys_it_cannot_place(folders):
    sd = fx.read_state_dicts(folders("sd1"))
    sd["unet"]["add_embedding.linear_1.weight"] = np.zeros((4, 4), np.float32)
    del sd["vae"]["decoder.conv_out.bias"]
    with pytest.raises(CheckpointError) as e:
        convert_ldm.diffusers_to_ldm(sd, "sd1")
    assert "unet: add_embedding.linear_1.weight" in str(e.value)
    assert "vae: decoder.conv_out.bias" in str(e.value)


ASTRONAUT = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


@pytest.mark.parametrize("kind,pad_id", [("sd1", 49407), ("sd2", 0)])
def test_vendored_clip_tokenizer(tmp_path, kind, pad_id):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer.clip_tokenizer_files(tmp_path, kind), local_files_only=True)
    assert len(tok) == 49408
    ids = tok("a photo of an astronaut riding a horse", padding="max_length", max_length=77).input_ids
    assert ids == ASTRONAUT + [pad_id] * (77 - len(ASTRONAUT))  # SD 1 pads with <|endoftext|>, SD 2 with "!"


def test_tokenizer_dir_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SDJAX_CACHE", str(tmp_path))
    d = tokenizer.tokenizer_dir("sd2")
    assert d == str(tmp_path / "clip-tokenizer-sd2")
    stamp = os.stat(os.path.join(d, "vocab.json")).st_mtime_ns
    assert tokenizer.tokenizer_dir("sd2") == d
    assert os.stat(os.path.join(d, "vocab.json")).st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path)) == ["clip-tokenizer-sd2"]


def test_cli_converts_a_single_file_that_diffusers_then_reads(folders, tmp_path):
    import subprocess
    import sys
    from diffusers import UNet2DConditionModel

    folder = folders("sd1")
    path = str(tmp_path / "model.safetensors")
    fx.write_single_file(folder, path)
    env = dict(os.environ, SDJAX_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "convert", path, "-o", str(tmp_path / "out"), "-q"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    got = UNet2DConditionModel.from_pretrained(str(tmp_path / "out"), subfolder="unet").state_dict()
    want = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "inspect", path, "-q"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "truncated" in r.stderr and "model.safetensors" in r.stderr
