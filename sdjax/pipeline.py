"""The pipeline object ``sdjax.load`` returns: params, configs, tokenizer, scheduler config."""
from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from . import checkpoint, clip, lora, nn
from .params import CheckpointError, canonical_dtype
from .tokenizer import Tokenizer

REFERENCE_MODEL_DIR = os.path.join(os.path.dirname(__file__), "reference_model")


def reference_model_path() -> str:
    """Folder of the embedded reference model (diffusers layout)."""
    if not os.path.exists(os.path.join(REFERENCE_MODEL_DIR, "model_index.json")):
        raise CheckpointError(
            f"{REFERENCE_MODEL_DIR}: the embedded reference model is not in this build of sdjax yet; "
            "pass a diffusers folder or a .safetensors/.ckpt file")
    return REFERENCE_MODEL_DIR


@dataclasses.dataclass
class Pipeline:
    params: dict        # {"text_encoder", "unet", "vae"} -> parameter pytrees; SDXL adds "text_encoder_2"
    configs: dict       # the same keys -> frozen config dataclasses
    tokenizer: Tokenizer | None
    scheduler_config: dict
    dtype: object
    source: str = ""
    quantization: dict | None = None  # {"recipe": recipe dict or None, ...} for a quantized pipeline
    tokenizer_2: Tokenizer | None = None  # SDXL's, for text_encoder_2 (the refiner has only this one)
    model_index: dict | None = None  # the checkpoint's model_index.json (a single file's: as diffusers writes)
    loras: tuple = ()  # ((path, scale), ...) merged into the float weights at load

    @property
    def architecture(self) -> str:
        """"sd" (SD 1.x/2.x), "sdxl" (SDXL base) or "sdxl-refiner", from the configs."""
        return checkpoint.architecture(self.configs)

    def encode_prompt(self, prompts, clip_skip: int = 0):
        """Prompts -> CLIP hidden states for cross-attention (B, 77, D).

        ``clip_skip`` as diffusers: 0 uses the last layer; k > 0 takes the output k layers
        before it, through the final layer norm."""
        if self.tokenizer is None:
            raise CheckpointError(f"{self.source}: this checkpoint has no tokenizer")
        ids = jnp.asarray(self.tokenizer(prompts))
        last, hidden, _ = clip.apply(self.params["text_encoder"], self.configs["text_encoder"], ids)
        if not clip_skip:
            return last
        cfg = self.configs["text_encoder"]
        if not 0 < clip_skip < cfg.num_hidden_layers:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, {cfg.num_hidden_layers - 1}]")
        return nn.layer_norm(hidden[-(clip_skip + 1)], self.params["text_encoder"]["final_layer_norm"],
                          cfg.layer_norm_eps)

    def encode_prompt_sdxl(self, prompts, clip_skip: int = 0):
        """SDXL: prompts -> (states (B, 77, D), pooled (B, P)): the text encoders' penultimate
        hidden states side by side (``hidden_states[-(clip_skip + 2)]``, no final layer norm;
        text_encoder then text_encoder_2, or text_encoder_2 alone for the refiner) and
        text_encoder_2's projected pooled output, as diffusers' StableDiffusionXLPipeline.encode_prompt."""
        from .conditioning import encode_prompt_sdxl
        return encode_prompt_sdxl(self, prompts, clip_skip)

    def generate(self, prompt, negative_prompt=None, steps=25, guidance_scale=7.5, sampler="dpmpp_2m",
                 seed=0, height=None, width=None, latents=None, output_type="pil", *, clip_skip=0,
                 init_image=None, strength=None, mask=None, scheduler_overrides=None, loop="host",
                 progress=True, settings=None, init_latents=None, guidance_rescale=0.0, denoising_start=None,
                 denoising_end=None, original_size=None, crops_coords_top_left=None, target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=None, negative_target_size=None,
                 aesthetic_score=None, negative_aesthetic_score=None, controlnet=None, control_image=None,
                 controlnet_conditioning_scale=1.0, control_guidance_start=0.0, control_guidance_end=1.0):
        """Generate images for a prompt or a list of prompts.

        negative_prompt: a string or one per prompt; None (no negative prompt) is the empty prompt,
        or for SDXL zero embeddings when the model's ``force_zeros_for_empty_prompt`` is set (as
        diffusers' ``negative_prompt=None``; an explicit "" is encoded).
        latents: x_T as NCHW (like diffusers); in img2img the noise added to the encoded image.
        output_type: "pil" -> list of PIL images, "np" -> float32 NHWC in [0, 1], "latent" -> the
        final scaled latents, float32 NCHW (for a refiner's ``init_latents``).
        Further keywords: clip_skip, init_image + strength (img2img), init_image + mask
        (inpainting: white is repainted), init_latents (NCHW scaled latents instead of
        init_image), scheduler_overrides (dict of scheduler config fields), loop ("host": one
        compiled step with a progress bar, or "scan"), progress, guidance_rescale (diffusers'
        rescale_noise_cfg factor). SDXL: denoising_end (the base stops at that fraction of the
        schedule) and denoising_start (the refiner continues init_latents from it), and the
        micro-conditioning original_size, crops_coords_top_left, target_size (base), their
        negative_* counterparts, aesthetic_score and negative_aesthetic_score (refiner); see
        ``sdjax.generate.GenerationSettings``.
        ``settings``: a ``sdjax.generate.GenerationSettings`` instead of the keywords it holds.
        ControlNet (diffusers' StableDiffusion[XL]ControlNet[Img2Img]Pipeline): ``controlnet`` one
        (params, config) pair from ``sdjax.load_controlnet`` or a list of them; ``control_image`` for one
        ControlNet an image (path, PIL image, (H, W, C) array in [0, 1]) or one per prompt, for several
        a list with an image per ControlNet or diffusers' nested lists (per prompt, an image per
        ControlNet); ``controlnet_conditioning_scale``,
        ``control_guidance_start`` and ``control_guidance_end`` (the fraction of model calls where each
        ControlNet acts) a number or one per ControlNet. Control images are resized to the output
        size, which defaults to the init image's or the first control image's (``sdjax.control``).
        """
        from . import control as control_nets
        from .generate import GenerationSettings, run
        control = control_nets.make(controlnet, control_image, controlnet_conditioning_scale, control_guidance_start,
                                    control_guidance_end)
        if settings is None:
            settings = GenerationSettings(
                steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed, height=height, width=width,
                clip_skip=clip_skip, strength=strength, scheduler_overrides=scheduler_overrides, loop=loop,
                guidance_rescale=guidance_rescale, denoising_start=denoising_start, denoising_end=denoising_end,
                original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                negative_original_size=negative_original_size,
                negative_crops_coords_top_left=negative_crops_coords_top_left,
                negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                negative_aesthetic_score=negative_aesthetic_score)
        return run(self, prompt, settings, negative_prompt, latents, init_image, mask, output_type, progress,
                   init_latents, control)

    @property
    def vae_scale_factor(self):
        """Image pixels per latent pixel (8 for SD)."""
        return self.configs["vae"].scale_factor

    def quantize(self, recipe, calibration=None, select=None, components=None, progress=False,
                 importance=None, hessian=None, finetune=None) -> "Pipeline":
        """A new pipeline whose params are quantized by ``recipe`` (a preset name, a JSON file, a
        dict; see ``quant.recipes``). ``components`` replaces the recipe's components;
        ``calibration``, ``importance`` (for "sensitive" palettize rules, e.g. from
        ``sdjax.evaluation.fisher.fisher``), ``hessian`` (for "gptq" palettize rules) and ``finetune``
        (for recipes with "finetune" settings, e.g.
        ``sdjax.evaluation.qat_recipe.finetune_callable(pipe, prompts)``) as ``quant.apply_recipe``."""
        import quant
        r = quant.parse_recipe(recipe, select=select, components=components)
        params = quant.apply_recipe(self.params, r, calibration, importance=importance, hessian=hessian,
                                    finetune=finetune, progress=progress)
        return dataclasses.replace(self, params=params, quantization={"recipe": r.to_json()})

    @property
    def is_quantized(self):
        import jax
        return any(nn.is_quantized(w) for w in jax.tree.leaves(self.params, is_leaf=nn.is_quantized))

    def save(self, out_dir, overwrite=False):
        """Write this pipeline as a diffusers folder (safetensors). A quantized pipeline is
        written in sdjax's quantized layout (``quant.io``; diffusers cannot read it)."""
        if self.is_quantized:
            from quant import io as qio
            return qio.save(self, out_dir, overwrite=overwrite)
        ckpt = checkpoint.Checkpoint(self.params, self.configs,
                                     self.tokenizer.folder if self.tokenizer else None,
                                     self.scheduler_config, _model_index(self), self.source,
                                     self.tokenizer_2.folder if self.tokenizer_2 else None)
        return checkpoint.save(ckpt, out_dir, overwrite=overwrite)


