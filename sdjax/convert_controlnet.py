"""Single-file ControlNets (lllyasviel's original ``cldm`` layout) <-> diffusers ControlNetModel names.

The original ControlNet holds the UNet's ``time_embed``, ``input_blocks`` and ``middle_block``
(LDM names, mapped by ``convert_ldm``'s UNet key table), SDXL's size conditioning as
``label_emb.0.0`` / ``label_emb.0.2``, the control image's conditioning embedding as the convs of
``input_hint_block`` (0, 2, 4, ...: conv_in, the blocks, conv_out; SiLUs between them) and the
zero convs as ``zero_convs.<i>.0`` and ``middle_block_out.0``. Its tensors sit under
``control_model.`` (beside the whole SD model in a full cldm checkpoint, whose other tensors are
skipped) or at the top level (files of the ControlNet alone).

What shapes cannot tell follows the SD conventions of ``convert_ldm``: 8 heads where the
attention projections are convolutions (SD 1.x), else heads 64 wide (SD 2.x, SDXL); SDXL's time
ids are 256 wide. Callers override any field.
"""
from __future__ import annotations

import re

from .convert_ldm import PLAIN, _indices, _plain, encoder_config, from_table, match_keys, rows, unet_table
from .params import CheckpointError

PREFIX = "control_model."
COMPONENT = "controlnet"
SDXL_TIME_EMBED_DIM = 256  # SDXL's addition_time_embed_dim (6 x 256 + 1280 pooled = 2816)
SHARED = ("time_embedding", "conv_in", "down_blocks", "mid_block")  # the UNet table's rows a ControlNet has


def layout(keys) -> str:
    """"cldm" (``control_model.*`` keys, maybe beside a whole SD model), "bare" (the cldm names at the
    top level) or "diffusers" (ControlNetModel's own names); CheckpointError otherwise."""
    keys = set(keys)
    if any(k.startswith(PREFIX) for k in keys):
        return "cldm"
    if "input_hint_block.0.weight" in keys:
        return "bare"
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers"
    raise CheckpointError(f"not a ControlNet checkpoint: no {PREFIX}* keys, no input_hint_block.0.weight (the "
                          f"original layout), no controlnet_cond_embedding.conv_in.weight (diffusers' names); "
                          f"{len(keys)} keys, the first: {', '.join(sorted(keys)[:3])}")


def _hint_convs(s):
    """The input_hint_block conv indices (0, 2, 4, ...), checked to be a conv_in, pairs of blocks and a conv_out."""
    idx = _indices(s, r"input_hint_block\.(\d+)\.weight")
    if len(idx) < 2 or idx != list(range(0, 2 * len(idx), 2)) or len(idx) % 2:
        raise CheckpointError(f"input_hint_block has convs {idx}: expected 0, 2, ..., 4k + 2 (conv_in, "
                              "two convs per level, conv_out)")
    return idx


def config_from_shapes(s) -> dict:
    """A ControlNetModel config dict from the shapes ``s`` of the original layout (no prefix)."""
    kind = "sd1" if len(s["middle_block.1.proj_in.weight"]) == 4 else "sd2"  # conv projections: SD 1.x
    c = {"_class_name": "ControlNetModel", **encoder_config(s, kind)}
    hint = _hint_convs(s)
    c["conditioning_channels"] = s["input_hint_block.0.weight"][1]
    c["conditioning_embedding_out_channels"] = [s["input_hint_block.0.weight"][0]] + [
        s[f"input_hint_block.{i}.weight"][0] for i in hint[2:-1:2]]
    if "label_emb.0.0.weight" in s:
        c.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                 projection_class_embeddings_input_dim=s["label_emb.0.0.weight"][1])
    return {k: ([_plain(x) for x in v] if isinstance(v, list) else _plain(v)) for k, v in c.items()}


def table(c) -> list:
    """[(key without prefix, [(COMPONENT, diffusers key, transform)])] of a ControlNet of config dict ``c``."""
    n, lpb = len(c["block_out_channels"]), c["layers_per_block"]
    unet = dict(c, up_block_types=["UpBlock2D"] * n)
    mods = [m for m in unet_table(unet) if m[1].split(".")[0] in SHARED]
    if c.get("addition_embed_type") == "text_time":
        mods += [("label_emb.0.0", "add_embedding.linear_1", PLAIN), ("label_emb.0.2", "add_embedding.linear_2", PLAIN)]
    levels = len(c.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    mods += [("input_hint_block.0", "controlnet_cond_embedding.conv_in", PLAIN),
             (f"input_hint_block.{4 * levels - 2}", "controlnet_cond_embedding.conv_out", PLAIN)]
    mods += [(f"input_hint_block.{2 * (i + 1)}", f"controlnet_cond_embedding.blocks.{i}", PLAIN)
             for i in range(2 * (levels - 1))]
    mods += [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}", PLAIN) for i in range(n * (lpb + 1))]
    mods.append(("middle_block_out.0", "controlnet_mid_block", PLAIN))
    return rows(COMPONENT, "", mods)


def plan(shapes: dict, overrides: dict | None = None) -> tuple[dict, list, list]:
    """(config dict, mapping, skipped keys) of a ControlNet single file in the original layout, from
    its shapes, as ``convert_ldm.plan``: mapping is [(file key, [(COMPONENT, diffusers key,
    transform)])]. ``overrides``: config fields that replace the inferred ones. CheckpointError
    naming every missing and unrecognised key."""
    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    kind = layout(shapes)
    if kind == "diffusers":
        raise CheckpointError("a ControlNet file in diffusers' names carries no config: pass its config.json "
                              "as config=, or load the folder it was saved in")
    prefix = PREFIX if kind == "cldm" else ""
    own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    try:
        config = config_from_shapes(own)
    except KeyError as e:
        raise CheckpointError(f"cannot infer the ControlNet architecture: missing key {prefix}{e.args[0]}") from None
    config.update(overrides or {})
    mapping = [(prefix + k, targets) for k, targets in table(config)]
    others = [k for k in shapes if not k.startswith(prefix)] if prefix else []
    skipped = match_keys(shapes, mapping, re.compile(r"(?!)"), others, "ControlNet architecture")
    return config, mapping, skipped


def diffusers_to_ldm(state_dict: dict, config: dict, prefix: str = PREFIX) -> dict:
    """{diffusers key: PyTorch-layout array} of a ControlNetModel of config dict ``config`` (its
    config.json) -> {``prefix`` + original key: array}: ``plan``'s mapping read backwards."""
    out = from_table(table(config), {COMPONENT: state_dict}, "a ControlNet layout")
    return {prefix + k: v for k, v in out.items()}
