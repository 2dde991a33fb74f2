"""The "quality vs bits" report of ``sdjax eval``: results dict -> Markdown, JSON, plots, image grids.

    from sdjax.evaluation import report
    files = report.write_report(results, "eval_out", images={"float": imgs, "palette-6bit": imgs6})
    # {"json": ".../report.json", "quality_vs_bits": ..., "sizes": ..., "sensitivity": ...,
    #  "grid": ..., "markdown": ".../report.md"}

The evaluation engine measures; this module only renders what it measured, so a report can be
redrawn from ``report.json`` alone (``write_report(json.load(f), out_dir)``) without running a
model. The results schema is the engine's (see ``write_report``); optional keys may be missing
or None, and metric values may be None (not measured), inf (identical to the float model) or nan.

Every file is written atomically: to ``<name>.tmp`` in the same folder, flushed and fsynced,
then ``os.replace``d onto the name, so a run killed midway leaves each file either old or
complete, never half-written (the temporary file is removed when the writer raises).

JSON: non-finite floats are written as Python's ``json`` writes them, ``Infinity``, ``-Infinity``
and ``NaN``. ``json.load`` reads them back, so ``report.json`` round-trips; strict parsers
(JavaScript's ``JSON.parse``, jq) reject them. That is kept on purpose: the alternative, strings,
would make a PSNR column a mix of numbers and strings for every reader instead.

Plots use matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg on save), never
pyplot, so no display is needed and the caller's pyplot backend and figure list are left alone.
Image grids use Pillow only.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings

import numpy as np

COMPONENTS = ("unet", "text_encoder", "vae")
STANDARD_METRICS = ("noise_psnr_db", "latent_psnr_1step_db", "image_psnr_db", "ssim", "adherence")
ADHERENCE_KEYS = ("color", "shape", "size", "position", "background", "all")
METRIC_TITLES = {
    "noise_psnr_db": "noise PSNR (dB)",
    "latent_psnr_1step_db": "latent PSNR, 1 step (dB)",
    "image_psnr_db": "image PSNR (dB)",
    "final_latent_psnr_db": "final latent PSNR (dB)",
    "ssim": "SSIM",
    "adherence": "adherence (all)",
}
PLOT_FIRST = ("latent_psnr_1step_db", "image_psnr_db")   # Apple's protocol first, then what a user sees
NONFINITE_TEXT = "NaN/Inf in output"
GRID_MAX_COLS = 8
GRID_MAX_RECIPES = 24            # rows of the image grid besides the float model
GRID_MIN_TILE = 96               # images are upscaled (nearest neighbour) to at least this many pixels
DPI = 100


# the project's atomic writers, under the names this module's users know
from sdjax.files import (atomic_save_figure, atomic_save_image, atomic_write_json,  # noqa: E402,F401
                         atomic_write_text)


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


# ----------------------------------------------------------------------------------------- plots


def _figure(w, h):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h))


_MARKERS = "osD^v<>ph*"


def _family_order(recipes):
    fams = []
    for r in recipes:
        f = r.get("family") or "other"
        if f not in fams:
            fams.append(f)
    return fams


def _quality_panel(ax, results, metric):
    recipes = [r for r in results.get("recipes") or [] if _num(r.get("avg_bits")) is not None]
    fams = _family_order(recipes)
    n_points = len(recipes)
    bad_x, bad_names, top_x, top_names = [], [], [], []
    any_finite = False
    for i, fam in enumerate(fams):
        pts, color = [], f"C{i % 10}"
        for r in recipes:
            if (r.get("family") or "other") != fam:
                continue
            x, y = float(r["avg_bits"]), _num((r.get("metrics") or {}).get(metric))
            if y is not None and math.isfinite(y):
                pts.append((x, y, r.get("name", "?")))
            elif y == math.inf:
                top_x.append(x)
                top_names.append(r.get("name", "?"))
            elif y is not None or not _is_finite_recipe(r):     # nan, -inf, or not measured because NaN
                bad_x.append(x)
                bad_names.append(r.get("name", "?"))
        if not pts:
            continue
        any_finite = True
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color, marker=_MARKERS[i % len(_MARKERS)],
                ms=5, lw=1.2, label=fam)
        if n_points <= 16:
            for x, y, name in pts:
                ax.annotate(name, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6.5, color=color)
    fv = _num(((results.get("float") or {}).get("metrics") or {}).get(metric))
    if fv is not None and math.isfinite(fv):
        ax.axhline(fv, color="k", ls="--", lw=0.9, label="float")
        any_finite = True
    if not any_finite:
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center", color="0.4")
    trans = ax.get_xaxis_transform()          # x in data, y in axes (0 = bottom, 1 = top)
    if bad_x:
        ax.plot(bad_x, [0] * len(bad_x), "x", color="red", ms=9, mew=2, transform=trans, clip_on=False,
                label="NaN/Inf (at bottom)")
        if n_points <= 16:
            for x, name in zip(bad_x, bad_names):
                ax.annotate(name, (x, 0), xycoords=trans, xytext=(4, 6), textcoords="offset points",
                            fontsize=6.5, color="red")
    if top_x:
        ax.plot(top_x, [1] * len(top_x), "^", color="green", ms=7, transform=trans, clip_on=False,
                label="identical to float (inf, at top)")
        if n_points <= 16:
            for x, name in zip(top_x, top_names):
                ax.annotate(name, (x, 1), xycoords=trans, xytext=(4, -10), textcoords="offset points",
                            fontsize=6.5, color="green")
    ax.margins(y=0.12)                         # keep finite points clear of the x / triangle rows
    ax.set_xlabel("average bits per UNet weight (incl. LUTs/scales)", fontsize=8)
    ax.set_ylabel(_title(metric), fontsize=8)
    ax.set_title(_title(metric) + " vs bits", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def plot_quality_vs_bits(results, path, metric="latent_psnr_1step_db"):
    """Quality metric(s) against average bits per weight, one line per recipe family. Returns ``path``.

    ``metric``: a metric key or a sequence of them (one panel each, 3 per row). Recipes are sorted
    by bits within a family; names label the points when there are at most 16. The float model's
    value is a dashed line when finite (a PSNR against itself is inf and is left out). A recipe
    whose value is nan/-inf, or missing because its output was NaN/Inf, is a red x on the bottom
    axis; +inf (identical to float) is a green triangle on the top axis."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if not metrics:
        raise ValueError("plot_quality_vs_bits: no metric to plot")
    ncols = min(3, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig = _figure(5.2 * ncols, 4.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, m in enumerate(metrics):
        _quality_panel(axes[i], results, m)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    legend = {}                                # one legend for all panels: every family, in order
    for ax in axes[:len(metrics)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    special = ("float", "NaN/Inf (at bottom)", "identical to float (inf, at top)")
    legend = {k: legend[k] for k in [k for k in legend if k not in special] + [k for k in special if k in legend]}
    bottom = 0.0
    if legend:
        ncol = min(len(legend), 6)
        bottom = min(0.4, (0.15 + 0.25 * -(-len(legend) // ncol)) / fig.get_figheight())
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return atomic_save_figure(fig, path)


def _psnr_range(values):
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 60.0
    lo = 5.0 * math.floor(max(float(finite.min()), 0.0) / 5.0)
    hi = 5.0 * math.ceil(min(float(finite.max()), 100.0) / 5.0)
    return lo, (hi if hi > lo else lo + 5.0)


def plot_sensitivity_heatmap(sensitivity, path):
    """Single-layer latent PSNR as a layers x nbits heatmap. Returns ``path``.

    Colour range: the finite values rounded out to 5 dB, at most 0-100 dB; inf is drawn at the top,
    -inf at the bottom, nan in grey. The figure grows with the layer count (about 0.15 in a row)."""
    from matplotlib import colormaps
    nbits = list(sensitivity.get("nbits") or [])
    layers = list(sensitivity.get("layers") or [])
    psnr = np.array(sensitivity.get("psnr_db") or np.zeros((len(layers), len(nbits))), dtype=float)
    psnr = psnr.reshape(len(layers), len(nbits))
    lo, hi = _psnr_range(psnr)
    shown = np.where(np.isnan(psnr), np.nan, np.clip(np.nan_to_num(psnr, nan=0.0, posinf=hi, neginf=lo), lo, hi))
    labels = short_layer_names(layers)
    n = max(len(layers), 1)
    label_w = 0.3 + 0.055 * max([len(s) for s in labels] + [4])
    fig = _figure(label_w + 1.7 + 0.75 * max(len(nbits), 1), 1.6 + 0.15 * n)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="0.8")
    im = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_xticks(range(len(nbits)), [f"{b} bit" for b in nbits], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(layers)), labels, fontsize=6)
    if len(layers) <= 200:
        for i in range(len(layers)):
            for j in range(len(nbits)):
                v = psnr[i, j]
                text = "nan" if np.isnan(v) else ("inf" if v == math.inf else f"{v:.0f}")
                dark = np.isnan(shown[i, j]) or shown[i, j] > lo + 0.6 * (hi - lo)
                ax.text(j, i, text, ha="center", va="center", fontsize=5.5, color="k" if dark else "w")
    below, above = bool((psnr < lo).any()), bool((psnr > hi).any())     # nan compares False
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max"}.get((below, above), "both")
    cb = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.04, aspect=min(40, 4 + 2 * n), extend=extend,
                      extendfrac=min(0.05, 1.5 / (1.6 + 0.15 * n) / 10))
    cb.set_label("latent PSNR, this layer quantized (dB)", fontsize=7)
    cb.ax.tick_params(labelsize=6)
    title = "Layer sensitivity (low PSNR = sensitive)"
    rho = sensitivity.get("spearman")
    if rho:
        title += "\nSpearman(Fisher, measured): " + ", ".join(
            f"{k} bit {_fmt(_num(v), 2)}" for k, v in rho.items())
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def plot_sizes(results, path):
    """Stacked horizontal bars: MB (10^6 bytes) per component of the float model and each recipe.
    Returns ``path``."""
    rows = []
    fl = results.get("float") or {}
    if fl.get("bytes"):
        rows.append(("float", fl["bytes"]))
    rows += [(r.get("name", "?"), r.get("bytes") or {}) for r in results.get("recipes") or []]
    fig = _figure(8.0, 1.3 + 0.32 * max(len(rows), 1))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for i, comp in enumerate(COMPONENTS):
        mb = np.array([_mb(b.get(comp)) or 0.0 for _, b in rows])
        ax.barh(y, mb, left=left, color=f"C{i}", label=comp, height=0.7)
        left += mb
    for yi, total in zip(y, left):
        ax.text(total, yi, f" {_fmt_mb(total)} MB", va="center", fontsize=7)
    ax.set_yticks(y, [name for name, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("size (MB = 10^6 bytes)", fontsize=8)
    ax.set_xlim(0, max(float(left.max()) if len(left) else 1.0, 1e-9) * 1.18)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Model size by component", fontsize=9)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


# ----------------------------------------------------------------------------------------- images


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):     # Pillow < 10.1 or no FreeType: the bitmap font
        return ImageFont.load_default()


def to_uint8(images):
    """(N, H, W, 3) or (H, W, 3), float in [0, 1] or uint8 -> uint8 (N, H, W, 3); NaN/Inf -> magenta."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image_grid: expected images of shape (N, H, W, 3), got {a.shape}")
    a = a[..., :3] if a.shape[-1] != 1 else np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float32)
    bad = ~np.isfinite(a).all(-1)
    out = (np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0), 0, 1) * 255).round().astype(np.uint8)
    out[bad] = (255, 0, 255)
    return out


def _wrap(text, font, width, max_lines=None):
    """Greedy word wrap to ``width`` pixels (long words are cut); at most ``max_lines`` lines."""
    lines, cur = [], ""
    for word in str(text).split():
        cand = f"{cur} {word}" if cur else word
        if font.getlength(cand) <= width:
            cur = cand
            continue
        if cur:
            lines.append(cur)
        while font.getlength(word) > width and len(word) > 1:
            k = len(word)
            while k > 1 and font.getlength(word[:k]) > width:
                k -= 1
            lines.append(word[:k])
            word = word[k:]
        cur = word
    if cur:
        lines.append(cur)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines or [""]


def _line_height(font):
    box = font.getbbox("Hgy")
    return box[3] - min(box[1], 0) + 2


def image_grid(rows, path, captions=None, max_cols=GRID_MAX_COLS, min_size=GRID_MIN_TILE, gap=4):
    """A labelled grid of images as PNG at ``path`` (atomically). Returns the PIL image.

    ``rows``: ``[(label, images), ...]``, images ``(N, H, W, 3)`` float in [0, 1] or uint8, the
    same prompt/seed in the same column of every row; only the first ``max_cols`` are used.
    ``captions``: one per column, drawn wrapped above it. Tiles are the first row's image size
    times the smallest integer that makes both sides at least ``min_size`` px (nearest neighbour,
    so 64 px images stay crisp); images of another size are resized to the tile. NaN/Inf pixels
    are magenta. Layout: ``width = label_w + cols * (tile_w + gap) + gap``, ``height = caption_h
    + rows * (tile_h + gap) + gap``, tile (i, j) at ``(label_w + gap + j * (tile_w + gap),
    caption_h + gap + i * (tile_h + gap))``; ``caption_h`` is 0 without captions."""
    from PIL import Image, ImageDraw
    rows = [(str(label), to_uint8(imgs)[:max_cols]) for label, imgs in rows]
    if not rows:
        raise ValueError("image_grid: no rows")
    ncols = max(len(imgs) for _, imgs in rows)
    h0, w0 = rows[0][1].shape[1:3]
    k = max(1, math.ceil(min_size / min(h0, w0)))
    th, tw = h0 * k, w0 * k
    font, small = _font(11), _font(9)
    label_lines = [_wrap(label, font, 180, max_lines=max(1, th // _line_height(font))) for label, _ in rows]
    label_w = 2 * gap + max(int(math.ceil(max(font.getlength(s) for s in lines))) for lines in label_lines)
    caption_lines, caption_h = [], 0
    if captions:
        caption_lines = [_wrap(c, small, tw - 2, max_lines=4) for c in list(captions)[:ncols]]
        caption_h = gap + max(len(c) for c in caption_lines) * _line_height(small)
    width = label_w + ncols * (tw + gap) + gap
    height = caption_h + len(rows) * (th + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(caption_lines):
        x = label_w + gap + j * (tw + gap)
        for n, line in enumerate(lines):
            draw.text((x + 1, gap + n * _line_height(small)), line, fill="black", font=small)
    for i, ((_, imgs), lines) in enumerate(zip(rows, label_lines)):
        y = caption_h + gap + i * (th + gap)
        lh = _line_height(font)
        ty = y + max(0, (th - len(lines) * lh) // 2)
        for n, line in enumerate(lines):
            draw.text((gap, ty + n * lh), line, fill="black", font=font)
        for j, img in enumerate(imgs):
            tile = Image.fromarray(img).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (label_w + gap + j * (tw + gap), y))
    atomic_save_image(canvas, path)
    return canvas


def _default_captions(settings, n):
    """Column captions from the settings when the image count says how they are laid out:
    one per prompt, or prompt-major (every seed of prompt 0, then of prompt 1...)."""
    prompts = list((settings or {}).get("prompts") or [])
    seeds = list((settings or {}).get("seeds") or [])
    if prompts and n == len(prompts):
        return [f"{p} (seed {seeds[0]})" if len(seeds) == 1 else p for p in prompts]
    if prompts and seeds and n == len(prompts) * len(seeds):
        return [f"{p} (seed {s})" for p in prompts for s in seeds]
    return None


# ----------------------------------------------------------------------------------------- markdown


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


def _fmt_seconds(s):
    s = _num(s)
    if s is None or not math.isfinite(s):
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _fmt_metric(key, v):
    v = _num(v)
    if v is None or not math.isfinite(v):
        return _fmt(v, 0)
    if key.endswith("_db"):
        return f"{v:.2f}"
    if key == "ssim":
        return f"{v:.4f}"
    if key == "adherence":
        return f"{v:.3f}"
    return f"{v:.4g}"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header, rows):
    out = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _recipe_cells(r, metrics, float_unet):
    """Table cells of one recipe's metrics: numbers, or NONFINITE_TEXT where a non-finite output
    left no finite value."""
    finite = _is_finite_recipe(r)
    cells = []
    for m in metrics:
        v = _num((r.get("metrics") or {}).get(m))
        if not finite and (v is None or not math.isfinite(v)):
            cells.append(NONFINITE_TEXT)
        else:
            cells.append(_fmt_metric(m, v))
    unet = (r.get("bytes") or {}).get("unet")
    ratio = f"{float_unet / unet:.2f}x" if unet and float_unet else "-"
    return ratio, cells


def _sensitivity_markdown(sens, files):
    lines = ["## Layer sensitivity", ""]
    nbits = list(sens.get("nbits") or [])
    layers = list(sens.get("layers") or [])
    numel = list(sens.get("numel") or [None] * len(layers))
    psnr = np.array(sens.get("psnr_db") or np.zeros((len(layers), len(nbits))), dtype=float)
    psnr = psnr.reshape(len(layers), len(nbits))
    fisher = sens.get("fisher_estimate")
    fisher = None if fisher is None else np.array(fisher, dtype=float).reshape(len(layers), len(nbits))
    lines.append(f"Each of {len(layers)} UNet layers quantized alone to {', '.join(map(str, nbits))} bits, "
                 "everything else float; latent PSNR against the float model. Low PSNR = sensitive.")
    lines.append("")
    secs = sens.get("seconds") or {}
    if secs:
        meas, fish = _num(secs.get("measured")), _num(secs.get("fisher"))
        text = f"Time: measured {_fmt_seconds(meas)}, Fisher estimate {_fmt_seconds(fish)}"
        if meas and fish and math.isfinite(meas) and math.isfinite(fish) and fish > 0:
            text += f" ({meas / fish:.1f}x faster)" if meas >= fish else f" ({fish / meas:.1f}x slower)"
        lines += [text + ".", ""]
    rho = sens.get("spearman")
    if rho:
        lines.append("Spearman rank correlation between the Fisher estimate and the measured PSNR, per nbits "
                     "(how well the cheap estimate orders the layers):")
        lines.append("")
        lines += _table(["nbits", "Spearman rho"], [[k, _fmt(_num(v), 3)] for k, v in rho.items()])
        lines.append("")
    if "sensitivity" in files:
        lines += [f"![layer sensitivity]({files['sensitivity']})", ""]
    if layers and nbits:
        col = int(np.argmin(nbits))
        key = np.where(np.isnan(psnr[:, col]), -np.inf, psnr[:, col])
        order = list(np.argsort(key, kind="stable"))
        k_most = min(10, math.ceil(len(order) / 2))
        most = order[:k_most]
        least = order[::-1][:min(10, len(order) - k_most)]
        header = ["layer", "weights"] + [f"{b} bit (dB)" for b in nbits]
        if fisher is not None:
            header.append(f"Fisher est. ({nbits[col]} bit)")

        def row(i):
            r = [f"`{layers[i]}`", f"{int(numel[i]):,}" if numel[i] is not None else "-"]
            r += [_fmt(psnr[i, j], 1) for j in range(len(nbits))]
            if fisher is not None:
                v = fisher[i, col]
                r.append(_fmt(v, 0) if not math.isfinite(v) else f"{v:.4g}")
            return r
        at = f"{nbits[col]} bit{'s' * (nbits[col] != 1)}"
        lines += [f"Most sensitive at {at}:", ""] + _table(header, [row(i) for i in most]) + [""]
        if least:
            lines += [f"Least sensitive at {at}:", ""] + _table(header, [row(i) for i in least]) + [""]
    return lines


def render_markdown(results, files=None) -> str:
    """The report as Markdown. ``files``: ``{"quality_vs_bits" | "sensitivity" | "sizes" | "grid" |
    "grid:<recipe>" | "json": path relative to the report}``; those present are linked/embedded."""
    files = dict(files or {})
    settings = results.get("settings") or {}
    model = results.get("model") or {}
    fl = results.get("float") or {}
    recipes = list(results.get("recipes") or [])
    metrics = _metric_list(results)
    L = ["# Quality vs bits", ""]
    L.append(f"Model: {model.get('source') or 'unknown'}"
             + (f" (fingerprint `{model['fingerprint']}`)" if model.get("fingerprint") else "") + "  ")
    if results.get("sdjax_version"):
        L.append(f"sdjax {results['sdjax_version']}  ")
    prompts, seeds = list(settings.get("prompts") or []), list(settings.get("seeds") or [])
    parts = []
    if prompts:
        parts.append(f"{len(prompts)} prompt{'s' * (len(prompts) != 1)}")
    if seeds:
        parts.append(f"seed{'s' * (len(seeds) != 1)} {', '.join(map(str, seeds))}")
    for key, fmt in (("steps", "{} steps"), ("sampler", "sampler {}"), ("guidance_scale", "guidance {}")):
        if settings.get(key) is not None:
            parts.append(fmt.format(settings[key]))
    if parts:
        L.append("Settings: " + ", ".join(parts) + "  ")
    if metrics:
        L.append("Metrics: " + ", ".join(metrics))
    L.append("")
    if prompts:
        L.append("<details><summary>Prompts</summary>")
        L.append("")
        L += [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
        L += ["", "</details>", ""]

    if recipes or fl:
        L += ["## Recipes", ""]
        L.append("Average bits: stored bits per UNet conv/linear weight, LUTs and scales included, float layers "
                 "counted as 16; candidate bits: the same over the mixed-bit candidate layers only (the larger ones; "
                 "Apple's recipes are named by their bits over their candidates). MB = 10^6 bytes. PSNRs are against "
                 "the float model (inf: identical).")
        sel = (results.get("sensitivity") or {}).get("selection")
        if sel:
            L.append("")
            seeds = sel.get("seeds") or []
            L.append(f"Mixed-bit recipes are chosen on selection pairs ({sel['prompts']} calibration prompts, x_T seed"
                     f"{'s' * (len(seeds) != 1)} {', '.join(map(str, seeds))}; {sel['pairs']} of them per sensitivity "
                     "measurement), never on the evaluation "
                     "pairs measured here. mixed-...-u6-B: the smallest recipe of its family that keeps uniform 6-bit's "
                     "one-step PSNR there; mixed-...-u6img-B: the smallest that also keeps its final latents', images' "
                     "PSNR and SSIM; the other mixed recipes are at the sizes of Apple's recipes.")
        L.append("")
        float_unet = (fl.get("bytes") or {}).get("unet")
        header = ["recipe", "family", "avg bits", "candidate bits", "UNet MB", "total MB", "UNet compression"] + \
                 [_title(m) for m in metrics] + ["time"]
        rows = []
        if fl:
            b = fl.get("bytes") or {}
            rows.append(["float (reference)", "-", _fmt(_num(fl.get("avg_bits")), 2), "-", _fmt_mb(_mb(b.get("unet"))),
                         _fmt_mb(_mb(_total_bytes(b))), "1.00x" if float_unet else "-"]
                        + [_fmt_metric(m, (fl.get("metrics") or {}).get(m)) for m in metrics] + ["-"])
        for r in recipes:
            b = r.get("bytes") or {}
            ratio, cells = _recipe_cells(r, metrics, float_unet)
            name = r.get("name", "?") + ("" if _is_finite_recipe(r) else " (NaN/Inf)")
            rows.append([name, r.get("family") or "-", _fmt(_num(r.get("avg_bits")), 2),
                         _fmt(_num(r.get("avg_bits_candidates")), 2), _fmt_mb(_mb(b.get("unet"))),
                         _fmt_mb(_mb(_total_bytes(b))), ratio] + cells + [_fmt_seconds(r.get("seconds"))])
        L += _table(header, rows) + [""]
        bad = [r for r in recipes if not _is_finite_recipe(r)]
        if bad:
            L.append("Non-finite outputs (the quantized model produced NaN/Inf; its metrics are not comparable):")
            L.append("")
            L += [f"- {r.get('name', '?')}: {r.get('nonfinite') or 'NaN/Inf'}" for r in bad]
            L.append("")
        adh = [("float (reference)", fl.get("metrics") or {})] + [(r.get("name", "?"), r.get("metrics") or {})
                                                                   for r in recipes]
        adh = [(n, m["adherence"]) for n, m in adh if isinstance(m.get("adherence"), dict)]
        if adh:
            keys = [k for k in ADHERENCE_KEYS if any(k in a for _, a in adh)]
            keys += sorted({k for _, a in adh for k in a} - set(keys))
            L += ["### Prompt adherence", ""]
            L += _table(["recipe"] + keys, [[n] + [str(a[k]) if isinstance(a.get(k), int) else _fmt(_num(a.get(k)), 3)
                                                for k in keys] for n, a in adh]) + [""]

    targets = results.get("targets")
    if targets:
        n_pass = sum(bool(t.get("pass")) for t in targets)
        L += ["## Targets", "", f"{n_pass} of {len(targets)} met.", ""]
        L += _table(["target", "want", "got", "result"],
                    [[t.get("name", "?"), t.get("want", ""), t.get("got", ""), "PASS" if t.get("pass") else "FAIL"]
                     for t in targets]) + [""]

    plots = [("quality_vs_bits", "Quality vs bits"), ("sizes", "Sizes")]
    if any(k in files for k, _ in plots):
        L += ["## Plots", ""]
        for k, title in plots:
            if k in files:
                L += [f"![{title.lower()}]({files[k]})", ""]

    grids = [k for k in files if k == "grid" or k.startswith("grid:")]
    if grids:
        L += ["## Images", "", "First row: the float model; then one row per recipe, same prompts and seeds "
              "per column. Magenta pixels: NaN/Inf.", ""]
        for k in grids:
            name = "all recipes" if k == "grid" else k[len("grid:"):]
            L += [f"![images: {name}]({files[k]})", ""]

    sens = results.get("sensitivity")
    if sens:
        L += _sensitivity_markdown(sens, files)

    if "json" in files:
        L += [f"All numbers: [{files['json']}]({files['json']}).", ""]
    return "\n".join(L).rstrip() + "\n"


# ----------------------------------------------------------------------------------------- all


def write_report(results, out_dir, images=None, captions=None) -> dict:
    """Write the whole report into ``out_dir`` (created) -> ``{key: path}`` of the files written.

    Files: ``report.json`` (``results`` as given, key "json"), ``quality_vs_bits.png`` (one panel
    per metric with values: latent and image PSNR first), ``sizes.png``, ``sensitivity.png`` (when
    ``results["sensitivity"]``), ``grid.png`` (when ``images``), and ``report.md`` (key "markdown")
    last, linking the others by relative path.

    ``images``: ``{"float": array, "<recipe name>": array, ...}``, each ``(N, H, W, 3)`` float in
    [0, 1] or uint8, the same prompts and seeds in the same order. The grid has the float row first,
    then the recipes in results order (at most ``GRID_MAX_RECIPES``), the first ``GRID_MAX_COLS``
    columns. ``captions``: one per column; by default the prompts (and seeds), when the image count
    is the prompt count, or prompts x seeds taken prompt-major.

    ``report.json`` is written first, so the numbers survive whatever fails after it; a plot or
    grid that fails is warned about and left out of the report rather than losing the rest."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = {"json": atomic_write_json(os.path.join(out_dir, "report.json"), results)}
    rel = {"json": "report.json"}
    failed = []

    def attempt(key, name, fn, *args, **kw):
        path = os.path.join(out_dir, name)
        try:
            fn(*args, path, **kw)
        except Exception as e:     # noqa: BLE001 - one broken plot must not lose the report
            warnings.warn(f"report: {name} not written: {type(e).__name__}: {e}", stacklevel=3)
            failed.append(f"{name}: {type(e).__name__}: {e}")
            return
        written[key], rel[key] = path, name

    recipes = list(results.get("recipes") or [])
    if recipes:
        all_metrics = [m for m in _metric_list(results) if _has_values(results, m)]
        plotted = [m for m in PLOT_FIRST if m in all_metrics] + [m for m in all_metrics if m not in PLOT_FIRST]
        if plotted:
            attempt("quality_vs_bits", "quality_vs_bits.png", lambda p: plot_quality_vs_bits(results, p, plotted))
    if (results.get("float") or {}).get("bytes") or any(r.get("bytes") for r in recipes):
        attempt("sizes", "sizes.png", lambda p: plot_sizes(results, p))
    if results.get("sensitivity"):
        attempt("sensitivity", "sensitivity.png", lambda p: plot_sensitivity_heatmap(results["sensitivity"], p))
    left_out = []
    if images:
        rows = [("float", images["float"])] if images.get("float") is not None else []
        for r in recipes:
            name = r.get("name")
            if name == "float" or images.get(name) is None:
                continue
            if len(rows) - (images.get("float") is not None) >= GRID_MAX_RECIPES:
                left_out.append(name)
                continue
            rows.append((name + ("" if _is_finite_recipe(r) else " (NaN/Inf)"), images[name]))
        if rows:
            n = len(np.asarray(rows[0][1])) if np.ndim(rows[0][1]) == 4 else 1
            caps = captions if captions is not None else _default_captions(results.get("settings"), n)
            attempt("grid", "grid.png", lambda p: image_grid(rows, p, captions=caps))

    md = render_markdown(results, rel)
    if left_out and "grid" in rel:
        md += f"\nThe image grid shows the first {GRID_MAX_RECIPES} recipes; left out: {', '.join(left_out)}.\n"
    if failed:
        md += "\n## Not written\n\n" + "\n".join(f"- {f}" for f in failed) + "\n"
    written["markdown"] = atomic_write_text(os.path.join(out_dir, "report.md"), md)
    return written
