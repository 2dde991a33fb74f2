"""Single-file (CompVis/LDM) Stable Diffusion checkpoints <-> diffusers/transformers state dicts.

A single file holds the UNet under ``model.diffusion_model.``, the VAE under
``first_stage_model.`` and the text encoder under ``cond_stage_model.``: Hugging Face CLIP
(``cond_stage_model.transformer.text_model.``) in SD 1.x, OpenCLIP
(``cond_stage_model.model.``) in SD 2.x. It carries no config, so the architecture is read
from tensor shapes; what shapes cannot tell (attention heads, norm groups, image size) follows
the SD conventions below, and a caller may override any config field.

From the configs a key table is generated (one row per LDM tensor: its diffusers names and a
transform), so missing and unknown tensors are both found by comparing key sets, and the same
table read backwards writes single files.
"""
from __future__ import annotations

import re

import numpy as np

from .params import CheckpointError

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_PREFIX = {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model."}

# Tensors that belong to no component we load: EMA copies (diffusers also loads the non-EMA
# weights by default), the DDPM schedule buffers (the scheduler config is rebuilt), the VAE's
# training loss, OpenCLIP's image tower and contrastive head, CLIP's position_ids buffer.
SCHEDULE_BUFFERS = (r"betas|alphas_cumprod(_prev)?|sqrt_(one_minus_)?alphas_cumprod|log_one_minus_alphas_cumprod|"
                    r"sqrt_recip(m1)?_alphas_cumprod|posterior_(variance|log_variance_clipped|mean_coef[12])|"
                    r"logvar|lvlb_weights")
SKIP = re.compile(
    r"model_ema\..*|first_stage_model\.loss\..*|cond_stage_model\.model\.(visual\..*|logit_scale|"
    r"text_projection|attn_mask)|cond_stage_model\.transformer\.text_model\.embeddings\.position_ids|"
    + SCHEDULE_BUFFERS)

# What shapes cannot tell, as diffusers' own single-file loader sets it: its SD 2.x default
# is stable-diffusion-2-1 (768 px, upcast attention), SD 1.x is stable-diffusion-v1-5, SDXL
# stable-diffusion-xl-base-1.0 / -refiner-1.0 (1024 px, VAE latents scaled by 0.13025).
CONVENTIONS = {
    "sd1": dict(image_size=512, upcast_attention=False, hidden_act="quick_gelu", scaling_factor=0.18215),
    "sd2": dict(image_size=768, upcast_attention=True, hidden_act="gelu", scaling_factor=0.18215),
    "sdxl": dict(image_size=1024, upcast_attention=False, hidden_act="gelu", scaling_factor=0.13025),
    "sdxl-refiner": dict(image_size=1024, upcast_attention=False, hidden_act="gelu", scaling_factor=0.13025),
}
NORM_GROUPS = 32
HEAD_DIM = 64  # SD 2.x UNet heads and every CLIP text encoder's heads are 64 wide


# --- transforms: each needs only its own tensor ----------------------------------------

def _same(a):
    return a


def _squeeze_1x1(a):
    # VAE mid-block attention: 1x1 convs (c, c, 1, 1) in LDM, linear layers (c, c) in diffusers
    return a.reshape(a.shape[:2]) if a.ndim == 4 else a


def _third(i):
    # OpenCLIP packs q, k, v along rows: in_proj (3c, c) -> rows [i*c, (i+1)*c)
    def take(a):
        n = a.shape[0] // 3
        return a[i * n:(i + 1) * n]
    take.__name__ = f"qkv_part_{i}"
    return take


_QKV = [_third(i) for i in range(3)]


def _transpose(a):  # OpenCLIP's text_projection: (hidden, proj) used as x @ P; nn.Linear's is (proj, hidden)
    return a.T


def _inverse(fns, arrays):
    """The LDM tensor whose parts, through ``fns``, are ``arrays``."""
    if len(arrays) > 1:
        return np.concatenate(arrays, axis=0)
    return arrays[0][:, :, None, None] if fns[0] is _squeeze_1x1 else arrays[0].T if fns[0] is _transpose else arrays[0]


# --- the key table ---------------------------------------------------------------------
# Rows are (ldm_suffix, diffusers_suffix, transform) inside one module; a module is added
# under an (ldm_prefix, diffusers_prefix) pair.

def _wb(ldm, dif, fn=_same):
    return [(f"{ldm}.weight", f"{dif}.weight", fn), (f"{ldm}.bias", f"{dif}.bias", _same)]


def _leaves(pairs):
    return [row for ldm, dif in pairs for row in _wb(ldm, dif)]


PLAIN = [("weight", "weight", _same), ("bias", "bias", _same)]  # a conv, linear or norm kept as is


def _unet_resnet(shortcut):
    pairs = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
             ("out_layers.0", "norm2"), ("out_layers.3", "conv2")]
    return _leaves(pairs + ([("skip_connection", "conv_shortcut")] if shortcut else []))


