"""experiments/xt_mean_probe.py: a large enough shift of x_T's mean overrides the caption's background."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import xt_mean_probe  # noqa: E402

import sdjax  # noqa: E402


@pytest.mark.slow  # kept out of CI for time (the CI suite must stay under 30 min); run with -m slow
def test_a_large_mean_shift_decides_the_background(capsys):
    pipe = sdjax.load(None, progress=False)
    res = xt_mean_probe.probe(pipe, n=8, offsets=(-1.0, 1.0), steps=4)
    assert set(res) == {-1.0, 1.0}
    for acc in res.values():
        assert set(acc) == {"white", "black"} and all(0.0 <= v <= 1.0 for v in acc.values())
    # x_T shifted by +-1 (16 standard errors of its mean) is read as brightness whatever the caption says:
    # one shift draws every asked-white background right and the other every asked-black one
    lo, hi = res[-1.0], res[1.0]
    assert {(lo["white"], lo["black"]), (hi["white"], hi["black"])} == {(1.0, 0.0), (0.0, 1.0)}
    assert xt_mean_probe.main(["--n", "2", "--offsets", "0"]) == 0
    assert "+0.00: white" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        xt_mean_probe.main(["--offsets", "a,b"])
