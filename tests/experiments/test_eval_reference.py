"""experiments/eval_reference.py: the adherence report and the shape-as-drawn reading on a few pairs."""
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import eval_reference  # noqa: E402

from sdjax import shapes  # noqa: E402


def test_report_has_adherence_and_shape_fit(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert eval_reference.main(["--n", "6", "--steps", "2", "--batch", "3", "--json", str(out),
                                "--grid", str(tmp_path / "g.png")]) == 0
    rep = json.loads(out.read_text())
    assert rep["adherence"]["n"] == 6 and set(shapes.ATTRIBUTES) <= set(rep["adherence"])
    assert rep["detector_on_dataset"]["all"] == 1.0
    fit = rep["shape_fit"]
    assert set(fit) == set(shapes.SHAPES) and sum(v["n"] for v in fit.values()) == 6
    for v in fit.values():       # dataset renderings of the asked shape fit it almost exactly
        assert v["n"] == 0 or (v["dataset"] >= 0.85 and 0.0 <= v["generated"] <= 1.0)
        assert v["n"] > 0 or math.isnan(v["dataset"])
        assert v["n"] == 0 or 0.5 <= v["round_trip"] <= 1.0   # the VAE's own drawing of the dataset's shape
    sq = fit["square"]
    assert sq["n_small"] + sq["n_large"] == sq["n"]
    for size in ("small", "large"):
        for part in ("sides", "corners"):
            for v in (sq[f"{part}_{size}"], sq[f"{part}_{size}_round_trip"]):
                assert math.isnan(v) if sq[f"n_{size}"] == 0 else 0.0 <= v <= 1.0
    assert (tmp_path / "g.png").stat().st_size > 0
    assert "shape as drawn" in capsys.readouterr().out