def _vae_resnet(shortcut):
    pairs = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")]
    return _leaves(pairs + ([("nin_shortcut", "conv_shortcut")] if shortcut else []))


def _vae_attention():
    rows = _wb("norm", "group_norm")
    for ldm, dif in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        rows += _wb(ldm, dif, _squeeze_1x1)
    return rows


def _transformer(depth):
    # SpatialTransformer: LDM and diffusers use the same names inside it
    names = ["norm", "proj_in", "proj_out"]
    for d in range(depth):
        b = f"transformer_blocks.{d}"
        names += [f"{b}.{n}" for n in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
                                       "norm1", "norm2", "norm3")]
    rows = _leaves([(n, n) for n in names])
    for d in range(depth):
        rows += [(f"transformer_blocks.{d}.{a}.{p}.weight",) * 2 + (_same,)
                 for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")]
    return rows


def _per_level(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def unet_table(c):
    boc, lpb = c["block_out_channels"], c["layers_per_block"]
    n = len(boc)
    depth = _per_level(c.get("transformer_layers_per_block", 1), n)
    down_attn = [t.startswith("CrossAttn") for t in c["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in c["up_block_types"]]
    mods = [("time_embed.0", "time_embedding.linear_1", PLAIN), ("time_embed.2", "time_embedding.linear_2", PLAIN),
            ("input_blocks.0.0", "conv_in", PLAIN), ("out.0", "conv_norm_out", PLAIN), ("out.2", "conv_out", PLAIN)]
    ch = boc[0]
    for lv in range(n):
        for j in range(lpb):
            k = 1 + lv * (lpb + 1) + j
            mods.append((f"input_blocks.{k}.0", f"down_blocks.{lv}.resnets.{j}", _unet_resnet(ch != boc[lv])))
            ch = boc[lv]
            if down_attn[lv]:
                mods.append((f"input_blocks.{k}.1", f"down_blocks.{lv}.attentions.{j}", _transformer(depth[lv])))
        if lv < n - 1:
            mods.append((f"input_blocks.{(lv + 1) * (lpb + 1)}.0.op", f"down_blocks.{lv}.downsamplers.0.conv", PLAIN))
    mods += [("middle_block.0", "mid_block.resnets.0", _unet_resnet(False)),
             ("middle_block.1", "mid_block.attentions.0", _transformer(depth[-1])),
             ("middle_block.2", "mid_block.resnets.1", _unet_resnet(False))]
    for u, d in enumerate(reversed(depth)):
        for j in range(lpb + 1):
            k = u * (lpb + 1) + j
            # up resnets always have a shortcut: their input is concatenated with a skip
            mods.append((f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{j}", _unet_resnet(True)))
            if up_attn[u]:
                mods.append((f"output_blocks.{k}.1", f"up_blocks.{u}.attentions.{j}", _transformer(d)))
        if u < n - 1:
            upsampler = f"output_blocks.{k}.{2 if up_attn[u] else 1}.conv"
            mods.append((upsampler, f"up_blocks.{u}.upsamplers.0.conv", PLAIN))
    return mods


def vae_table(c):
    boc, lpb = c["block_out_channels"], c["layers_per_block"]
    n = len(boc)
    mods = [(f"{s}.{m}", f"{s}.{m}", PLAIN) for s in ("encoder", "decoder") for m in ("conv_in", "conv_out")]
    mods += [(f"{s}.norm_out", f"{s}.conv_norm_out", PLAIN) for s in ("encoder", "decoder")]
    mods += [(m, m, PLAIN) for m in ("quant_conv", "post_quant_conv") if c.get(f"use_{m}", True)]
    for s in ("encoder", "decoder"):
        mods += [(f"{s}.mid.block_1", f"{s}.mid_block.resnets.0", _vae_resnet(False)),
                 (f"{s}.mid.block_2", f"{s}.mid_block.resnets.1", _vae_resnet(False))]
        if c.get("mid_block_add_attention", True):
            mods.append((f"{s}.mid.attn_1", f"{s}.mid_block.attentions.0", _vae_attention()))
    ch = boc[0]
    for lv in range(n):
        for j in range(lpb):
            mods.append((f"encoder.down.{lv}.block.{j}", f"encoder.down_blocks.{lv}.resnets.{j}",
                         _vae_resnet(ch != boc[lv])))
            ch = boc[lv]
        if lv < n - 1:
            mods.append((f"encoder.down.{lv}.downsample.conv", f"encoder.down_blocks.{lv}.downsamplers.0.conv", PLAIN))
    rev = boc[::-1]
    ch = rev[0]
    for i in range(n):  # LDM numbers decoder levels from the lowest resolution up
        b = n - 1 - i
        for j in range(lpb + 1):
            mods.append((f"decoder.up.{b}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _vae_resnet(ch != rev[i])))
            ch = rev[i]
        if i < n - 1:
            mods.append((f"decoder.up.{b}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", PLAIN))
    return mods


_CLIP_LAYER = [f"self_attn.{p}_proj" for p in "qkv"] + ["self_attn.out_proj", "layer_norm1", "layer_norm2",
                                                        "mlp.fc1", "mlp.fc2"]
_OPEN_CLIP_LAYER = [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                    ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]


def _open_clip_resblock():
    rows = _leaves(_OPEN_CLIP_LAYER)
    for leaf in ("weight", "bias"):
        rows.append((f"attn.in_proj_{leaf}", [f"self_attn.{p}_proj.{leaf}" for p in "qkv"], _QKV))
    return rows


def clip_table(c, open_clip, projection=False):
    """Modules of a text encoder: Hugging Face CLIP (``open_clip=False``, same names as
    transformers) or OpenCLIP (packed q/k/v); ``projection``: OpenCLIP's text_projection too."""
    layers = c["num_hidden_layers"]
    emb = [("embeddings.token_embedding.weight", "embeddings.token_embedding.weight", _same)]
    if not open_clip:
        mods = [(f"encoder.layers.{i}", f"encoder.layers.{i}", _leaves([(n, n) for n in _CLIP_LAYER]))
                for i in range(layers)]
        emb.append(("embeddings.position_embedding.weight", "embeddings.position_embedding.weight", _same))
        return [("", "", emb + _leaves([("final_layer_norm", "final_layer_norm")]))] + mods
    # diffusers' SD 2 text encoder stops one block short of OpenCLIP's: SD 2 is conditioned on
    # the penultimate layer (then ln_final), so the file's last resblock is never used.
    emb = [("token_embedding.weight", "embeddings.token_embedding.weight", _same),
           ("positional_embedding", "embeddings.position_embedding.weight", _same)]
    if projection:
        emb.append(("text_projection", "text_projection.weight", _transpose))
    mods = [(f"transformer.resblocks.{i}", f"encoder.layers.{i}", _open_clip_resblock()) for i in range(layers)]
    return [("", "", emb + _leaves([("ln_final", "final_layer_norm")]))] + mods


def _join(prefix, suffix):
    return f"{prefix}.{suffix}" if prefix else suffix


def rows(comp, prefix, mods):
    """[(ldm_key, [(comp, diffusers_key, transform)])] of one component's modules under ``prefix``."""
    out = []
    for ldm_mod, dif_mod, leaves in mods:
        for ldm, dif, fn in leaves:
            key = prefix + _join(ldm_mod, ldm)
            if isinstance(dif, list):
                out.append((key, [(comp, _join(dif_mod, d), f) for d, f in zip(dif, fn)]))
            else:
                out.append((key, [(comp, _join(dif_mod, dif), fn)]))
    return out


def _table(configs, kind):
    """[(ldm_key, [(component, diffusers_key, transform)])] for the whole file."""
    return (rows("unet", UNET, unet_table(configs["unet"])) + rows("vae", VAE, vae_table(configs["vae"]))
            + rows("text_encoder", CLIP_PREFIX[kind], clip_table(configs["text_encoder"], kind == "sd2")))


# --- architecture from shapes ----------------------------------------------------------

def _indices(keys, pattern):
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def unet_config(s, kind):
    """s: {key without 'model.diffusion_model.': shape}."""
    c = encoder_config(s, kind)
    n, lpb = len(c["block_out_channels"]), c["layers_per_block"]
    up_attn = [f"output_blocks.{u * (lpb + 1)}.1.proj_in.weight" in s for u in range(n)]
    c.update(_class_name="UNet2DConditionModel", sample_size=CONVENTIONS[kind]["image_size"] // 8,
             out_channels=s["out.2.weight"][0],
             up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn])
    return c


def encoder_config(s, kind):
    """The config fields of conv_in, the input (down) blocks and the middle block, from their shapes
    ``s`` (LDM names, no prefix): what a UNet and a ControlNet share."""
    levels = [[]]  # input block ids of each level; a downsampler closes a level
    for k in _indices(s, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{k}.0.op.weight" in s:
            levels.append([])
        else:
            levels[-1].append(k)
    lpb = len(levels[0])
    if lpb == 0 or any(len(lv) != lpb for lv in levels):
        raise CheckpointError(f"UNet levels have {[len(lv) for lv in levels]} resnets each; "
                              "only the same number per level is supported")
    boc = [s[f"input_blocks.{lv[0]}.0.out_layers.3.weight"][0] for lv in levels]
    down_attn = [f"input_blocks.{lv[0]}.1.proj_in.weight" in s for lv in levels]

    def depth(mod):
        return len(_indices(s, re.escape(mod) + r"\.transformer_blocks\.(\d+)\."))
    depths = [depth(f"input_blocks.{lv[0]}.1") if a else None for lv, a in zip(levels, down_attn)]
    mid = depth("middle_block.1")
    found = {d for d in depths if d is not None} | {mid}
    # diffusers reads the mid block's depth from the last level's entry
    tlpb = mid if len(found) == 1 else [d or 1 for d in depths[:-1]] + [mid]
    conv_in = s["input_blocks.0.0.weight"]
    return {
        "in_channels": conv_in[1],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": boc,
        "layers_per_block": lpb,
        "transformer_layers_per_block": tlpb,
        "cross_attention_dim": s["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1],
        # heads: SD 1.x has 8 in every block, SD 2.x heads 64 wide
        "attention_head_dim": 8 if kind == "sd1" else [max(1, c // HEAD_DIM) for c in boc],
        "use_linear_projection": len(s["middle_block.1.proj_in.weight"]) == 2,
        "upcast_attention": CONVENTIONS[kind]["upcast_attention"],
        "norm_num_groups": NORM_GROUPS,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
    }


def vae_config(s, kind):
    n = len(_indices(s, r"encoder\.down\.(\d+)\."))
    return {
        "_class_name": "AutoencoderKL",
        "sample_size": CONVENTIONS[kind]["image_size"],
        "in_channels": s["encoder.conv_in.weight"][1],
        "out_channels": s["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [s[f"encoder.down.{lv}.block.0.conv1.weight"][0] for lv in range(n)],
        "layers_per_block": len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": s["decoder.conv_in.weight"][1],
        "norm_num_groups": NORM_GROUPS,
        "act_fn": "silu",
        "scaling_factor": CONVENTIONS[kind]["scaling_factor"],
        "use_quant_conv": "quant_conv.weight" in s,
        "use_post_quant_conv": "post_quant_conv.weight" in s,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in s,
    }


def _clip_config(s, kind):
    # SD 2 is conditioned on OpenCLIP's penultimate layer: the file's last block is unused
    return clip_config(s, kind == "sd2", CONVENTIONS[kind]["hidden_act"], unused_blocks=int(kind == "sd2"))


def clip_config(s, open_clip, hidden_act, unused_blocks=0):
    """A CLIPTextModel config from the shapes ``s`` of a Hugging Face CLIP (``open_clip=False``)
    or OpenCLIP text tower whose last ``unused_blocks`` blocks are left out."""
    if not open_clip:
        layers = len(_indices(s, r"encoder\.layers\.(\d+)\."))
        vocab, hidden = s["embeddings.token_embedding.weight"]
        positions = s["embeddings.position_embedding.weight"][0]
        ffn = s["encoder.layers.0.mlp.fc1.weight"][0]
    else:
        layers = len(_indices(s, r"transformer\.resblocks\.(\d+)\.")) - unused_blocks
        vocab, hidden = s["token_embedding.weight"]
        positions = s["positional_embedding"][0]
        ffn = s["transformer.resblocks.0.mlp.c_fc.weight"][0]
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // HEAD_DIM),
        "max_position_embeddings": positions,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        # <|startoftext|> and <|endoftext|> are the last two entries of a CLIP vocabulary
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 1,
        "projection_dim": 512,  # transformers' default; only CLIPTextModelWithProjection uses it
    }


def _listing(title, keys, limit=20):
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}): " + ", ".join(keys[:limit]) + more


def _plain(v):
    # shapes come as tuples of ints (or numpy ints): configs hold JSON-able ints
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v


def plan(shapes: dict) -> tuple[dict, list, list]:
    """Configs, key mapping and skipped keys of a single-file checkpoint, from its shapes alone.

    ``shapes``: {ldm_key: PyTorch-layout shape} (a top-level ``state_dict`` already unwrapped).
    Returns ``(configs, mapping, skipped)``:

    - ``configs``: {"unet", "vae", "text_encoder": config dict as diffusers/transformers write
      config.json, "kind": "sd1" | "sd2"}. Shapes fix channels, levels, layers and attention
      placement; the rest follows SD conventions (``CONVENTIONS``, 32 norm groups, UNet heads
      8 in SD 1.x and 64 wide in SD 2.x, CLIP heads 64 wide): override fields if a model differs.
    - ``mapping``: [(ldm_key, [(component, diffusers_key, transform)])]; ``transform(array)``
      gives the diffusers/transformers PyTorch-layout tensor from that one LDM tensor. CLIP keys
      are transformers v5 names without ``text_model.``.
    - ``skipped``: LDM keys of nothing we load (EMA, schedule buffers, OpenCLIP's image tower,
      the last OpenCLIP text block, which SD 2 does not use).

    Raises CheckpointError naming every missing and unrecognised key.
    """
    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    kinds = [k for k, p in CLIP_PREFIX.items() if any(key.startswith(p) for key in shapes)]
    problems = [f"no {name} ({p}*)" for name, p in (("UNet", UNET), ("VAE", VAE))
                if not any(k.startswith(p) for k in shapes)]
    if not kinds:
        problems.append(f"no text encoder ({' or '.join(p + '*' for p in CLIP_PREFIX.values())})")
    elif len(kinds) > 1:
        problems.append("both a CLIP and an OpenCLIP text encoder")
    if problems:
        if any(k.startswith("conditioner.") for k in shapes):
            problems.append("'conditioner.*' keys: an SDXL (SGM) layout, read by sdjax.convert_sdxl.plan")
        raise CheckpointError("not a Stable Diffusion 1.x/2.x single-file checkpoint: " + "; ".join(problems)
                              + f" ({len(shapes)} keys, the first: {', '.join(sorted(shapes)[:3])})")
    kind = kinds[0]
    configs = infer_configs(shapes, kind, [("unet", UNET, unet_config), ("vae", VAE, vae_config),
                                           ("text_encoder", CLIP_PREFIX[kind], _clip_config)])
    mapping = _table(configs, kind)
    skipped = []
    if kind == "sd2":
        last = f"{CLIP_PREFIX['sd2']}transformer.resblocks.{configs['text_encoder']['num_hidden_layers']}."
        skipped += [k for k in shapes if k.startswith(last)]
    skipped = match_keys(shapes, mapping, SKIP, skipped, f"{kind} architecture (or is not a Stable Diffusion "
                         "1.x/2.x checkpoint)")
    return configs, mapping, skipped


def infer_configs(shapes, kind, parts):
    """{"kind": kind, component: config dict} from ``parts``: [(component, key prefix, infer(shapes
    under the prefix, kind) -> config dict)]; CheckpointError naming each one that cannot be inferred."""
    def part(prefix):
        return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    configs = {"kind": kind}
    errors = []
    for comp, prefix, infer in parts:
        try:
            configs[comp] = {k: ([_plain(x) for x in v] if isinstance(v, list) else _plain(v))
                             for k, v in infer(part(prefix), kind).items()}
        except KeyError as e:
            errors.append(f"  cannot infer the {comp} architecture: missing key {prefix}{e.args[0]}")
        except CheckpointError as e:
            errors.append(f"  cannot infer the {comp} architecture: {e}")
    if errors:
        raise CheckpointError("single-file checkpoint:\n" + "\n".join(errors))
    return configs


def match_keys(shapes, mapping, skip, skipped, what):
    """``skipped`` and the keys outside ``mapping`` that the regex ``skip`` matches, sorted;
    CheckpointError naming every missing and unrecognised key."""
    expected = {k for k, _ in mapping}
    skipped = list(skipped) + [k for k in shapes if k not in expected and skip.fullmatch(k)]
    missing = expected - shapes.keys()
    unknown = shapes.keys() - expected - set(skipped)
    if missing or unknown:
        lines = [f"single-file checkpoint does not match the inferred {what}:"]
        if missing:
            lines.append(_listing("missing keys", missing))
        if unknown:
            lines.append(_listing("unrecognised keys", unknown))
        raise CheckpointError("\n".join(lines))
    return sorted(set(skipped))


# --- the inverse: diffusers state dicts -> one LDM file --------------------------------

def structure_from_diffusers(sd):
    """The config fields the key table needs, from diffusers key names and shapes."""
    u, v = sd["unet"], sd["vae"]
    n = len(_indices(u, r"down_blocks\.(\d+)\."))

    def has_attn(block):
        return any(k.startswith(f"{block}.attentions.") for k in u)

    def depth(mod):
        return len(_indices(u, re.escape(mod) + r"\.transformer_blocks\.(\d+)\."))
    depths = [depth(f"down_blocks.{lv}.attentions.0") or 1 for lv in range(n)]
    depths[-1] = depth("mid_block.attentions.0")
    vn = len(_indices(v, r"encoder\.down_blocks\.(\d+)\."))
    return {
        "unet": {"block_out_channels": [u[f"down_blocks.{lv}.resnets.0.conv2.weight"].shape[0] for lv in range(n)],
                 "layers_per_block": len(_indices(u, r"down_blocks\.0\.resnets\.(\d+)\.")),
                 "transformer_layers_per_block": depths,
                 "down_block_types": ["CrossAttnDownBlock2D" if has_attn(f"down_blocks.{lv}") else "DownBlock2D"
                                      for lv in range(n)],
                 "up_block_types": ["CrossAttnUpBlock2D" if has_attn(f"up_blocks.{lv}") else "UpBlock2D"
                                    for lv in range(n)]},
        "vae": {"block_out_channels": [v[f"encoder.down_blocks.{lv}.resnets.0.conv2.weight"].shape[0]
                                       for lv in range(vn)],
                "layers_per_block": len(_indices(v, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
                "use_quant_conv": "quant_conv.weight" in v, "use_post_quant_conv": "post_quant_conv.weight" in v,
                "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in v},
        **{c: {"num_hidden_layers": len(_indices(t, r"encoder\.layers\.(\d+)\."))}
           for c, t in sd.items() if c.startswith("text_encoder")},
    }


def _unused_open_clip_block(hidden, ffn, dtype):
    """OpenCLIP's last text block, absent from diffusers' SD 2 text encoder. Written as an
    identity block (zero projections, unit norms), so the full OpenCLIP tower's output is the
    penultimate layer's, the one SD 2 is conditioned on."""
    shapes = {"attn.in_proj_weight": (3 * hidden, hidden), "attn.in_proj_bias": (3 * hidden,),
              "attn.out_proj.weight": (hidden, hidden), "attn.out_proj.bias": (hidden,),
              "ln_1.weight": (hidden,), "ln_1.bias": (hidden,), "ln_2.weight": (hidden,), "ln_2.bias": (hidden,),
              "mlp.c_fc.weight": (ffn, hidden), "mlp.c_fc.bias": (ffn,),
              "mlp.c_proj.weight": (hidden, ffn), "mlp.c_proj.bias": (hidden,)}
    return {k: (np.ones if k.startswith("ln_") and k.endswith("weight") else np.zeros)(s, dtype)
            for k, s in shapes.items()}


def text_keys(state_dict):
    """A transformers CLIP state dict under sdjax's names: no ``text_model.``, no position_ids buffer."""
    return {k.removeprefix("text_model."): a for k, a in state_dict.items() if not k.endswith("position_ids")}


def from_table(table, sd, what):
    """{ldm_key: array} from ``sd`` ({component: {diffusers_key: array}}) by the key ``table`` read
    backwards; CheckpointError naming every key missing from ``sd`` or without a single-file name."""
    out, missing, used = {}, [], {c: set() for c in sd}
    for ldm_key, targets in table:
        parts = []
        for comp, dkey, _ in targets:
            used[comp].add(dkey)
            if dkey not in sd[comp]:
                missing.append(f"{comp}: {dkey}")
            else:
                parts.append(np.asarray(sd[comp][dkey]))
        if len(parts) == len(targets):
            out[ldm_key] = _inverse([fn for _, _, fn in targets], parts)
    unused = [f"{c}: {k}" for c in sd for k in sd[c] if k not in used[c]]
    if missing or unused:
        lines = [f"diffusers state dicts do not match {what}:"]
        if missing:
            lines.append(_listing("missing keys", missing))
        if unused:
            lines.append(_listing("keys with no single-file name", unused))
        raise CheckpointError("\n".join(lines))
    return out


def diffusers_to_ldm(state_dicts: dict, kind: str) -> dict:
    """{"unet"|"vae"|"text_encoder": {diffusers_key: PyTorch-layout array}} -> {ldm_key: array}.

    The inverse of ``plan``'s mapping. CLIP keys may carry transformers' ``text_model.``
    prefix. For SD 2 the file gets OpenCLIP's unused last block as an identity block and an
    identity ``text_projection``, so the file has the layout of a real SD 2 checkpoint.
    """
    if kind not in CLIP_PREFIX:
        raise ValueError(f"kind must be one of {sorted(CLIP_PREFIX)}, not {kind!r}")
    sd = {"unet": state_dicts["unet"], "vae": state_dicts["vae"],
          "text_encoder": text_keys(state_dicts["text_encoder"])}
    configs = structure_from_diffusers(sd)
    out = from_table(_table(configs, kind), sd, "a Stable Diffusion 1.x/2.x layout")
    text = sd["text_encoder"]
    if kind == "sd2":
        p = CLIP_PREFIX["sd2"]
        hidden = text["final_layer_norm.weight"].shape[0]
        ffn = text["encoder.layers.0.mlp.fc1.weight"].shape[0]
        dtype = text["final_layer_norm.weight"].dtype
        last = configs["text_encoder"]["num_hidden_layers"]
        for k, a in _unused_open_clip_block(hidden, ffn, dtype).items():
            out[f"{p}transformer.resblocks.{last}.{k}"] = a
        out[f"{p}text_projection"] = np.eye(hidden, dtype=dtype)
    return out
