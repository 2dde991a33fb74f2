"""experiments/train_reference.py: a few steps of each stage export a checkpoint that sdjax and
diffusers both load, and an interrupted run resumes to the same weights as an uninterrupted one."""
import os
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import train_reference  # noqa: E402

import sdjax  # noqa: E402

FAST = ["--vae-steps", "3", "--unet-steps", "3", "--vae-batch", "2", "--unet-batch", "2", "--pool", "16",
        "--save-every", "1"]
WEIGHTS = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    import jax
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jaxcache")))
    out = tmp_path_factory.mktemp("whole")
    assert train_reference.main(["--out", str(out), *FAST]) == 0
    return out


@pytest.mark.slow  # four training runs, about 4 minutes on 2 cores
def test_resumed_run_equals_uninterrupted_run(whole, tmp_path):
    resumed = tmp_path / "resumed"
    for _ in range(2):  # the VAE stage, then the UNet stage, each stopped after 2 of 3 steps
        with pytest.raises(train_reference.Interrupted):
            train_reference.main(["--out", str(resumed), *FAST, "--interrupt-after", "2"])
    assert train_reference.main(["--out", str(resumed), *FAST]) == 0
    for name in WEIGHTS:
        a, b = load_file(whole / "model" / name), load_file(resumed / "model" / name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")


@pytest.mark.slow  # needs the ~70 s training run; the shipped model it produced is loaded by both in CI
def test_export_is_a_pipeline_sdjax_and_diffusers_load(whole):
    import torch
    from diffusers import StableDiffusionPipeline
    folder = whole / "model"
    pipe = sdjax.load(str(folder), progress=False)
    assert pipe.vae_scale_factor == 4 and pipe.scheduler_config["prediction_type"] == "epsilon"
    ids = pipe.tokenizer(["a small red circle at the top left on a white background"])[0]
    assert (ids != pipe.tokenizer.pad_token_id).sum() == 13  # bos + 12 words, one token each (eos is the pad token)
    ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True)
    with torch.no_grad():
        img = ref("a large red circle", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


@pytest.mark.slow  # a fresh process (jax must start with 2 host devices): about a minute
def test_two_device_run_matches_one_device_run(whole, tmp_path):
    """--devices 2 (what shipped the model) splits each batch over two host devices; it changes only the
    order of float sums, so after the same steps the weights agree with the one-device run."""
    import subprocess
    script = os.path.join(os.path.dirname(train_reference.__file__), "train_reference.py")
    out = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, script, "--out", str(out), *FAST, "--devices", "2"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    log = (out / "train_log.json").read_text()
    assert "CpuDevice(id=1)" in log
    for name in WEIGHTS:
        a, b = load_file(whole / "model" / name), load_file(out / "model" / name)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-4, err_msg=f"{name}:{k}")


@pytest.mark.slow  # one more short UNet stage on top of the fixture's run
def test_vae_from_and_unet_config(whole, tmp_path):
    """--vae-from reuses a model's VAE unchanged (no VAE stage); --unet-config changes the exported UNet."""
    out = tmp_path / "arch"
    override = '{"attention_head_dim": 2, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", ' \
               '"CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", ' \
               '"CrossAttnUpBlock2D"]}'
    assert train_reference.main(["--out", str(out), *FAST, "--vae-from", str(whole / "model"),
                                 "--unet-config", override]) == 0
    assert (out / "unet.msgpack").exists() and not (out / "vae.msgpack").exists()  # no VAE stage ran
    a = load_file(whole / "model" / WEIGHTS[1])
    b = load_file(out / "model" / WEIGHTS[1])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    pipe = sdjax.load(str(out / "model"), progress=False)
    u = pipe.configs["unet"]
    assert set(u.down_block_types) == {"CrossAttnDownBlock2D"} and u.attention_head_dim == 2
    assert pipe.configs["vae"].scaling_factor == sdjax.load(str(whole / "model"), progress=False).configs["vae"].scaling_factor
    with pytest.raises(SystemExit):
        train_reference.main(["--out", str(tmp_path / "bad"), *FAST, "--unet-config", "[1]"])


@pytest.mark.slow  # one more short UNet stage on top of the fixture's run
def test_frozen_text_encoder_and_v_prediction(whole, tmp_path):
    """--freeze-text-encoder exports the text encoder exactly as initialised (no update, no weight decay)
    while the UNet trains; --prediction-type v_prediction is written to the scheduler config."""
    from sdjax import clip, nn
    out = tmp_path / "frozen"
    assert train_reference.main(["--out", str(out), *FAST, "--vae-from", str(whole / "model"),
                                 "--freeze-text-encoder", "--prediction-type", "v_prediction"]) == 0
    pipe = sdjax.load(str(out / "model"), progress=False)
    init = nn.flatten(clip.init_params(pipe.configs["text_encoder"], 0 + 10))  # the script's --seed 0 + 10
    got = nn.flatten(pipe.params["text_encoder"])
    assert init.keys() == got.keys() and all(np.array_equal(np.asarray(init[k]), np.asarray(got[k])) for k in init)
    trained = load_file(whole / "model" / WEIGHTS[2])  # the jointly trained encoder did change
    assert not all(np.array_equal(trained[k], load_file(out / "model" / WEIGHTS[2])[k]) for k in trained)
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"


