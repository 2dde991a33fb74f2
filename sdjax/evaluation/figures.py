"""The report's pictures: quality-vs-bits, quality-vs-int8-MACs (W8A8) and size plots, the sensitivity
heatmap, image grids.

Plots use matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg on save), never
pyplot, so no display is needed and the caller's pyplot backend and figure list are left alone.
Image grids use Pillow only. Every file is written atomically (``sdjax.files``).
"""
from __future__ import annotations

import math

import numpy as np

from sdjax.files import atomic_save_figure, atomic_save_image

from .results import *  # noqa: F401,F403
from .results import _fmt, _fmt_mb, _has_values, _is_finite_recipe, _mb, _num, _title, _total_bytes  # noqa: F401

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


W8A8_METRICS = ("latent_psnr_1step_db", "final_latent_psnr_db", "image_psnr_db", "ssim")


def w8a8_points(results):
    """{family: [(int8 MAC share, recipe)]} of the recipes with a share (the W8A8 analysis ran), W8A8
    families first, by share."""
    out = {}
    for r in results.get("recipes") or []:
        x = _num(r.get("int8_mac_fraction"))
        if x is not None and (x > 0 or str(r.get("family", "")).startswith("W8A8")):
            out.setdefault(r.get("family") or "other", []).append((x, r))
    return {f: sorted(v, key=lambda p: p[0]) for f, v in sorted(out.items(), key=lambda kv: not kv[0].startswith("W8A8"))}


def plot_w8a8(results, path, metrics=W8A8_METRICS):
    """Quality on ``metrics`` (one panel each) against the share of the UNet's conv/linear MACs on the int8
    path, one line per family (Apple's thresholds, sdjax's allocator), w8-int8 (W8A16, no int8 MACs) as a
    dotted line. Returns ``path``."""
    fams = w8a8_points(results)
    if not fams:
        raise ValueError("plot_w8a8: no recipe with an int8 MAC share (run the W8A8 families)")
    w16 = next((r for r in results.get("recipes") or [] if r.get("name") == "w8-int8"), None)
    fig = _figure(4.2 * len(metrics), 3.8)
    axes = fig.subplots(1, len(metrics), squeeze=False).ravel()
    for ax, m in zip(axes, metrics):
        for i, (fam, pts) in enumerate(fams.items()):
            xy = [(x, _num((r.get("metrics") or {}).get(m))) for x, r in pts]
            xy = [(x, y) for x, y in xy if y is not None and math.isfinite(y)]
            if xy:
                ax.plot([p[0] for p in xy], [p[1] for p in xy], "-", color=f"C{i % 10}",
                        marker=_MARKERS[i % len(_MARKERS)], ms=5, lw=1.2, label=fam)
        y16 = _num(((w16 or {}).get("metrics") or {}).get(m))
        if y16 is not None and math.isfinite(y16):
            ax.axhline(y16, color="k", ls=":", lw=0.9, label="w8-int8 (W8A16, no int8 MACs)")
        ax.set_xlabel("share of UNet conv/linear MACs on the int8 path", fontsize=8)
        ax.set_ylabel(_title(m), fontsize=8)
        ax.set_title(_title(m), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
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
    present = [c for c in COMPONENTS if any(b.get(c) is not None for _, b in rows)]  # SD 1.x has no text_encoder_2
    for i, comp in enumerate(present):
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


