"""The Pipeline object: loading (folder, embedded model, refusals), the settings value and the
keyword API giving the same images, quantize returning a new pipeline, random full-size
architectures, the prompt encoder's errors."""
import dataclasses

import jax
import numpy as np
import pytest

import sdjax
from sdjax import pipeline
from sdjax.generate import GenerationSettings
from sdjax.params import CheckpointError


@pytest.fixture(scope="module")
def pipe(pipeline_dirs):
    return sdjax.load(pipeline_dirs("sd1")[0], progress=False)


def test_load_fills_every_component(pipe, pipeline_dirs):
    assert set(pipe.params) == set(pipe.configs) == {"text_encoder", "unet", "vae"}
    assert pipe.source == pipeline_dirs("sd1")[0] and pipe.dtype == np.float32
    assert pipe.scheduler_config["prediction_type"] == "epsilon"
    assert pipe.vae_scale_factor == pipe.configs["vae"].scale_factor == 2
    assert not pipe.is_quantized and pipe.quantization is None


def test_embedded_model_path_and_its_absence(monkeypatch, tmp_path):
    assert sdjax.reference_model_path().endswith("reference_model")
    monkeypatch.setattr(pipeline, "REFERENCE_MODEL_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match="embedded reference model is not in this build"):
        sdjax.load(progress=False)


def test_settings_value_and_keywords_give_the_same_image(pipe):
    kw = dict(steps=3, guidance_scale=4.0, sampler="euler", seed=5, height=16, width=16)
    a = pipe.generate("a red circle", output_type="np", progress=False, **kw)
    b = pipe.generate("a red circle", output_type="np", progress=False, settings=GenerationSettings(**kw))
    np.testing.assert_array_equal(a, b)
    c = pipe.generate("a red circle", output_type="np", progress=False,
                      settings=dataclasses.replace(GenerationSettings(**kw), seed=6))
    assert not np.array_equal(a, c)


def test_quantize_returns_a_new_pipeline(pipe):
    before = jax.tree.leaves(pipe.params)
    q = pipe.quantize("w8-int8")
    assert q.is_quantized and not pipe.is_quantized
    assert q.quantization["recipe"]["rules"] and q.tokenizer is pipe.tokenizer
    assert all(a is b for a, b in zip(jax.tree.leaves(pipe.params), before))  # the original is untouched


def test_quantized_component_file_is_refused_with_the_folder_to_load(pipe, tmp_path):
    from quant import io as qio
    out = pipe.quantize("w8-int8").save(tmp_path / "q")
    path = tmp_path / "q" / "unet" / qio.WEIGHTS_NAME
    assert path.exists()
    with pytest.raises(CheckpointError, match=f"load the folder {tmp_path / 'q'}"):
        sdjax.load(str(path), progress=False)
    assert sdjax.load(out, progress=False).is_quantized


def test_random_architecture_has_no_tokenizer(monkeypatch):
    from sdjax import configs
    small = dict(block_out_channels=[32, 64], norm_num_groups=8, layers_per_block=1, cross_attention_dim=32,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    monkeypatch.setitem(configs.PRESETS, "tiny", dict(
        unet=small, vae=dict(block_out_channels=[32], norm_num_groups=8),
        text_encoder=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)))
    p = pipeline.random("tiny", seed=1, dtype="bfloat16")
    assert p.configs["unet"].cross_attention_dim == 32 and p.tokenizer is None and p.dtype == np.dtype("bfloat16")
    assert "random tiny (seed 1)" == p.source
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        p.encode_prompt(["a cat"])


def test_clip_skip_out_of_range_is_named(pipe):
    n = pipe.configs["text_encoder"].num_hidden_layers
    with pytest.raises(ValueError, match=rf"clip_skip={n} must be in \[0, {n - 1}\]"):
        pipe.encode_prompt(["a cat"], clip_skip=n)
