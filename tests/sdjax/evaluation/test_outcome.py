"""The typed view of a report.json record: every field read, targets' verdicts kept, the mapping."""
import json
import math

import pytest

from sdjax.evaluation.outcome import EvalResult, RecipeResult, TargetResult

RECORD = {
    "recipes": [
        {"name": "palette-4bit", "family": "palettize", "avg_bits": 4.1, "avg_bits_candidates": 4.05,
         "bytes": {"unet": 1000}, "metrics": {"image_psnr_db": 30.5, "ssim": math.nan}, "finite": True,
         "nonfinite": None, "path": "simulated", "recipe": {"rules": []}, "seconds": 1.0},
        {"name": "mixed-sdjax-3.00", "family": "mixed-sdjax", "avg_bits": 3.0, "bytes": {"unet": 700},
         "metrics": {}, "finite": False, "nonfinite": "images", "path": "simulated",
         "recipe": {"conv_in": 4}, "chosen_for": "Apple's size"},
    ],
    "targets": [{"name": "a", "want": "x", "got": "y", "pass": False},
                {"name": "b", "want": "x", "got": "z", "pass": True}],
    "files": {"json": "out/report.json"},
}


def test_record_read_into_typed_values():
    res = EvalResult.from_json(json.loads(json.dumps(RECORD)))
    a, b = res.recipes
    assert a == RecipeResult("palette-4bit", "palettize", 4.1, 4.05, {"unet": 1000}, a.metrics, True, None,
                             "simulated", {"rules": []}, None)
    assert math.isnan(a.metrics["ssim"])
    assert (b.avg_bits_candidates, b.finite, b.nonfinite, b.chosen_for) == (3.0, False, "images", "Apple's size")
    assert res.targets == (TargetResult("a", "x", "y", False), TargetResult("b", "x", "z", True))
    assert res.files == {"json": "out/report.json"} and res.recipe("mixed-sdjax-3.00") is b
    with pytest.raises(KeyError, match="no recipe 'x'"):
        res.recipe("x")
    # the mapping is the record itself
    assert res["recipes"][0]["seconds"] == 1.0 and set(res) == set(RECORD) and len(res) == 3


def test_empty_record():
    res = EvalResult.from_json({"recipes": [], "targets": None})
    assert res.recipes == () and res.targets == () and res.files == {}
