"""Sensitivities (diagonal Fisher of the denoising loss) against torch autograd in float64 on tiny
diffusers models; sensitive k-means through recipes and the CLI; the experiment's --quick mode."""
import copy
import json
import os
import sys

import numpy as np
import pytest
import torch

import quant
import sdjax
from quant import palettize
from quant.metrics import weighted_error
from sdjax.evaluation import calibration, fisher as sensitivity
from quant.recipes import RecipeError, layers
from sdjax.cli import main
from sdjax.params import sdjax_to_torch

PROMPTS = ["a red circle", "a small blue cat"]
N_T = 3


@pytest.fixture(scope="module")
def sd1(pipeline_dirs):
    folder, ref = pipeline_dirs("sd1")
    return folder, ref, sdjax.load(folder, progress=False)


def _latents(pipe, seed=1):
    c, s = pipe.configs["unet"].in_channels, pipe.configs["unet"].sample_size
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), c, s, s)).astype(np.float32)


@pytest.fixture(scope="module")
def fishers(sd1):
    """(latents, UNet importance) of the tiny sd1 model on given latents (6 samples: batch 8, padded)."""
    _, _, pipe = sd1
    lat = _latents(pipe)
    return lat, sensitivity.fisher(pipe, PROMPTS, latents=lat, n_timesteps=N_T, seed=3, progress=False)


