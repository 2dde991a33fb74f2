"""CLIP BPE tokenizer from a checkpoint's own files (transformers' CLIPTokenizer does the BPE)."""
from __future__ import annotations

import os

import numpy as np

from .params import CheckpointError


class Tokenizer:
    """Prompts -> (B, 77) int32 ids, padded and truncated as diffusers' pipelines do.

    The pad token is the checkpoint's own: SD 1.x pads with <|endoftext|>, SD 2.x with "!".
    """

    def __init__(self, folder):
        if not folder or not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: tokenizer folder not found")
        has_bpe = all(os.path.exists(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt"))
        if not has_bpe and not os.path.exists(os.path.join(folder, "tokenizer.json")):
            raise CheckpointError(f"{folder}: no CLIP tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
        from transformers import CLIPTokenizer
        import transformers
        transformers.logging.set_verbosity_error()
        try:
            self._tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # transformers raises many types for malformed files
            raise CheckpointError(f"{folder}: cannot read the tokenizer: {type(e).__name__}: {e}") from None
        self.folder = folder
        self.max_length = min(int(self._tok.model_max_length), 77)
        self.pad_token_id = self._tok.pad_token_id
        self.eos_token_id = self._tok.eos_token_id

    def __call__(self, prompts) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self._tok(list(prompts), padding="max_length", max_length=self.max_length,
                        truncation=True).input_ids
        return np.asarray(ids, np.int32)

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
