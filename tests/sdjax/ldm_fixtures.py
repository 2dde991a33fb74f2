"""Tiny random diffusers pipelines shaped like SD 1.x / SD 2.x / SD 1.x inpainting, and the
same weights written as CompVis/LDM single files (.safetensors or .ckpt).

The architectures follow the SD conventions that single files leave implicit (32 norm groups,
UNet heads 8 in SD 1.x and 64 wide in SD 2.x, CLIP heads 64 wide, an SD 2 text encoder of
23 layers), so the config inferred from a single file equals the one saved here.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from sdjax import convert_ldm
from sdjax.safetensors_io import Reader, write
import tiny_models

STYLES = {
    # SD 1.x: conv projection, 8 heads, quick_gelu CLIP; 3 levels, 2 resnets per level
    "sd1": dict(kind="sd1",
                unet=dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=64,
                          attention_head_dim=8, sample_size=64,
                          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
                vae=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=512),
                clip=dict(hidden_size=64, intermediate_size=96, num_attention_heads=1, num_hidden_layers=3,
                          hidden_act="quick_gelu"),
                pad_token="<|endoftext|>", prediction_type="epsilon"),
    # SD 2.x: linear projection, heads 64 wide, upcast attention, gelu OpenCLIP of 23 (+1) blocks
    "sd2": dict(kind="sd2",
                unet=dict(block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64,
                          attention_head_dim=(1, 2), use_linear_projection=True, upcast_attention=True,
                          sample_size=96, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
                vae=dict(block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=768),
                clip=dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=23,
                          hidden_act="gelu"),
                pad_token="!", prediction_type="v_prediction"),
}
# SD 1.x inpainting: 9 input channels (latents, mask, masked-image latents); two transformer
# blocks per attention to exercise depth inference
STYLES["inpaint"] = dict(STYLES["sd1"], unet=dict(STYLES["sd1"]["unet"], in_channels=9,
                                                  transformer_layers_per_block=2))

COMPONENTS = ("unet", "vae", "text_encoder")


def build_pipeline(folder, style="sd1", seed=0):
    """Save a tiny random StableDiffusionPipeline of ``style`` (a name in STYLES) into ``folder``."""
    s = STYLES[style]
    return tiny_models.build_pipeline(folder, dict(s, unet=dict(s["unet"], norm_num_groups=32),
                                                   vae=dict(s["vae"], norm_num_groups=32)), seed)


def read_state_dicts(pipe_dir):
    """{component: {key: numpy array}} of a saved diffusers folder (safetensors weights)."""
    names = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    out = {}
    for comp in COMPONENTS:
        with Reader(os.path.join(pipe_dir, comp, f"{names[comp]}.safetensors")) as r:
            out[comp] = {k: r.get(k) for k in r.keys()}
    return out


def kind_of(pipe_dir):
    """"sd2" for a gelu (OpenCLIP-style) text encoder, else "sd1"."""
    with open(os.path.join(pipe_dir, "text_encoder", "config.json")) as f:
        return "sd2" if json.load(f)["hidden_act"] == "gelu" else "sd1"


def write_single_file(pipe_dir, out_path, kind=None, extra=None):
    """Write the diffusers folder ``pipe_dir`` as an LDM single file at ``out_path``.

    ``.safetensors`` is written flat; any other suffix as a ``.ckpt`` pickle
    ``{"state_dict": ...}`` the way CompVis/Lightning saved them. ``extra`` ({ldm_key: array})
    adds tensors (EMA copies, schedule buffers, ...). Returns {ldm_key: array} as written."""
    tensors = convert_ldm.diffusers_to_ldm(read_state_dicts(pipe_dir), kind or kind_of(pipe_dir))
    tensors.update(extra or {})
    save_single_file(tensors, out_path)
    return tensors


def save_single_file(tensors, out_path):
    """{ldm_key: array} -> ``out_path``: flat ``.safetensors``, else a ``{"state_dict": ...}`` pickle."""
    if str(out_path).endswith(".safetensors"):
        write(out_path, tensors)
    else:
        torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in tensors.items()},
                    "global_step": 0}, out_path)


def read_single_file(path):
    """{ldm_key: numpy array} of a file written by ``save_single_file``."""
    if str(path).endswith(".safetensors"):
        with Reader(path) as r:
            return {k: r.get(k) for k in r.keys()}
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: t.numpy() for k, t in sd.items()}
