"""sdjax eval's fine-tuned recipes (qat-4bit, qat-2bit, qat-mixed-gptq, recipe files with "finetune") on a
tiny model: trained on the calibration prompts, never the evaluation prompts, in their own families in
report.json, report.md and the plots, with their training time; a killed run resumes the fine-tuning from
the state folder. In CI qat.finetune is a stand-in; the slow tests run the real one."""
import functools
import json
import os

import numpy as np
import pytest

import quant
import sdjax
from quant.palettize import PalettizedWeight
from quant.recipes import QAT_DEFAULTS, qat_defaults
from sdjax.cli import main
from sdjax.evaluation import families, qat, sweep
from sdjax.evaluation.evaluator import Settings
from sdjax.nn import flatten, unflatten

PROMPTS = ["a red circle", "a small blue cat"]
CALIBRATION = ["a green square", "a large red cat"]


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def folder(pipeline_dirs):
    return pipeline_dirs("sd1")[0]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    (tmp_path / "cal.txt").write_text("\n".join(CALIBRATION))
    return ["--prompts", tmp_path / "prompts.txt", "--calibration-prompts", tmp_path / "cal.txt", "--seeds", "0",
            "--steps", "2", "--batch", "2", "--no-fisher", "-q"]


class StandIn:
    """qat.finetune and qat.training_samples stand-ins: LUTs moved by 1/64, arguments recorded, out_dir
    written as qat writes it; ``interrupt`` raises KeyboardInterrupt once, after writing it."""

    def __init__(self, monkeypatch, interrupt=False):
        self.calls, self.samples, self.interrupt = [], [], interrupt
        # with the real ones' signatures (the defaults qat_recipe reads)
        for name in ("finetune", "training_samples"):
            method = getattr(self, name)
            monkeypatch.setattr(qat, name, functools.wraps(getattr(qat, name))(lambda *a, m=method, **k: m(*a, **k)))

    def training_samples(self, pipe, prompts, **kw):
        self.samples.append(dict(kw, prompts=list(prompts)))
        return "samples"

    def finetune(self, pipe, unet, prompts, *, out_dir=None, **kw):
        self.calls.append(dict(kw, prompts=list(prompts), out_dir=out_dir,
                               resumed=bool(out_dir) and os.path.exists(os.path.join(out_dir, "settings.json"))))
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            open(os.path.join(out_dir, "settings.json"), "w").write("{}")
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt
        return unflatten({p: w.replace(lut=(np.asarray(w.lut, np.float32) + 1 / 64).astype(np.float16))
                          if isinstance(w, PalettizedWeight) else w for p, w in flatten(unet).items()})


