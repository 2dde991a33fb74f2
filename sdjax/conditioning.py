"""SDXL's conditioning, as diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline build it.

- Prompt states: each text encoder's penultimate hidden state (``hidden_states[-(clip_skip + 2)]``,
  no final layer norm) side by side on the feature axis: text_encoder's (CLIP ViT-L, 768) then
  text_encoder_2's (OpenCLIP bigG, 1280) for the base, text_encoder_2's alone for the refiner.
  The pooled embeds are text_encoder_2's projected pooled output.
- The negative side: zeros for both when no negative prompt is given (``None``) and the
  pipeline's ``force_zeros_for_empty_prompt`` (model_index.json) is true, else the negative
  prompts encoded the same way, always from the penultimate layer (diffusers ignores clip_skip
  there).
- Micro-conditioning ``time_ids``: original size, crop top-left, target size (base: 6 values) or
  original size, crop top-left, aesthetic score (refiner: 5), for the negative and positive rows.

Functions of a pipeline and plain values; the denoising loop (``sdjax.generate``) passes the
results to the UNet as ``added_cond`` traced values, so changing any of them never recompiles.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from . import clip
from .params import CheckpointError

TEXT_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
BASE_TIME_IDS, REFINER_TIME_IDS = 6, 5
DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
# GenerationSettings fields only SDXL models read: micro-conditioning (and which model takes each)
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                      "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
                      "negative_aesthetic_score")
BASE_ONLY = ("target_size", "negative_target_size")
REFINER_ONLY = ("aesthetic_score", "negative_aesthetic_score")


def force_zeros_for_empty_prompt(pipe) -> bool:
    """Whether a missing negative prompt means zero embeddings: the pipeline's model_index.json
    ``force_zeros_for_empty_prompt``, True where it is absent (the default of every diffusers
    SDXL pipeline class)."""
    value = (getattr(pipe, "model_index", None) or {}).get("force_zeros_for_empty_prompt", True)
    return bool(value)


def text_encoders(pipe):
    """[(encoder component, tokenizer)] the pipeline has, in diffusers' order."""
    out = []
    for comp, tok in TEXT_ENCODERS:
        if comp in pipe.params:
            tokenizer = getattr(pipe, tok, None)
            if tokenizer is None:
                raise CheckpointError(f"{pipe.source}: {comp} has no {tok} (the {tok}/ folder of the checkpoint)")
            out.append((comp, tokenizer))
    if not out or out[-1][0] != "text_encoder_2":
        raise CheckpointError(f"{pipe.source}: an SDXL pipeline needs text_encoder_2 (CLIPTextModelWithProjection) "
                              f"for its pooled embeds; it has {', '.join(c for c, _ in out) or 'no text encoder'}")
    return out


def encode_prompt_sdxl(pipe, prompts, clip_skip: int = 0):
    """Prompts -> (states (B, 77, sum of the encoders' widths), pooled (B, projection_dim)).

    ``clip_skip`` as diffusers' SDXL pipelines: k takes ``hidden_states[-(k + 2)]`` of each
    encoder (0: the penultimate layer), without the final layer norm."""
    encoders = text_encoders(pipe)
    depth = min(pipe.configs[c].num_hidden_layers for c, _ in encoders)
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or not 0 <= clip_skip < depth:
        raise ValueError(f"clip_skip={clip_skip!r} must be an integer in [0, {depth - 1}] (SDXL counts from the "
                         "penultimate layer)")
    states, pooled = [], None
    for comp, tokenizer in encoders:
        ids = jnp.asarray(tokenizer(list(prompts)))
        _, hidden, pooled = clip.apply(pipe.params[comp], pipe.configs[comp], ids)
        states.append(hidden[-(int(clip_skip) + 2)])
    dtype = states[-1].dtype
    states = jnp.concatenate([s.astype(dtype) for s in states], axis=-1)
    want = pipe.configs["unet"].cross_attention_dim
    if states.shape[-1] != want:
        raise ValueError(f"{pipe.source}: the text encoders give {states.shape[-1]} features ("
                         + " + ".join(f"{c} {pipe.configs[c].hidden_size}" for c, _ in encoders)
                         + f"), the UNet cross-attends to {want}: SDXL's base concatenates text_encoder and "
                         "text_encoder_2, the refiner takes text_encoder_2 alone")
    return states, pooled


def encode(pipe, prompts, negatives=None, clip_skip: int = 0):
    """(context (2B, 77, D), text_embeds (2B, P)): the negative rows, then the positive ones.

    ``negatives`` None: zeros when the pipeline forces zeros for an empty prompt, else the
    empty prompt encoded (as diffusers' ``negative_prompt=None``)."""
    states, pooled = encode_prompt_sdxl(pipe, prompts, clip_skip)
    neg_states, neg_pooled = _negative(pipe, negatives, states, pooled)
    return jnp.concatenate([neg_states, states]), jnp.concatenate([neg_pooled, pooled])


def _negative(pipe, negatives, states, pooled):
    """(states, pooled) of the negative side for ``len(states)`` rows: zeros for ``negatives`` None
    where the pipeline forces zeros for an empty prompt, else ``negatives`` (None: the empty prompt)
    encoded from the penultimate layer."""
    if negatives is None and force_zeros_for_empty_prompt(pipe):
        return jnp.zeros_like(states), jnp.zeros_like(pooled)
    negatives = [""] * len(states) if negatives is None else list(negatives)
    return encode_prompt_sdxl(pipe, negatives, 0)


