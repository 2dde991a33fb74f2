"""sdjax report, and report.html at the end of sdjax eval: the page of a finished folder (redrawn byte
for byte), the eval command's hook (its run stood in for; a real tiny run, opened in headless Chromium,
is marked slow), and folders that are not a finished run, refused."""
import json
import os
import re

import pytest

import headless_chromium
from eval_runs import make_run, results
from sdjax.cli import build_parser, main


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def tree(folder):
    """{relative path: bytes} of every file under ``folder``."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = fh.read()
    return out


def test_help_lists_report():
    assert "report" in build_parser().format_help()


def test_report_writes_the_page_of_a_finished_run(tmp_path, capsys):
    res, _ = make_run(tmp_path / "ev")
    rc, text, err = cli(capsys, "report", tmp_path / "ev")
    assert rc == 0, err
    assert text.startswith(f"wrote {tmp_path / 'ev' / 'report.html'} and {tmp_path / 'ev' / 'report_files'}/ (")
    first = tree(tmp_path / "ev")
    assert {"report.html", "report_files/plotly.min.js", "report_files/float.png", "report_files/r04.png",
            "report_files/r04-diff.png"} <= set(first)
    assert len([f for f in first if f.startswith("report_files/")]) == 2 + 2 * len(res["recipes"])
    rc, _, err = cli(capsys, "report", tmp_path / "ev")                 # again: the same page and images
    assert rc == 0 and tree(tmp_path / "ev") == first


def _fake_run(monkeypatch, images=True):
    """sdjax eval with its run stood in for: the folder a finished run leaves (``images=False``: without
    the images in state/), and what sweep.run returns."""
    import sdjax
    from sdjax.evaluation import sweep
    from sdjax.evaluation.outcome import EvalResult

    def run(pipe, names, out, settings, options, progress=True):
        res, _ = make_run(out)
        if not images:
            for d, _, files in os.walk(os.path.join(out, "state")):
                for f in files:
                    if f.endswith(".npz"):
                        os.remove(os.path.join(d, f))
        return EvalResult.from_json(res)
    monkeypatch.setattr(sdjax, "load", lambda *a, **k: None)
    monkeypatch.setattr(sweep, "run", run)


def test_eval_ends_by_writing_report_html(tmp_path, capsys, monkeypatch):
    _fake_run(monkeypatch)
    rc, text, err = cli(capsys, "eval", "-o", tmp_path / "ev", "-q")
    assert rc == 0, err
    assert f"wrote {tmp_path / 'ev' / 'report.html'}, the report as one page for a browser" in text
    assert "mixed-4.50" in text and err == ""
    names = [r["name"] for r in results()["recipes"]]
    assert sorted(os.listdir(tmp_path / "ev" / "report_files")) == ["float.png", "plotly.min.js"] + sorted(
        f"r{i:02d}{end}" for i in range(len(names)) for end in (".png", "-diff.png"))


def test_eval_warns_when_the_page_cannot_be_written(tmp_path, capsys, monkeypatch):
    _fake_run(monkeypatch, images=False)
    rc, text, err = cli(capsys, "eval", "-o", tmp_path / "ev", "-q")
    assert rc == 0 and "wrote" in text and "report.md" in text          # the run and its report stand
    assert "sdjax eval: warning: report.html not written" in err and "float.npz is missing" in err
    assert not (tmp_path / "ev" / "report.html").exists() and not (tmp_path / "ev" / "report_files").exists()


@pytest.mark.slow
def test_eval_writes_report_html_and_report_redraws_it(pipeline_dirs, tmp_path, capsys):
    """A real run of the tiny model (about 45 s on 2 cores): the page from the state/ sweep.run keeps."""
    import sdjax
    import quant
    folder = pipeline_dirs("sd1")[0]
    layers = list(quant.recipes.layers(sdjax.load(folder, progress=False).params["unet"]))
    mixed = {layers[0]: 2, layers[1]: 4, layers[2]: 8}
    (tmp_path / "mixed-test.json").write_text(json.dumps(mixed))
    (tmp_path / "prompts.txt").write_text("a red circle\na small blue cat\n")
    out = tmp_path / "ev"
    rc, text, err = cli(capsys, "eval", "--model", folder, "--recipes", f"palette-4bit,{tmp_path / 'mixed-test.json'}",
                        "--prompts", tmp_path / "prompts.txt", "--seeds", "0", "--steps", "2", "--batch", "2",
                        "-o", out, "-q")
    assert rc == 0, err
    assert f"wrote {out / 'report.html'}" in text and "warning" not in err
    page = (out / "report.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert [r["name"] for r in data["recipes"]] == ["palette-4bit", "mixed-test"]
    assert [s["prompt"] for s in data["samples"]] == ["a red circle", "a small blue cat"]
    bits = dict(zip(data["layers"]["names"], data["recipes"][1]["layers"]["bits"]))
    assert bits == mixed                              # no sweep ran: the layers the recipe names, at its bits
    for rel in ("report_files/plotly.min.js", "report_files/float.png", "report_files/r01.png",
                "report_files/r01-diff.png", "report.md", "grid.png"):
        assert (out / rel).exists(), rel
    written = tree(out)

    # sdjax report on the finished folder writes the same page and images, byte for byte
    rc, text, err = cli(capsys, "report", out)
    assert rc == 0, err
    assert text.startswith(f"wrote {out / 'report.html'} and {out / 'report_files'}/ (")
    assert tree(out) == written

    if headless_chromium.find_chromium() is not None:
        from selenium.webdriver.support.ui import WebDriverWait
        driver = headless_chromium.start(str(tmp_path / "profile"))
        try:
            driver.get(f"file://{out / 'report.html'}")
            WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
            assert driver.execute_script("return document.querySelectorAll('#plot .scatterlayer .point').length") == 2
            WebDriverWait(driver, 20).until(lambda d: d.execute_script(
                "const im = [...document.querySelectorAll('#images .tile img')];"
                "return im.length === 6 && im.every((i) => i.complete && i.naturalWidth === arguments[0]);",
                data["image"]["grid"][1] * data["image"]["shown"][1]))   # two pairs: one row of two tiles
            assert headless_chromium.console_errors(driver) == []
            assert headless_chromium.not_local(headless_chromium.requested_urls(driver)) == []
        finally:
            driver.quit()


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "no such folder"),
    (lambda p: p.mkdir(), "not an evaluation run: no report.json"),
    (lambda p: (p / "state").mkdir(parents=True) or (p / "state" / "manifest.json").write_text("{}"),
     "the evaluation run is incomplete: report.json is missing"),
    (lambda p: p.mkdir() or (p / "report.json").write_text(json.dumps({"sdjax_version": "0.0.1"})),
     "was written by sdjax 0.0.1; this is sdjax"),
])
def test_report_refuses_what_is_not_a_finished_run(tmp_path, capsys, make, message):
    target = tmp_path / "ev"
    make(target)
    before = tree(target) if target.exists() else None
    rc, text, err = cli(capsys, "report", target)
    assert rc == 2 and err.startswith("sdjax report: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and text == ""
    assert (tree(target) if target.exists() else None) == before
