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