def _pair(v, default):
    return tuple(float(x) for x in (default if v is None else v))


def time_ids(n: int, height: int, width: int, settings, from_image: bool) -> np.ndarray:
    """(2, n) float32: the negative row, then the positive one, as diffusers builds add_time_ids.

    ``settings`` holds the micro-conditioning fields (``GenerationSettings``). original_size and
    target_size default to (height, width), crops_coords_top_left to (0, 0); the negative sizes
    default to the positive ones. n = 5 (refiner): original size, crop, aesthetic score (default
    6.0; negative 2.5) with the negative crop defaulting to (0, 0). n = 6 (base): original size,
    crop, target size; the negative crop defaults to the positive one when no negative value is
    given or an init image is refined (diffusers' img2img/inpainting use the positive crop on both
    rows), else to (0, 0) (its text-to-image). Where diffusers ignores a negative value it was
    given (text-to-image with only one negative size, or img2img's negative crop), sdjax uses it."""
    s = settings
    orig = _pair(s.original_size, (height, width))
    crops = _pair(s.crops_coords_top_left, (0, 0))
    neg_orig = _pair(s.negative_original_size, orig)
    if n == REFINER_TIME_IDS:
        aesthetic = DEFAULT_AESTHETIC_SCORE if s.aesthetic_score is None else s.aesthetic_score
        neg_aesthetic = (DEFAULT_NEGATIVE_AESTHETIC_SCORE if s.negative_aesthetic_score is None
                         else s.negative_aesthetic_score)
        pos = orig + crops + (float(aesthetic),)
        neg = neg_orig + _pair(s.negative_crops_coords_top_left, (0, 0)) + (float(neg_aesthetic),)
    elif n == BASE_TIME_IDS:
        target = _pair(s.target_size, (height, width))
        negatives_given = any(getattr(s, k) is not None for k in (
            "negative_original_size", "negative_crops_coords_top_left", "negative_target_size"))
        neg_crops = _pair(s.negative_crops_coords_top_left, crops if from_image or not negatives_given else (0, 0))
        pos = orig + crops + target
        neg = neg_orig + neg_crops + _pair(s.negative_target_size, target)
    else:
        raise ValueError(f"SDXL UNets take {BASE_TIME_IDS} (base) or {REFINER_TIME_IDS} (refiner) time ids, not {n}")
    return np.asarray([neg, pos], np.float32)


def prompt_conditions(pipe, prompts, negative_prompt, height, width, settings=None, clip_skip=0):
    """The UNet conditioning of ``prompts`` as host float32 arrays, for code that batches rows itself
    (evaluation, calibration): ``(negative, positive)`` dicts of arrays with one row for the negative
    side and one per prompt, ``{"context": (B, L, D)}``, plus ``"text_embeds"`` (B, P) and
    ``"time_ids"`` (B, n) for an SDXL UNet.

    What ``Pipeline.generate`` would use for the same prompts: SD encodes ``negative_prompt``
    (None is the empty prompt); SDXL zeros a ``None`` negative where the pipeline forces zeros, and
    builds text-to-image time ids for images of ``height`` x ``width`` pixels from ``settings``'
    micro-conditioning (``GenerationSettings``, default none).
    Rows go to the UNet through ``unet_inputs``."""
    prompts = list(prompts)
    if pipe.architecture == "sd":
        neg = pipe.encode_prompt(["" if negative_prompt is None else negative_prompt], clip_skip)
        pos = pipe.encode_prompt(prompts, clip_skip)
        return {"context": np.asarray(neg, np.float32)}, {"context": np.asarray(pos, np.float32)}
    states, pooled = encode_prompt_sdxl(pipe, prompts, clip_skip)
    neg_states, neg_pooled = _negative(pipe, None if negative_prompt is None else [negative_prompt],
                                       states[:1], pooled[:1])
    ucfg = pipe.configs["unet"]
    if settings is None:
        from .generate import GenerationSettings
        settings = GenerationSettings()
    ids = time_ids(ucfg.time_ids_length(pooled.shape[-1]), height, width, settings, from_image=False)
    neg = {"context": neg_states, "text_embeds": neg_pooled, "time_ids": ids[:1]}
    pos = {"context": states, "text_embeds": pooled, "time_ids": np.repeat(ids[1:], len(prompts), 0)}
    as_host = lambda d: {k: np.asarray(v, np.float32) for k, v in d.items()}  # noqa: E731
    return as_host(neg), as_host(pos)


def rows(conditions, index):
    """``conditions`` (a dict from ``prompt_conditions``) at rows ``index`` (an int array or slice)."""
    return {k: v[index] for k, v in conditions.items()}


def guided(negative, positive, put=None):
    """``[negative rows repeated; positive rows]`` for a guided batch of len(positive) rows:
    ``(context, added_cond or None)`` for ``sdjax.generate.denoise``. ``put``: a function placing
    each half on devices (default ``jnp.asarray``)."""
    put = put or jnp.asarray
    n = len(positive["context"])
    both = {k: jnp.concatenate([put(np.repeat(np.asarray(negative[k]), n, 0)), put(positive[k])]) for k in negative}
    return unet_inputs(both)


def unet_inputs(conditions):
    """A conditions dict -> ``(context, added_cond or None)``, the UNet's two conditioning arguments."""
    conditions = dict(conditions)
    context = conditions.pop("context")
    return context, (conditions or None)
