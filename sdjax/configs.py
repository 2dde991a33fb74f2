"""Model configs: frozen dataclasses read from each component's own ``config.json``.

Field names are diffusers'/transformers' own, so a config.json maps onto them directly.
Options the model code does not implement are refused by name unless they hold their
default value: a config is never silently half-honoured.
"""
from __future__ import annotations

import dataclasses
import math
import json
from typing import Any


class ConfigError(ValueError):
    """A config the models cannot honour (names the file and the option)."""


def _norm(v):
    return tuple(_norm(x) for x in v) if isinstance(v, (list, tuple)) else v


def _check_object(d, source):
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: a config must be a JSON object of options, not a {type(d).__name__}")


def _wrong_type(value, default):
    """Why ``value`` cannot stand where the field's ``default`` does (None when it can). Fields whose
    default is None take any value, checked by ``validate``."""
    number = (int, float)
    if default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a boolean"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        ok = isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, tuple):
        kinds = {type(x) for x in default} or {int, str}
        ok = isinstance(value, tuple) and all(isinstance(x, tuple(kinds)) and not isinstance(x, bool) for x in value)
        return None if ok else f"a list of {' or '.join(sorted(k.__name__ for k in kinds))}"
    return None


def _build(cls, d: dict, unsupported: dict, source: str, ignore_unknown: bool):
    _check_object(d, source)
    # options annotated Any (an int or a per-block list, ...) are left to ``validate``
    fields = {f.name: (f.default if f.type in ("int", "float", "str", "bool", "tuple") else None)
              for f in dataclasses.fields(cls)}
    kwargs, errors, typing_errors = {}, [], []
    for key, value in d.items():
        if key.startswith("_"):
            continue
        if key in fields:
            kwargs[key] = _norm(value)
            want = None if value is None else _wrong_type(kwargs[key], fields[key])  # null: checked by validate
            if want is not None:
                typing_errors.append(f"option {key}={value!r}: expected {want}")
        elif key in unsupported:
            if _norm(value) != _norm(unsupported[key]):
                errors.append(f"option {key}={value!r} is not implemented by sdjax "
                              f"(only the default {unsupported[key]!r})")
        elif not ignore_unknown:
            errors.append(f"unknown option {key}={value!r}")
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))
    try:  # validate first: its messages are the specific ones
        cfg = cls(**kwargs)
        cfg.validate(source)
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, IndexError, KeyError, OverflowError, ZeroDivisionError) as e:
        raise ConfigError(f"{source}: invalid config ({type(e).__name__}: {e})"
                          + "".join(f"; {t}" for t in typing_errors)) from None
    if typing_errors:
        raise ConfigError(f"{source}: " + "; ".join(typing_errors))
    return cfg


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    sample_size: Any = None
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0  # inference only: dropout is the identity
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: Any = 1  # an int, one per block, or per block a list per layer
    reverse_transformer_layers_per_block: Any = None  # the up blocks' (else the down list reversed)
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False  # sdjax always computes scores and softmax in float32
    resnet_out_scale_factor: float = 1.0
    only_cross_attention: Any = False
    # SDXL's micro-conditioning ("text_time"): pooled text embeds + sinusoidal time_ids -> add_embedding
    addition_embed_type: Any = None
    addition_time_embed_dim: Any = None
    projection_class_embeddings_input_dim: Any = None
    addition_embed_type_num_heads: int = 64  # unused by text_time

    def _per_block(self, v, name):
        v = (v,) * len(self.down_block_types) if not isinstance(v, tuple) else v
        if len(v) != len(self.down_block_types):
            raise ConfigError(f"{name} has {len(v)} entries for {len(self.down_block_types)} blocks")
        return v

    @property
    def heads(self):
        # diffusers' historical naming: `attention_head_dim` holds the number of heads
        # when `num_attention_heads` is unset.
        n = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return self._per_block(n, "num_attention_heads")

    @property
    def transformer_layers(self):
        """Per down block: an int, or a tuple with one count per attention (asymmetric UNets)."""
        return self._per_block(self.transformer_layers_per_block, "transformer_layers_per_block")

    def _depth_entries(self):
        """The transformer counts as given, checked against the layout diffusers builds from them
        (without expanding them): (down entries, mid count, up entries), each entry a count or a
        tuple with one count per layer of its block."""
        def count(x):
            return isinstance(x, int) and not isinstance(x, bool) and x >= 0

        def check(v, n, kind, name):
            if not (count(v) or isinstance(v, tuple) and len(v) == n and all(map(count, v))):
                raise ConfigError(f"{name} entry {v!r}: expected a count or a list of {n} counts for "
                                  f"a {kind} of {n} layers")

        tl, layers = self.transformer_layers, self.layers
        rev = self.reverse_transformer_layers_per_block
        if rev is None:
            if any(isinstance(t, tuple) for t in tl):
                raise ConfigError("transformer_layers_per_block with per-layer lists needs "
                                  "reverse_transformer_layers_per_block (as diffusers requires)")
            rev = tl[::-1]
        rev = self._per_block(rev, "reverse_transformer_layers_per_block")
        for entries, counts, kinds, name in (
                (tl, layers, self.down_block_types, "transformer_layers_per_block"),
                (rev, [n + 1 for n in layers[::-1]], self.up_block_types, "reverse_transformer_layers_per_block")):
            for v, n, kind in zip(entries, counts, kinds):
                if "CrossAttn" in kind:
                    check(v, n, kind, name)
        mid = tl[-1] if not isinstance(tl[-1], tuple) else tl[-1][:1]  # diffusers' mid block: the first
        check(mid, 1, "mid block", "transformer_layers_per_block")
        return tl, mid if isinstance(mid, int) else mid[0], rev

    @property
    def transformer_depths(self):
        """Transformer blocks in each attention as diffusers builds them: ``(down, mid, up)`` with
        ``down[i][j]`` for down block i's attention j (0 where the block has none), ``mid`` an int and
        ``up[i][j]`` likewise for the up blocks (one more layer each), which take
        reverse_transformer_layers_per_block when set, else the down blocks' list reversed."""
        tl, mid, rev = self._depth_entries()

        def expand(entries, counts, kinds):
            return tuple((0,) * n if "CrossAttn" not in kind else v if isinstance(v, tuple) else (v,) * n
                         for v, n, kind in zip(entries, counts, kinds))
        layers = self.layers
        return (expand(tl, layers, self.down_block_types), mid,
                expand(rev, [n + 1 for n in layers[::-1]], self.up_block_types))

    @property
    def layers(self):
        return self._per_block(self.layers_per_block, "layers_per_block")

    @property
    def time_embed_dim(self):
        return self.block_out_channels[0] * 4

    @property
    def is_sdxl(self) -> bool:
        """SDXL's conditioning: ``unet.apply`` needs ``added_cond`` (pooled text embeds, time_ids)."""
        return self.addition_embed_type == "text_time"

    def time_ids_length(self, text_embeds_dim: int) -> int:
        """time_ids per sample this SDXL UNet takes beside pooled text embeds of width
        ``text_embeds_dim`` (text_encoder_2's projection_dim): 6 for SDXL base, 5 for the refiner
        (``SDXL_TIME_IDS`` says what they hold). add_embedding reads the pooled embeds followed by
        each time id's sinusoidal embedding, so the count is the rest of its input width over
        addition_time_embed_dim."""
        if not self.is_sdxl:
            raise ValueError(f"addition_embed_type is {self.addition_embed_type!r}: this UNet takes no time_ids")
        rest = self.projection_class_embeddings_input_dim - text_embeds_dim
        if rest <= 0 or rest % self.addition_time_embed_dim:
            raise ValueError(f"text_embeds of width {text_embeds_dim} do not fit this UNet: add_embedding "
                             f"reads {self.projection_class_embeddings_input_dim} values, the pooled embeds "
                             f"then {self.addition_time_embed_dim} per time id")
        return rest // self.addition_time_embed_dim

    def validate(self, source):
        errs = []
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            errs.append("down_block_types, up_block_types and block_out_channels differ in length")
        for t in self.down_block_types:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                errs.append(f"down block type {t!r} is not implemented")
        for t in self.up_block_types:
            if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                errs.append(f"up block type {t!r} is not implemented")
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            errs.append(f"mid_block_type {self.mid_block_type!r} is not implemented")
        if self.act_fn not in ("silu", "swish"):
            errs.append(f"act_fn {self.act_fn!r} is not implemented")
        oca = self.only_cross_attention
        if oca is True or (isinstance(oca, tuple) and any(oca)):
            errs.append("only_cross_attention is not implemented")
        if isinstance(self.cross_attention_dim, tuple):
            errs.append("a per-block cross_attention_dim list is not implemented")
        if self.addition_embed_type not in (None, "text_time"):
            errs.append(f"addition_embed_type {self.addition_embed_type!r} is not implemented "
                        "(only 'text_time', SDXL's, or null)")
        elif self.is_sdxl:
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                v = getattr(self, name)
                if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                    errs.append(f"addition_embed_type 'text_time' needs {name} (a positive integer), not {v!r}")
        try:
            self.heads, self.layers, self._depth_entries()
        except ConfigError as e:
            errs.append(str(e))
        if errs:
            raise ConfigError(f"{source}: " + "; ".join(errs))


