"""experiments/bench_pipeline.py: arguments, refusals before launch, token ids, and (slow) a real run."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import bench_common as bc  # noqa: E402
import bench_pipeline  # noqa: E402

ALL_FLAGS = {"model": "test", "cores": 2, "flags": {f: True for f in bc.FLAGS}}


def test_cli(capsys):
    a = bench_pipeline.parse_args([])
    assert a.names == list(bench_pipeline.CONTENDERS) and (a.steps, a.height, a.batch) == (20, 512, 1)
    for bad, expect in ((["--contenders", "openvino-nncf-w8a8"], "--contenders: unknown openvino-nncf-w8a8"),
                        (["--steps", "0"], "--steps must be >= 1"), (["--width", "100"], "--width must be a multiple")):
        with pytest.raises(SystemExit):
            bench_pipeline.parse_args(bad)
        assert expect in capsys.readouterr().err


def test_token_ids_put_negative_rows_first():
    ids = bench_pipeline.token_ids(2)
    assert ids.shape == (4, 77) and (ids[:, 0] == 49406).all()
    assert (ids[0] == ids[1]).all() and (ids[0, 1:] == 49407).all()      # BOS, then EOS padding
    assert (ids[2] == ids[3]).all() and (ids[2] != ids[0]).sum() == 12


def test_too_big_is_refused_and_nothing_launched(tmp_path, monkeypatch):
    monkeypatch.setattr(bc, "mem_available_bytes", lambda: 16 * 2**30)
    monkeypatch.setattr(bc, "backend_problem", lambda *a, **k: None)
    launched, lines = [], []
    args = bench_pipeline.parse_args(["--height", "1024", "--width", "1024", "--batch", "64",
                                      "--workdir", str(tmp_path)])
    rows, ratio, runs = bench_pipeline.run_all(args, ALL_FLAGS, launch=lambda *a, **k: launched.append(a),
                                               log=lines.append)
    assert launched == [] and runs == [{}]
    assert len(lines) == len(bench_pipeline.CONTENDERS)
    assert all("1024x1024, batch 64: estimated peak" in ln and "> 16.0 GiB available" in ln for ln in lines)
    assert all("skipped" in r for r in rows.values())


def test_estimate_adds_the_vae_and_text_encoder():
    unet_only = bc.estimate_bytes("sdjax-fp32", 512, 512, 2)
    assert bench_pipeline.estimate_bytes("sdjax-fp32", 512, 512, 1) > unet_only + bench_pipeline.TEXT_VAE_PARAMS * 4


@pytest.mark.slow  # full-size SD 1.5 pipeline in three processes: minutes on 2 cores
def test_sdjax_generation_matches_diffusers(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    rows = bench_pipeline.main(["--contenders", "pytorch-fp32,sdjax-fp32", "--height", "64", "--width", "64",
                                "--steps", "2", "--no-loop-check", "--workdir", str(tmp_path)])
    assert rows["pytorch-fp32"]["rel_l2"] == 0.0
    assert rows["sdjax-fp32"]["rel_l2"] < 1e-3  # text encoder, 2 dpmpp_2m steps and the VAE, vs diffusers
