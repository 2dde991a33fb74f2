"""Apple's mixed-bit palettization as Apple runs it: ml-stable-diffusion's
``mixed_bit_compression_pre_analysis.py``, step by step, on an sdjax pipeline.

    reading = AppleReading(pipe, prompts)             # Apple's reference latents of the float model
    reading.psnr(unet_params)                         # Apple's "signal integrity" of other UNet params
    sweep = AppleSweep(selection_evaluator, state)    # its candidates, sweeps, baselines and recipes
                                                      # (sdjax.evaluation.apple_sweep)

What Apple measures (``run_pipe``): ``pipe(prompts, negative_prompt=[""] * 8, num_inference_steps=1,
output_type="latent", generator=rng)`` with the pipeline's *own* scheduler (for SD 1.x's PNDM, a
single step at t = 1) and default guidance (7.5 for SD, 5.0 for SDXL), the generator's state reset
before every run, so each of the 8 prompts keeps the same ``x_T`` (drawn in order, one per prompt,
from that one generator); every latent is scored with ``compute_psnr`` rounded to 0.1 dB, then
averaged (``quant.metrics.apple_psnr_db``). ``AppleReading`` is that, with ``x_T`` from sdjax's generator
(``initial_noise(APPLE_SEED, (8, h, w, c))``: PyTorch's cannot be reproduced without PyTorch; a test
feeds the same ``x_T`` to diffusers' pipeline and compares the latents).

What it does with the reading (``apple_sweep.AppleSweep``):

- candidates: conv/linear weights with more than ``PALETTIZE_MIN_SIZE = 1e5`` elements, in the UNet's
  module order. That constant was set for SD-sized UNets; for another model it is scaled by the
  model's conv/linear weight count over SD 1.5's (``apple_min_size``: 172 for the embedded model, so
  all of its 132 layers, as nearly all of SD 1.5's are: everything but ``conv_in``/``conv_out``);
- each candidate palettized per tensor as coremltools clusters it (``palettize.coremltools_kmeans``:
  exact 1-D k-means from 10,000 weights, scikit-learn's k-means below);
- single-layer sweeps, then cumulative sweeps least sensitive first (its stable sort keeps module
  order among equal rounded PSNRs: ``module_order``);
- baselines: "original" and "linear_8bit", the latter every UNet weight (norms included) through
  ``mixed_bit.apple_linear8`` (per-tensor asymmetric int8);
- recipes at ``linspace(original - 1, linear_8bit + 5, 7)``, named by Apple's bits: ``nbits x numel``
  over the candidates, no LUTs (``mixed_bit.average_bits`` without ``cost_bits``).

Where sdjax cannot do what Apple's run does, and what it does instead: Apple's pipeline is float16 on
a GPU, whose run-to-run noise is its "original" baseline (82.2 dB for SDXL); on a deterministic CPU
that run would be infinite, so "original" is the model with its weights rounded to float16, computed
in float32 against the float32 model (sdjax's floor, as in the other families). Apple's test
resolution (768) is the model's own here.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import quant
import samplers
from quant import metrics, mixed_bit
from sdjax import conditioning
from sdjax.generate import denoise, initial_noise

APPLE_PROMPTS = 8        # RANDOM_TEST_DATA: Apple's 8 prompts
APPLE_SEED = 67280421    # x_T of Apple's reading (sdjax's generator; Apple's is torch.Generator()'s default)
# Apple does not set guidance_scale: the pipeline's default, by architecture (StableDiffusionPipeline's
# 7.5, StableDiffusionXLPipeline's 5.0)
APPLE_GUIDANCE = {"sd": 7.5, "sdxl": 5.0}
APPLE_RECIPES = 7        # --num-recipes default

# SD 1.5's UNet conv/linear weights (diffusers' UNet2DConditionModel with SD 1.5's config): the size
# Apple's PALETTIZE_MIN_SIZE was chosen for (tests/sdjax/evaluation/test_apple.py counts it)
SD15_UNET_CONV_LINEAR = 859_077_120

# diffusers' registration order of the modules on the path to a conv/linear layer (each module's
# children in the order its __init__ assigns them); numbers (list indices) sort numerically and
# names not listed come after the listed ones, alphabetically
_ORDER = ("conv_in", "time_proj", "time_embedding", "encoder_hid_proj", "class_embedding", "add_time_proj",
          "add_embedding", "time_embed_act", "down_blocks", "up_blocks", "mid_block", "conv_norm_out", "conv_act",
          "conv_out",
          "attentions", "resnets", "downsamplers", "upsamplers",                     # blocks
          "norm", "proj_in", "transformer_blocks", "proj_out",                       # Transformer2DModel
          "norm1", "conv1", "attn1", "time_emb_proj", "norm2", "attn2", "conv2",     # ResnetBlock2D and
          "norm3", "ff", "conv_shortcut",                                            # BasicTransformerBlock
          "to_q", "to_k", "to_v", "to_out", "net", "proj", "conv", "linear_1", "linear_2")
_RANK = {name: i for i, name in enumerate(_ORDER)}


def _order_key(layer):
    return tuple((0, int(p), "") if p.isdigit() else (1, _RANK.get(p, len(_RANK)), p) for p in layer.split("."))


def module_order(layers):
    """``layers`` (diffusers module names) in diffusers' ``named_modules()`` order."""
    return sorted(layers, key=_order_key)


