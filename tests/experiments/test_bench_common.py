"""experiments/bench_common.py: backend and memory checks, child processes, ratios, tables (no torch/OpenVINO)."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import bench_common as bc  # noqa: E402

ALL_FLAGS = {f: True for f in bc.FLAGS}


def test_cpu_info_and_meminfo_read_the_files(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx512f avx512_vnni sse\n"
                       "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx512f avx512_vnni sse\n")
    info = bc.cpu_info(str(cpuinfo))
    assert info["model"] == "Test CPU 9000"
    assert info["flags"] == {"amx_bf16": False, "amx_int8": False, "avx512_bf16": False, "avx512_vnni": True}
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:         500 kB\nMemAvailable:    700 kB\n")
    assert bc.mem_available_bytes(str(meminfo)) == 700 * 1024
    assert bc.mem_available_bytes(str(tmp_path / "missing")) is None
    header = bc.machine_header(info, {"jax": "1.0", "openvino": "not installed"})
    assert "avx512_bf16 absent" in header and "avx512_vnni present" in header and "openvino not installed" in header


def test_a_missing_backend_is_named_in_one_line():
    def no_openvino(m):
        return None if m == "openvino" else object()
    why = bc.backend_problem("openvino-bf16", ALL_FLAGS, find_spec=no_openvino)
    assert why.startswith("skipped openvino-bf16: openvino not installed") and "\n" not in why
    assert bc.backend_problem("pytorch-fp32", ALL_FLAGS, find_spec=no_openvino) is None
    assert bc.backend_problem("sdjax-fp32", {}, find_spec=lambda m: None) is None  # needs nothing extra


def test_a_precision_without_its_cpu_flags_is_refused_naming_them():
    flags = {f: False for f in bc.FLAGS}
    present = lambda m: object()  # noqa: E731
    why = bc.backend_problem("sdjax-bf16", flags, find_spec=present)
    assert "avx512_bf16" in why and "amx_bf16" in why and "sdjax-bf16" in why
    why = bc.backend_problem("openvino-nncf-w8a8", dict(flags, avx512_bf16=True), find_spec=present)
    assert "avx512_vnni" in why and "amx_int8" in why
    assert bc.backend_problem("openvino-nncf-w8a8", dict(flags, avx512_vnni=True), find_spec=present) is None
    assert bc.backend_problem("pytorch-fp32", flags, find_spec=present) is None  # float32 needs no flag


def test_memory_estimate_grows_with_the_attention_matrix_and_refuses_what_cannot_fit():
    # 1024 px, 64 prompts: 128 rows x 8 heads x (128*128)^2 float32 scores = 1 TiB alone
    need = bc.estimate_bytes("pytorch-fp32", 1024, 1024, 128)
    assert need > 128 * 8 * (128 * 128) ** 2 * 4
    why = bc.memory_problem("pytorch-fp32", 1024, 1024, 128, available=16 * 2**30)
    assert why.startswith("skipped pytorch-fp32 at 1024x1024, 128 UNet rows: estimated peak ")
    assert "> 16.0 GiB available" in why
    # the full-size weights alone (3.2 GiB float32) do not fit in 2 GiB; 512 px batch 1 fits in 16 GiB
    assert bc.memory_problem("sdjax-fp32", 256, 256, 2, available=2 * 2**30) is not None
    assert bc.memory_problem("sdjax-fp32", 512, 512, 2, available=16 * 2**30) is None
    assert bc.memory_problem("sdjax-fp32", 512, 512, 2, available=None) is None  # unknown: not refused


def test_parse_contenders():
    assert bc.parse_contenders("sdjax-fp32, pytorch-fp32,sdjax-fp32") == ["sdjax-fp32", "pytorch-fp32"]
    with pytest.raises(bc.BenchError, match="--contenders: unknown tensorflow-fp32"):
        bc.parse_contenders("sdjax-fp32,tensorflow-fp32")
    with pytest.raises(bc.BenchError, match="--contenders"):
        bc.parse_contenders(" , ")


def test_ratios_against_the_reference_and_the_best_peer_at_the_same_precision():
    run = {"pytorch-fp32": {"s": 2.0}, "sdjax-fp32": {"s": 3.0}, "pytorch-bf16": {"s": 1.0},
           "openvino-bf16": {"s": 0.5}, "sdjax-bf16": {"s": 1.0}, "openvino-nncf-w8a8": None, "sdjax-w8a8": {"s": 4.0}}
    r = bc.ratios(run)
    assert r["sdjax-fp32"] == (1.5, 1.5)
    assert r["sdjax-bf16"] == (0.5, 2.0)          # the best bf16 peer is OpenVINO at 0.5 s
    assert r["pytorch-bf16"] == (0.5, 2.0)
    assert r["openvino-bf16"] == (0.25, 1.0)
    assert r["sdjax-w8a8"] == (2.0, None)         # no int8 peer measured
    assert "openvino-nncf-w8a8" not in r
    run2 = dict(run, **{"sdjax-fp32": {"s": 5.0}, "pytorch-fp32": {"s": 2.5}})
    run3 = dict(run, **{"sdjax-fp32": {"s": 2.0}, "pytorch-fp32": {"s": 2.0}})
    med = bc.median_ratios([run, run2, run3])
    assert med["sdjax-fp32"][0] == pytest.approx(1.5)  # median of 1.5, 2.0, 1.0: of ratios, not of times


def test_format_table_rows():
    rows = {"pytorch-fp32": {"s": 2.0, "first_s": 3.0, "rss_gib": 4.0, "rel_l2": 0.0, "note": "2 threads"},
            "sdjax-fp32": {"s": 3.0, "first_s": 30.0, "rss_gib": 4.5, "rel_l2": 1.5e-6, "note": ""},
            "openvino-bf16": {"skipped": "skipped openvino-bf16: openvino not installed"},
            "sdjax-w8a8": {"failed": "exit status 1"}}
    text = bc.format_table(rows, bc.ratios({"pytorch-fp32": {"s": 2.0}, "sdjax-fp32": {"s": 3.0}}))
    lines = text.splitlines()
    assert len(lines) == 6 and all(ln.startswith("| ") and ln.endswith(" |") for ln in lines)
    assert all(ln.count("|") == lines[0].count("|") for ln in lines)
    assert "| sdjax-fp32 | 3.000 | 30.0 | 4.50 | 1.50e-06 | 1.50 | 1.50 |" in text
    assert "skipped openvino-bf16: openvino not installed" in text and "FAILED: exit status 1" in text


def test_rel_l2():
    ref = np.arange(1, 11, dtype=np.float32)
    assert bc.rel_l2(ref * 1.01, ref) == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(bc.BenchError, match="shape"):
        bc.rel_l2(ref[:5], ref)


def test_run_child_returns_the_result_or_the_stderr_tail():
    ok, err = bc.run_child([sys.executable, "-c", "print('noise'); print('RESULT ' + '{\"s\": 1.5}')"])
    assert ok == {"s": 1.5} and err == ""
    res, err = bc.run_child([sys.executable, "-c", "import sys; sys.stderr.write('boom at layer 3'); sys.exit(3)"])
    assert res is None and "exit status 3" in err and "boom at layer 3" in err
    res, err = bc.run_child([sys.executable, "-c", "print('no result line')"])
    assert res is None and "exit status 0" in err


def test_atomic_write_json(tmp_path):
    p = tmp_path / "out.json"
    bc.atomic_write_json(p, {"a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2]} and os.listdir(tmp_path) == ["out.json"]


def test_scaling_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    row = lambda s, g: {"s": s, "rss_gib": g, "first_s": 1.0}  # noqa: E731
    results = [{"height": 256, "width": 256, "batch": 1, "rows": {"a": row(1.0, 3.0), "b": row(2.0, 4.0)}},
               {"height": 512, "width": 512, "batch": 1, "rows": {"a": row(4.0, 3.5), "b": {"skipped": "too big"}}}]
    text = bc.scaling_table(results)
    assert "| 256x256 | 1 | 1.00 / 3.00 | 2.00 / 4.00 |" in text and "| 512x512 | 1 | 4.00 / 3.50 | skipped |" in text
    bc.write_scaling(results, str(tmp_path / "sc"), "header")
    assert sorted(os.listdir(tmp_path)) == ["sc.md", "sc.png"]
    assert "too big" in (tmp_path / "sc.md").read_text()
    assert (tmp_path / "sc.png").read_bytes()[:4] == b"\x89PNG"
