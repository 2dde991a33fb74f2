"""The eval report writer: every file written (atomically), JSON round trip with inf/nan, the
Markdown marks non-finite recipes and targets, heatmaps with inf/nan, image grid layout."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from sdjax.evaluation import report

PNG = b"\x89PNG\r\n\x1a\n"
NBITS = [1, 2, 4, 6, 8]


def _layers(n=30):
    names = ["conv_in", "time_embedding.linear_1", "mid_block.resnets.0.conv1"]
    i = 0
    while len(names) < n:
        blk, a = divmod(i, 6)
        names.append(f"down_blocks.{blk}.attentions.{a % 2}.transformer_blocks.0."
                     + ["attn1.to_q", "attn1.to_k", "attn2.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"][a])
        i += 1
    return names[:n]


def _results():
    rng = np.random.default_rng(0)
    layers = _layers()
    psnr = (np.array(NBITS, float)[None] * 6 + rng.uniform(0, 10, (len(layers), 1))).tolist()
    psnr[0][-1] = math.inf            # identical to float at 8 bits
    psnr[1][0] = math.nan             # this layer alone made NaN latents
    adherence = {"color": 0.9, "shape": 0.8, "size": 0.7, "position": 0.6, "background": 0.95, "all": 0.79}

    def recipe(name, family, bits, latent, image, finite=True, nonfinite=None, ssim=0.9):
        return {"name": name, "family": family, "avg_bits": bits,
                "bytes": {"unet": int(3.4e9 * bits / 32), "text_encoder": 246_000_000, "vae": 167_000_000},
                "metrics": {"noise_psnr_db": None if latent is None else latent + 3, "latent_psnr_1step_db": latent,
                            "image_psnr_db": image, "ssim": ssim, "adherence": dict(adherence) if finite else None,
                            "clip_score": 0.31 if finite else None},
                "finite": finite, "nonfinite": nonfinite, "seconds": 12.5, "recipe": {"name": name, "rules": []}}

    return {
        "sdjax_version": "0.1.0",
        "model": {"source": "embedded reference model", "fingerprint": "ab12cd34ef56"},
        "settings": {"prompts": ["a red circle", "a small blue square on a green background"], "seeds": [0, 1],
                     "steps": 25, "sampler": "dpmpp_2m", "guidance_scale": 7.5,
                     "metrics": ["noise_psnr_db", "latent_psnr_1step_db", "image_psnr_db", "ssim", "adherence",
                                 "clip_score"]},
        "float": {"bytes": {"unet": 1_720_000_000, "text_encoder": 246_000_000, "vae": 167_000_000},
                  "avg_bits": 16.0, "metrics": {"adherence": dict(adherence, all=0.81), "clip_score": 0.32}},
        "recipes": [
            recipe("palette-6bit", "uniform palettize", 6.05, 38.2, 31.0),
            recipe("palette-4bit", "uniform palettize", 4.05, 27.9, 22.5),
            recipe("palette-2bit", "uniform palettize", 2.05, math.nan, None, finite=False,
                   nonfinite="latents: 12 NaN, 0 Inf", ssim=math.nan),
            recipe("mixed-4.5", "mixed (Apple)", 4.5, 31.7, 25.1),
            recipe("int8", "int8", 8.0, math.inf, 45.0, ssim=1.0),
        ],
        "sensitivity": {"nbits": NBITS, "layers": layers, "numel": [1000 * (i + 1) for i in range(len(layers))],
                        "psnr_db": psnr, "fisher_estimate": (-np.array(psnr)).tolist(),
                        "spearman": {str(b): 0.8 + 0.02 * i for i, b in enumerate(NBITS)},
                        "seconds": {"measured": 812.0, "fisher": 41.5},
                        "selection": {"prompts": 32, "seeds": [2000], "pairs": 8}},
        "targets": [{"name": "latent PSNR at <= 4.5 bits", "want": ">= 30 dB", "got": "31.7 dB (mixed-4.5)",
                     "pass": True},
                    {"name": "image PSNR at <= 4.1 bits", "want": ">= 25 dB", "got": "22.5 dB", "pass": False}],
    }


def _same(a, b):
    """Deep equality with nan == nan."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _images(rng, n=4, size=64, dtype=float):
    x = rng.uniform(0, 1, (n, size, size, 3))
    return (x * 255).astype(np.uint8) if dtype == np.uint8 else x.astype(np.float32)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_write_report(tmp_path):
    res = _results()
    rng = np.random.default_rng(1)
    bad = _images(rng)
    bad[0, :8, :8] = np.nan
    images = {"float": _images(rng, dtype=np.uint8), "palette-6bit": _images(rng), "palette-2bit": bad,
              "int8": _images(rng)}
    out = tmp_path / "sub" / "eval"
    files = report.write_report(res, out, images=images)
    assert set(files) == {"json", "quality_vs_bits", "sizes", "sensitivity", "grid", "markdown"}
    assert {os.path.basename(p) for p in files.values()} == {
        "report.json", "quality_vs_bits.png", "sizes.png", "sensitivity.png", "grid.png", "report.md"}
    for key, path in files.items():
        assert os.path.dirname(path) == str(out) and os.path.getsize(path) > 0
        if path.endswith(".png"):
            assert _is_png(path), key
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    md = open(files["markdown"]).read()
    assert "chosen on selection pairs (32 calibration prompts, x_T seed 2000; 8 of them per sensitivity" in md
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in files.values())

    with open(files["json"]) as f:
        assert _same(json.load(f), res)

    md = open(files["markdown"], encoding="utf-8").read()
    for r in res["recipes"]:
        assert r["name"] in md
    row = next(line for line in md.splitlines() if line.startswith("| palette-2bit"))
    assert "(NaN/Inf)" in row and report.NONFINITE_TEXT in row
    assert "latents: 12 NaN, 0 Inf" in md
    assert report.NONFINITE_TEXT not in next(line for line in md.splitlines() if line.startswith("| palette-4bit"))
    for t in res["targets"]:
        assert t["name"] in md and t["got"] in md
    assert "1 of 2 met" in md and "PASS" in md and "FAIL" in md
    for name in ("quality_vs_bits.png", "sizes.png", "sensitivity.png", "grid.png", "report.json"):
        assert f"({name})" in md
    assert "embedded reference model" in md and "ab12cd34ef56" in md and "dpmpp_2m" in md
    assert "Spearman" in md and "19.6x faster" in md        # 812 s measured / 41.5 s Fisher
    # the most sensitive layer at 1 bit is the NaN one, listed first
    most = md.split("Most sensitive at 1 bit:")[1]
    assert most.split("\n| `")[1].startswith(res["sensitivity"]["layers"][1] + "`")
    assert "38.20" in md and "0.9000" in md and "0.790" in md    # latent dB, SSIM, adherence precision

    # grid: float + the 3 recipes with images, 4 columns of 64 px images shown at 128 px
    grid = Image.open(files["grid"])
    assert grid.size[1] > 4 * (128 + 4)


