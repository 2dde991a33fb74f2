"""The embedded reference model: a real diffusers checkpoint inside the package, <= 25 MB, that
diffusers and sdjax run to the same image, and that draws the shapes it is asked for."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sdjax
from sdjax import shapes
from tiny_models import DIFFUSERS_SCHEDULERS

MAX_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def folder():
    return sdjax.reference_model_path()


@pytest.fixture(scope="module")
def pipe():
    return sdjax.load(None, progress=False)


def test_is_a_small_diffusers_folder_inside_the_package(folder):
    assert os.path.dirname(folder) == os.path.dirname(sdjax.__file__)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    assert total <= MAX_BYTES, total
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionPipeline"
    for comp, weights in [("unet", "diffusion_pytorch_model.safetensors"),
                          ("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")]:
        assert os.path.exists(os.path.join(folder, comp, weights)) and comp in index
    for f in ["tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"]:
        assert os.path.exists(os.path.join(folder, f)), f


def test_sd1_architecture(pipe):
    u, v, c = pipe.configs["unet"], pipe.configs["vae"], pipe.configs["text_encoder"]
    assert set(u.down_block_types) == {"CrossAttnDownBlock2D", "DownBlock2D"}
    assert u.cross_attention_dim == c.hidden_size and v.latent_channels == 4
    sc = pipe.scheduler_config
    assert (sc["beta_schedule"], sc["beta_start"], sc["beta_end"], sc["prediction_type"]) == \
        ("scaled_linear", 0.00085, 0.012, "epsilon")


def test_tokenizer_covers_the_caption_vocabulary(pipe):
    """Every caption encodes to known tokens and decodes back; all words but "triangle" are one token
    each (its merges were shadowed by those of "right"; the model was trained with that tokenization)."""
    tok = pipe.tokenizer
    for scene in shapes.all_scenes():
        ids = tok([scene.caption])[0]
        assert tok.decode(ids) == scene.caption
    split = [w for w in shapes.WORDS if len(tok._tok.tokenize(w)) != 1]
    assert split == ["triangle"]
    assert pipe.configs["text_encoder"].vocab_size == len(tok._tok)


def test_diffusers_draws_the_same_image(folder, pipe):
    import diffusers
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    cls, kw = DIFFUSERS_SCHEDULERS["dpmpp_2m"]
    ref.scheduler = getattr(diffusers, cls).from_pretrained(folder, subfolder="scheduler", **kw)
    prompts = ["a small red circle at the top left on a white background",
               "a large blue triangle in the center on a black background"]
    x_t = np.random.default_rng(5).standard_normal((2, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = ref(prompts, num_inference_steps=25, guidance_scale=7.5, latents=torch.from_numpy(x_t),
                   output_type="np").images
    got = pipe.generate(prompts, steps=25, guidance_scale=7.5, sampler="dpmpp_2m", latents=x_t,
                        output_type="np", progress=False)
    assert got.shape == want.shape == (2, 64, 64, 3)
    mse = float(np.mean((np.asarray(got, np.float64) - want) ** 2))
    assert 10 * np.log10(1 / max(mse, 1e-20)) >= 70.0


def test_draws_what_it_is_asked(pipe):
    """A regression guard on prompt adherence (experiments/eval_reference.py measures it on 200+ pairs)."""
    rng = np.random.default_rng(77)
    scenes = shapes.all_scenes()
    captions = [scenes[i].caption for i in rng.permutation(len(scenes))[:30]]
    images = pipe.generate(captions, steps=25, seed=3, output_type="np", progress=False)
    acc = shapes.score(images, captions)
    assert acc["color"] >= 0.8 and acc["shape"] >= 0.8 and acc["position"] >= 0.8 and acc["background"] >= 0.8, acc
    assert acc["all"] >= 0.6, acc


def test_text_encoder_tells_positions_apart(pipe):
    """The text states of captions differing only in position are as far apart as those differing only in
    colour (trained jointly, the text encoder collapsed position to a sixth of colour's spread and the
    model ignored the position words; experiments/position_probe.py)."""
    from sdjax import clip

    def spread(captions):
        h = np.asarray(clip.apply(pipe.params["text_encoder"], pipe.configs["text_encoder"],
                                  pipe.tokenizer(captions))[0], np.float64)
        return np.linalg.norm(h - h.mean(0), axis=(1, 2)).mean() / np.linalg.norm(h, axis=(1, 2)).mean()
    base = shapes.Scene("large", "red", "square", "top left", "white")
    by_position = [dataclasses.replace(base, position=p).caption for p in shapes.POSITIONS]
    by_color = [dataclasses.replace(base, color=c).caption for c in shapes.COLORS]
    assert spread(by_position) >= 0.5 * spread(by_color)


def test_vae_reconstructs_held_out_scenes(pipe):
    from sdjax import vae
    images, _ = shapes.batch(4242, 0, 32)
    p, c = pipe.params["vae"], pipe.configs["vae"]
    rec = np.asarray(vae.decode(p, c, vae.encode(p, c, images * 2 - 1)[0]))
    mse = np.mean((np.clip((rec + 1) / 2, 0, 1) - images) ** 2, axis=(1, 2, 3))
    assert np.mean(10 * np.log10(1 / mse)) >= 30.0


def test_cli_generate_defaults_to_the_reference_model(tmp_path):
    out = tmp_path / "x.png"
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", "--prompt",
                        "a large green square in the center on a gray background", "--out", str(out), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    img = Image.open(out)
    assert img.size == (64, 64) and img.text["model"] == sdjax.reference_model_path()