def _model_index(pipe):
    """The pipeline's model_index.json less sdjax's quantized-format note (None: the default for
    its architecture)."""
    if not pipe.model_index:
        return None
    return {k: v for k, v in pipe.model_index.items() if not k.startswith("_sdjax")}


def random(name="sd15", seed=0, dtype="float32") -> Pipeline:
    """A full-size architecture ("sd15", "sd21", "sdxl") with random weights: no download, for
    speed and memory work. It has no tokenizer."""
    from . import configs as cfgs
    conf = cfgs.preset(name)
    params = {c: m.init_params(conf[c], seed, dtype) for c, m in checkpoint.MODELS.items() if c in conf}
    return Pipeline(params, conf, None, {}, canonical_dtype(dtype), f"random {name} (seed {seed})")


def load_controlnet(path, dtype="float32", variant=None, config=None, progress=True):
    """(params, ControlNetConfig) of a diffusers ControlNet folder or an original-layout single file
    (``config``: config fields overriding those a single file's shapes imply, e.g. attention heads;
    or the config.json of a file in diffusers' names), for ``Pipeline.generate(controlnet=...)``."""
    return checkpoint.load_controlnet(path, canonical_dtype(dtype), variant, config, progress)


def load(path=None, dtype="float32", variant=None, configs=None, progress=True, loras=None) -> Pipeline:
    """Load a diffusers folder or single .safetensors/.ckpt; ``None`` is the embedded model.

    A folder written by ``sdjax quantize`` (``quant.io``) is recognised by its quantized
    components' metadata and loads with the same quantized weight objects.
    ``dtype`` ("float32", "bfloat16", "float16") is the params' and compute dtype (quantized
    weights keep their stored dtypes). ``configs`` overrides inferred single-file config fields
    per component. ``loras``: LoRA .safetensors files (diffusers/PEFT or kohya), each a path (scale
    1.0) or a (path, scale) pair, merged into the float weights in float32 (``sdjax.lora.merge``);
    LoraError names a file, key or shape that does not fit, before any weight is changed."""
    dt = canonical_dtype(dtype)
    path = reference_model_path() if path is None else os.fspath(path)
    specs = lora.normalize(loras)
    lora.check_files(specs)  # a missing or corrupt LoRA file fails before the model loads
    quantization = None
    from quant import io as qio
    if qio.is_quantized_folder(path):
        if specs:
            raise lora.LoraError(f"{path}: is quantized; LoRAs merge into float weights: load the float model "
                                 "with loras=..., then quantize it")
        ckpt, quantization = qio.load(path, dt, progress=progress)
    else:
        if os.path.basename(path) == qio.WEIGHTS_NAME:
            raise CheckpointError(f"{path}: is one component of an sdjax quantized folder; load the folder "
                                  f"{os.path.dirname(os.path.dirname(os.path.abspath(path)))}")
        ckpt = checkpoint.load(path, dt, variant=variant, configs=configs, progress=progress)
    params = lora.merge(ckpt.params, ckpt.configs, specs, progress=progress, source=path) if specs else ckpt.params
    tok = Tokenizer(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else None
    tok_2 = Tokenizer(ckpt.tokenizer_2_dir) if ckpt.tokenizer_2_dir else None
    return Pipeline(params, ckpt.configs, tok, ckpt.scheduler_config or {}, dt, path, quantization, tok_2,
                    ckpt.model_index, tuple(specs) or tuple((f, s) for f, s in (quantization or {}).get("loras", ())))