def test_write_report_minimal(tmp_path):
    """Missing optional keys and None values: no sensitivity, targets, images or bytes."""
    res = {"recipes": [{"name": "only", "avg_bits": 4.0, "metrics": {"latent_psnr_1step_db": 20.0}},
                       {"name": "nobits", "avg_bits": None, "metrics": None, "finite": False}],
           "sensitivity": None, "targets": None}
    files = report.write_report(res, tmp_path)
    assert set(files) == {"json", "quality_vs_bits", "markdown"}
    md = open(files["markdown"], encoding="utf-8").read()
    assert "only" in md and "nobits (NaN/Inf)" in md and "Targets" not in md and "sensitivity" not in md.lower()
    assert report.render_markdown({}, {}).startswith("# Quality vs bits")


def test_heatmap_inf_nan(tmp_path):
    layers = _layers(40)
    psnr = np.full((40, 3), 30.0)
    psnr[:, 2] = math.inf
    psnr[3] = math.nan
    psnr[4, 0] = -math.inf
    sens = {"nbits": [2, 4, 8], "layers": layers, "psnr_db": psnr.tolist()}
    report.plot_sensitivity_heatmap(sens, tmp_path / "h.png")
    assert _is_png(tmp_path / "h.png")
    all_bad = {"nbits": [4], "layers": layers[:3], "psnr_db": [[math.nan], [math.inf], [None]]}
    report.plot_sensitivity_heatmap(all_bad, tmp_path / "h2.png")
    assert _is_png(tmp_path / "h2.png")
    h_small = Image.open(tmp_path / "h2.png").size[1]
    assert Image.open(tmp_path / "h.png").size[1] > h_small + 300     # height grows with the layer count


