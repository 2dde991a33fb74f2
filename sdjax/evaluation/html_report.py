"""The report a person opens in a browser: ``OUT/report.html``, one page over an ``sdjax eval`` folder.

    from sdjax.evaluation import html_report
    html_report.write_html("eval-out")   # {"html": ".../report.html", "folder": ".../report_files", "bytes": n}

The page is read from a plain file, with no server and no request to any other host: its script, styles
and numbers are inline, and what it loads lies in the folder beside it, a few files to attach or mail:

    OUT/report.html                     the page (numbers as JSON inline, its script and styles)
    OUT/report_files/plotly.min.js      plotly.js, copied from the ``plotly`` package (the plots)
    OUT/report_files/float.png          the float model's images: one sprite sheet, every pair a tile
    OUT/report_files/rNN.png            the images of recipe NN (its place in report.json), tiled the same way
    OUT/report_files/rNN-diff.png       max over R, G, B of |recipe - float|, log scale (``DIFF_LEVELS``), a
                                        palette PNG tiled the same way

A sprite sheet holds pair K (prompt-major: ``Settings.pairs``) at row ``K // cols``, column ``K % cols`` of
a grid of ``rows x cols`` tiles (``sprite_grid``: about square; unused tiles black); the page shows a tile
by clipping the sheet to it. One PNG per recipe rather than one per image: the folder is a few dozen files,
and zlib compresses the tiles together. The difference is computed here, not in the page: a browser will not
read the pixels of an image loaded from a file:// URL (a tainted canvas).

It is built from the folder alone, so ``sdjax report OUT`` redraws it for a finished run without a model:
the numbers from ``report.json``, the images from ``state/`` (the float model's and each recipe's, kept
there by the run). Images are PNG files, not base64 in the page, and lossless; images over ``MAX_SIDE``
pixels are shown shrunk by an integer factor. NaN/Inf pixels are magenta, as in ``grid.png``
(``figures.to_uint8``), and magenta in the difference view too.

Everything is checked before anything is written; a folder that is not an evaluation run, a run that has
not finished, or a ``report.json`` of another sdjax version raises ``ReportError`` naming every problem.
``report_files/`` is built under a temporary name and renamed into place (``files.staged_path``), then
``report.html`` is written atomically, so a failure leaves the old page and folder as they were.
"""
from __future__ import annotations

import datetime
import html
import json
import math
import os
import platform
import shutil
import zipfile
from importlib import resources

import numpy as np

import quant
from quant.apply import small_layer_threshold
from sdjax.files import StoreError, atomic_write_text, staged_path
from sdjax.version import __version__

from .apple import module_order
from .figures import to_uint8
from .results import (ADHERENCE_KEYS, PLOT_FIRST, _has_values, _metric_list, _num, _title, _total_bytes,
                      short_layer_names)
from .state import State, _safe

HTML_NAME = "report.html"
FILES_DIR = "report_files"
TEMPLATE = "html_report_template.html"
MAX_SIDE = 256              # larger images are shown shrunk by an integer factor (SD's 512 px: 2)
MAGENTA = (255, 0, 255)     # NaN/Inf pixels (figures.to_uint8)
# difference view: |recipe - float| in 8-bit steps d -> grey level round(254 log2(1 + d) / 8), so one step
# is already visible (32) and 255 steps is white; palette entry 255 is magenta (NaN/Inf in either image)
DIFF_LEVELS = np.round(254 * np.log2(1 + np.arange(256)) / 8).astype(np.uint8)
# the UNet's layers as data flows through them (diffusers registers up_blocks before mid_block); within
# each part, diffusers' module order (apple.module_order)
DATA_FLOW = {name: i for i, name in enumerate(("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block",
                                               "up_blocks", "conv_norm_out", "conv_out"))}
BITS = (("avg_bits", "avg bits"), ("avg_bits_candidates", "candidate bits"), ("apple_bits", "Apple bits"),
        ("int8_mac_fraction", "int8 MAC share (W8A8)"))   # the plot's x axes: those some recipe has
METHOD_BITS = {"int8": 8, "int8-w8a8": 8, "llm-int8": 8, "float": 16}
NONFINITE = {math.inf: "__inf__", -math.inf: "__-inf__"}   # JSON has no inf/nan: the page's reviver reads these


class ReportError(ValueError):
    """A folder ``report.html`` cannot be written for (names the folder and every problem)."""


# ----------------------------------------------------------------------------------------- reading the run


