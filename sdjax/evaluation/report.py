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

The pictures are ``figures``'s; the schema's names and value helpers ``results``'s.
"""
from __future__ import annotations

import math
import os
import re
import warnings

import numpy as np

# the project's atomic writers, under the names this module's users know
from sdjax.files import atomic_save_figure, atomic_save_image, atomic_write_json, atomic_write_text  # noqa: F401

from .figures import *  # noqa: F401,F403
from .figures import _default_captions, _family_order, _font, _line_height, _wrap  # noqa: F401
from .results import *  # noqa: F401,F403
from .results import _fmt, _fmt_mb, _has_values, _is_finite_recipe, _mb, _metric_list, _num, _title, _total_bytes  # noqa: F401

# ----------------------------------------------------------------------------------------- markdown


def _fmt_seconds(s):
    s = _num(s)
    if s is None or not math.isfinite(s):
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _time_cell(r):
    """A recipe's time, with its fine-tuning's in parentheses when it was fine-tuned."""
    text = _fmt_seconds(r.get("seconds"))
    ft = _num(r.get("finetune_seconds"))
    return text if ft is None else f"{text} (fine-tuning {_fmt_seconds(ft)})"


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


W8A8_MARGIN_DB = 1.0   # issue 23's target: sdjax's W8A8 recipe this much better on images at Apple's int8 MAC share


def w8a8_pairs(results):
    """[(Apple's recipe, sdjax's at its MAC share, image PSNR margin)] of the W8A8 families."""
    by = {r.get("name"): r for r in results.get("recipes") or []}
    out = []
    for name, r in by.items():
        if str(name).startswith("w8a8-apple-"):
            mine = by.get("w8a8-sdjax-" + name[len("w8a8-apple-"):])
            if mine is not None:
                a, b = (_num((x.get("metrics") or {}).get("image_psnr_db")) for x in (r, mine))
                out.append((r, mine, None if a is None or b is None else b - a))
    return out


def _w8a8_markdown(results, files):
    act = results.get("act_sensitivity")
    if not act:
        return []
    psnr = [v for v in act.get("psnr_db") or [] if _num(v) is not None]
    L = ["## W8A8: activation sensitivity", "",
         f"Every UNet conv/linear layer ({len(act.get('layers') or [])}) measured with int8 weights everywhere and "
         f"only its own activations int8 (per-tensor scale max|x|/127 from {act.get('scale_prompts')} calibration "
         f"prompts' generations), on the guided noise prediction over {act.get('samples')} noised self-generated "
         f"latents of {act.get('measure_prompts')} other calibration prompts, against the float UNet: "
         f"{_fmt(min(psnr), 2) if psnr else '-'} to {_fmt(max(psnr), 2) if psnr else '-'} dB per layer; every weight "
         f"int8 and every activation float (W8A16) reads {_fmt(_num(act.get('base_psnr_db')), 2)} dB. "
         "w8a8-apple-F: Apple's rule (a conv threshold at a percentile of these readings, then its overrides: "
         "up-block resnet conv1 and upsampler convs W8A8, to_out W8A16), F its share of the UNet's "
         f"{(act.get('total_macs') or 0) / 1e6:.1f} M conv/linear MACs on the int8 path; w8a8-sdjax-F: sdjax's "
         "allocator at the share of w8a8-apple-F; w8a8-sdjax-floor-F: the most int8 MACs keeping an Apple "
         "recipe's calibration reading.", ""]
    by = {r.get("name"): r for r in results.get("recipes") or []}
    rows = []
    for info in act.get("recipes") or []:
        r = by.get(info["name"]) or {}
        m = r.get("metrics") or {}
        rows.append([info["name"], f"{info['mac_fraction']:.3f}", str(info["w8a8_layers"]),
                     _fmt(_num(info["calibration_psnr_db"]), 2), _fmt(_num(info["predicted_psnr_db"]), 2)]
                    + [_fmt_metric(k, m.get(k)) for k in ("latent_psnr_1step_db", "final_latent_psnr_db",
                                                           "image_psnr_db", "ssim")])
    if rows:
        L += _table(["recipe", "int8 MAC share", "W8A8 layers", "calibration dB", "predicted dB", "1-step latent PSNR",
                     "final latent PSNR", "image PSNR", "SSIM"], rows) + [""]
    pairs = w8a8_pairs(results)
    if pairs:
        got = [d for _, _, d in pairs if d is not None]
        ok = bool(got) and min(got) >= W8A8_MARGIN_DB
        L += [f"Target: at each Apple recipe's int8 MAC share, sdjax's recipe >= {W8A8_MARGIN_DB:g} dB better on image "
              f"PSNR: **{'PASS' if ok else 'FAIL'}** (" + ", ".join(
                  f"{a['name']} -> {b['name']}: {_fmt(d, 2)} dB" for a, b, d in pairs) + ").", ""]
    if "w8a8" in files:
        L += [f"![quality vs int8 MACs]({files['w8a8']})", ""]
    if "act_apple" in files:
        L += [f"The per-layer readings in Apple's layer-list format: [{files['act_apple']}]({files['act_apple']}); "
              "each W8A8 recipe's split as recipes/NAME.apple-layers.json.", ""]
    return L


def write_apple_layers(results, out_dir):
    """OUT/act_sensitivity.apple.json (the per-layer readings in Apple's format) and
    OUT/recipes/NAME.apple-layers.json (each W8A8 recipe's split, ``quant.apple_layers.selection_layers``)."""
    from quant import apple_layers
    act = results.get("act_sensitivity")
    if not act:
        return None
    model = (results.get("model") or {}).get("source") or ""
    path = apple_layers.write(os.path.join(out_dir, "act_sensitivity.apple.json"),
                              apple_layers.sensitivity_layers(dict(zip(act["layers"], act["psnr_db"])), model))
    os.makedirs(os.path.join(out_dir, "recipes"), exist_ok=True)
    for r in results.get("recipes") or []:
        rules = (r.get("recipe") or {}).get("rules") or []
        if r.get("int8_mac_fraction") is not None and rules and all(x.get("method") in ("int8", "int8-w8a8")
                                                                    and "pattern" in x for x in rules):
            fast = [x["pattern"] for x in rules if x["method"] == "int8-w8a8"]
            slow = [x["pattern"] for x in rules if x["method"] == "int8"]
            if fast:
                apple_layers.write(os.path.join(out_dir, "recipes", re.sub(r"[^A-Za-z0-9._-]+", "_", r["name"])
                                                + ".apple-layers.json"),
                                   apple_layers.selection_layers(fast, slow, model))
    return path


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
        apple_col = any(_num(r.get("apple_bits")) is not None for r in recipes)
        L.append("Average bits: stored bits per UNet conv/linear weight, LUTs and scales included, float layers "
                 "counted as 16; candidate bits: the same over the mixed-bit candidate layers only (the larger ones)"
                 + ("; Apple bits: Apple's count, nbits x weights over Apple's candidates without LUTs, which names "
                    "Apple's recipes" if apple_col else "")
                 + ". MB = 10^6 bytes. PSNRs are against the float model (inf: identical). Apple's reading: Apple's "
                 "pre-analysis metric (the pipeline's own scheduler for one step, 8 prompts, Apple's PSNR rounded to "
                 "0.1 dB); latent PSNR, 1 step: sdjax's (a 1-step plan of the evaluation's sampler on every pair).")
        sel = (results.get("sensitivity") or {}).get("selection")
        if sel:
            L.append("")
            seeds = sel.get("seeds") or []
            L.append(f"Mixed-bit recipes are chosen on selection pairs ({sel['prompts']} calibration prompts, x_T seed"
                     f"{'s' * (len(seeds) != 1)} {', '.join(map(str, seeds))}; {sel['pairs']} of them per sensitivity "
                     "measurement), never on the evaluation "
                     "pairs measured here. apple-mbp-B: Apple's pre-analysis as Apple runs it (its reading, candidates, "
                     "clustering, int8 baseline and thresholds), B its Apple bits; apple-rule-B: Apple's thresholds on "
                     "sdjax's one-step sweep; mixed-sdjax-B, mixed-gptq-B: our allocator at the stored size of the Apple "
                     "recipe tagged B; mixed-...-u6-B: the smallest recipe of its family that keeps uniform 6-bit's "
                     "one-step PSNR there; mixed-...-u6img-B: the smallest that also keeps its final latents', images' "
                     "PSNR and SSIM.")
        tuned = [r for r in recipes if _num(r.get("finetune_seconds")) is not None]
        if tuned:
            L += ["", "Fine-tuned recipes (" + ", ".join(r.get("name", "?") for r in tuned) + "): the recipe's "
                  "palettized UNet weights trained after quantizing (sdjax.evaluation.qat: the float UNet distilled "
                  "into the palettized one on the calibration prompts' own generations, never on evaluation prompts), "
                  "the same bytes as the recipe without fine-tuning; qat-Nbit is palette-Nbit fine-tuned, "
                  "qat-mixed-gptq-u6-B is mixed-gptq-u6-B fine-tuned. Their time includes the fine-tuning, given "
                  "in parentheses."]
        ab = (results.get("sensitivity_apple") or {}).get("baselines")
        if ab:
            L += ["", f"Apple's baselines on Apple's reading (selection prompts): original (float16 weights) "
                      f"{_fmt(_num(ab.get('original')), 2)} dB, linear 8-bit (per-tensor asymmetric, every weight) "
                      f"{_fmt(_num(ab.get('linear8')), 2)} dB; Apple's recipes take the thresholds "
                      "linspace(original - 1, linear 8-bit + 5, 7)."]
        L.append("")
        float_unet = (fl.get("bytes") or {}).get("unet")
        header = ["recipe", "family", "avg bits", "candidate bits"] + (["Apple bits"] if apple_col else []) + \
                 ["UNet MB", "total MB", "UNet compression"] + [_title(m) for m in metrics] + ["time"]
        rows = []
        if fl:
            b = fl.get("bytes") or {}
            rows.append(["float (reference)", "-", _fmt(_num(fl.get("avg_bits")), 2), "-"] + (["-"] if apple_col else [])
                        + [_fmt_mb(_mb(b.get("unet"))), _fmt_mb(_mb(_total_bytes(b))), "1.00x" if float_unet else "-"]
                        + [_fmt_metric(m, (fl.get("metrics") or {}).get(m)) for m in metrics] + ["-"])
        for r in recipes:
            b = r.get("bytes") or {}
            ratio, cells = _recipe_cells(r, metrics, float_unet)
            name = r.get("name", "?") + ("" if _is_finite_recipe(r) else " (NaN/Inf)")
            rows.append([name, r.get("family") or "-", _fmt(_num(r.get("avg_bits")), 2),
                         _fmt(_num(r.get("avg_bits_candidates")), 2)]
                        + ([_fmt(_num(r.get("apple_bits")), 2)] if apple_col else [])
                        + [_fmt_mb(_mb(b.get("unet"))), _fmt_mb(_mb(_total_bytes(b))), ratio] + cells
                        + [_time_cell(r)])
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

    L += _w8a8_markdown(results, files)

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
    if results.get("act_sensitivity"):
        attempt("act_apple", "act_sensitivity.apple.json", lambda p: write_apple_layers(results, out_dir))
        if w8a8_points(results):
            attempt("w8a8", "w8a8_vs_macs.png", lambda p: plot_w8a8(results, p))
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
