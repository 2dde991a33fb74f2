"""sdjax generate from the command line: PNG metadata, reproducibility, usage errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_png_carries_its_parameters_and_is_reproducible(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sd1")
    args = ["--model", folder, "--prompt", "a red circle", "--negative-prompt", "blue", "--steps", "3",
            "--sampler", "euler_a", "--seed", "11", "--guidance-scale", "4", "--height", "32", "--width", "32", "-q"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    r = _run(*args, "--out", str(a))
    assert r.returncode == 0, r.stderr
    assert _run(*args, "--out", str(b)).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    meta = Image.open(a).text
    assert meta["prompt"] == "a red circle" and meta["seed"] == "11" and meta["sampler"] == "euler_a"
    assert meta["steps"] == "3" and meta["guidance_scale"] == "4.0" and meta["model"] == folder
    assert "recipe" in meta
    r = _run(*args, "--out", str(tmp_path / "x.npy"), "--batch-size", "2")
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (2, 32, 32, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1


def test_latents_file_and_batch_pngs(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sd1")
    np.save(tmp_path / "xt.npy", np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32))
    r = _run("--model", folder, "--prompt", "a cat", "--steps", "2", "--latents", str(tmp_path / "xt.npy"),
             "--batch-size", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "c.png"), "-q")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "c-0.png") and os.path.exists(tmp_path / "c-1.png")


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--height", "30"], "height=30"),
    (["--steps", "0"], "steps=0"),
    (["--init-image", "missing.png"], "init image missing.png: file not found"),
    (["--init-image", "bad.png"], "not a readable image"),
    (["--init-image", "small.png"], "is 8x8"),
    (["--init-image", "small.png", "--strength", "2"], "strength=2.0"),
    (["--latents", "wrong.npy"], "latents: shape (1, 4, 2, 2)"),
    (["--out", "x.jpg"], "must end in .png"),
    (["--scheduler-option", "timestep_spacing"], "expected KEY=VALUE"),
    (["--scheduler-option", "timestep_spacing=sideways"], "timestep_spacing"),
])
def test_usage_errors_exit_2_without_traceback_or_output(pipeline_dirs, tmp_path, extra, message):
    folder, _ = pipeline_dirs("sd1")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    np.save(tmp_path / "wrong.npy", np.zeros((1, 4, 2, 2), np.float32))
    r = _run("--model", folder, "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32", "-q",
             *(["--out", "out.png"] if "--out" not in extra else []), *extra, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not any(p.name.startswith(("out", "x.")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("flag, value", [("--guidance-scale", "nan"), ("--guidance-scale", "inf"),
                                         ("--strength", "-inf"), ("--guidance-scale", "x")])
def test_non_finite_numbers_are_refused_naming_the_flag(tmp_path, flag, value):
    out = tmp_path / "o.png"
    r = _run("--prompt", "a red circle", f"{flag}={value}", "--out", str(out), "-q")
    assert r.returncode == 2 and flag in r.stderr and value in r.stderr and not out.exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance_scale=float("nan")), "guidance_scale=nan: must be a finite number"),
    (dict(guidance_scale=float("inf")), "guidance_scale=inf: must be a finite number"),
    (dict(strength=float("nan")), "strength=nan: must be a finite number"),
])
def test_the_api_refuses_non_finite_numbers(kwargs, message):
    import sdjax
    from sdjax.generate import GenerationError
    with pytest.raises(GenerationError, match=message):
        sdjax.load(None, progress=False).generate("a red circle", steps=1, **kwargs)
