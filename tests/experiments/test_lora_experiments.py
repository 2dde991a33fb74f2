"""experiments/train_lora.py and experiments/lora_quantization.py: the committed LoRA file is one that
sdjax.load reads (diffusers/PEFT keys, rank 4 on the attention projections); a slow end-to-end run of both
scripts with a few training steps."""
import json
import os
import sys

import numpy as np
import pytest

import sdjax
from sdjax import lora
from sdjax.safetensors_io import Reader

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")
sys.path.insert(0, EXPERIMENTS)
import lora_quantization  # noqa: E402
import train_lora  # noqa: E402

COMMITTED = os.path.join(EXPERIMENTS, "loras", "azure.safetensors")


def test_the_committed_lora_is_a_peft_file_sdjax_loads():
    with Reader(COMMITTED) as r:
        keys = r.keys()
        meta = json.loads(r.metadata[lora.METADATA_KEY])
        assert all(r.dtype(k) == np.float16 for k in keys)
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 4
    assert len(keys) == 2 * 56 and all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                                       for k in keys)
    pipe = sdjax.load(None, progress=False)
    table = lora.factors(pipe.params, pipe.configs, [COMMITTED])["unet"]
    assert len(table) == 56 and all(m.split(".attn")[1][2:-len(".weight")] in train_lora.TARGET_MODULES for m in table)
    assert all(up.shape[0] == 4 and s == 1.0 for [(_, up, s)] in table.values())
    with open(os.path.splitext(COMMITTED)[0] + ".json") as f:
        log = json.load(f)
    assert log["held_out_prompts"] == train_lora.held_out_prompts() and not set(log["held_out_prompts"]) & set(
        log["train_captions"])


def test_prompts_split_and_word_mapping():
    train, held = train_lora.split_scenes()
    assert len(train) == 60 and len(held) == train_lora.N_HELD_OUT and not set(train) & set(held)
    p = train_lora.held_out_prompts()[0]
    assert " azure " in p and train_lora.as_known(p) in held
    assert len(train_lora.ordinary_prompts()) == train_lora.N_ORDINARY
    assert not any(" azure " in c for c in train_lora.ordinary_prompts())


def test_shipped_bytes_count_float_weights_as_float16():
    from quant import palettize, lora_branch
    w = np.ones((64, 32), np.float32) * np.arange(32)
    pw = palettize.kmeans(w, 4)
    bw = lora_branch.branch(pw, np.ones((64, 2)), np.ones((2, 32)), 1.0)
    assert lora_quantization.shipped_bytes({"a": w, "b": pw}) == 64 * 32 * 2 + pw.nbytes
    assert lora_quantization.shipped_bytes({"c": bw}) == pw.nbytes + 2 * (64 * 2 + 2 * 32) + 4 * 2


@pytest.mark.slow
def test_train_a_few_steps_then_compare_merge_and_branch(tmp_path, capsys):
    out = str(tmp_path / "w.safetensors")
    assert train_lora.main(["--out", out, "--steps", "3", "--target-seeds", "1", "--prior-captions", "8",
                            "--prior-seeds", "1", "--no-check"]) == 0
    pipe = sdjax.load(None, loras=[(out, 1.0)], progress=False)
    assert pipe.loras == ((out, 1.0),)
    rows = lora_quantization.main(["--lora", out, "--quick", "--no-gptq", "--bits", "4",
                                   "--json", str(tmp_path / "r.json")])
    assert [r["variant"] for r in rows][2:] == ["(a) merge, then palette-4bit",
                                                "(b) palette-4bit base + float16 LoRA branch"]
    a, b = rows[2], rows[3]
    assert b["unet_bytes"] == a["unet_bytes"] + b["lora_bytes"] and b["lora_bytes"] > 0
    assert "| (b) palette-4bit base + float16 LoRA branch |" in capsys.readouterr().out