def test_fine_tuned_recipes_are_their_own_family_with_their_training_time(folder, files, tmp_path, capsys, monkeypatch):
    fake = StandIn(monkeypatch, interrupt=True)
    out = tmp_path / "ev"
    argv = ["eval", "--model", folder, "--recipes", "palette-2bit,qat-2bit", "-o", out, *files]
    rc, _, err = cli(capsys, *argv)     # killed while fine-tuning
    assert rc == 130, err
    (call,) = fake.calls
    assert call["prompts"] == CALIBRATION and call["eval_prompts"] == tuple(PROMPTS)
    assert {k: call[k] for k in qat_defaults(2)} == qat_defaults(2) and call["samples"] == "samples"
    # the training samples: the calibration prompts generated with the evaluation's sampler, steps, guidance
    (made,) = fake.samples
    want = dict(prompts=CALIBRATION, generation_steps=2, guidance_scale=7.5, sampler="dpmpp_2m", negative_prompt="",
                seed=0, n_timesteps=8, batch=8, progress=False)
    assert {k: made.get(k) for k in want} == want
    tune_dir = call["out_dir"]
    assert os.path.dirname(tune_dir) == str(out / "state" / "finetune")
    assert os.path.basename(tune_dir).startswith("qat-2bit-") and not call["resumed"]
    assert os.path.exists(os.path.join(tune_dir, "time.json"))
    rc, text, err = cli(capsys, *argv)  # the same command: the fine-tuning resumes from its folder
    assert rc == 0, err
    assert len(fake.calls) == 2 and fake.calls[1]["out_dir"] == tune_dir and fake.calls[1]["resumed"]
    assert not os.path.exists(tune_dir)   # removed once the recipe is done
    saved = json.loads((out / "report.json").read_text())
    r = {x["name"]: x for x in saved["recipes"]}
    assert r["qat-2bit"]["family"] == "fine-tuned palettize" and r["palette-2bit"]["family"] == "uniform palettize"
    assert r["qat-2bit"]["finetune_seconds"] > 0 and r["qat-2bit"]["seconds"] >= r["qat-2bit"]["finetune_seconds"]
    assert "finetune_seconds" not in r["palette-2bit"]
    assert r["qat-2bit"]["bytes"] == r["palette-2bit"]["bytes"]       # the same bytes, other LUTs
    assert r["qat-2bit"]["metrics"] != r["palette-2bit"]["metrics"]
    assert quant.parse_recipe(str(out / "recipes" / "qat-2bit.json")).finetune == qat_defaults(2)
    md = (out / "report.md").read_text()
    assert "| qat-2bit | fine-tuned palettize |" in md and "(fine-tuning " in md and "Fine-tuned recipes (qat-2bit)" in md
    res = sweep.EvalResult.from_json(saved)
    assert res.recipe("qat-2bit").finetune_seconds == r["qat-2bit"]["finetune_seconds"]
    assert (out / "quality_vs_bits.png").exists() and (out / "report.html").exists()
    # other calibration prompts than the saved fine-tuning's are refused, naming them
    (tmp_path / "cal.txt").write_text("a green square\n")
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and "other calibration prompts (prompts differ)" in err, err


def test_bad_fine_tuning_requests_are_refused(folder, files, tmp_path, capsys, monkeypatch):
    fake = StandIn(monkeypatch)
    (tmp_path / "cal.txt").write_text("a green square\na red circle\n")   # an evaluation prompt
    rc, _, err = cli(capsys, "eval", "--model", folder, "--recipes", "qat-4bit", "-o", tmp_path / "ev", *files)
    assert rc == 2 and "fine-tuning (calibration) prompts must not be evaluation prompts; both have 'a red circle'" \
        in err, err
    assert not fake.calls
    # --no-finetune leaves the fine-tuned recipes out (and says so when nothing is left)
    rc, _, err = cli(capsys, "eval", "--model", folder, "--recipes", "qat-4bit", "--no-finetune", "-o", tmp_path / "e2",
                     *files)
    assert rc == 2 and "--no-finetune leaves no recipe" in err
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps({"rules": [{"pattern": "*", "method": "palettize", "nbits": 4}], "finetune": {}}))
    (tmp_path / "cal.txt").write_text("a green square\n")
    rc, _, err = cli(capsys, "eval", "--model", folder, "--recipes", f"palette-4bit,qat-4bit,{recipe}", "--no-finetune",
                     "-o", tmp_path / "e3", *files)
    assert rc == 0, err
    assert [r["name"] for r in json.loads((tmp_path / "e3" / "report.json").read_text())["recipes"]] == ["palette-4bit"]
    assert not fake.calls


def test_families_and_the_fine_tuned_mixed_recipe():
    assert set(families.FINETUNED) <= set(sweep.DEFAULT_RECIPES) and "qat-mixed-gptq" in families.GENERATED
    assert families.family("qat-4bit") == families.family("qat-2bit") == "fine-tuned palettize"
    assert families.family("qat-mixed-gptq-u6-4.33") == "fine-tuned mixed (sdjax, GPTQ)"
    assert families.family("mine", {"rules": [], "finetune": {"steps": 3}}) == "fine-tuned (custom)"
    assert families.family("mine", {"rules": []}) == "custom"
    u6 = {"name": "mixed-gptq-u6-4.33", "rules": [{"pattern": "a", "method": "palettize", "nbits": 4, "gptq": True}]}
    mixed = [("mixed-sdjax-7.00", {"a": 6}, "size"), ("mixed-gptq-7.00", {"name": "mixed-gptq-7.00", "rules": []}, "size"),
             ("mixed-gptq-u6-4.33", u6, "one-step"), ("mixed-gptq-u6img-4.61", dict(u6, name="x"), "final")]
    both = families.finetuned_mixed(mixed, {"mixed-sdjax", "mixed-gptq", "qat-mixed-gptq"})
    assert both[:4] == mixed
    name, recipe, role = both[4]
    assert name == "qat-mixed-gptq-u6-4.33" and role == "qat" and families.ROLES[role]
    assert recipe["rules"] == u6["rules"] and recipe["name"] == name and recipe["finetune"] == QAT_DEFAULTS
    assert quant.parse_recipe(recipe).needs_hessian and quant.parse_recipe(recipe).needs_finetune
    alone = families.finetuned_mixed(mixed, {"mixed-sdjax", "qat-mixed-gptq"})
    assert [x[0] for x in alone] == ["mixed-sdjax-7.00", "qat-mixed-gptq-u6-4.33"]
    assert families.finetuned_mixed(mixed, {"mixed-sdjax", "mixed-gptq"}) == mixed


