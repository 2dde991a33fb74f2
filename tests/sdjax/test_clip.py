"""The CLIP text encoder computes the same function as transformers' CLIPTextModel (tiny random
configs saved with save_pretrained, loaded by sdjax, compared on the same token ids)."""
import jax.numpy as jnp
import pytest
import torch

import sdjax
from sdjax import clip, configs
from tiny_models import TOL, in_torch_layout, rel_err, torch_shapes


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


def test_full_size_clip_param_shapes_match_transformers():
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        ref = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, projection_dim=768))
    want = {k.removeprefix("text_model."): s for k, s in torch_shapes(ref).items()
            if not k.endswith("position_ids")}
    assert in_torch_layout(clip.param_shapes(configs.CLIPConfig())) == want