def _npz_images_shape(path):
    """The shape of ``images`` in an ``.npz`` without loading it; a problem string when unreadable."""
    try:
        with zipfile.ZipFile(path) as z, z.open("images.npy") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                return f"{path}: unsupported .npy version {version}"
            return tuple(read[version](f)[0])
    except FileNotFoundError:
        return f"{path} is missing"
    except KeyError:
        return f"{path} has no images"
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return f"{path}: unreadable ({e})"


def _load_results(out_dir):
    """report.json of ``out_dir``, checked: a ReportError names what is missing or of another version."""
    where = os.fspath(out_dir)
    path = os.path.join(where, "report.json")
    if not os.path.isdir(where):
        raise ReportError(f"{where}: no such folder (an evaluation run is the folder `sdjax eval -o` wrote)")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(where, "state", "manifest.json")):
            raise ReportError(f"{where}: the evaluation run is incomplete: report.json is missing (the run stopped "
                              "before writing its report); rerun the same `sdjax eval` command to finish it")
        raise ReportError(f"{where}: not an evaluation run: no report.json (and no state/manifest.json); "
                          "`sdjax eval -o FOLDER` writes one")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: unreadable ({e})") from None
    if not isinstance(results, dict):
        raise ReportError(f"{path}: not an evaluation report (a JSON {type(results).__name__}, not an object)")
    version = results.get("sdjax_version")
    if version is None:
        raise ReportError(f"{path}: not written by sdjax eval (no sdjax_version)")
    if version != __version__:
        raise ReportError(f"{path} was written by sdjax {version}; this is sdjax {__version__}: rerun the same "
                          f"`sdjax eval` command with sdjax {__version__} (it reuses state/), or use sdjax {version}")
    problems = []
    settings = results.get("settings")
    if not isinstance(settings, dict):
        problems.append("settings")
    else:
        problems += [f"settings.{k}" for k in ("prompts", "seeds") if not isinstance(settings.get(k), list)
                     or not settings.get(k)]
    if not isinstance(results.get("float"), dict):
        problems.append("float")
    recipes = results.get("recipes")
    if not isinstance(recipes, list):
        problems.append("recipes")
    else:
        for i, r in enumerate(recipes):
            missing = [k for k in ("name", "avg_bits", "metrics") if not isinstance(r, dict) or k not in r]
            if missing:
                name = r.get("name") if isinstance(r, dict) else None
                problems.append(f"recipes[{i}]{f' ({name})' if name else ''}: {', '.join(missing)}")
    if problems:
        raise ReportError(f"{path}: incomplete, missing {'; '.join(problems)}")
    return results


def check_run(out_dir):
    """``(results, {"float" | recipe name: path of its state .npz}, (N, H, W, C))`` of a finished run, or a
    ReportError naming every problem (nothing is loaded but the images' headers)."""
    results = _load_results(out_dir)
    state = State(out_dir, writer=False)
    s = results["settings"]
    n = len(s["prompts"]) * len(s["seeds"])
    paths = {"float": state.path("float.npz")}
    paths.update({r["name"]: state.path("recipes", _safe(r["name"]) + ".npz") for r in results["recipes"]})
    problems, shape = [], None
    for name, path in paths.items():
        got = _npz_images_shape(path)
        if isinstance(got, str):
            problems.append(got)
        elif len(got) != 4 or got[0] != n or got[-1] not in (1, 3, 4):
            problems.append(f"{path}: images of shape {got}, expected ({n}, H, W, 3) for "
                            f"{len(s['prompts'])} prompts x {len(s['seeds'])} seeds")
        elif shape is None:
            shape = got
        elif got[1:3] != shape[1:3]:
            problems.append(f"{path}: images of {got[1]}x{got[2]} pixels, the float model's are {shape[1]}x{shape[2]}")
    if problems:
        raise ReportError(f"{os.fspath(out_dir)}: the evaluation run is incomplete (its images are kept in state/; "
                          f"rerun the same `sdjax eval` command to finish it): {'; '.join(problems)}")
    return results, paths, shape


def _load_images(path):
    with np.load(path) as z:
        return to_uint8(z["images"])


# ----------------------------------------------------------------------------------------- per-layer bits


def _rule_bits(rule):
    return rule.options["nbits"] if rule.method == "palettize" else METHOD_BITS.get(rule.method)


