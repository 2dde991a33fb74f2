"""Single-file SDXL checkpoints (Stability's SGM layout) <-> diffusers/transformers state dicts.

An SDXL base file holds the UNet under ``model.diffusion_model.`` (its size conditioning MLP as
``label_emb.0.0`` / ``label_emb.0.2``, diffusers' ``add_embedding.linear_1`` / ``linear_2``), the VAE
under ``first_stage_model.``, and two text encoders under ``conditioner.embedders.``: CLIP ViT-L in
Hugging Face names (``conditioner.embedders.0.transformer.text_model.``, diffusers' ``text_encoder``)
and OpenCLIP ViT-bigG (``conditioner.embedders.1.model.``: packed ``attn.in_proj_*``,
``positional_embedding``, ``ln_final``, and ``text_projection``, a (hidden, proj) matrix used as
``x @ P``; diffusers' ``text_encoder_2``, a CLIPTextModelWithProjection of all its blocks). A refiner
file has only the OpenCLIP encoder, as ``conditioner.embedders.0.model.``.

As in ``convert_ldm``, shapes fix the architecture and one key table, generated from the configs,
maps the file both ways. What shapes cannot tell follows SDXL's conventions (``convert_ldm.CONVENTIONS``:
1024 px, VAE latents scaled by 0.13025; UNet and CLIP heads 64 wide, 32 norm groups). The width of
one time id comes from the UNet's ``label_emb.0.0`` input: the pooled text embedding plus 6 time ids
in a base (original size, crop, target size) and 5 in a refiner (original size, crop, aesthetic score).
"""
from __future__ import annotations

import re

from .convert_ldm import (PLAIN, SCHEDULE_BUFFERS, UNET, VAE, clip_config, clip_table, from_table, infer_configs,
                          match_keys, rows, structure_from_diffusers, text_keys, unet_config, unet_table, vae_config,
                          vae_table)
from .params import CheckpointError

EMBEDDERS = "conditioner.embedders."
TOWERS = {"clip": "transformer.text_model.", "open_clip": "model."}  # under conditioner.embedders.<i>.
TOWER_NAMES = {"clip": "CLIP (transformer.text_model.*)", "open_clip": "OpenCLIP (model.*)"}
# each layout's text encoders: {embedder index: (diffusers component, tower)}
LAYOUTS = {
    "sdxl": {0: ("text_encoder", "clip"), 1: ("text_encoder_2", "open_clip")},
    "sdxl-refiner": {0: ("text_encoder_2", "open_clip")},
}
NAMES = {"sdxl": "SDXL base", "sdxl-refiner": "SDXL refiner"}
TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}
# the tokenizer of each text encoder, as the SD kind whose pad token it shares ("!" for OpenCLIP)
TOKENIZERS = {"text_encoder": ("tokenizer", "sd1"), "text_encoder_2": ("tokenizer_2", "sd2")}
HIDDEN_ACT = {"clip": "quick_gelu", "open_clip": "gelu"}

# Tensors of no component we load: EMA copies, the VAE's training loss, the denoiser's sigma table,
# OpenCLIP's image tower and contrastive scale, CLIP's position_ids buffer, DDPM schedule buffers.
SKIP = re.compile(
    r"model_ema\..*|first_stage_model\.loss\..*|denoiser\..*|conditioner\.embedders\.\d+\.model\.(visual\..*|"
    r"logit_scale|attn_mask)|conditioner\.embedders\.\d+\.transformer\.text_model\.embeddings\.position_ids|"
    + SCHEDULE_BUFFERS)

# What a diffusers SDXL folder's scheduler_config.json says (a single file carries none)
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "interpolation_type": "linear", "sample_max_value": 1.0, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "use_karras_sigmas": False}


def is_sgm(keys) -> bool:
    """Whether a single file's keys are in the SGM (SDXL) layout: ``conditioner.*`` text encoders."""
    return any(k.startswith("conditioner.") for k in keys)


def _towers(keys):
    """{embedder index: "clip" | "open_clip" | description of unknown keys} of the file's text encoders."""
    found = {}
    for k in keys:
        m = re.match(r"conditioner\.embedders\.(\d+)\.(.*)", k)
        if m:
            kind = next((t for t, p in TOWERS.items() if m.group(2).startswith(p)), None)
            found.setdefault(int(m.group(1)), set()).add(kind or f"other ({k})")
    return {i: " + ".join(sorted(t)) for i, t in sorted(found.items())}


def _describe(towers):
    return ", ".join(f"embedders.{i}: {TOWER_NAMES.get(t, t)}" for i, t in towers.items()) or "none"


def detect(keys) -> str:
    """"sdxl" or "sdxl-refiner" from an SGM file's keys; CheckpointError naming what was found
    and what each layout has otherwise."""
    keys = list(keys)
    towers = _towers(keys)
    kind = next((k for k, lay in LAYOUTS.items() if towers == {i: t for i, (_, t) in lay.items()}), None)
    problems = [f"no {name} ({p}*)" for name, p in (("UNet", UNET), ("VAE", VAE))
                if not any(k.startswith(p) for k in keys)]
    if kind is None:
        want = "; ".join(f"{NAMES[k]}: " + _describe({i: t for i, (_, t) in lay.items()}) for k, lay in LAYOUTS.items())
        problems.append(f"its text encoders are {_describe(towers)}, expected {want}")
    if problems:
        raise CheckpointError("an SGM-layout (conditioner.*) single file that is not an SDXL base or refiner "
                              "checkpoint: " + "; ".join(problems))
    return kind


