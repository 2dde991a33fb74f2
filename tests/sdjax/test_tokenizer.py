"""Tokenizer: the checkpoint's own CLIP BPE files, padded/truncated to 77 as diffusers does."""
import os

import numpy as np
import pytest
import torch

import sdjax
from sdjax.params import CheckpointError
from sdjax.tokenizer import Tokenizer
from tiny_models import rel_err

PROMPTS = ["a red circle", "", "THE small   blue square, of a cat photo!", "zebra " * 100]


@pytest.mark.parametrize("style", ["sd1", "sd2"])
@pytest.mark.parametrize("files", ["tokenizer", "_tok"])  # tokenizer.json (transformers v5) or vocab.json+merges.txt
def test_ids_match_the_pipeline_tokenizer(pipeline_dirs, style, files):
    folder, ref = pipeline_dirs(style)
    tok = Tokenizer(os.path.join(folder, files))
    want = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    got = tok(PROMPTS)
    assert got.shape == (4, 77) and got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(want))
    # SD 2 pads with "!", SD 1 with <|endoftext|>
    assert got[0, -1] == (ref.tokenizer.convert_tokens_to_ids("!") if style == "sd2" else ref.tokenizer.eos_token_id)


@pytest.mark.parametrize("style,clip_skip", [("sd1", 0), ("sd1", 1), ("sd2", 0)])
def test_encode_prompt_matches_diffusers(pipeline_dirs, style, clip_skip):
    folder, ref = pipeline_dirs(style)
    pipe = sdjax.load(folder, progress=False)
    prompts = ["a red circle", "the small blue square"]
    with torch.no_grad():
        if clip_skip == 0:
            want, _ = ref.encode_prompt(prompts, "cpu", 1, False)
        else:
            # diffusers' clip_skip path reaches text_encoder.text_model, which transformers v5
            # removed; this is its formula: hidden_states[-(k+1)] through the final layer norm
            ids = ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
            hs = ref.text_encoder(ids, output_hidden_states=True).hidden_states
            want = ref.text_encoder.final_layer_norm(hs[-(clip_skip + 1)])
    assert rel_err(pipe.encode_prompt(prompts, clip_skip=clip_skip), want.numpy()) <= 1e-4


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer(str(tmp_path / "nope"))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no CLIP tokenizer files"):
        Tokenizer(str(tmp_path / "tok"))