UNET_UNSUPPORTED = dict(
    dual_cross_attention=False, class_embed_type=None, num_class_embeds=None,
    resnet_time_scale_shift="default", resnet_skip_time_act=False, time_embedding_type="positional",
    time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
    conv_in_kernel=3, conv_out_kernel=3, attention_type="default", class_embeddings_concat=False,
    mid_block_only_cross_attention=None, cross_attention_norm=None, encoder_hid_dim=None,
    encoder_hid_dim_type=None,
)

# what SDXL's time_ids hold, per sample, by their count (UNetConfig.time_ids_length)
SDXL_TIME_IDS = {
    6: "SDXL base: original size (height, width), crop top-left (top, left), target size (height, width)",
    5: "SDXL refiner: original size (height, width), crop top-left (top, left), aesthetic score",
}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ControlNetModel: the UNet's conv_in, time embedding, down and mid blocks (``unet``
    is them as a UNetConfig), a conditioning embedding of the control image and 1x1 zero convs."""
    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    only_cross_attention: Any = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: Any = 1
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    use_linear_projection: bool = False
    upcast_attention: bool = False  # sdjax always computes scores and softmax in float32
    addition_embed_type: Any = None
    addition_time_embed_dim: Any = None
    projection_class_embeddings_input_dim: Any = None
    addition_embed_type_num_heads: int = 64  # unused by text_time
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": the control image's channels reversed
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)

    @property
    def unet(self) -> UNetConfig:
        """The down and mid blocks as the UNetConfig whose ``unet.encode`` walk runs them (its up
        blocks are stand-ins: a ControlNet has none)."""
        n = len(self.block_out_channels)
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(UNetConfig) if hasattr(self, f.name)}
        return UNetConfig(**dict(shared, up_block_types=("UpBlock2D",) * n,
                                 reverse_transformer_layers_per_block=(1,) * n))

    @property
    def is_sdxl(self) -> bool:
        return self.addition_embed_type == "text_time"

    @property
    def downscale(self) -> int:
        """Control image pixels per latent pixel: the conditioning embedding's stride-2 convs."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def validate(self, source):
        errs = []
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            errs.append(f"controlnet_conditioning_channel_order {self.controlnet_conditioning_channel_order!r} "
                        "(rgb or bgr)")
        if not self.conditioning_embedding_out_channels:
            errs.append("conditioning_embedding_out_channels is empty")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            errs.append(f"layers_per_block {self.layers_per_block!r}: a ControlNet takes one positive count")
        if errs:
            raise ConfigError(f"{source}: " + "; ".join(errs))
        self.unet.validate(source)


