"""Tiny random Stable Diffusion pipelines built with diffusers/transformers and saved with
``save_pretrained``: the oracle side of every parity test. Nothing is downloaded."""
from __future__ import annotations

import os

import numpy as np
import torch

from sdjax.tokenizer import write_bpe


WORDS = ["a", "red", "blue", "green", "circle", "square", "small", "large", "photo", "of", "the", "cat"]


def write_tokenizer(folder, pad_token="<|endoftext|>"):
    """A CLIP BPE tokenizer in the openai/clip format, with merges that make WORDS single tokens."""
    return write_bpe(folder, WORDS, pad_token)


STYLES = {
    # SD 1.x: conv projection, quick_gelu, 8 heads everywhere, epsilon
    "sd1": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
                          attention_head_dim=8, norm_num_groups=8, sample_size=16,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                clip=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                          hidden_act="quick_gelu"),
                pad_token="<|endoftext|>", prediction_type="epsilon"),
    # SD 2.x: linear projection, per-block head list, upcast_attention, gelu, v-prediction
    "sd2": dict(unet=dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=48,
                          attention_head_dim=(2, 4, 4), norm_num_groups=8, sample_size=16,
                          use_linear_projection=True, upcast_attention=True,
                          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
                clip=dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                          hidden_act="gelu"),
                pad_token="!", prediction_type="v_prediction"),
}
STYLES["inpaint"] = dict(STYLES["sd1"], unet=dict(STYLES["sd1"]["unet"], in_channels=9))


TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32)


