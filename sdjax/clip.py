"""CLIP text encoders (transformers' CLIPTextModel and CLIPTextModelWithProjection, SDXL's
text_encoder_2) as pure functions.

Parameter names are transformers' without the ``text_model.`` prefix (transformers v5 writes
CLIPTextModel's that way; v4 checkpoints' prefix is stripped at load); the projection of
CLIPTextModelWithProjection is ``text_projection.weight``, ``(hidden, projection_dim)`` as every linear.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from . import nn
from .configs import CLIPConfig
from .params import make_params


def _layer(x, p, cfg: CLIPConfig, mask):
    h = nn.layer_norm(x, p["layer_norm1"], cfg.layer_norm_eps)
    a = p["self_attn"]
    q, k, v = (nn.linear(h, a[n]) for n in ("q_proj", "k_proj", "v_proj"))
    x = x + nn.linear(nn.attention(q, k, v, cfg.num_attention_heads, mask=mask), a["out_proj"])
    h = nn.layer_norm(x, p["layer_norm2"], cfg.layer_norm_eps)
    h = nn.activation(cfg.hidden_act)(nn.linear(h, p["mlp"]["fc1"]))
    return x + nn.linear(h, p["mlp"]["fc2"])


def apply(params, config: CLIPConfig, input_ids):
    """input_ids (B, L) int -> (last_hidden_state (B, L, D), hidden_states, pooled).

    ``hidden_states`` is a tuple of num_hidden_layers + 1 arrays as transformers returns
    them: the embeddings, then each layer's output (before the final layer norm).
    ``pooled`` is the final-layer-normed state at each sequence's EOS token, (B, D), as
    CLIPTextModel's ``pooler_output``; for a ``config.with_projection`` model it is that state
    through ``text_projection``, (B, projection_dim), as CLIPTextModelWithProjection's
    ``text_embeds`` (SDXL's pooled conditioning).
    """
    emb = params["embeddings"]
    dtype = emb["token_embedding"]["weight"].dtype
    b, length = input_ids.shape
    x = jnp.take(emb["token_embedding"]["weight"], input_ids, axis=0)  # (B, L, D)
    x = (x + emb["position_embedding"]["weight"][:length][None]).astype(dtype)
    causal = jnp.where(np.tril(np.ones((length, length), bool)), 0.0, -jnp.inf).astype(jnp.float32)
    hidden_states = [x]
    for i in range(config.num_hidden_layers):
        x = _layer(x, params["encoder"]["layers"][str(i)], config, causal)
        hidden_states.append(x)
    last = nn.layer_norm(x, params["final_layer_norm"], config.layer_norm_eps)
    if config.eos_token_id == 2:
        # legacy configs (before transformers PR #24773): the EOS token has the largest id
        eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
        eos_pos = jnp.argmax(input_ids == config.eos_token_id, axis=-1)
    pooled = last[jnp.arange(b), eos_pos]
    if config.with_projection:
        pooled = nn.linear(pooled, params["text_projection"])
    return last, tuple(hidden_states), pooled


def param_shapes(config: CLIPConfig) -> dict:
    """{dotted name: shape} of every parameter, in sdjax layout."""
    d, f = config.hidden_size, config.intermediate_size
    s = {"embeddings.token_embedding.weight": (config.vocab_size, d),
         "embeddings.position_embedding.weight": (config.max_position_embeddings, d),
         "final_layer_norm.weight": (d,), "final_layer_norm.bias": (d,)}
    for i in range(config.num_hidden_layers):
        p = f"encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}self_attn.{n}.weight"] = (d, d)
            s[f"{p}self_attn.{n}.bias"] = (d,)
        for n in ("layer_norm1", "layer_norm2"):
            s[f"{p}{n}.weight"] = (d,)
            s[f"{p}{n}.bias"] = (d,)
        s[f"{p}mlp.fc1.weight"], s[f"{p}mlp.fc1.bias"] = (d, f), (f,)
        s[f"{p}mlp.fc2.weight"], s[f"{p}mlp.fc2.bias"] = (f, d), (d,)
    if config.with_projection:
        s["text_projection.weight"] = (d, config.projection_dim)
    return s


def init_params(config: CLIPConfig, seed: int = 0, dtype="float32"):
    """Random parameters for ``config`` (any size, full CLIP ViT-L/14 and OpenCLIP bigG included)."""
    return make_params(param_shapes(config), seed, dtype)
