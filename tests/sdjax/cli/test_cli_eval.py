"""sdjax eval from the command line: a tiny model with generic prompts, and bad arguments."""
import json

import pytest

from sdjax.cli import build_parser, main


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_eval():
    assert "eval" in build_parser().format_help()


def test_eval_on_a_tiny_model_with_a_prompts_file(pipeline_dirs, tmp_path, capsys):
    folder = pipeline_dirs("sd1")[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na small blue cat\n")
    out = tmp_path / "ev"
    rc, text, err = cli(capsys, "eval", "--model", folder, "--recipes", "palette-4bit,w8-int8", "--prompts", prompts,
                        "--seeds", "0", "--steps", "2", "--batch", "2", "-o", out, "-q")
    assert rc == 0, err
    assert "palette-4bit" in text and "w8-int8" in text and "report.md" in text
    saved = json.loads((out / "report.json").read_text())
    assert saved["settings"]["prompts"] == ["a red circle", "a small blue cat"] and saved["settings"]["seeds"] == [0]
    assert saved["float"]["metrics"]["adherence"] is None  # no detector for other models
    assert [r["name"] for r in saved["recipes"]] == ["palette-4bit", "w8-int8"]
    for f in ("report.md", "quality_vs_bits.png", "sizes.png", "grid.png", "recipes/palette-4bit.json"):
        assert (out / f).exists(), f
    # same command again: everything is loaded, nothing recomputed, same numbers
    rc, text2, err = cli(capsys, "eval", "--model", folder, "--recipes", "palette-4bit,w8-int8", "--prompts", prompts,
                         "--seeds", "0", "--steps", "2", "--batch", "2", "-o", out, "-q")
    assert rc == 0 and text2.splitlines()[:3] == text.splitlines()[:3]
    # other settings into the same folder: refused, naming the folder
    rc, _, err = cli(capsys, "eval", "--model", folder, "--recipes", "palette-4bit", "--prompts", prompts,
                     "--seeds", "0,1", "--steps", "2", "-o", out, "-q")
    assert rc == 2 and str(out) in err and "settings" in err


@pytest.mark.parametrize("args,message", [
    (["--recipes", "palette-5bit"], "unknown recipe 'palette-5bit'; known: w8-int8conv"),
    (["--seeds", "a,b"], "--seeds 'a,b': a comma-separated list of integers"),
    (["--steps", "0"], "steps=0: must be an integer >= 1"),
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--prompts", "/nonexistent/p.txt"], "--prompts /nonexistent/p.txt: cannot read"),
    (["--metric", "no_such_module:f"], "no_such_module"),
])
def test_bad_arguments_are_named(tmp_path, capsys, args, message):
    rc, _, err = cli(capsys, "eval", "-o", tmp_path / "ev", "-q", *args)
    assert rc == 2 and message in err, err


@pytest.mark.slow
def test_two_processes_under_jax_distributed_give_the_numbers_of_one(tmp_path):
    """Two local processes (2 host devices each) joined by jax.distributed run one sdjax eval: the
    first writes the report, with the numbers of a one-process run."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    common = ["-m", "sdjax.cli", "eval", "--recipes", "palette-3bit", "--n-prompts", "2", "--seeds", "0,1",
              "--steps", "2", "--batch", "4", "--no-fisher", "-q"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, *common, "-o", str(tmp_path / "multi"), "--coordinator",
                               f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert "palette-3bit" in outs[0][0] and "palette-3bit" not in outs[1][0]  # the first process reports
    one = subprocess.run([sys.executable, *common, "-o", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    multi = json.loads((tmp_path / "multi" / "report.json").read_text())["recipes"][0]["metrics"]
    single = json.loads((tmp_path / "one" / "report.json").read_text())["recipes"][0]["metrics"]
    for k in ("noise_psnr_db", "latent_psnr_1step_db", "image_psnr_db", "ssim"):
        assert multi[k] == pytest.approx(single[k], rel=1e-4), k
