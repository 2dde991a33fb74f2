"""A finished ``sdjax eval`` folder without running a model: report.json of five recipes (one with
NaN/Inf output, one identical to float, a mixed-bit one, one whose rules go by kind) and the images
in state/, written through the run's own ``State`` as ``sweep.run`` keeps them."""
import math
import os

import numpy as np

from sdjax.evaluation.state import State, _safe
from sdjax.files import atomic_write_json
from sdjax.version import __version__

PROMPTS = ["a red circle", "a small blue square on a green background", "a <b>bold</b> & 'quoted' prompt"]
SEEDS = [0, 1]
SIZE = 16
# the sensitivity sweep lists layers alphabetically; the page orders them as data flows
LAYERS = {"conv_in": 1000, "conv_out": 1152, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 4096,
          "down_blocks.0.resnets.0.conv1": 9216, "mid_block.resnets.0.conv1": 36864,
          "time_embedding.linear_1": 4096, "up_blocks.0.resnets.0.conv1": 36864}
FLOW = ["conv_in", "time_embedding.linear_1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.resnets.0.conv1", "mid_block.resnets.0.conv1", "up_blocks.0.resnets.0.conv1", "conv_out"]
MIXED = {"conv_in": 6, "time_embedding.linear_1": 6, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 16,
         "down_blocks.0.resnets.0.conv1": 4, "mid_block.resnets.0.conv1": 2, "up_blocks.0.resnets.0.conv1": 8}
MAGENTA = (255, 0, 255)


def _recipe(name, family, bits, apple, metrics, recipe, finite=True, nonfinite=None):
    return {"name": name, "family": family, "avg_bits": bits, "avg_bits_candidates": bits - 0.2, "apple_bits": apple,
            "bytes": {"unet": int(1.5e6 * bits / 16), "text_encoder": 774912, "vae": 2727644},
            "metrics": metrics, "finite": finite, "nonfinite": nonfinite, "seconds": 7.5, "recipe": recipe,
            "path": "simulated"}


def _metrics(latent, image, ssim=0.99):
    return {"noise_psnr_db": None if latent is None else latent + 5, "latent_psnr_1step_db": latent,
            "apple_latent_psnr_db": None if latent is None else latent + 20,
            "final_latent_psnr_db": None if latent is None else latent + 2, "image_psnr_db": image, "ssim": ssim,
            "adherence": {"color": 1.0, "shape": 0.9, "size": 1.0, "position": 1.0, "background": 1.0, "all": 0.9, "n": 6}}


def results():
    preset = {"name": "palette-6bit", "components": ["unet"], "weight_threshold": 2048, "source": "preset",
              "rules": [{"pattern": "*", "method": "palettize", "nbits": 6}]}
    conv = {"name": "w8-int8conv", "components": ["unet"], "rules": [{"pattern": "*", "kind": "conv", "method": "int8"}]}
    return {
        "sdjax_version": __version__,
        "model": {"source": "a <i>test</i> model", "fingerprint": "0123456789abcdef"},
        "settings": {"prompts": PROMPTS, "seeds": SEEDS, "steps": 3, "sampler": "dpmpp_2m", "guidance_scale": 7.5,
                     "negative_prompt": "", "n_one_step": 6, "batch": 4,
                     "metrics": ["noise_psnr_db", "latent_psnr_1step_db", "apple_latent_psnr_db", "image_psnr_db",
                                 "ssim", "adherence"]},
        "float": {"bytes": {"unet": 1_500_000, "text_encoder": 774912, "vae": 2727644}, "avg_bits": 16.0,
                  "metrics": {"adherence": {"all": 0.95, "color": 1.0}}},
        "recipes": [
            _recipe("palette-6bit", "uniform palettize", 6.3, 6.2, _metrics(39.0, 46.0), preset),
            _recipe("palette-2bit", "uniform palettize", 2.4, 2.4,
                    dict(_metrics(math.nan, None, ssim=math.nan), adherence=None), dict(preset, name="palette-2bit"),
                    finite=False, nonfinite="latents: 12 NaN, 0 Inf"),
            dict(_recipe("mixed-4.50", "mixed (sdjax)", 4.5, 4.4, _metrics(37.5, 44.0), MIXED),
                 chosen_for="uniform 6-bit's one-step PSNR"),
            _recipe("w8-int8", "int8", 8.4, 8.2, _metrics(math.inf, 57.0, ssim=1.0),
                    {"name": "w8-int8", "rules": [{"pattern": "*", "method": "int8"}]}),
            _recipe("w8-int8conv", "int8", 10.8, None, _metrics(54.5, 60.0, ssim=1.0), conv),
        ],
        "sensitivity": {"nbits": [2, 4], "layers": sorted(LAYERS), "numel": [LAYERS[k] for k in sorted(LAYERS)],
                        "psnr_db": [[10.0, 20.0]] * len(LAYERS), "seconds": {"measured": 81.5, "fisher": 26.0},
                        "selection": {"prompts": 32, "seeds": [2000], "pairs": 8}},
        "targets": [{"name": "uniform 6-bit quality at <= 4.5 bits", "want": ">= 39 dB", "got": "37.5 dB", "pass": False}],
    }


def float_images():
    rng = np.random.default_rng(0)
    n = len(PROMPTS) * len(SEEDS)
    return rng.uniform(10, 240, (n, SIZE, SIZE, 3)).round().astype(np.float32) / 255


def make_run(folder, res=None):
    """An evaluation folder as `sdjax eval` leaves it: report.json, and the images in state/ (its own layout)."""
    res = results() if res is None else res
    os.makedirs(folder, exist_ok=True)
    state = State(folder)
    state.write({"sdjax_version": __version__}, "manifest.json")
    f = float_images()
    state.save_arrays({"images": f}, "float.npz")
    base = (f * 255).round().astype(np.uint8)
    for i, r in enumerate(res["recipes"]):
        imgs = base.copy()
        imgs[:, 0, 0, 0] += 3                      # a difference of 3 steps: level DIFF_LEVELS[3]
        imgs[:, 1, 1] = base[:, 1, 1] + i + 1      # a pixel that tells the recipes apart
        if not r["finite"]:
            imgs[:, 4:8, 4:8] = MAGENTA            # NaN/Inf pixels, as figures.to_uint8 leaves them
        state.save_arrays({"images": imgs}, "recipes", _safe(r["name"]) + ".npz")
    atomic_write_json(os.path.join(folder, "report.json"), res)
    return res, base
