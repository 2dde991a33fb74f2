"""experiments/bench_unet.py: arguments, what is refused before launch, failures, and (slow) a real run."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import bench_common as bc  # noqa: E402
import bench_unet  # noqa: E402

ALL_FLAGS = {"model": "test", "cores": 2, "flags": {f: True for f in bc.FLAGS}}


def test_cli_defaults_and_bad_arguments(capsys):
    a = bench_unet.parse_args([])
    assert a.names == list(bc.CONTENDERS) and (a.height, a.width, a.batch, a.reps, a.runs) == (512, 512, 1, 3, 1)
    a = bench_unet.parse_args(["--contenders", "sdjax-fp32,pytorch-fp32", "--batch", "2", "--scaling",
                               "--sizes", "256,512", "--batches", "1,4"])
    assert a.names == ["sdjax-fp32", "pytorch-fp32"] and a.size_list == [256, 512] and a.batch_list == [1, 4]
    for bad, expect in ((["--contenders", "sdjax-fp32,onnx-fp32"], "--contenders: unknown onnx-fp32"),
                        (["--height", "500"], "--height must be a multiple of 64"),
                        (["--batch", "0"], "--batch must be >= 1"),
                        (["--sizes", "256,a"], "--sizes: expected a comma-separated list"),
                        (["--sizes", "256,300"], "--sizes must be multiples of 64")):
        with pytest.raises(SystemExit):
            bench_unet.parse_args(bad)
        assert expect in capsys.readouterr().err


def _args(tmp_path, *extra):
    a = bench_unet.parse_args(["--workdir", str(tmp_path), *extra])
    a.workdir = str(tmp_path)
    return a


def test_a_size_that_cannot_fit_is_refused_before_anything_is_launched(tmp_path, monkeypatch):
    monkeypatch.setattr(bc, "mem_available_bytes", lambda: 16 * 2**30)
    launched, lines = [], []
    args = _args(tmp_path, "--height", "1024", "--width", "1024", "--batch", "64")
    rows, ratio, runs = bench_unet.run_point(args, args.names, 1024, 1024, 64, ALL_FLAGS,
                                             launch=lambda *a, **k: launched.append(a), log=lines.append)
    assert launched == [] and ratio == {} and runs == [{}]
    assert set(rows) == set(bc.CONTENDERS) and all("skipped" in r for r in rows.values())
    mem_lines = [ln for ln in lines if "1024x1024, 128 UNet rows: estimated peak" in ln and "16.0 GiB available" in ln]
    # every contender whose backend is installed is refused for memory, each in one line
    installed = [n for n in bc.CONTENDERS if bc.backend_problem(n, ALL_FLAGS["flags"]) is None]
    assert len(mem_lines) == len(installed) and len(lines) == len(bc.CONTENDERS)
    assert "sdjax-fp32" in installed


def test_missing_backends_are_skipped_and_the_rest_planned(monkeypatch):
    missing = {"openvino", "nncf"}
    runnable, skipped = bench_unet.plan_point(list(bc.CONTENDERS), 256, 256, 1, ALL_FLAGS, 64 * 2**30,
                                              find_spec=lambda m: None if m in missing else object())
    needs_openvino = {n for n in bc.CONTENDERS if "openvino" in n}   # sdjax-openvino-* too
    assert set(skipped) == needs_openvino and len(needs_openvino) == 5
    assert "openvino not installed" in skipped["openvino-bf16"]
    assert "openvino not installed" in skipped["sdjax-openvino-w8a8"]
    assert runnable == [n for n in bc.CONTENDERS if n not in needs_openvino]


def test_a_failed_child_is_marked_and_the_others_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr(bc, "mem_available_bytes", lambda: 64 * 2**30)
    monkeypatch.setattr(bc, "backend_problem", lambda *a, **k: None)
    calls, lines = [], []

    def launch(argv, timeout=None):
        calls.append(argv)
        if "--prepare-child" in argv:
            return {"prepare_s": 0.0}, ""
        name = argv[argv.index("--child") + 1]
        if name == "sdjax-bf16":
            return None, "exit status 1\nTraceback ... RuntimeError: out of cheese"
        s = {"pytorch-fp32": 2.0, "sdjax-fp32": 3.0}[name]
        return {"s": s, "first_s": 1.0, "load_s": 1.0, "rss_gib": 1.0, "times": [s], "note": ""}, ""

    args = _args(tmp_path, "--contenders", "pytorch-fp32,sdjax-bf16,sdjax-fp32", "--runs", "2")
    rows, ratio, runs = bench_unet.run_point(args, args.names, 256, 256, 1, ALL_FLAGS, launch=launch,
                                             log=lines.append)
    assert len(calls) == 1 + 3 * 2  # prepare once, then every contender in each run
    assert "failed" in rows["sdjax-bf16"] and any("out of cheese" in ln for ln in lines)
    assert rows["sdjax-fp32"]["s"] == 3.0 and ratio["sdjax-fp32"] == (1.5, 1.5)
    # no calibration is prepared when no int8 contender runs
    prep = calls[0]
    assert prep[prep.index("--prepare-child") + 5] == "0"


def test_a_scaling_run_stopped_part_way_keeps_the_points_it_measured(tmp_path, monkeypatch):
    """--scaling writes its table, plot and JSON after every point: a long run stopped at the second point
    still has the first."""
    def fake_point(args, names, h, w, b, cpu):
        if h > 64:
            raise KeyboardInterrupt
        return {"sdjax-fp32": {"s": 1.5, "first_s": 2.0, "rss_gib": 0.5, "rel_l2": 1e-6}}, {"sdjax-fp32": (1.0, 1.0)}, 1
    monkeypatch.setattr(bench_unet, "run_point", fake_point)
    monkeypatch.setattr(bench_unet, "report_point", lambda *a, **k: None)
    out = tmp_path / "sc"
    with pytest.raises(KeyboardInterrupt):
        bench_unet.main(["--scaling", "--sizes", "64,128", "--batches", "1", "--contenders", "sdjax-fp32",
                         "--workdir", str(tmp_path / "wd"), "--scaling-out", str(out), "--json", str(tmp_path / "r.json")])
    table = (tmp_path / "sc.md").read_text()
    assert "| 64x64 | 1 | 1.50 / 0.50 |" in table and "128x128" not in table
    assert (tmp_path / "sc.png").exists()
    import json
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [p["height"] for p in saved["points"]] == [64] and saved["complete"] is False


@pytest.mark.slow  # full-size SD 1.5 weights in three processes: minutes on 2 cores
def test_sdjax_matches_diffusers_on_the_same_weights(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    res = bench_unet.main(["--contenders", "pytorch-fp32,sdjax-fp32", "--height", "64", "--width", "64",
                           "--reps", "1", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    rows = res[0]["rows"]
    assert rows["pytorch-fp32"]["rel_l2"] == 0.0
    assert rows["sdjax-fp32"]["rel_l2"] < 1e-4  # diffusers is the oracle for the same saved weights
    assert "| sdjax-fp32 |" in capsys.readouterr().out and (tmp_path / "r.json").exists()