def _torch_fisher(ref, lat, seed, prompts=PROMPTS, n_t=N_T):
    """The same mean squared per-sample gradient, written out in float64 torch from the diffusers
    modules, the diffusers tokenizer and scheduler: {torch parameter name: array}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _torch_fisher_1(ref, lat, seed, prompts, n_t)
    finally:
        torch.set_num_threads(threads)


def _torch_fisher_1(ref, lat, seed, prompts, n_t):
    unet, te = copy.deepcopy(ref.unet).double(), copy.deepcopy(ref.text_encoder).double()
    ids = ref.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    abar = ref.scheduler.alphas_cumprod.double()
    pred_type = ref.scheduler.config.prediction_type
    idx, t, noise = calibration.calibration_samples(len(prompts), n_t, lat.shape[2:] + lat.shape[1:2], seed)
    params = [(f"unet.{n}", p) for n, p in unet.named_parameters() if n.endswith(".weight")]
    params += [(f"te.{n}", p) for n, p in te.named_parameters() if n.endswith(".weight")]
    acc = {n: np.zeros(p.shape) for n, p in params}
    for i in range(len(t)):
        x0 = torch.from_numpy(lat[idx[i]:idx[i] + 1]).double()
        eps = torch.from_numpy(noise[i:i + 1].transpose(0, 3, 1, 2).copy()).double()
        a = abar[int(t[i])]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        ctx = te(ids[idx[i]:idx[i] + 1]).last_hidden_state
        pred = unet(xt, torch.tensor([int(t[i])]), ctx).sample
        target = eps if pred_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        loss = torch.mean((pred - target) ** 2)
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        for (n, _), g in zip(params, grads):
            if g is not None:
                acc[n] += g.numpy() ** 2
    return {n: a / len(t) for n, a in acc.items()}


def _compare(ours, want, prefix):
    assert ours, "no layers"
    for name, imp in ours.items():
        ref = want[f"{prefix}{name}.weight"]
        got = sdjax_to_torch(name + ".weight", imp.astype(np.float64))
        assert got.shape == ref.shape, name
        assert np.abs(ref).max() > 0, name
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 2e-3, (name, err)


def test_fisher_matches_torch_autograd_float64(sd1, fishers):
    folder, ref, pipe = sd1
    lat, imp = fishers
    want = _torch_fisher(ref, lat, seed=3)
    assert set(imp) == set(quant.calibrate.layer_names(pipe.params["unet"]))
    _compare(imp, want, "unet.")
    table = layers(pipe.params["unet"])
    for k, v in imp.items():
        assert v.dtype == np.float32 and v.shape == tuple(table[k].shape), k


@pytest.mark.slow
def test_text_encoder_fisher_matches_torch_autograd(sd1):
    folder, ref, pipe = sd1
    lat = _latents(pipe)
    imp = sensitivity.fisher(pipe, PROMPTS, latents=lat, n_timesteps=N_T, seed=3, component="text_encoder",
                             progress=False)
    want = _torch_fisher(ref, lat, seed=3)
    # text encoder names are transformers' without the "text_model." prefix
    _compare(imp, {k.replace("te.text_model.", "te."): v for k, v in want.items()}, "te.")


@pytest.mark.slow
def test_fisher_v_prediction_matches_torch(pipeline_dirs):
    folder, ref = pipeline_dirs("sd2")
    pipe = sdjax.load(folder, progress=False)
    lat = _latents(pipe, 2)
    imp = sensitivity.fisher(pipe, PROMPTS, latents=lat, n_timesteps=2, seed=5, batch_size=3, progress=False)
    _compare(imp, _torch_fisher(ref, lat, 5, n_t=2), "unet.")


def test_calibration_samples_are_stratified_and_seeded():
    idx, t, noise = calibration.calibration_samples(3, 4, (2, 2, 4), seed=7, num_train_timesteps=1000)
    assert idx.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and noise.shape == (12, 2, 2, 4)
    assert all(250 * k <= tk < 250 * (k + 1) for i in range(3) for k, tk in enumerate(t[4 * i:4 * i + 4]))
    again = calibration.calibration_samples(3, 4, (2, 2, 4), seed=7, num_train_timesteps=1000)
    other = calibration.calibration_samples(3, 4, (2, 2, 4), seed=8, num_train_timesteps=1000)
    assert np.array_equal(t, again[1]) and np.array_equal(noise, again[2]) and not np.array_equal(noise, other[2])


def test_default_latents_are_the_models_own_generations(sd1, monkeypatch):
    _, _, pipe = sd1
    calls = []
    real = sdjax.pipeline.Pipeline.generate

    def spy(self, prompt, **kw):
        calls.append((list(prompt), kw["settings"].steps, kw["settings"].seed))
        return real(self, prompt, **kw)
    monkeypatch.setattr(sdjax.pipeline.Pipeline, "generate", spy)
    prompts = PROMPTS + ["a green square", "a photo of the cat"]  # the shapes of the experiment's --quick
    x0 = calibration.self_generated_latents(pipe, calibration.Calibration(prompts, steps=4, seed=4))  # batch 8: one call
    assert calls == [(prompts, 4, 4)] and x0.shape == (4, 16, 16, 4) and np.isfinite(x0).all()
    default = sensitivity.fisher(pipe, prompts, n_timesteps=2, steps=4, seed=4, progress=False)
    given = sensitivity.fisher(pipe, prompts, latents=x0.transpose(0, 3, 1, 2), n_timesteps=2, seed=4,
                               progress=False)
    assert default.keys() == given.keys()
    for k in default:
        np.testing.assert_allclose(default[k], given[k], rtol=1e-5, atol=1e-12 * given[k].max(), err_msg=k)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts=["a", 3]), "prompts must be strings"),
    (dict(n_timesteps=0), "n_timesteps must be a positive integer"),
    (dict(batch_size=-1), "batch_size must be a positive integer"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(component="vae"), "component must be one of ('unet', 'text_encoder', 'text_encoder_2'); got 'vae' (the VAE"),
    (dict(component="clip"), "got 'clip'"),
    (dict(latents=np.zeros((2, 4, 16, 16), np.float32)[:1]), r"latents must be NCHW (2, 4, height, width)"),
])
def test_fisher_errors_name_the_argument(sd1, kwargs, message):
    _, _, pipe = sd1
    kw = dict(prompts=PROMPTS, latents=np.zeros((2, 4, 16, 16), np.float32), progress=False)
    kw.update(kwargs)
    with pytest.raises(ValueError) as e:
        sensitivity.fisher(pipe, kw.pop("prompts"), **kw)
    assert message in str(e.value)


def test_fisher_refuses_a_quantized_model(sd1):
    _, _, pipe = sd1
    q = pipe.quantize({"rules": [{"pattern": "mid_block.resnets.0.conv1", "method": "palettize", "nbits": 4}]})
    with pytest.raises(ValueError, match="component 'unet' .* holds quantized weights"):
        sensitivity.fisher(q, PROMPTS, latents=_latents(pipe), progress=False)


# --- sensitive k-means ------------------------------------------------------------------------

def test_sensitive_kmeans_lowers_the_weighted_error(sd1, fishers):
    _, _, pipe = sd1
    imp = fishers[1]
    table = layers(pipe.params["unet"])
    plain_total = sens_total = 0.0
    strictly = count = 0
    for name, w in table.items():
        if np.prod(w.shape) <= 2048:
            continue
        w16 = np.asarray(w, np.float32).astype(np.float16).astype(np.float64)  # what k-means sees
        e_plain = weighted_error(w16, palettize.kmeans(np.asarray(w), 2), imp[name])
        e_sens = weighted_error(w16, palettize.kmeans(np.asarray(w), 2, importance=imp[name]), imp[name])
        assert e_sens <= e_plain * (1 + 1e-3), name
        strictly += e_sens < 0.999 * e_plain
        count += 1
        plain_total, sens_total = plain_total + e_plain, sens_total + e_sens
    # a random tiny model's sensitivities hardly depend on the weight's value, so the gain is small
    # (1-5% per layer at 2 bits), yet every layer should see some
    assert count > 20 and strictly >= 0.8 * count and sens_total < 0.995 * plain_total


def _rule(**kw):
    return {"rules": [dict({"pattern": "*", "method": "palettize", "nbits": 3}, **kw)]}


def test_recipe_sensitive_option(sd1, fishers):
    _, _, pipe = sd1
    imp = fishers[1]
    unet = pipe.params["unet"]
    mid = "mid_block.resnets.*"  # a few layers keep the k-means short
    r = quant.parse_recipe(_rule(sensitive=True, pattern=mid))
    assert r.needs_importance and not quant.parse_recipe(_rule()).needs_importance
    assert r.rules[0].options["sensitive"] is True and quant.parse_recipe(r.to_json()) == r
    assert quant.parse_recipe(_rule()).rules[0].options["sensitive"] is False

    q = quant.apply_recipe(unet, r, importance=imp)
    name = "mid_block.resnets.0.conv1"
    w = layers(unet)[name]
    want = palettize.kmeans(np.asarray(w), 3, importance=imp[name])
    got = layers(q)[name]
    np.testing.assert_array_equal(np.asarray(got.lut), np.asarray(want.lut))
    np.testing.assert_array_equal(np.asarray(got.packed), np.asarray(want.packed))
    plain = layers(quant.apply_recipe(unet, _rule(pattern=mid)))[name]
    assert not np.array_equal(np.asarray(plain.lut), np.asarray(got.lut))
    # importance is ignored by rules that are not sensitive
    same = layers(quant.apply_recipe(unet, _rule(pattern=mid), importance=imp))[name]
    np.testing.assert_array_equal(np.asarray(same.lut), np.asarray(plain.lut))
    # pipeline params with {component: {layer: array}}; grouped sensitive rules
    qp = quant.apply_recipe(pipe.params, _rule(sensitive=True, pattern=mid, group_size=16),
                            importance={"unet": imp})
    g = layers(qp["unet"])[name]
    want = palettize.kmeans(np.asarray(w), 3, group_size=16, importance=imp[name])
    assert g.group_size == 16 and np.array_equal(np.asarray(g.lut), np.asarray(want.lut))


@pytest.mark.parametrize("recipe, importance, message", [
    (_rule(sensitive="yes"), None, r"rule 1 \(pattern '\*'\): sensitive must be true or false; got 'yes'"),
    (_rule(sensitive=True), None, r"rule 1 \(pattern '\*', method 'palettize'\): sensitive palettization needs "
                                  r"per-weight importances: pass importance=.*sdjax\.evaluation\.fisher\.fisher"),
    (_rule(sensitive=True), "drop", r"rule 1 .*no importance for 1 sensitive layer\(s\) of unet: mid_block\.resnets\.0\.conv1$"),
    (_rule(sensitive=True), "shape", r"rule 1 .*unet layer 'mid_block\.resnets\.0\.conv1' .*importance must have the shape"),
    (_rule(sensitive=True), [1], r"importance must be a dict"),
])
def test_recipe_sensitive_errors(sd1, fishers, recipe, importance, message):
    _, _, pipe = sd1
    imp = dict(fishers[1])
    if importance == "drop":
        del imp["mid_block.resnets.0.conv1"]
        importance = imp
    elif importance == "shape":
        imp["mid_block.resnets.0.conv1"] = imp["mid_block.resnets.0.conv1"][..., :1]
        importance = imp
    with pytest.raises(RecipeError, match=message):
        quant.apply_recipe(pipe.params["unet"], recipe, importance=importance)


# --- CLI ----------------------------------------------------------------------------------------

def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_quantize_with_sensitivities(sd1, tmp_path, capsys, monkeypatch):
    folder, _, pipe = sd1
    recipe = tmp_path / "sens.json"
    recipe.write_text(json.dumps(_rule(sensitive=True, nbits=2)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a small blue cat \na green square\na photo of the cat\n")
    seen = {}
    real = sensitivity.fisher

    def spy(p, ps, **kw):
        seen.update(prompts=ps, **kw)
        return real(p, ps, **dict(kw, steps=4))  # short self-generation (the shapes other tests compile)
    monkeypatch.setattr(sensitivity, "fisher", spy)
    out = tmp_path / "q"
    rc, stdout, err = _cli(capsys, "quantize", "-m", folder, "-r", recipe, "--sensitivity-prompts", prompts,
                           "--sensitivity-timesteps", "2", "-o", out, "-q")
    assert rc == 0, err
    assert seen["prompts"] == PROMPTS + ["a green square", "a photo of the cat"] and seen["n_timesteps"] == 2
    assert seen["component"] == "unet"
    q = sdjax.load(out, progress=False)
    assert q.quantization["recipe"]["rules"][0]["sensitive"] is True
    name = "mid_block.resnets.0.conv1"
    w = layers(q.params["unet"])[name]
    imp = real(pipe, seen["prompts"], n_timesteps=2, steps=4, progress=False)
    want = palettize.kmeans(np.asarray(layers(pipe.params["unet"])[name]), 2, importance=imp[name])
    np.testing.assert_array_equal(np.asarray(w.lut), np.asarray(want.lut))


def test_cli_sensitivity_usage_errors(sd1, tmp_path, capsys, monkeypatch):
    folder, _, _ = sd1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sens.json").write_text(json.dumps(_rule(sensitive=True)))
    (tmp_path / "empty.txt").write_text("\n \n")
    rc, _, err = _cli(capsys, "quantize", "-m", folder, "-r", "palette-4bit", "--sensitivity-prompts", "p.txt",
                      "-o", "o", "-q")
    assert rc == 2 and "--sensitivity-prompts: recipe 'palette-4bit' has no sensitive palettize rule" in err
    rc, _, err = _cli(capsys, "quantize", "-m", folder, "-r", "sens.json", "-o", "o", "-q")
    assert rc == 2 and ("rule 1 (pattern '*', method 'palettize') is sensitive palettization" in err
                        and "pass --sensitivity-prompts FILE" in err)
    rc, _, err = _cli(capsys, "quantize", "-m", folder, "-r", "sens.json", "--sensitivity-prompts", "nope.txt",
                      "-o", "o", "-q")
    assert rc == 2 and "--sensitivity-prompts nope.txt: cannot read the prompts file" in err
    rc, _, err = _cli(capsys, "quantize", "-m", folder, "-r", "sens.json", "--sensitivity-prompts", "empty.txt",
                      "-o", "o", "-q")
    assert rc == 2 and "empty.txt: the file has no prompts" in err
    rc, _, err = _cli(capsys, "quantize", "-m", folder, "-r", "sens.json", "--sensitivity-timesteps", "0",
                      "-o", "o", "-q")
    assert rc == 2 and "--sensitivity-timesteps 0: must be >= 1" in err
    assert not os.path.exists(tmp_path / "o")


def test_cli_reference_model_defaults_to_dataset_captions(tmp_path, capsys, monkeypatch):
    from sdjax import shapes
    seen = {}

    def fake(p, ps, **kw):  # the reference model's sensitivities: only the wiring is under test here
        seen.update(prompts=ps, **kw)
        return {n: np.ones(w.shape, np.float32) for n, w in layers(p.params[kw["component"]]).items()}
    monkeypatch.setattr(sensitivity, "fisher", fake)
    recipe = tmp_path / "sens.json"
    recipe.write_text(json.dumps(_rule(sensitive=True, pattern="mid_block.*")))
    rc, stdout, err = _cli(capsys, "quantize", "-r", recipe, "-o", tmp_path / "q", "-q")
    assert rc == 0, err
    assert len(seen["prompts"]) == 32 and len(set(seen["prompts"])) == 32
    assert all(shapes.parse_caption(c) for c in seen["prompts"])
    q = sdjax.load(tmp_path / "q", progress=False)
    assert isinstance(layers(q.params["unet"])["mid_block.resnets.0.conv1"], palettize.PalettizedWeight)


# --- the experiment -----------------------------------------------------------------------------

def _experiment(tmp_path, capsys, *model):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "experiments"))
    import sensitive_kmeans
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    report = sensitive_kmeans.main(["--quick", "--json", str(out), "--plot", str(plot), "--no-progress", *model])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert not set(saved["calibration_captions"]) & set(saved["eval_captions"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = saved["results"]
    assert rows and {"nbits", "group_size", "plain", "sensitive", "delta"} <= set(rows[0])
    for row in rows:
        for v in ("plain", "sensitive"):
            m = row[v]
            assert np.isfinite(m["sqnr_db"]) and np.isfinite(m["latent_psnr_db"]) and 0 <= m["adherence"]["all"] <= 1
        assert row["delta"]["sqnr_db"] == pytest.approx(row["sensitive"]["sqnr_db"] - row["plain"]["sqnr_db"])
    assert 0 <= saved["float"]["adherence"]["color"] <= 1
    printed = capsys.readouterr().out
    assert "sensitive - plain" in printed


def test_experiment_reporting(tmp_path, capsys):
    """The experiment's caption split, table, JSON-ready report and plot, from a made-up result."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "experiments"))
    import sensitive_kmeans as sk
    cal, ev = sk.split_captions(64, 120)
    assert len(set(cal)) == 64 and len(set(ev)) == 120 and not set(cal) & set(ev)
    assert sk.split_captions(64, 120) == (cal, ev)
    with pytest.raises(SystemExit, match="exceeds the 540 distinct captions"):
        sk.split_captions(500, 100)
    assert sk.recipe(3, 16, True)["rules"][0] == {"pattern": "*", "method": "palettize", "nbits": 3,
                                                  "sensitive": True, "group_size": 16, "indivisible": "per_tensor"}
    quant.parse_recipe(sk.recipe(3, 16, True))

    def m(s, p, a):
        return {"sqnr_db": s, "latent_psnr_db": p, "adherence": {"color": a, "shape": a, "all": a}}
    rows = [{"nbits": b, "group_size": g, "bits_per_weight": b + 0.1, "plain": m(10 * b, 12 * b, 0.2),
             "sensitive": m(10 * b + 1, 12 * b - 1, 0.25)} for g in (None, 16) for b in (2, 4)]
    for r in rows:
        r["delta"] = sk._delta(r["plain"], r["sensitive"])
    assert rows[0]["delta"]["sqnr_db"] == 1 and rows[0]["delta"]["latent_psnr_db"] == -1
    assert rows[0]["delta"]["adherence"]["all"] == pytest.approx(0.05)
    report = {"model": "m", "n_eval": 3, "n_sqnr": 4, "steps": 5, "results": rows, "float": m(0, 0, 0.3)}
    sk.print_table(report)
    text = capsys.readouterr().out
    assert "sensitive - plain" in text and "    2 tensor   2.10 |         20.00  21.00  +1.00 |" in text
    sk.plot(report, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_experiment_quick_on_a_tiny_model(sd1, tmp_path, capsys):
    _experiment(tmp_path, capsys, "--model", sd1[0])


@pytest.mark.slow
def test_experiment_quick_on_the_reference_model(tmp_path, capsys):
    _experiment(tmp_path, capsys)
