"""CLIP BPE tokenizer from a checkpoint's own files (transformers' CLIPTokenizer does the BPE)."""
from __future__ import annotations

import gzip
import os

import numpy as np

from .files import atomic_folder

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


def _byte_alphabet():
    """The GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256+."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_bpe(folder, words, pad_token="<|endoftext|>", max_length=77) -> int:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, special tokens) whose merges make each of
    ``words`` one token; any other text still tokenizes, byte by byte. Returns the vocabulary size."""
    os.makedirs(folder, exist_ok=True)
    chars = _byte_alphabet()
    vocab = chars + [c + "</w>" for c in chars]
    merges, seen = [], set()
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merged, m = parts[0] + parts[1], f"{parts[0]} {parts[1]}"
            if m not in seen:
                seen.add(m)
                merges.append(m)
                vocab.append(merged)
            parts = [merged] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    write_files(folder, vocab, merges, pad_token=pad_token, max_length=max_length)
    return len(vocab)


def write_files(folder, vocab, merges, pad_token=None, max_length=77, config=None):
    """The one writer of CLIP BPE tokenizer files in the Hugging Face layout: ``vocab.json`` (``vocab``:
    tokens in id order, or ``{token: id}``) and ``merges.txt`` (``merges``: "a b" strings or pairs);
    with ``pad_token`` also ``special_tokens_map.json`` and ``tokenizer_config.json`` (``config``:
    more fields for it). Each file is written atomically. Returns ``folder``."""
    import json

    from .files import atomic_write_text
    os.makedirs(folder, exist_ok=True)
    ids = vocab if isinstance(vocab, dict) else {t: i for i, t in enumerate(vocab)}
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    atomic_write_text(os.path.join(folder, "vocab.json"), json.dumps(ids, ensure_ascii=False))
    atomic_write_text(os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "".join(m + "\n" for m in lines))
    if pad_token is not None:
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": pad_token}
        atomic_write_text(os.path.join(folder, "special_tokens_map.json"), json.dumps(special, indent=2))
        atomic_write_text(os.path.join(folder, "tokenizer_config.json"),
                          json.dumps({**special, "model_max_length": max_length, "do_lower_case": True,
                                      "tokenizer_class": "CLIPTokenizer", **(config or {})}, indent=2))
    return str(folder)


# --- the tokenizer a single file does not carry ------------------------------------------

VOCAB_GZ = os.path.join(os.path.dirname(__file__), "clip_vocab", "bpe_simple_vocab_16e6.txt.gz")
PAD_TOKEN = {"sd1": "<|endoftext|>", "sd2": "!"}  # the pad tokens of SD 1.x's and SD 2.x's tokenizers


def _bytes_to_unicode():
    # CLIP's byte-level alphabet: printable bytes stand for themselves, the others map to 256+
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(len(extra))]


def clip_tokenizer_files(out_dir, kind):
    """Write the CLIP BPE tokenizer of an SD ``kind`` ("sd1" | "sd2") into ``out_dir`` in the
    Hugging Face layout of openai/clip-vit-large-patch14 (vocab.json, merges.txt,
    special_tokens_map.json, tokenizer_config.json), from the vendored OpenAI vocabulary.
    SD 1.x pads with <|endoftext|>, SD 2.x with "!". Returns ``out_dir``."""
    if kind not in PAD_TOKEN:
        raise ValueError(f"kind must be one of {sorted(PAD_TOKEN)}, not {kind!r}")
    with gzip.open(VOCAB_GZ, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # as OpenAI's tokenizer reads it: a header line, then the 49152 - 256 - 2 merges in rank order
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return write_files(out_dir, vocab, merges, pad_token=PAD_TOKEN[kind],
                       config={"errors": "replace", "add_prefix_space": False})


def tokenizer_dir(kind):
    """A folder holding the tokenizer of ``kind``, written once into the sdjax cache
    ($SDJAX_CACHE, else ~/.cache/sdjax)."""
    cache = os.environ.get("SDJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sdjax")
    out = os.path.join(cache, f"clip-tokenizer-{kind}")
    if not os.path.exists(os.path.join(out, "tokenizer_config.json")):
        try:
            with atomic_folder(out) as tmp:
                clip_tokenizer_files(tmp, kind)
        except OSError:  # a concurrent writer's complete folder got there first
            if not os.path.exists(os.path.join(out, "tokenizer_config.json")):
                raise
    return out
