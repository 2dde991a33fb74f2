"""experiments/readme_eval_figures.py: the README's table and grid from an eval folder's files."""
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import readme_eval_figures as ref  # noqa: E402


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    recipes = [{"name": "palette-6bit", "avg_bits": 6.36, "avg_bits_candidates": 6.07, "apple_bits": 6.29,
                "metrics": {"apple_latent_psnr_db": 68.14, "latent_psnr_1step_db": 38.21, "final_latent_psnr_db": 41.2, "image_psnr_db": 46.0,
                            "ssim": 0.9921, "adherence": {"all": 0.75, "color": 1.0}}},
               {"name": "mixed a/b", "avg_bits": 4.2, "avg_bits_candidates": 4.0,
                "metrics": {"latent_psnr_1step_db": 30.0, "final_latent_psnr_db": None, "image_psnr_db": 31.0,
                            "ssim": 0.9, "adherence": None}}]
    report = {"settings": {"prompts": ["a p", "a q", "a r"], "seeds": [0, 1]}, "recipes": recipes,
              "float": {"metrics": {"adherence": {"all": 0.875}}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    os.makedirs(tmp_path / "state" / "recipes")
    imgs = {k: rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8) for k in ("float", "palette-6bit", "mixed_a_b")}
    np.savez(tmp_path / "state" / "float.npz", images=imgs["float"])
    for k in ("palette-6bit", "mixed_a_b"):
        np.savez(tmp_path / "state" / "recipes" / f"{k}.npz", images=imgs[k])
    (tmp_path / "quality_vs_bits.png").write_bytes(b"png")
    return report


def test_table_and_grid(tmp_path, capsys):
    report = _folder(tmp_path)
    t = ref.table(report).splitlines()
    assert t[0].startswith("| recipe | bits/weight (all / candidates / Apple's) | Apple's reading | 1-step latent PSNR "
                           "| final latent PSNR")
    assert t[2] == "| float model | 32 |  |  |  |  |  | 0.875 |"
    assert t[3] == "| palette-6bit | 6.36 / 6.07 / 6.29 | 68.1 | 38.2 | 41.2 | 46.0 | 0.992 | 0.750 |"
    assert t[4] == "| mixed a/b | 4.20 / 4.00 |  | 30.0 |  | 31.0 | 0.900 |  |"
    for r in report["recipes"]:   # a report without Apple's pre-analysis: neither column
        r.pop("apple_bits", None)
        r["metrics"].pop("apple_latent_psnr_db", None)
    assert ref.table(report).splitlines()[3] == "| palette-6bit | 6.36 / 6.07 | 38.2 | 41.2 | 46.0 | 0.992 | 0.750 |"
    out = tmp_path / "g.png"
    assert ref.main([str(tmp_path), "--rows", "mixed a/b", "--grid", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    img = Image.open(out)
    assert img.size[0] > 3 * 8 and img.size[1] > 2 * 8   # three seed-0 columns, two rows
    assert (tmp_path / "p.png").read_bytes() == b"png"
    with pytest.raises(SystemExit, match="no recipe 'nope'"):
        ref.main([str(tmp_path), "--rows", "nope", "--grid", str(out)])
    with pytest.raises(SystemExit):
        ref.main([str(tmp_path / "missing")])