def layer_bits(results):
    """The UNet conv/linear layers that report.json names, in the order data flows through them, and what each
    recipe gives them -> ``(layers, numel, {recipe: {"bits": [...], "method": [...]} or {"note": why}})``.

    Layers: those of the sensitivity sweeps (with their weight counts) and those recipes name exactly.
    A layer takes its first matching rule (``quant.apply.plan``'s order); a layer of at most the recipe's
    weight threshold that the rule does not name exactly stays float, counted 16 bits as ``avg_bits``
    counts it. Nominal bits: a palettized layer its LUT width, int8 8, float 16 (LUTs and scales are in
    ``avg_bits``, not here). Rules by ``kind`` need the weights' shapes, which report.json lacks: such a
    recipe gets a note instead."""
    numel = {}
    for key in ("sensitivity_apple", "sensitivity", "sensitivity_gptq"):
        block = results.get(key) or {}
        names, counts = list(block.get("layers") or []), list(block.get("numel") or [])
        for i, name in enumerate(names):
            numel.setdefault(name, counts[i] if i < len(counts) else None)
    parsed = {}
    for r in results["recipes"]:
        try:
            parsed[r["name"]] = quant.parse_recipe(r.get("recipe"))
        except (quant.RecipeError, TypeError, ValueError) as e:
            parsed[r["name"]] = f"its recipe cannot be read ({e})"
            continue
        for rule in parsed[r["name"]].rules:
            if rule.pattern is not None and not any(c in rule.pattern for c in "*?[") and \
                    (rule.components is None or "unet" in rule.components):
                numel.setdefault(rule.pattern, None)
    layers = sorted(module_order(numel), key=lambda n: DATA_FLOW.get(n.split(".")[0], len(DATA_FLOW)))
    out = {}
    for name, recipe in parsed.items():
        if isinstance(recipe, str):
            out[name] = {"note": recipe}
            continue
        rules = [] if "unet" not in recipe.components else \
            [x for x in recipe.rules if x.components is None or "unet" in x.components]
        if any(x.kind is not None for x in rules):
            out[name] = {"note": "its rules choose layers by kind (conv or linear), and report.json does not "
                                 "record the layers' shapes"}
            continue
        bits, methods = [], []
        for layer in layers:
            rule = next((x for x in rules if x.matches(layer, None)), None)
            n = numel[layer]
            thr = None if rule is None or n is None else small_layer_threshold(recipe, rule, layer, n)
            if rule is None or thr is not None:
                bits.append(16), methods.append("float" if rule is None else f"float (<= {thr} weights)")
            else:
                bits.append(_rule_bits(rule)), methods.append(rule.method)
        out[name] = {"bits": bits, "method": methods}
    return layers, [numel[x] for x in layers], out


# ----------------------------------------------------------------------------------------- images