def build_pipeline(folder, style="sd1", seed=0):
    """Save a tiny random diffusers StableDiffusionPipeline of ``style`` (a name in STYLES, or
    such a dict) into ``folder``; returns it.

    Weights get extra noise on top of diffusers' init so no layer is an identity
    (zero-initialised output convs, unit norms) that would hide a swapped tensor."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    s = STYLES[style] if isinstance(style, str) else style
    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "_tok")
    n_vocab = write_tokenizer(tok_dir, s["pad_token"])
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=n_vocab, bos_token_id=n_vocab - 2,
                                                eos_token_id=n_vocab - 1, pad_token_id=1,
                                                max_position_embeddings=77, **s["clip"]))
    unet = UNet2DConditionModel(**s["unet"])
    v = s.get("vae", TINY_VAE)
    n = len(v["block_out_channels"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        latent_channels=4, **v)
    with torch.no_grad():
        for m in (unet, vae, text_encoder):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=s["prediction_type"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # read back from disk: an in-memory config remembers which keys were defaults and
    # from_config treats them differently from the saved JSON sdjax reads
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


# SDXL: two text encoders (CLIP ViT-L- and OpenCLIP bigG-like: quick_gelu / gelu + projection), a UNet
# with no attention at the first level, per-block transformer depths, linear projections and "text_time"
# conditioning on the pooled projected output and 6 (base) or 5 (refiner: aesthetic score) time ids.
# The encoders keep SDXL's eos_token_id 2 (transformers' legacy argmax pooling).
SDXL_TIME_EMBED_DIM = 8
SDXL_CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                 hidden_act="quick_gelu")
SDXL_CLIP_2 = dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                   hidden_act="gelu", projection_dim=40)
_SDXL_UNET = dict(norm_num_groups=8, sample_size=16, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=SDXL_TIME_EMBED_DIM)
SDXL_STYLES = {
    "sdxl": dict(clip=SDXL_CLIP, clip_2=SDXL_CLIP_2, time_ids=6, unet=dict(
        _SDXL_UNET, block_out_channels=(32, 64), layers_per_block=2, transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=SDXL_CLIP["hidden_size"] + SDXL_CLIP_2["hidden_size"],
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_CLIP_2["projection_dim"])),
    # the refiner: text_encoder_2 alone, one more level, attention only in the middle ones
    "sdxl-refiner": dict(clip=None, clip_2=SDXL_CLIP_2, time_ids=5, unet=dict(
        _SDXL_UNET, block_out_channels=(32, 64, 64), layers_per_block=2, transformer_layers_per_block=2,
        attention_head_dim=(2, 4, 4), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=SDXL_CLIP_2["hidden_size"],
        projection_class_embeddings_input_dim=5 * SDXL_TIME_EMBED_DIM + SDXL_CLIP_2["projection_dim"])),
}


def build_sdxl_pipeline(folder, style="sdxl", seed=0):
    """Save a tiny random diffusers SDXL pipeline into ``folder``; returns it read back.

    ``style`` "sdxl" is a StableDiffusionXLPipeline (two tokenizers: tokenizer pads with
    <|endoftext|>, tokenizer_2 with "!" as SDXL's do), "sdxl-refiner" a StableDiffusionXLImg2ImgPipeline
    without text_encoder/tokenizer and with requires_aesthetics_score; either with SDXL's
    EulerDiscreteScheduler and a VAE with SDXL's scaling_factor. Weights get extra noise as in
    ``build_pipeline``."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    s = SDXL_STYLES[style] if isinstance(style, str) else style
    torch.manual_seed(seed)

    def text_config(folder, pad_token, kw):
        n_vocab = write_tokenizer(folder, pad_token)
        return CLIPTokenizer.from_pretrained(folder), CLIPTextConfig(
            vocab_size=n_vocab, bos_token_id=0, eos_token_id=2, pad_token_id=1, max_position_embeddings=77, **kw)

    tokenizer = text_encoder = None
    if s["clip"] is not None:
        tokenizer, cfg = text_config(os.path.join(folder, "_tok"), "<|endoftext|>", s["clip"])
        text_encoder = CLIPTextModel(cfg)
    tokenizer_2, cfg = text_config(os.path.join(folder, "_tok_2"), "!", s["clip_2"])
    text_encoder_2 = CLIPTextModelWithProjection(cfg)
    unet = UNet2DConditionModel(**s["unet"])
    v = s.get("vae", TINY_VAE)
    n = len(v["block_out_channels"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        latent_channels=4, scaling_factor=0.13025, force_upcast=True, **v)
    with torch.no_grad():
        for m in (unet, vae, text_encoder, text_encoder_2):
            for p in (m.parameters() if m is not None else ()):
                p.add_(torch.randn_like(p) * 0.05)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading", interpolation_type="linear")
    refiner = s["time_ids"] == 5
    cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    extra = dict(requires_aesthetics_score=True) if refiner else {}
    pipe = cls(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
               tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False, **extra)
    pipe.save_pretrained(folder)
    return cls.from_pretrained(folder, local_files_only=True, add_watermarker=False)


def params_from_torch(module, prefix_strip=""):
    """A torch module's state_dict as an sdjax parameter tree (sdjax layouts; ``prefix_strip`` removed
    from the front of each name, e.g. "text_model." for CLIP; position_ids buffers dropped)."""
    import jax.numpy as jnp
    from sdjax.nn import unflatten
    from sdjax.params import torch_to_sdjax
    flat = {}
    for k, v in module.state_dict().items():
        if k.endswith("position_ids"):
            continue
        k = k.removeprefix(prefix_strip)
        flat[k] = jnp.asarray(np.ascontiguousarray(torch_to_sdjax(k, v.detach().cpu().float().numpy())))
    return unflatten(flat)


# sdjax sampler name -> (diffusers scheduler class, from_config overrides)
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}), "lcm": ("LCMScheduler", {}),
}

def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def psnr(a, b):
    """PSNR in dB of images in [0, 1] (peak 1)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def rel_err(got, ref):
    """max|got - ref| / max|ref|: the issue's parity measure."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


TOL = 1e-4  # the models' parity bound: max|diff| <= 1e-4 x max|ref| in float32


def unet_io(cfg, seed=0, h=16, w=24):
    """Random UNet inputs (NCHW sample, two timesteps, context) as torch tensors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, h, w, generator=g)
    t = torch.tensor([3.0, 741.0])
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    return x, t, ctx


def torch_shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def in_torch_layout(shapes):
    """{name: sdjax shape} -> {name: PyTorch shape}."""
    from sdjax.params import torch_shape
    return {k: torch_shape(k, s) for k, s in shapes.items()}