CONTROLNET_UNSUPPORTED = dict(
    encoder_hid_dim=None, encoder_hid_dim_type=None, class_embed_type=None, num_class_embeds=None,
    resnet_time_scale_shift="default", global_pool_conditions=False,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: Any = None
    latents_mean: Any = None
    latents_std: Any = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel: 2 per VAE level after the first (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self, source):
        errs = []
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            errs.append(f"down_block_types {self.down_block_types} (only DownEncoderBlock2D)")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            errs.append(f"up_block_types {self.up_block_types} (only UpDecoderBlock2D)")
        if self.act_fn not in ("silu", "swish"):
            errs.append(f"act_fn {self.act_fn!r} is not implemented")
        if errs:
            raise ConfigError(f"{source}: not implemented: " + "; ".join(errs))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    bos_token_id: int = 49406
    pad_token_id: Any = 1
    projection_dim: Any = None  # only used by CLIPTextModelWithProjection
    # CLIPTextModelWithProjection (SDXL's text_encoder_2): the pooled output goes through text_projection.
    # Set from the config's architectures, not a transformers option: to_dict writes it back as them.
    with_projection: bool = False

    def validate(self, source):
        p = self.projection_dim
        if self.with_projection and not (isinstance(p, int) and not isinstance(p, bool) and p > 0):
            raise ConfigError(f"{source}: CLIPTextModelWithProjection needs projection_dim (a positive "
                              f"integer), not {p!r}")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"{source}: hidden_act {self.hidden_act!r} is not implemented "
                              "(quick_gelu, gelu)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")


