"""Checkpoint I/O: diffusers folders (variants, shards), save -> load, bad input."""
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sdjax
from sdjax import checkpoint, unet
from sdjax.nn import flatten
from sdjax.params import CheckpointError
from tiny_models import nchw, nhwc


def _unet_out(params, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    ours = nchw(unet.apply(params, cfg, jnp.asarray(nhwc(x.numpy())), 250.0, jnp.asarray(ctx.numpy())))
    return x, ctx, ours


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_save_load_roundtrip_is_lossless_and_diffusers_reads_it(pipeline_dirs, tmp_path):
    folder, ref = pipeline_dirs("sd2")
    pipe = sdjax.load(folder, progress=False)
    out = pipe.save(tmp_path / "saved")
    again = sdjax.load(out, progress=False)
    for comp in ("text_encoder", "unet", "vae"):
        a, b = flatten(pipe.params[comp]), flatten(again.params[comp])
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), comp
        assert again.configs[comp] == pipe.configs[comp]
    assert again.scheduler_config == pipe.scheduler_config

    from diffusers import StableDiffusionPipeline
    theirs = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    for comp in ("text_encoder", "unet", "vae"):
        got, want = getattr(theirs, comp).state_dict(), getattr(ref, comp).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), comp
    ids = ref.tokenizer(["a red cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert theirs.tokenizer(["a red cat"], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids.equal(ids)


def test_save_refuses_existing_folder(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sd1")
    pipe = sdjax.load(folder, progress=False)
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        pipe.save(tmp_path / "x")


def test_fp16_variant_and_bfloat16_load(pipeline_dirs, tmp_path):
    folder, ref = pipeline_dirs("sd1")
    from diffusers import StableDiffusionPipeline
    half = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16, local_files_only=True)
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert os.path.exists(tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert not os.path.exists(tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.safetensors")
    pipe = sdjax.load(tmp_path / "fp16", progress=False)  # fp16 files, float32 params
    w = flatten(pipe.params["unet"])["conv_in.weight"]
    assert w.dtype == jnp.float32
    want = ref.unet.conv_in.weight.detach().half().float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(w), want)
    bf = sdjax.load(folder, dtype="bfloat16", progress=False)
    assert flatten(bf.params["vae"])["decoder.conv_in.weight"].dtype == jnp.bfloat16


def test_sharded_checkpoint_loads(pipeline_dirs, tmp_path):
    folder, ref = pipeline_dirs("sd1")
    d = _copy(folder, tmp_path / "sharded")
    shutil.rmtree(os.path.join(d, "unet"))
    ref.unet.save_pretrained(os.path.join(d, "unet"), max_shard_size="1MB")
    files = os.listdir(os.path.join(d, "unet"))
    assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 3
    a = sdjax.load(d, progress=False).params["unet"]
    b = sdjax.load(folder, progress=False).params["unet"]
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_legacy_vae_attention_names_load(pipeline_dirs, tmp_path):
    """diffusers < 0.14 folders name the VAE attention query/key/value/proj_attn."""
    folder, ref = pipeline_dirs("sd1")
    d = _copy(folder, tmp_path / "legacy")
    path = os.path.join(d, "vae", "diffusion_pytorch_model.safetensors")
    from safetensors.numpy import load_file, save_file
    sd = load_file(path)
    ren = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in sd.items():
        for new, old in ren.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
                if v.ndim == 2:
                    v = v[:, :, None, None]  # and stored as 1x1 convs
        out[k] = v
    save_file(out, path)
    a = flatten(sdjax.load(d, progress=False).params["vae"])
    b = flatten(sdjax.load(folder, progress=False).params["vae"])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --- bad input ---------------------------------------------------------------------------

def _unet_file(d):
    return os.path.join(d, "unet", "diffusion_pytorch_model.safetensors")


def test_missing_folder_and_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        sdjax.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder"):
        sdjax.load(tmp_path / "empty")
    (tmp_path / "weights.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="weights.txt"):
        sdjax.load(tmp_path / "weights.txt")


def test_truncated_and_corrupt_safetensors(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sd1")
    d = _copy(folder, tmp_path / "trunc")
    f = _unet_file(d)
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CheckpointError, match=r"truncated.*diffusion_pytorch_model|diffusion_pytorch_model.*truncated"):
        sdjax.load(d, progress=False)
    with open(f, "wb") as fh:
        fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt"):
        sdjax.load(d, progress=False)


def test_missing_unexpected_and_misshapen_keys_are_all_named(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sd1")
    d = _copy(folder, tmp_path / "keys")
    from safetensors.numpy import load_file, save_file
    sd = load_file(_unet_file(d))
    del sd["conv_in.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
    save_file(sd, _unet_file(d))
    with pytest.raises(CheckpointError) as e:
        sdjax.load(d, progress=False)
    msg = str(e.value)
    assert "diffusion_pytorch_model.safetensors" in msg
    assert "missing keys (1): conv_in.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "conv_out.weight expected (4, 32, 3, 3) got (4, 32, 1, 1)" in msg


def test_missing_component_and_config(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sd1")
    d = _copy(folder, tmp_path / "novae")
    shutil.rmtree(os.path.join(d, "vae"))
    with pytest.raises(CheckpointError, match="missing vae folder"):
        sdjax.load(d, progress=False)
    d = _copy(folder, tmp_path / "noconf")
    os.remove(os.path.join(d, "unet", "config.json"))
    with pytest.raises(Exception, match="unet/config.json"):
        sdjax.load(d, progress=False)


def test_unsupported_architecture_option_names_file_and_option(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sd1")
    d = _copy(folder, tmp_path / "opt")
    p = os.path.join(d, "unet", "config.json")
    cfg = json.load(open(p))
    cfg["class_embed_type"] = "timestep"
    json.dump(cfg, open(p, "w"))
    with pytest.raises(Exception, match=r"unet/config.json.*class_embed_type"):
        sdjax.load(d, progress=False)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sdjax-pwned",))


def test_pickled_checkpoint_never_runs_code(tmp_path):
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "payload": _Evil()}, p)
    if os.path.exists("/tmp/sdjax-pwned"):
        os.remove("/tmp/sdjax-pwned")
    with pytest.raises(CheckpointError, match="weights-only"):
        checkpoint.open_source(str(p))
    assert not os.path.exists("/tmp/sdjax-pwned")


def test_cli_reports_bad_checkpoint_without_traceback(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sd1")
    d = _copy(folder, tmp_path / "cli")
    with open(_unet_file(d), "r+b") as fh:
        fh.truncate(1000)
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "inspect", d, "-q"], capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "truncated" in r.stderr and "diffusion_pytorch_model" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "inspect", folder, "-q"], capture_output=True, text=True)
    assert r.returncode == 0 and "unet" in r.stdout