# --- the real fine-tuning (slow: its compilation alone takes 30-60 s on 2 cores) ------------------------------

@pytest.mark.slow
def test_a_killed_eval_resumes_the_fine_tuning_to_the_numbers_of_an_uninterrupted_one(folder, files, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.setitem(QAT_DEFAULTS, "steps", 2)
    real = qat.finetune
    whole = tmp_path / "whole"
    rc, _, err = cli(capsys, "eval", "--model", folder, "--recipes", "qat-2bit", "-o", whole, *files)
    assert rc == 0, err
    interrupted = functools.wraps(real)(lambda *a, **k: real(*a, **dict(k, interrupt_after=1)))  # its signature kept
    monkeypatch.setattr(qat, "finetune", interrupted)
    killed = tmp_path / "killed"
    with pytest.raises(qat.Interrupted):
        cli(capsys, "eval", "--model", folder, "--recipes", "qat-2bit", "-o", killed, *files)
    (tune_dir,) = os.listdir(killed / "state" / "finetune")
    assert os.path.exists(killed / "state" / "finetune" / tune_dir / "checkpoint.msgpack")
    monkeypatch.setattr(qat, "finetune", real)
    rc, _, err = cli(capsys, "eval", "--model", folder, "--recipes", "qat-2bit", "-o", killed, *files)
    assert rc == 0, err
    a, b = (json.loads((d / "report.json").read_text())["recipes"][0] for d in (whole, killed))
    assert a["metrics"] == b["metrics"] and a["family"] == b["family"] == "fine-tuned palettize"
    assert a["recipe"]["finetune"]["steps"] == 2 and b["finetune_seconds"] > 0


@pytest.mark.slow
def test_the_fine_tuned_mixed_gptq_recipe_end_to_end(folder, tmp_path, monkeypatch):
    """qat-mixed-gptq alone: the GPTQ sweep and mixed-gptq's one-step search run, only the fine-tuned recipe
    is evaluated, on the plot beside uniform palettization."""
    monkeypatch.setitem(QAT_DEFAULTS, "steps", 2)
    pipe = sdjax.load(folder, progress=False)
    settings = Settings(prompts=tuple(PROMPTS), seeds=(0,), steps=2, batch=2, n_one_step=2)
    res = sweep.run(pipe, ["palette-6bit", "qat-mixed-gptq"], str(tmp_path / "ev"), settings, calibration=CALIBRATION,
                    candidate_min=20000, mixed_nbits=(2, 4, 6), fisher=False, progress=False)
    names = [r["name"] for r in res["recipes"]]
    assert names[0] == "palette-6bit" and len(names) == 2 and names[1].startswith("qat-mixed-gptq-u6-")
    r = res["recipes"][1]
    assert r["family"] == "fine-tuned mixed (sdjax, GPTQ)" and r["chosen_for"] == sweep.ROLES["qat"]
    assert r["finetune_seconds"] > 0 and res["sensitivity_gptq"] is not None
    recipe = quant.parse_recipe(str(tmp_path / "ev" / "recipes" / f"{names[1]}.json"))
    assert recipe.needs_hessian and recipe.finetune == QAT_DEFAULTS