def apple_min_size(unet_params):
    """Apple's ``PALETTIZE_MIN_SIZE`` (1e5, for SD-sized UNets) scaled by this UNet's conv/linear weight
    count over SD 1.5's; 1e5 itself for a UNet at least SD 1.5's size (SDXL: Apple's own runs)."""
    total = sum(quant.calibrate.layer_numel(unet_params).values())
    return mixed_bit.APPLE_MIN_SIZE * min(1.0, total / SD15_UNET_CONV_LINEAR)


def cycled(prompts, n=APPLE_PROMPTS):
    """``n`` prompts: ``prompts`` in order, repeated when there are fewer (Apple's reading takes 8)."""
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise ValueError("Apple's reading needs at least one prompt")
    return [prompts[i % len(prompts)] for i in range(n)]


class AppleReading:
    """Apple's one-step reading of a pipeline on ``prompts`` (8 of them: ``cycled``): the float
    model's latents once, then ``latents``/``psnr`` of other params against them.

    ``batch``: pairs per UNet call (guided: twice the rows); ``reference``: the float latents from an
    earlier run (not recomputed)."""

    def __init__(self, pipe, prompts, seed=APPLE_SEED, guidance_scale=None, batch=8, reference=None):
        self.pipe, self.prompts, self.seed = pipe, tuple(prompts), int(seed)
        self.guidance_scale = float(APPLE_GUIDANCE[pipe.architecture] if guidance_scale is None else guidance_scale)
        self.batch = int(batch)
        self.ucfg = pipe.configs["unet"]
        self.sampler = samplers.for_scheduler(pipe.scheduler_config)
        self.plan = self.sampler.plan(samplers.Schedule.from_config(pipe.scheduler_config), 1)
        size = self.ucfg.sample_size if isinstance(self.ucfg.sample_size, int) else 64
        self.image_size = size * pipe.vae_scale_factor
        self.xT = np.asarray(initial_noise(self.seed, (len(self.prompts), size, size,
                                                       pipe.configs["vae"].latent_channels)))
        self._float_conditions = None
        self.reference = np.asarray(reference) if reference is not None else self.latents(pipe.params)

    def conditions(self, params=None):
        """(negative, positive) conditioning from ``params``' text encoders (default the float ones):
        Apple's ``negative_prompt=[""] * 8``."""
        if params is None:
            if self._float_conditions is None:
                self._float_conditions = self.conditions(self.pipe.params)
            return self._float_conditions
        pipe = dataclasses.replace(self.pipe, params=params)
        return conditioning.prompt_conditions(pipe, self.prompts, "", self.image_size, self.image_size)

    def latents(self, params, unet_only=False):
        """The latents after Apple's one step, NHWC, one row per prompt. ``params``: a pipeline's params
        (its text encoders are used), or with ``unet_only`` UNet params (the float text encoders)."""
        neg, pos = self.conditions(None if unet_only else params)
        unet = params if unet_only else params["unet"]
        out = []
        for s in range(0, len(self.prompts), self.batch):
            idx = np.arange(s, min(s + self.batch, len(self.prompts)))
            context, added = conditioning.guided(neg, conditioning.rows(pos, idx))
            state = self.sampler.init(self.plan, jnp.asarray(self.xT[idx]))
            state = denoise(unet, self.ucfg, self.sampler, self.plan, state, context, self.guidance_scale,
                            added_cond=added)
            out.append(np.asarray(self.sampler.result(self.plan, state), np.float32))
        return np.concatenate(out)

    def psnr(self, params, unet_only=False):
        """Apple's signal integrity (dB): ``quant.metrics.apple_psnr_db`` against the float latents."""
        return metrics.apple_psnr_db(self.reference, self.latents(params, unet_only))