def _shrink(images, k, reduce):
    """(N, H, W, ...) -> blocks of k x k reduced by ``reduce`` ("mean" or "max"); edges padded."""
    if k == 1:
        return images
    n, h, w = images.shape[:3]
    ph, pw = -h % k, -w % k
    pad = [(0, 0), (0, ph), (0, pw)] + [(0, 0)] * (images.ndim - 3)
    a = np.pad(images, pad, mode="edge")
    a = a.reshape(n, (h + ph) // k, k, (w + pw) // k, k, *images.shape[3:])
    return a.mean(axis=(2, 4)).round().astype(images.dtype) if reduce == "mean" else a.max(axis=(2, 4))


def _bad(images):
    return (images == np.array(MAGENTA, np.uint8)).all(-1)


def page_images(float_u8, images_u8, k=1):
    """The page's image and difference view of a recipe: ``(images, levels)``, both shrunk by ``k``.
    ``levels``: ``DIFF_LEVELS`` of max over R, G, B of |image - float|, 255 where either pixel is
    NaN/Inf (magenta); shrunk by the block maximum, so NaN stays and the largest error shows."""
    bad = _bad(images_u8) | _bad(float_u8)
    diff = np.abs(images_u8.astype(np.int16) - float_u8.astype(np.int16)).max(-1)
    levels = np.where(bad, 255, DIFF_LEVELS[diff]).astype(np.uint8)
    return shown_images(images_u8, k), _shrink(levels, k, "max")


def shown_images(images_u8, k=1):
    """Images shrunk by ``k`` (the block mean), a block with any NaN/Inf (magenta) pixel magenta."""
    shown = _shrink(images_u8, k, "mean")
    shown[_shrink(_bad(images_u8), k, "max")] = MAGENTA
    return shown


def sprite_grid(n):
    """``(rows, cols)`` of the sprite sheets of ``n`` images: about square, so no side grows long."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return -(-n // cols), cols


def sprite(tiles):
    """``(N, h, w, ...)`` -> one ``(rows * h, cols * w, ...)`` sheet, tile K at row K // cols, column
    K % cols (``sprite_grid``); the tiles past N are zeros."""
    n, h, w = tiles.shape[:3]
    rows, cols = sprite_grid(n)
    sheet = np.zeros((rows * cols,) + tiles.shape[1:], tiles.dtype)
    sheet[:n] = tiles
    sheet = sheet.reshape(rows, cols, h, w, *tiles.shape[3:]).swapaxes(1, 2)
    return sheet.reshape(rows * h, cols * w, *tiles.shape[3:])


def _diff_palette():
    grey = np.repeat(np.round(np.arange(255) * 255 / 254).astype(np.uint8), 3)
    return list(grey) + list(MAGENTA)


def _save_png(array, path, palette=None):
    from PIL import Image
    image = Image.fromarray(array, "P" if palette is not None else "RGB")
    if palette is not None:
        image.putpalette(palette)
    # zlib's default level: optimize=True took 7x as long (0.27 s against 0.04 s for a 448x448 sprite, 18 of
    # the 19 s writing an sdjax eval page) for files 5% smaller
    image.save(path, format="PNG")


# ----------------------------------------------------------------------------------------- the page


def _jsonable(v):
    """Numbers the page's JSON can hold: nan -> "__nan__", +-inf -> "__inf__" / "__-inf__"."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return "__nan__" if math.isnan(v) else NONFINITE.get(v, v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _samples(settings):
    """The pairs in the images' order: ``Settings.pairs``, prompt-major."""
    return [{"prompt": p, "seed": s} for p in settings["prompts"] for s in settings["seeds"]]


def _timings(results, out_dir):
    each = [_num(r.get("seconds")) for r in results["recipes"]]     # each recipe's: the table's time column
    t = [{"what": f"all {len(each)} recipes (quantizing, generating, measuring; each in the table)",
          "seconds": sum(s for s in each if s is not None and math.isfinite(s))}]
    tuned = [_num(r.get("finetune_seconds")) for r in results["recipes"] if r.get("finetune_seconds") is not None]
    if tuned:
        t.append({"what": f"fine-tuning of the {len(tuned)} fine-tuned recipe{'s' * (len(tuned) != 1)} (included above)",
                  "seconds": sum(x for x in tuned if x is not None and math.isfinite(x))})
    for key, what in (("sensitivity", "sdjax's per-layer sweep (k-means)"), ("sensitivity_gptq", "GPTQ per-layer sweep"),
                      ("sensitivity_apple", "Apple's per-layer sweep")):
        secs = (results.get(key) or {}).get("seconds") or {}
        if _num(secs.get("measured")) is not None:
            t.append({"what": what, "seconds": _num(secs["measured"])})
        if _num(secs.get("fisher")) is not None:
            t.append({"what": "Fisher estimate of layer sensitivity", "seconds": _num(secs["fisher"])})
    try:
        hess = State(out_dir, writer=False).read("hessians-time.json")
    except StoreError:
        hess = None
    if hess and _num(hess.get("seconds")) is not None:
        t.append({"what": "GPTQ input statistics (collect X^T X)", "seconds": _num(hess["seconds"])})
    stamps = {}
    for name, path in (("started", os.path.join(out_dir, "state", "manifest.json")),
                       ("finished", os.path.join(out_dir, "report.json"))):
        if os.path.exists(path):
            stamps[name] = datetime.datetime.fromtimestamp(os.path.getmtime(path)).isoformat(" ", "seconds")
    return t, stamps


def _versions():
    from importlib.metadata import PackageNotFoundError, version
    out = {"sdjax (this page)": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "pillow", "plotly"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def page_data(results, image_shape, k, out_dir):
    """The page's numbers (JSON-ready): what the run measured, in the page's terms."""
    metrics = [m for m in _metric_list(results) if _has_values(results, m)]
    metrics = [m for m in PLOT_FIRST if m in metrics] + [m for m in metrics if m not in PLOT_FIRST]
    if "final_latent_psnr_db" in metrics:   # the page's reading order: the latents, then what a user sees
        metrics.remove("final_latent_psnr_db")
        metrics.insert(1 if metrics and metrics[0] == "latent_psnr_1step_db" else 0, "final_latent_psnr_db")
    bits = [{"key": key, "title": title} for key, title in BITS
            if any(_num(r.get(key)) is not None for r in results["recipes"])]
    layers, numel, per_layer = layer_bits(results)

    def entry(r, i):
        m = r.get("metrics") or {}
        adherence = m.get("adherence") if isinstance(m.get("adherence"), dict) else None
        return {"name": r.get("name", "float"), "family": r.get("family") or "", "chosen_for": r.get("chosen_for"),
                "avg_bits": _num(r.get("avg_bits")), "avg_bits_candidates": _num(r.get("avg_bits_candidates")),
                "apple_bits": _num(r.get("apple_bits")), "int8_mac_fraction": _num(r.get("int8_mac_fraction")),
                "bytes": r.get("bytes") or {},
                "total_bytes": _total_bytes(r.get("bytes")), "metrics": {k: _num(m.get(k)) for k in metrics},
                "adherence": adherence, "finite": r.get("finite", True) is not False and not r.get("nonfinite"),
                "nonfinite": r.get("nonfinite"), "seconds": _num(r.get("seconds")), "path": r.get("path"),
                "finetune_seconds": _num(r.get("finetune_seconds")),
                "sprite": f"{FILES_DIR}/{'float' if i is None else f'r{i:02d}'}.png",
                "diff": None if i is None else f"{FILES_DIR}/r{i:02d}-diff.png",
                "layers": per_layer.get(r.get("name")) if i is not None else None}
    timings, stamps = _timings(results, out_dir)
    h, w = image_shape[1:3]
    return {"model": results.get("model") or {}, "sdjax_version": results.get("sdjax_version"),
            "settings": {k: v for k, v in results["settings"].items() if k != "prompts"},
            "prompts": results["settings"]["prompts"],
            "metrics": [{"key": m, "title": _title(m)} for m in metrics], "bits": bits,
            "adherence_keys": list(ADHERENCE_KEYS),
            "float": entry(results["float"], None), "recipes": [entry(r, i) for i, r in enumerate(results["recipes"])],
            "layers": {"names": layers, "short": short_layer_names(layers), "numel": numel},
            "samples": _samples(results["settings"]),
            "image": {"height": h, "width": w, "shrink": k, "shown": [-(-h // k), -(-w // k)],
                      "grid": list(sprite_grid(image_shape[0]))},
            "targets": results.get("targets") or [], "timings": timings, "stamps": stamps, "versions": _versions(),
            "sweeps": {key: {"layers": len((results.get(key) or {}).get("layers") or []),
                             "nbits": (results.get(key) or {}).get("nbits"),
                             "selection": (results.get(key) or {}).get("selection")}
                       for key in ("sensitivity", "sensitivity_gptq", "sensitivity_apple") if results.get(key)}}


def render_html(data):
    """The page's text: the template with ``data`` inline as JSON."""
    template = resources.files("sdjax.evaluation").joinpath(TEMPLATE).read_text(encoding="utf-8")
    text = json.dumps(_jsonable(data), allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    title = f"Quality vs bits: {(data.get('model') or {}).get('source') or 'sdjax eval'}"
    return (template.replace("{{TITLE}}", html.escape(title)).replace("{{FILES_DIR}}", FILES_DIR)
            .replace("{{DATA}}", text))


def _plotly_js():
    path = resources.files("plotly").joinpath("package_data", "plotly.min.js")
    if not path.is_file():
        raise ReportError("the plotly package has no package_data/plotly.min.js; reinstall plotly")
    return path


def folder_bytes(out_dir):
    """Bytes of report.html and report_files/ together (what to attach or mail)."""
    total = os.path.getsize(os.path.join(out_dir, HTML_NAME))
    for root, _, files in os.walk(os.path.join(out_dir, FILES_DIR)):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def write_html(out_dir):
    """Write ``OUT/report.html`` and ``OUT/report_files/`` for the finished evaluation run in ``out_dir``.
    Returns ``{"html": path, "folder": path, "bytes": both together}``; raises ReportError (nothing written)
    when the folder is not a finished run of this sdjax version."""
    out_dir = os.fspath(out_dir)
    results, paths, shape = check_run(out_dir)
    plotly_js = _plotly_js()
    k = max(1, -(-max(shape[1:3]) // MAX_SIDE))
    page = render_html(page_data(results, shape, k, out_dir))
    folder = os.path.join(out_dir, FILES_DIR)
    with staged_path(folder, overwrite=True) as staged:
        os.makedirs(staged)
        shutil.copyfile(plotly_js, os.path.join(staged, "plotly.min.js"))
        float_u8 = _load_images(paths["float"])
        _save_png(sprite(shown_images(float_u8, k)), os.path.join(staged, "float.png"))
        palette = _diff_palette()
        for i, r in enumerate(results["recipes"]):
            shown, levels = page_images(float_u8, _load_images(paths[r["name"]]), k)
            _save_png(sprite(shown), os.path.join(staged, f"r{i:02d}.png"))
            _save_png(sprite(levels), os.path.join(staged, f"r{i:02d}-diff.png"), palette)
    path = atomic_write_text(os.path.join(out_dir, HTML_NAME), page)
    return {"html": path, "folder": folder, "bytes": folder_bytes(out_dir)}