CLIP_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def unet_config(d: dict, source: str = "unet config") -> UNetConfig:
    return _build(UNetConfig, d, UNET_UNSUPPORTED, source, ignore_unknown=False)


def vae_config(d: dict, source: str = "vae config") -> VAEConfig:
    return _build(VAEConfig, d, {}, source, ignore_unknown=False)


def clip_config(d: dict, source: str = "text_encoder config") -> CLIPConfig:
    _check_object(d, source)
    arch = d.get("architectures") or ["CLIPTextModel"]
    if not isinstance(arch, list) or len(arch) != 1 or arch[0] not in CLIP_ARCHITECTURES:
        raise ConfigError(f"{source}: architecture {arch} is not implemented (only one of "
                          f"{', '.join(CLIP_ARCHITECTURES)})")
    if d.get("model_type", "clip_text_model") != "clip_text_model":
        raise ConfigError(f"{source}: model_type {d['model_type']!r} is not a CLIP text model")
    d = dict(d, with_projection=arch[0] == "CLIPTextModelWithProjection")
    if d["with_projection"] and "projection_dim" not in d:
        d["projection_dim"] = 512  # transformers' CLIPTextConfig default
    # transformers configs carry dozens of generic generation/runtime keys: only the
    # architecture's own are read.
    return _build(CLIPConfig, d, {}, source, ignore_unknown=True)


def controlnet_config(d: dict, source: str = "controlnet config") -> ControlNetConfig:
    _check_object(d, source)
    cls = d.get("_class_name", "ControlNetModel")
    if cls != "ControlNetModel":
        raise ConfigError(f"{source}: the config of a {cls}, not of a ControlNetModel")
    return _build(ControlNetConfig, d, CONTROLNET_UNSUPPORTED, source, ignore_unknown=False)


# Full-size architectures, for speed and memory work with random weights (init_params).
PRESETS = {
    "sd15": dict(unet=dict(cross_attention_dim=768, sample_size=64),
                 vae=dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                          up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, sample_size=512),
                 text_encoder=dict()),
    "sd21": dict(unet=dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                           upcast_attention=True, sample_size=96),
                 vae=dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                          up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, sample_size=768),
                 text_encoder=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                   num_hidden_layers=23, hidden_act="gelu")),
    # SDXL base 1.0: text_encoder CLIP ViT-L, text_encoder_2 OpenCLIP ViT-bigG; both configs keep
    # eos_token_id 2 (transformers' legacy pooling at the largest token id) as SDXL ships them
    "sdxl": dict(unet=dict(sample_size=128, block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                           up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                           attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                           addition_embed_type="text_time", addition_time_embed_dim=256,
                           projection_class_embeddings_input_dim=2816),
                 vae=dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                          up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, sample_size=1024,
                          scaling_factor=0.13025, force_upcast=True),
                 text_encoder=dict(bos_token_id=0, eos_token_id=2, projection_dim=768),
                 text_encoder_2=dict(architectures=["CLIPTextModelWithProjection"], hidden_size=1280,
                                     intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                     hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2)),
}


def preset(name: str) -> dict:
    """{component: config} of a full-size architecture ("sd15", "sd21", "sdxl")."""
    try:
        p = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
    return {c: READERS[c](d, source=f"preset {name}") for c, d in p.items()}


READERS = {"unet": unet_config, "vae": vae_config, "text_encoder": clip_config, "text_encoder_2": clip_config,
           "controlnet": controlnet_config}


def read(component: str, path: str):
    """Read ``path`` (a config.json) as the config of ``component``."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing config file for {component}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return READERS[component](d, source=path)


def to_dict(cfg) -> dict:
    """The config as diffusers/transformers would write it (lists, not tuples)."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, tuple) else v
    d = {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}
    if isinstance(cfg, UNetConfig):
        d["_class_name"] = "UNet2DConditionModel"
    elif isinstance(cfg, VAEConfig):
        d["_class_name"] = "AutoencoderKL"
    elif isinstance(cfg, ControlNetConfig):
        d["_class_name"] = "ControlNetModel"
    else:
        arch = "CLIPTextModelWithProjection" if d.pop("with_projection") else "CLIPTextModel"
        d.update(architectures=[arch], model_type="clip_text_model")
    return d