def _prefix(i, tower):
    return f"{EMBEDDERS}{i}.{TOWERS[tower]}"


def _text_config(tower):
    def infer(s, kind):
        c = clip_config(s, tower == "open_clip", HIDDEN_ACT[tower])
        # as SDXL's text encoder configs ship: pooling at the largest token id, <|endoftext|>
        c.update(bos_token_id=0, eos_token_id=2)
        if tower == "open_clip":
            c.update(architectures=["CLIPTextModelWithProjection"], projection_dim=s["text_projection"][1])
        return c
    return infer


def _unet_config(pooled, projection_key):
    def infer(s, kind):
        c = unet_config(s, kind)
        n_in = s["label_emb.0.0.weight"][1]
        if pooled is None:
            raise CheckpointError(f"the pooled text width comes from {projection_key}, which is missing")
        width, rest = divmod(n_in - pooled, TIME_IDS[kind])
        if rest or width <= 0:
            raise CheckpointError(
                f"{UNET}label_emb.0.0.weight takes {n_in} features, which is not the pooled text embedding "
                f"({pooled}, from {projection_key}) plus {TIME_IDS[kind]} time ids of equal width, as an "
                f"{NAMES[kind]} UNet's is (a base has 6 time ids, a refiner 5)")
        c.update(addition_embed_type="text_time", addition_time_embed_dim=width,
                 projection_class_embeddings_input_dim=n_in)
        return c
    return infer


def sgm_unet_table(c):
    """The UNet's modules in the SGM layout, (ldm module, diffusers module, leaves) as
    ``convert_ldm.unet_table``: that table plus the size-conditioning MLP (``label_emb``)."""
    return unet_table(c) + [("label_emb.0.0", "add_embedding.linear_1", PLAIN),
                            ("label_emb.0.2", "add_embedding.linear_2", PLAIN)]


def _table(configs, kind):
    table = rows("unet", UNET, sgm_unet_table(configs["unet"])) + rows("vae", VAE, vae_table(configs["vae"]))
    for i, (comp, tower) in LAYOUTS[kind].items():
        open_clip = tower == "open_clip"
        table += rows(comp, _prefix(i, tower), clip_table(configs[comp], open_clip, projection=open_clip))
    return table


def plan(shapes: dict) -> tuple[dict, list, list]:
    """Configs, key mapping and skipped keys of an SDXL base or refiner single file, as
    ``convert_ldm.plan``: configs has "unet", "vae", "text_encoder_2", "text_encoder" (base only)
    and "kind" ("sdxl" | "sdxl-refiner"). Raises CheckpointError naming every missing and
    unrecognised key, or what the file holds when it is neither layout."""
    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    kind = detect(shapes)
    i = next(i for i, (c, _) in LAYOUTS[kind].items() if c == "text_encoder_2")
    projection_key = _prefix(i, "open_clip") + "text_projection"
    pooled = shapes[projection_key][1] if len(shapes.get(projection_key, ())) == 2 else None
    parts = [("unet", UNET, _unet_config(pooled, projection_key)), ("vae", VAE, vae_config)]
    parts += [(comp, _prefix(i, tower), _text_config(tower)) for i, (comp, tower) in LAYOUTS[kind].items()]
    configs = infer_configs(shapes, kind, parts)
    texts = [c for c, _ in LAYOUTS[kind].values()]
    width = sum(configs[c]["hidden_size"] for c in texts)
    if configs["unet"]["cross_attention_dim"] != width:
        raise CheckpointError(
            f"not an {NAMES[kind]} checkpoint: its UNet's cross-attention takes "
            f"{configs['unet']['cross_attention_dim']} features, its text encoders give {width} ("
            + " + ".join(f"{c} {configs[c]['hidden_size']}" for c in texts) + ")")
    mapping = _table(configs, kind)
    return configs, mapping, match_keys(shapes, mapping, SKIP, [], f"{NAMES[kind]} architecture")


def diffusers_to_sgm(state_dicts: dict, kind: str = "sdxl") -> dict:
    """{"unet", "vae", "text_encoder_2", and for a base "text_encoder": {diffusers key: PyTorch-layout
    array}} -> {SGM key: array}: the inverse of ``plan``'s mapping (CLIP keys may carry
    transformers' ``text_model.`` prefix)."""
    if kind not in LAYOUTS:
        raise ValueError(f"kind must be one of {sorted(LAYOUTS)}, not {kind!r}")
    texts = [c for c, _ in LAYOUTS[kind].values()]
    absent = [c for c in ["unet", "vae", *texts] if c not in state_dicts]
    if absent:
        raise ValueError(f"an {NAMES[kind]} file needs the state dicts of {absent}")
    sd = {"unet": state_dicts["unet"], "vae": state_dicts["vae"], **{c: text_keys(state_dicts[c]) for c in texts}}
    return from_table(_table(structure_from_diffusers(sd), kind), sd, f"an {NAMES[kind]} layout")