@pytest.mark.slow  # two more short UNet stages on top of the fixture's run
def test_init_from_and_noise_offset(whole, tmp_path):
    """--init-from starts the UNet stage from a trained model's weights (its VAE, UNet config and frozen text
    encoder carried over); --noise-offset changes the training noise and so the weights, and nothing else."""
    from sdjax import nn
    src = sdjax.load(str(whole / "model"), progress=False)
    runs = {}
    for name, extra in (("plain", []), ("offset", ["--noise-offset", "0.1"]), ("shape", ["--shape-weight", "4"])):
        out = tmp_path / name
        assert train_reference.main(["--out", str(out), *FAST, "--init-from", str(whole / "model"),
                                     "--freeze-text-encoder", *extra]) == 0
        assert not (out / "vae.msgpack").exists()  # the VAE came from the --init-from folder
        runs[name] = sdjax.load(str(out / "model"), progress=False)
    for pipe in runs.values():
        assert pipe.configs["unet"] == src.configs["unet"]
        for part in ("text_encoder", "vae"):
            a, b = nn.flatten(src.params[part]), nn.flatten(pipe.params[part])
            assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a), part
    # three fine-tuning steps move the UNet a little from where it started, not back to a random init
    s, p, o = (nn.flatten(x.params["unet"]) for x in (src, runs["plain"], runs["offset"]))
    moved = max(float(np.abs(np.asarray(p[k]) - np.asarray(s[k])).max()) for k in s)
    assert 0 < moved < 0.05
    assert any(not np.array_equal(np.asarray(p[k]), np.asarray(o[k])) for k in p)
    w = nn.flatten(runs["shape"].params["unet"])   # --shape-weight reweighs the loss: other weights
    assert any(not np.array_equal(np.asarray(p[k]), np.asarray(w[k])) for k in p)
    with pytest.raises(SystemExit):
        train_reference.main(["--out", str(tmp_path / "bad"), *FAST, "--init-from", str(whole / "model"),
                              "--unet-config", '{"attention_head_dim": 2}'])


@pytest.mark.slow  # two decoder-only runs on top of the fixture's model
def test_decoder_fine_tune_keeps_the_latent_space(whole, tmp_path):
    """--decoder-steps trains the VAE's decoder (and post_quant_conv) only: the encoder, quant_conv, scaling
    factor, UNet and text encoder come out bit-identical (--unet-steps 0), so the UNet's latents keep their
    meaning; --decoder-latent-noise changes what the decoder learns."""
    from sdjax import nn
    src = sdjax.load(str(whole / "model"), progress=False)
    runs = {}
    for name, extra in (("plain", []), ("noisy", ["--decoder-latent-noise", "0.5", "--shape-weight", "4"])):
        out = tmp_path / name
        assert train_reference.main(["--out", str(out), *FAST, "--init-from", str(whole / "model"),
                                     "--freeze-text-encoder", "--unet-steps", "0", "--decoder-steps", "3",
                                     *extra]) == 0
        assert (out / "decoder.msgpack").exists()
        runs[name] = sdjax.load(str(out / "model"), progress=False)
    for pipe in runs.values():
        assert pipe.configs["vae"] == src.configs["vae"]   # scaling factor included
        for part in ("text_encoder", "unet"):
            a, b = nn.flatten(src.params[part]), nn.flatten(pipe.params[part])
            assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a), part
        a, b = nn.flatten(src.params["vae"]), nn.flatten(pipe.params["vae"])
        same = {k for k in a if np.array_equal(np.asarray(a[k]), np.asarray(b[k]))}
        assert {k for k in a if k.startswith(("encoder.", "quant_conv."))} <= same
        assert any(k.startswith("decoder.") for k in set(a) - same)
        assert any(k.startswith("post_quant_conv.") for k in set(a) - same)
    p, q = (nn.flatten(runs[n].params["vae"]) for n in ("plain", "noisy"))
    assert any(not np.array_equal(np.asarray(p[k]), np.asarray(q[k])) for k in p if k.startswith("decoder."))
    for bad in (["--decoder-steps", "-1"], ["--decoder-latent-noise", "-0.1"]):
        with pytest.raises(SystemExit):
            train_reference.main(["--out", str(tmp_path / "bad"), *FAST, *bad])


@pytest.mark.slow  # one more short run (both stages)
def test_vae_config(tmp_path):
    """--vae-config changes the trained and exported VAE; it cannot be combined with a VAE taken from a folder."""
    out = tmp_path / "vae"
    assert train_reference.main(["--out", str(out), *FAST, "--vae-config",
                                 '{"block_out_channels": [8, 16, 32], "norm_num_groups": 4}']) == 0
    v = sdjax.load(str(out / "model"), progress=False).configs["vae"]
    assert list(v.block_out_channels) == [8, 16, 32] and v.norm_num_groups == 4
    for bad in (["--vae-config", "[1]"], ["--vae-config", '{"layers_per_block": 2}', "--vae-from", str(out / "model")]):
        with pytest.raises(SystemExit):
            train_reference.main(["--out", str(tmp_path / "bad"), *FAST, *bad])


def test_shape_cells_mark_the_latent_cells_the_shape_touches():
    """--shape-weight's mask: a latent cell (4 x 4 pixels) is 1 where any of its pixels is not the
    caption's background colour, i.e. where the rendered shape covers it at all."""
    from sdjax import shapes
    images, captions = shapes.batch(3, 0, 6)
    cells = train_reference.shape_cells(images, captions, 4)
    assert cells.shape == (6, 16, 16, 1) and set(np.unique(cells)) <= {0.0, 1.0}
    for img, cap, c in zip(images, captions, cells):
        bg = np.asarray(shapes.BACKGROUNDS[shapes.parse_caption(cap).background], np.float32) / 255
        touched = (np.abs(img - bg).max(-1) > 1e-3).reshape(16, 4, 16, 4).any((1, 3))
        assert np.array_equal(c[..., 0] > 0, touched) and 0 < c.mean() < 0.5
