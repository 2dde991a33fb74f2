"""experiments/bench_palettized.py: each variant of a small linear and conv layer computes the product it
claims (float64 NumPy of the looked-up LUT entries), and palettized layers are as close as bfloat16's."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import bench_palettized as bp  # noqa: E402


@pytest.mark.parametrize("kind, xshape, wshape", [("linear", (2, 24, 40), (40, 48)),
                                                  ("conv", (2, 6, 5, 16), (3, 3, 16, 24))])
def test_rows_compute_the_float64_product(kind, xshape, wshape):
    rows = bp.layer_rows("small", kind, xshape, wshape, reps=1, rng=np.random.default_rng(0))
    by = {r["variant"]: r for r in rows}
    assert set(by) == set(bp.VARIANTS)
    assert by["float32"]["rel_l2"] < 1e-6
    for v in ("bfloat16", "p6", "p4"):  # bf16 activations (and output): bf16-sized errors, not wrong products
        assert 1e-5 < by[v]["rel_l2"] < 1e-2, v
    assert by["p4"]["weight_bytes"] < by["p6"]["weight_bytes"] < by["bfloat16"]["weight_bytes"]


def test_reps_below_one_is_named(capsys):
    with pytest.raises(SystemExit):
        bp.main(["--reps", "0"])
    assert "--reps 0: must be at least 1" in capsys.readouterr().err
