"""sdjax quantize with fine-tuning (--finetune, recipes with "finetune") on a tiny model: what reaches
qat.finetune and where its checkpoints go (a stand-in for it, in CI), bad settings named, export-coreml
carrying fine-tuned weights bit for bit; and with the real fine-tuning (slow: its compilation alone takes
30-60 s on 2 cores): fine-tuned LUTs over the post-training indices, and a run killed while fine-tuning
continuing to the weights of an uninterrupted one."""
import argparse
import functools
import json
import os

import flax.serialization
import numpy as np
import pytest

import sdjax
from quant.palettize import PalettizedWeight
from quant.recipes import QAT_DEFAULTS, layers
from sdjax.cli import build_parser
from sdjax.cli.quantize import CALIBRATION_PROMPTS
from sdjax.evaluation import qat
from sdjax.evaluation.qat_recipe import TIME_FILE
import test_cli_quantize as cli_tests

cli, folder = cli_tests.cli, cli_tests.folder  # the CLI runner and the tiny SD1 folder fixture

# two steps of LUT training on one prompt's samples at one noise level: seconds once compiled
FINETUNE = ["--finetune", "steps=2,n_timesteps=1,batch=2", "--calibration-prompt", "a red cat", "-q"]


def _palettized(path):
    return {n: w for n, w in layers(sdjax.load(str(path), progress=False).params["unet"]).items()
            if isinstance(w, PalettizedWeight)}


def _stand_in(calls):
    """A qat.finetune that moves every LUT by 1/64 and records what it was given; it writes
    its settings into out_dir as qat does."""
    from sdjax.nn import flatten, unflatten

    def finetune(pipe, unet, prompts, *, out_dir=None, **kw):
        calls.append(dict(kw, prompts=list(prompts), out_dir=out_dir, existed=out_dir and os.path.isdir(out_dir)))
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            (open(os.path.join(out_dir, "settings.json"), "w")).write("{}")
        return unflatten({p: w.replace(lut=(np.asarray(w.lut, np.float32) + 1 / 64).astype(np.float16))
                          if isinstance(w, PalettizedWeight) else w for p, w in flatten(unet).items()})
    return finetune


