"""sdjax quantize and the per-layer sdjax inspect, end to end on a tiny model."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import sdjax
from quant import gptq
from quant import io as qio
from quant.int8 import Int8Weight
from quant.palettize import PalettizedWeight
from quant.recipes import layers
from sdjax.cli import build_parser, main
from sdjax.safetensors_io import Reader, write


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def folder(pipeline_dirs):
    return pipeline_dirs("sd1")[0]


@pytest.fixture(scope="module")
def palette4(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "p4")
    assert main(["quantize", "--model", folder, "--recipe", "palette-4bit", "-o", out, "-q"]) == 0
    return out


def test_help_lists_quantize():
    text = build_parser().format_help()
    assert "quantize" in text and "diffusers cannot read it" in text
    sub = "".join(build_parser()._subparsers._group_actions[0].choices["quantize"].format_help().split())
    assert "diffusersandtransformerscannot" in sub and "palette-Nbit-gGwithoneLUTperGoutputchannels" in sub
    assert "-gptq" in sub
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
                  if "--calibration-prompt" in a.option_strings)
    assert "W8A8" in action.help and "GPTQ" in action.help


def test_quantize_preset_then_inspect_against_float(palette4, folder, capsys):
    pipe = sdjax.load(palette4, progress=False)
    table = layers(pipe.params["unet"])
    w = table["mid_block.resnets.0.conv1"]
    assert isinstance(w, PalettizedWeight) and w.nbits == 4
    assert not hasattr(table["conv_in"], "dequantize")  # 1152 weights: small, stays float
    assert not any(hasattr(x, "dequantize") for x in layers(pipe.params["vae"]).values())
    assert pipe.quantization["recipe"]["name"] == "palette-4bit"

    rc, out, err = cli(capsys, "inspect", palette4, "--against", folder, "-q")
    assert rc == 0, err
    assert "quantized     recipe 'palette-4bit' (unet; sdjax quantized format v1)" in out
    assert re.search(r"compression +\d+\.\d\dx vs float16: \d+ bytes stored", out)
    line = next(x for x in out.splitlines() if x.split()[:1] == ["mid_block.resnets.0.conv1"])
    cols = line.split()
    assert cols[1:3] == ["palettize", "4b"]
    assert float(cols[3]) == pytest.approx(qio.bits_per_weight(w), abs=0.005) and int(cols[4]) == w.nbytes
    ref = np.asarray(layers(sdjax.load(folder, progress=False).params["unet"])["mid_block.resnets.0.conv1"], np.float64)
    deq = np.asarray(w.dequantize(), np.float64)
    sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - deq) ** 2))
    assert float(cols[-1]) == pytest.approx(sqnr, abs=0.01) and 10 < sqnr < 40
    assert float(cols[5]) == pytest.approx(np.abs(deq).max(), abs=1e-4)  # absmax of the stored weight
    conv_in = next(x for x in out.splitlines() if x.split()[:1] == ["conv_in"]).split()
    assert conv_in[1] == "float32" and conv_in[-1] == "inf"
    assert re.search(r"unet conv/linear weights: \d+ float, \d+ palettize; \d+ bytes, .*SQNR \d+\.\d\d dB \(pooled\)", out)
    assert "text_encoder layers:" not in out  # float components: no table unless --layers

    rc, out, _ = cli(capsys, "inspect", folder, "-q", "--layers")
    assert rc == 0 and "text_encoder layers:" in out and "vae layers:" in out and "SQNR" not in out


def test_recipe_file_components_and_apple_select(folder, tmp_path, capsys):
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps({"rules": [{"pattern": "decoder.*", "kind": "conv", "method": "int8"}]}))
    out = tmp_path / "vae8"
    rc, stdout, err = cli(capsys, "quantize", "-m", folder, "-r", recipe, "--components", "vae", "-o", out, "-q")
    assert rc == 0, err
    assert "vae:" in stdout and "int8" in stdout and "wrote" in stdout and "diffusers cannot" in stdout
    pipe = sdjax.load(out, progress=False)
    assert pipe.quantization["recipe"]["name"] == "mine"
    assert isinstance(layers(pipe.params["vae"])["decoder.conv_in"], Int8Weight)
    assert not any(hasattr(x, "dequantize") for x in layers(pipe.params["unet"]).values())
    assert os.path.exists(out / "unet" / "diffusion_pytorch_model.safetensors")

    apple = tmp_path / "pre.json"
    apple.write_text(json.dumps({"model_version": "tiny", "recipes": {
        "recipe_4.00_bit_mixedpalette": {"mid_block.resnets.0.conv1": 4},
        "recipe_2.00_bit_mixedpalette": {"mid_block.resnets.0.conv1": 2, "up_blocks.0.resnets.0.conv1": 16}}}))
    rc, _, err = cli(capsys, "quantize", "-m", folder, "-r", apple, "-o", tmp_path / "a", "-q")
    assert rc == 2 and "select one of: recipe_4.00_bit_mixedpalette, recipe_2.00_bit_mixedpalette" in err
    rc, _, err = cli(capsys, "quantize", "-m", folder, "-r", apple, "--select", "recipe_2.00_bit_mixedpalette",
                     "-o", tmp_path / "a", "-q")
    assert rc == 0, err
    t = layers(sdjax.load(tmp_path / "a", progress=False).params["unet"])
    assert [n for n, w in t.items() if hasattr(w, "dequantize")] == ["mid_block.resnets.0.conv1"]
    assert t["mid_block.resnets.0.conv1"].nbits == 2


def test_w8a8_preset_calibrates(folder, tmp_path, capsys):
    out = tmp_path / "w8a8"
    rc, stdout, err = cli(capsys, "quantize", "-m", folder, "-r", "w8a8-int8conv", "--calibration-prompt", "a red cat",
                          "--calibration-steps", "1", "-o", out, "-q")
    assert rc == 0, err
    t = layers(sdjax.load(out, progress=False).params["unet"])
    w8a8 = [w for w in t.values() if isinstance(w, Int8Weight)]
    assert len(w8a8) > 10 and all(w.act_scale is not None and float(w.act_scale) > 0 for w in w8a8)
    assert all(w.ndim == 4 for w in w8a8)


# GPTQ on the feed-forward input linears and a stride-2 convolution, plain k-means (the palette-4bit
# preset's) on every other layer
GPTQ_RECIPE = {"name": "some-gptq", "rules": [
    {"regex": r".*ff\.net\.0\.proj|down_blocks\.0\.downsamplers\.0\.conv", "method": "palettize", "nbits": 4,
     "gptq": True},
    {"pattern": "*", "method": "palettize", "nbits": 4}]}
GPTQ_LAYERS = ["down_blocks.0.downsamplers.0.conv"] + [
    f"{b}.attentions.{i}.transformer_blocks.0.ff.net.0.proj" for b, n in (("down_blocks.0", 2), ("mid_block", 1),
                                                                         ("up_blocks.1", 3)) for i in range(n)]


def _gptq_quantize(capsys, folder, out, recipe):
    rc, stdout, err = cli(capsys, "quantize", "-m", folder, "-r", recipe, "--calibration-prompt", "a red cat",
                          "--calibration-steps", "1", "-o", out, "-q")
    assert rc == 0, err
    assert "collecting input statistics (GPTQ X^T X) on 1 calibration prompt, 1 sampler step each" in stdout
    return sdjax.load(out, progress=False)


def test_gptq_recipe_collects_statistics_on_the_calibration_prompts(folder, palette4, tmp_path, capsys, monkeypatch):
    path = tmp_path / "gptq.json"
    path.write_text(json.dumps(GPTQ_RECIPE))
    collected = []

    def spy(params, run, names=None):  # what the command has collected, and on which layers
        h = real(params, run, names)
        collected.append((list(names), h))
        return h
    real = gptq.collect
    monkeypatch.setattr(gptq, "collect", spy)
    pipe = _gptq_quantize(capsys, folder, tmp_path / "g", path)
    rules = pipe.quantization["recipe"]["rules"]
    assert pipe.quantization["recipe"]["name"] == "some-gptq"
    assert rules[0]["gptq"] is True and rules[1]["gptq"] is False
    # one calibration run, probing the GPTQ layers only
    assert len(collected) == 1
    names, h = collected[0]
    assert sorted(names) == sorted(h) == sorted("unet." + n for n in GPTQ_LAYERS)
    got, plain = layers(pipe.params["unet"]), layers(sdjax.load(palette4, progress=False).params["unet"])
    assert {n for n, w in got.items() if isinstance(w, PalettizedWeight)} == \
        {n for n, w in plain.items() if isinstance(w, PalettizedWeight)}
    for name, w in got.items():
        if not isinstance(w, PalettizedWeight):
            continue
        assert w.nbits == 4 and w.nbytes == plain[name].nbytes
        same = np.array_equal(np.asarray(w.packed), np.asarray(plain[name].packed)) and \
            np.array_equal(np.asarray(w.lut), np.asarray(plain[name].lut))
        assert same == (name not in GPTQ_LAYERS), name  # GPTQ changed its layers, and only those
    # on the calibration run's inputs every GPTQ layer has a lower output error than plain k-means
    src = layers(sdjax.load(folder, progress=False).params["unet"])
    for name in GPTQ_LAYERS:
        w, hn = np.asarray(src[name]), h["unet." + name]
        assert np.all(np.diag(hn) >= 0) and np.diag(hn).max() > 0
        assert gptq.output_error(w, got[name], hn) < gptq.output_error(w, plain[name], hn), name


@pytest.mark.slow  # 22 s on 2 cores, most of it numpy's Cholesky/inverse competing with XLA's threads
def test_gptq_preset(folder, palette4, tmp_path, capsys):
    pipe = _gptq_quantize(capsys, folder, tmp_path / "g", "palette-4bit-gptq")
    assert pipe.quantization["recipe"]["name"] == "palette-4bit-gptq"
    assert pipe.quantization["recipe"]["rules"][0]["gptq"] is True
    got, plain = layers(pipe.params["unet"]), layers(sdjax.load(palette4, progress=False).params["unet"])
    names = [n for n, w in plain.items() if isinstance(w, PalettizedWeight)]
    assert names and all(isinstance(got[n], PalettizedWeight) and got[n].nbits == 4 for n in names)
    differ = [n for n in names if not np.array_equal(np.asarray(got[n].indices()), np.asarray(plain[n].indices()))]
    assert len(differ) >= 0.9 * len(names)  # measured: every layer


@pytest.mark.parametrize("args, message", [
    (["-r", "palette-5bit"], "unknown preset 'palette-5bit'"),
    (["-r", "missing.json"], "missing.json: recipe file not found"),
    (["-r", "nomatch.json"], "rule 1 (pattern '*.nope', method 'int8'): matches no conv/linear layer of unet"),
    (["-r", "palette-4bit", "--select", "x"], "select='x' applies only to Apple pre-analysis files"),
    (["-r", "palette-4bit", "--components", "unet,clip"], "unknown component(s) ['clip']"),
    (["-r", "w8-int8conv", "--calibration-steps", "0"], None),
    (["-r", "palette-4bit-gptq", "--calibration-steps", "0"], "--calibration-steps 0: must be >= 1"),
    (["-r", "palette-4bit", "-o", "exists"], "already exists (pass --overwrite"),
])
def test_quantize_usage_errors(folder, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nomatch.json").write_text(json.dumps({"rules": [{"pattern": "*.nope", "method": "int8"}]}))
    (tmp_path / "exists").mkdir()
    if "-o" not in args:
        args = args + ["-o", "out"]
    rc, stdout, err = cli(capsys, "quantize", "-m", folder, "-q", *args)
    if message is None:  # calibration options are only read by recipes that need them
        assert rc == 0
        return
    assert rc == 2 and message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


def test_bad_metadata_exit_1_naming_the_file(palette4, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(palette4, d)
    path = str(d / "unet" / qio.WEIGHTS_NAME)
    with Reader(path) as r:
        tensors = {k: r.get(k) for k in r.keys()}
        meta = dict(r.metadata, sdjax_format_version="7")
    write(path, tensors, meta)
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "inspect", str(d), "-q"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert path in r.stderr and "format version '7'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    write(path, tensors, {})
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", "-m", str(d), "-p", "x", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and path in r.stderr and "not an sdjax quantized weights file" in r.stderr


def test_inspect_against_a_different_model(palette4, pipeline_dirs, capsys):
    other = pipeline_dirs("sd2")[0]
    rc, _, err = cli(capsys, "inspect", palette4, "--against", other, "-q")
    assert rc == 1 and "does not have the layers of" in err
