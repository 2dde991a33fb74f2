"""--lora FILE[:SCALE] on sdjax generate, quantize, eval and export-coreml: the same merge as
sdjax.load(loras=...), and the errors for a bad scale, a missing file, a quantized model.
(Parity of the merge itself with diffusers: tests/sdjax/test_lora.py.)"""
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import sdjax
from sdjax.cli import build_parser, main
from sdjax.nn import flatten
from sdjax.params import torch_shape
from sdjax.safetensors_io import write

TARGETS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.1.resnets.0.conv1",
           "down_blocks.0.attentions.0.proj_in")


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def folder(pipeline_dirs):
    return pipeline_dirs("sd1")[0]


@pytest.fixture(scope="module")
def lora_file(folder, tmp_path_factory):
    """A random diffusers-format LoRA (rank 2) on an attention projection, a 3x3 conv and a 1x1 conv."""
    flat = flatten(sdjax.load(folder, progress=False).params["unet"])
    g = np.random.default_rng(0)
    tensors = {}
    for m in TARGETS:
        out, cin, *kernel = torch_shape(m + ".weight", flat[m + ".weight"].shape)
        tensors[f"unet.{m}.lora_A.weight"] = g.standard_normal((2, cin, *kernel)).astype(np.float32) * 0.3
        tensors[f"unet.{m}.lora_B.weight"] = g.standard_normal((out, 2, *([1, 1] if kernel else []))).astype(
            np.float32) * 0.3
    path = str(tmp_path_factory.mktemp("lora") / "style.safetensors")
    write(path, tensors)
    return path


ARGS = ["--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32", "--seed", "3", "-q"]


def test_generate_merges_as_the_library_does(folder, lora_file, tmp_path):
    out = tmp_path / "x.npy"
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", "--model", folder, "--lora", f"{lora_file}:0.5",
                        *ARGS, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pipe = sdjax.load(folder, loras=[(lora_file, 0.5)], progress=False)
    want = pipe.generate(["a red circle"], steps=2, height=32, width=32, seed=3, output_type="np", progress=False)
    plain = sdjax.load(folder, progress=False).generate(["a red circle"], steps=2, height=32, width=32, seed=3,
                                                         output_type="np", progress=False)
    assert not np.allclose(want, plain, atol=1e-3)
    np.testing.assert_allclose(np.load(out), want, atol=1e-5)
    png = tmp_path / "x.png"
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", "--model", folder, "--lora", f"{lora_file}:0.5",
                        "--lora", lora_file, *ARGS, "--out", str(png)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Image.open(png).text["loras"] == f"{lora_file}:0.5, {lora_file}:1"


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["quantize", "-r", "w8-int8", "-o", "o"],
                                     ["eval"], ["export-coreml", "-o", "o"]])
def test_every_model_command_takes_repeated_loras(command, capsys):
    args = build_parser().parse_args([*command, "--lora", "a.safetensors", "--lora", "b.safetensors:-0.25"])
    assert args.lora == [("a.safetensors", 1.0), ("b.safetensors", -0.25)]
    for bad, message in (("a.safetensors:strong", "'strong' is not a scale"), ("a.safetensors:nan", "not a finite"),
                         (":2", "no file before the scale")):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*command, "--lora", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"sdjax {command[0]}: error: argument --lora: '{bad}'" in err and message in err, err


def test_quantize_merges_before_quantizing(folder, lora_file, tmp_path, capsys):
    out = tmp_path / "q"
    rc, _, err = cli(capsys, "quantize", "--model", folder, "--lora", f"{lora_file}:0.5", "-r", "w8-int8", "-o", out,
                     "-q")
    assert rc == 0, err
    loaded = sdjax.load(str(out), progress=False)
    want = sdjax.load(folder, loras=[(lora_file, 0.5)], progress=False).quantize("w8-int8").params["unet"]
    for a, b in zip(jax.tree.leaves(loaded.params["unet"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    # the folder records what was merged before quantizing, and inspect says so
    assert loaded.loras == ((str(lora_file), 0.5),)
    rc, printed, err = cli(capsys, "inspect", str(out), "-q")
    assert rc == 0, err
    assert f"LoRAs merged  {lora_file}:0.5" in printed, printed


def test_lora_errors_exit_with_the_message(folder, lora_file, tmp_path, capsys):
    rc, _, err = cli(capsys, "generate", "--model", folder, "--lora", tmp_path / "none.safetensors", *ARGS,
                     "--out", tmp_path / "x.png")
    assert rc == 1 and f"{tmp_path / 'none.safetensors'}: LoRA file not found" in err, err
    bad = tmp_path / "bad.safetensors"
    write(str(bad), {"unet.nothing.here.lora_A.weight": np.ones((2, 2), np.float32),
                     "unet.nothing.here.lora_B.weight": np.ones((2, 2), np.float32)})
    rc, _, err = cli(capsys, "quantize", "--model", folder, "--lora", bad, "-r", "w8-int8", "-o", tmp_path / "q", "-q")
    assert rc == 1 and "unet.nothing.here.lora_A.weight: matches no layer of this model's unet" in err, err
    assert not (tmp_path / "q").exists()
    for extra in (["--quantized", tmp_path], ["--random", "sd15"]):
        rc, _, err = cli(capsys, "export-coreml", *extra, "--lora", lora_file, "-o", tmp_path / "cx")
        assert rc == 2 and "--lora: merges into the float weights of --model" in err, err
