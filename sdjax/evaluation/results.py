"""The results schema of ``sdjax eval`` read for display: metric names and titles, the values a report
shows (None: not measured, inf: identical to the float model, nan: a non-finite output)."""
from __future__ import annotations

import math
import re


COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
STANDARD_METRICS = ("noise_psnr_db", "latent_psnr_1step_db", "apple_latent_psnr_db", "image_psnr_db", "ssim", "adherence")
ADHERENCE_KEYS = ("color", "shape", "size", "position", "background", "all")
METRIC_TITLES = {
    "noise_psnr_db": "noise PSNR (dB)",
    "latent_psnr_1step_db": "latent PSNR, 1 step (dB)",
    "apple_latent_psnr_db": "Apple's reading (dB)",
    "image_psnr_db": "image PSNR (dB)",
    "final_latent_psnr_db": "final latent PSNR (dB)",
    "ssim": "SSIM",
    "adherence": "adherence (all)",
}
PLOT_FIRST = ("latent_psnr_1step_db", "image_psnr_db")   # the selection reading first, then what a user sees
NONFINITE_TEXT = "NaN/Inf in output"
GRID_MAX_COLS = 8
GRID_MAX_RECIPES = 24            # rows of the image grid besides the float model
GRID_MIN_TILE = 96               # images are upscaled (nearest neighbour) to at least this many pixels
DPI = 100


# ----------------------------------------------------------------------------------------- values


def _num(v):
    """A metric value -> float, or None when absent; an adherence dict -> its "all"."""
    if isinstance(v, dict):
        v = v.get("all")
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _is_finite_recipe(r):
    finite = r.get("finite")
    return (not r.get("nonfinite")) if finite is None else bool(finite)


def _metric_list(results):
    """Metric keys to report: the settings' list, else those present, standard ones first."""
    listed = list(((results.get("settings") or {}).get("metrics")) or [])
    seen = list(listed)
    for src in [results.get("float") or {}] + list(results.get("recipes") or []):
        for k in (src.get("metrics") or {}):
            if k not in seen:
                seen.append(k)
    if listed:
        return seen
    return [k for k in STANDARD_METRICS if k in seen] + [k for k in seen if k not in STANDARD_METRICS]


def _has_values(results, key):
    return any(_num((r.get("metrics") or {}).get(key)) is not None for r in results.get("recipes") or [])


def _title(key):
    return METRIC_TITLES.get(key, key)


def _mb(nbytes):
    return None if nbytes is None else float(nbytes) / 1e6


def _total_bytes(b):
    b = b or {}
    vals = [b.get(c) for c in COMPONENTS if b.get(c) is not None]
    return sum(vals) if vals else None


def short_layer_names(names):
    """Diffusers layer paths -> short unique labels for plots.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``down1.tf0.attn1.to_q``
    (``.bN`` is kept for the transformer block when any layer has more than block 0, as SDXL does);
    names that would collide keep their full path."""
    names = [str(n) for n in names]
    many_blocks = any(re.search(r"transformer_blocks\.[1-9]", n) for n in names)
    rules = [(r"^down_blocks\.(\d+)\.", r"down\1."), (r"^up_blocks\.(\d+)\.", r"up\1."),
             (r"^mid_block\.", "mid."), (r"attentions\.(\d+)\.", r"tf\1."), (r"resnets\.(\d+)\.", r"res\1."),
             (r"transformer_blocks\.(\d+)\.", r"b\1." if many_blocks else ""),
             (r"downsamplers\.0\.", "down."), (r"upsamplers\.0\.", "up."), (r"ff\.net\.0\.proj$", "ff.proj"),
             (r"ff\.net\.2$", "ff.out"), (r"to_out\.0$", "to_out"), (r"^time_embedding\.", "time."),
             (r"conv_shortcut$", "shortcut")]
    short = []
    for n in names:
        s = n
        for pat, rep in rules:
            s = re.sub(pat, rep, s)
        short.append(s)
    counts = {}
    for s in short:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else n for s, n in zip(short, names)]


def _fmt(v, digits):
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}f}"


def _fmt_mb(mb):
    if mb is None:
        return "-"
    if mb >= 100:
        return f"{mb:.0f}"
    if mb >= 10:
        return f"{mb:.1f}"
    if mb >= 0.01:
        return f"{mb:.2f}"
    return f"{mb:.3g}"