def test_short_layer_names():
    names = _layers(30) + ["up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",
                           "down_blocks.0.downsamplers.0.conv", "down_blocks.0.resnets.1.conv_shortcut"]
    short = report.short_layer_names(names)
    assert len(set(short)) == len(names)
    assert short[-3:] == ["up1.tf2.attn2.to_k", "down0.down.conv", "down0.res1.shortcut"]
    # more than one transformer block (SDXL): the block index stays
    assert report.short_layer_names(["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                                     "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"]) == \
        ["down1.tf0.b0.attn1.to_q", "down1.tf0.b1.attn1.to_q"]
    # collisions keep their full names
    assert report.short_layer_names(["down_blocks.0.x", "down0.x"]) == ["down_blocks.0.x", "down0.x"]


def test_image_grid_layout(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    solid = np.stack([np.broadcast_to(np.array(c, np.uint8), (64, 64, 3)) for c in colours])
    as_float = solid.astype(np.float32) / 255
    as_float[2, 0, 0] = np.nan
    rows = [("float", solid), ("a much longer recipe label", as_float)]
    gap, tile = 4, 128                          # 64 px upscaled by 2 to reach 96
    img = report.image_grid(rows, tmp_path / "g.png", gap=gap)
    assert _is_png(tmp_path / "g.png")
    w, h = img.size
    assert h == 2 * (tile + gap) + gap
    label_w = w - 3 * (tile + gap) - gap
    font = report._font(11)
    assert label_w >= 2 * gap + font.getlength("float")
    for i in range(2):
        for j, c in enumerate(colours):
            x0, y0 = label_w + gap + j * (tile + gap), gap + i * (tile + gap)
            assert img.getpixel((x0 + tile // 2, y0 + tile // 2)) == c
            assert img.getpixel((x0 + tile - 1, y0 + tile - 1)) == c
            assert img.getpixel((x0 + tile, y0 + tile // 2)) == (255, 255, 255)      # the gap
    # the NaN pixel (0, 0) of row 1, column 2 is magenta, as a 2x2 block
    x0, y0 = label_w + gap + 2 * (tile + gap), gap + (tile + gap)
    assert img.getpixel((x0 + 1, y0 + 1)) == (255, 0, 255)

    # captions add a band on top; max_cols truncates; large images are not upscaled
    many = np.zeros((10, 100, 120, 3), np.uint8)
    img2 = report.image_grid([("x", many)], tmp_path / "g2.png", captions=[f"prompt {i} " * 8 for i in range(10)])
    cap_h = img2.size[1] - (100 + gap) - gap
    assert cap_h > 0
    assert (img2.size[0] - 8 * (120 + gap) - gap) == 2 * gap + math.ceil(font.getlength("x"))
    assert img2.getpixel((img2.size[0] - gap - 1, cap_h + gap + 50)) == (0, 0, 0)


def test_quality_plot_single_metric(tmp_path):
    res = _results()
    for r in res["recipes"]:
        r["finite"], r["metrics"]["image_psnr_db"] = False, math.nan
    report.plot_quality_vs_bits(res, tmp_path / "q.png", metric="image_psnr_db")
    assert _is_png(tmp_path / "q.png")
    report.plot_quality_vs_bits(res, tmp_path / "q2.png", metric=["adherence", "clip_score", "ssim", "noise_psnr_db"])
    assert _is_png(tmp_path / "q2.png")


def test_grid_cap_and_failed_plot(tmp_path, monkeypatch):
    """At most GRID_MAX_RECIPES recipe rows (the rest named in the report); a plot that raises is
    warned about and listed, and everything else is still written."""
    res = _results()
    rng = np.random.default_rng(2)
    images = {r["name"]: _images(rng, n=2) for r in res["recipes"]}
    images["float"] = _images(rng, n=2)
    monkeypatch.setattr(report, "GRID_MAX_RECIPES", 2)

    def broken(results, path):
        raise RuntimeError("no fonts")
    monkeypatch.setattr(report, "plot_sizes", broken)
    with pytest.warns(UserWarning, match="sizes.png not written"):
        files = report.write_report(res, tmp_path, images=images, captions=["one", "two"])
    assert "sizes" not in files and not (tmp_path / "sizes.png").exists()
    assert Image.open(files["grid"]).size[1] > 3 * (128 + 4) and Image.open(files["grid"]).size[1] < 4 * (128 + 4)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "sizes.png: RuntimeError: no fonts" in md
    assert "left out: palette-2bit, mixed-4.5, int8" in md