def test_what_reaches_the_fine_tuning_and_where_its_checkpoints_go(folder, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(qat, "finetune", _stand_in(calls))
    out = tmp_path / "q"
    rc, text, err = cli(capsys, "quantize", "-m", folder, "-r", "palette-4bit", "-o", out, "--finetune",
                        "method=ste,steps=7,lr=1e-2,refine=true", "-q")
    assert rc == 0, err
    (call,) = calls
    assert call["prompts"] == list(CALIBRATION_PROMPTS)   # other models: the built-in prompts
    assert {k: call[k] for k in ("method", "steps", "lr", "refine", "loss")} == \
        {"method": "ste", "steps": 7, "lr": 1e-2, "refine": True, "loss": QAT_DEFAULTS["loss"]}
    assert call["out_dir"] == os.path.normpath(out) + ".finetune" and call["progress"] is False
    assert not os.path.exists(call["out_dir"])      # the default folder goes once --out is written
    assert "fine-tuning the palettized UNet weights (method ste, steps 7, lr 0.01, " in text
    assert "refine True" in text and "on 4 calibration prompts" in text and "fine-tuned in" in text
    got = _palettized(out)
    plain = {n: w for n, w in layers(sdjax.load(folder, progress=False).quantize("palette-4bit").params["unet"]).items()
             if isinstance(w, PalettizedWeight)}
    assert got.keys() == plain.keys()
    for n, w in got.items():
        np.testing.assert_array_equal(np.asarray(w.lut), (np.asarray(plain[n].lut, np.float32) + 1 / 64).astype(np.float16))
    assert sdjax.load(str(out), progress=False).quantization["recipe"]["finetune"]["steps"] == 7
    rc, text, _ = cli(capsys, "inspect", out, "-q")
    assert rc == 0 and "fine-tuned    palettized UNet weights, method ste, steps 7, lr 0.01" in text
    # a recipe with "finetune" needs no flag; --calibration-prompt and a named --finetune-dir (kept)
    calls.clear()
    rc, _, err = cli(capsys, "quantize", "-m", folder, "-r", "qat-2bit", "-o", tmp_path / "q2", "--finetune-dir",
                     tmp_path / "keep", "--calibration-prompt", "a red cat", "--calibration-prompt", "a blue cat", "-q")
    assert rc == 0, err
    assert calls[0]["prompts"] == ["a red cat", "a blue cat"] and calls[0]["steps"] == QAT_DEFAULTS["steps"]
    assert calls[0]["out_dir"] == str(tmp_path / "keep") and (tmp_path / "keep" / "settings.json").exists()
    assert (tmp_path / "keep" / TIME_FILE).exists()


def test_embedded_model_fine_tunes_on_the_captions_eval_calibrates_on():
    from sdjax.cli import eval as eval_cmd, quantize
    got = quantize.finetune_prompts(argparse.Namespace(calibration_prompt=None, model=None))
    evals = eval_cmd._eval_prompts(argparse.Namespace(n_prompts=None, prompts=None, model=None))
    want = eval_cmd._eval_calibration_prompts(argparse.Namespace(calibration_prompts=None, model=None), evals)
    assert got == want and len(got) == eval_cmd.EVAL_CALIBRATION_PROMPTS and not set(got) & set(evals)


@pytest.fixture(scope="module")
def tuned(folder, tmp_path_factory):
    """An uninterrupted run, its checkpoint folder named (and so kept)."""
    base = tmp_path_factory.mktemp("ft")
    rc = cli_tests.main(["quantize", "-m", folder, "-r", "palette-4bit", "-o", str(base / "q"),
                         "--finetune-dir", str(base / "ckpt"), *FINETUNE])
    assert rc == 0
    return base


def test_help_names_the_options():
    sub = build_parser()._subparsers._group_actions[0].choices["quantize"]
    text = " ".join(sub.format_help().split())
    for words in ("--finetune [KEY=VALUE,...]", "quant.recipes.QAT_DEFAULTS", "method (lut", "Bare --finetune: the defaults",
                  "--finetune-dir DIR", "OUT.finetune", "continues from its last checkpoint", "qat-Nbit presets"):
        assert words in text, words


@pytest.mark.slow  # the module's real fine-tuning: 30-60 s of compilation on 2 cores, then seconds
def test_fine_tuned_folder_keeps_the_indices_and_bytes(tuned, folder, capsys):
    got, plain = _palettized(tuned / "q"), {n: w for n, w in layers(
        sdjax.load(folder, progress=False).quantize("palette-4bit").params["unet"]).items()
        if isinstance(w, PalettizedWeight)}
    assert got.keys() == plain.keys() and got
    changed = 0
    for n, w in got.items():   # method lut: the indices as k-means left them, the LUTs trained
        assert (w.shape, w.nbits, w.nbytes) == (plain[n].shape, plain[n].nbits, plain[n].nbytes)
        np.testing.assert_array_equal(np.asarray(w.packed), np.asarray(plain[n].packed))
        changed += not np.array_equal(np.asarray(w.lut), np.asarray(plain[n].lut))
    assert changed >= len(got) // 2
    recipe = sdjax.load(str(tuned / "q"), progress=False).quantization["recipe"]
    assert recipe["finetune"] == dict(QAT_DEFAULTS, steps=2, n_timesteps=1, batch=2)
    # a folder named by --finetune-dir is kept: the settings, the last checkpoint, the time spent
    assert {"settings.json", "checkpoint.msgpack", TIME_FILE} <= set(os.listdir(tuned / "ckpt"))
    assert json.loads((tuned / "ckpt" / "settings.json").read_text())["prompts"] == ["a red cat"]


@pytest.mark.slow
def test_a_killed_run_continues_to_the_weights_of_an_uninterrupted_one(tuned, folder, tmp_path, capsys, monkeypatch):
    real = qat.finetune
    monkeypatch.setattr(qat, "finetune", functools.wraps(real)(lambda *a, **k: real(*a, **dict(k, interrupt_after=1))))
    out = tmp_path / "q"
    argv = ["quantize", "-m", folder, "-r", "qat-4bit", "-o", out, "--finetune", "steps=2,n_timesteps=1,batch=2",
            "--calibration-prompt", "a red cat", "-q"]
    with pytest.raises(qat.Interrupted):
        cli(capsys, *argv)
    ckpt = tmp_path / "q.finetune"          # the default folder, beside --out
    assert not out.exists() and (ckpt / "checkpoint.msgpack").exists()
    state = flax.serialization.msgpack_restore((ckpt / "checkpoint.msgpack").read_bytes())
    assert int(state["step"]) == 1
    monkeypatch.setattr(qat, "finetune", real)
    rc, text, err = cli(capsys, *argv)      # the same command again
    assert rc == 0, err
    assert "fine-tuning the palettized UNet weights (method lut, steps 2, lr 0.001, loss guided, n_timesteps 1, " \
           "batch 2) on 1 calibration prompt" in text and "fine-tuned in" in text
    assert not ckpt.exists()                # the default folder goes once --out is written
    a, b = _palettized(tuned / "q"), _palettized(out)   # qat-4bit is palette-4bit + the settings given
    assert a.keys() == b.keys()
    for n in a:
        assert np.asarray(a[n].lut).tobytes() == np.asarray(b[n].lut).tobytes(), n
        assert np.asarray(a[n].packed).tobytes() == np.asarray(b[n].packed).tobytes(), n
    # a checkpoint folder of other settings is refused, naming the setting and the folder
    rc, _, err = cli(capsys, "quantize", "-m", folder, "-r", "palette-4bit", "-o", tmp_path / "q3", "--finetune-dir",
                     tuned / "ckpt", "--finetune", "steps=3,n_timesteps=1,batch=2", "--calibration-prompt", "a red cat",
                     "-q")
    assert rc == 2 and "other settings: 'steps' was 2, now 3" in err and f"--finetune-dir {tuned / 'ckpt'}" in err
    assert not (tmp_path / "q3").exists()


@pytest.mark.parametrize("args, message", [
    (["--finetune", "steps=0"], "--finetune: finetune steps must be an integer >= 1; got 0"),
    (["--finetune", "steps=2.5"], "--finetune: finetune steps must be an integer >= 1; got 2.5"),
    (["--finetune", "lr=2"], "--finetune: finetune lr must be a learning rate, a number in (0, 1]; got 2"),
    (["--finetune", "lr=fast"], "finetune lr must be a learning rate, a number in (0, 1]; got 'fast'"),
    (["--finetune", "method=kmeans"], "finetune method must be one of lut, dkm, ste; got 'kmeans'"),
    (["--finetune", "method=dkm"], "finetune method 'dkm' needs a temperature"),
    (["--finetune", "method=lut,refine=true"], "method 'lut' trains none"),
    (["--finetune", "stepz=3"], "unknown finetune key(s) ['stepz'] (its keys: method, steps, lr"),
    (["--finetune", "steps"], "--finetune 'steps': expected key=value pairs separated by commas"),
    (["--finetune", "steps=1,steps=2"], "steps is given twice"),
    (["-r", "w8-int8", "--finetune"], "finetune trains palettized weights; recipe 'w8-int8' has none"),
    (["-r", "qat-4bit", "--finetune", "loss=l2"], "finetune loss must be one of guided, eps; got 'l2'"),
    (["--finetune-dir", "d"], "--finetune-dir: recipe 'palette-4bit' does not fine-tune (add --finetune)"),
])
def test_bad_finetune_arguments_are_named(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    if "-r" not in args:
        args = ["-r", "palette-4bit"] + args
    # refused before the model is read (this one does not exist)
    rc, _, err = cli(capsys, "quantize", "-m", tmp_path / "no-model", "-o", "out", "-q", *args)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not os.listdir(tmp_path)


def _exports_bit_identical(quantized, out, capsys):
    pytest.importorskip("coremltools")
    from test_cli_export_coreml import assert_carried_over
    rc, _, err = cli(capsys, "export-coreml", "--quantized", quantized, "-o", out, "-q", "--compute-precision",
                     "float32")
    assert rc == 0, err
    assert_carried_over(out / "Unet.mlpackage", sdjax.load(str(quantized), progress=False).params["unet"])


@pytest.mark.slow
def test_fine_tuned_folder_exports_bit_identical(tuned, tmp_path, capsys):
    _exports_bit_identical(tuned / "q", tmp_path / "cm", capsys)


def test_quantize_finetune_then_export_coreml_is_bit_identical(folder, tmp_path, capsys, monkeypatch):
    """`sdjax quantize` of a recipe with "finetune" (steps=2) -> folder -> `sdjax export-coreml`: the package's
    LUTs and indices are the saved PalettizedWeights' (the fine-tuning a stand-in here; the real one in the slow
    test above); export-coreml refuses to fine-tune itself."""
    monkeypatch.setattr(qat, "finetune", _stand_in([]))
    recipe = tmp_path / "tuned.json"
    recipe.write_text(json.dumps({"name": "tuned", "rules": [{"pattern": "*", "method": "palettize", "nbits": 4}],
                                  "finetune": {"steps": 2}}))
    rc, _, err = cli(capsys, "quantize", "-m", folder, "-r", recipe, "-o", tmp_path / "q", "-q")
    assert rc == 0, err
    _exports_bit_identical(tmp_path / "q", tmp_path / "cm", capsys)
    rc, _, err = cli(capsys, "export-coreml", "-r", "qat-4bit", "-o", tmp_path / "cm2", "-q")
    assert rc == 2 and "fine-tuning" in err and "`sdjax quantize --recipe qat-4bit -o Q ...`" in err, err
    assert not (tmp_path / "cm2").exists()
