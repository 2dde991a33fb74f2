"""Data-free fine-tuning of a palettized UNet (sdjax.evaluation.qat) on the embedded reference model:
the distillation loss goes down, a resumed run ends with the weights of an uninterrupted one, other
settings / evaluation prompts / bad steps and rates are refused, and the result is an ordinary
palettized model of the same bytes that the pipeline and the evaluator run."""
import dataclasses

import numpy as np
import pytest

import quant
import sdjax
from quant.palettize import PalettizedWeight
from sdjax import shapes
from sdjax.evaluation import qat
from sdjax.evaluation.evaluator import Evaluator, Settings
from sdjax.nn import flatten

PROMPTS = tuple(shapes.captions(3, seed=5))
EVAL_PROMPTS = tuple(shapes.captions(2, seed=6, exclude=PROMPTS))
FAST = dict(n_timesteps=2, generation_steps=3, batch=4, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return sdjax.load(None, progress=False)


@pytest.fixture(scope="module")
def q2(pipe):
    return quant.apply_recipe(pipe.params, "palette-2bit")["unet"]


@pytest.fixture(scope="module")
def samples(pipe):
    return qat.training_samples(pipe, PROMPTS, n_timesteps=2, generation_steps=3, batch=4)


def _palettized(tree):
    return {p: v for p, v in flatten(tree).items() if isinstance(v, PalettizedWeight)}


def test_samples_have_both_guidance_contexts(pipe, samples):
    n = len(PROMPTS) * 2
    assert len(samples) == 2 * n and samples.target.shape == samples.x.shape
    np.testing.assert_array_equal(samples.x[:n], samples.x[n:])
    ctx = samples.cond["context"]
    assert np.all(ctx[:n] == ctx[0])            # the negative (empty) prompt's context
    assert not np.allclose(ctx[n], ctx[0])      # the prompt's
    assert qat.distillation_loss(pipe.params["unet"], pipe.configs["unet"], samples) < 1e-10


@pytest.mark.parametrize("method", ["lut", pytest.param("ste", marks=pytest.mark.slow)])  # ste: slow (CI time)
def test_finetuning_lowers_the_distillation_loss_and_keeps_the_bytes(pipe, q2, samples, method):
    cfg = pipe.configs["unet"]
    before = qat.distillation_loss(q2, cfg, samples)
    out = qat.finetune(pipe, q2, PROMPTS, method=method, steps=6, lr=1e-3, w_lr=1e-3, samples=samples,
                       **dict(FAST, batch=12))
    after = qat.distillation_loss(out, cfg, samples)
    assert after < 0.8 * before, (before, after)
    a, b = _palettized(q2), _palettized(out)
    assert a.keys() == b.keys() and a
    for p in a:
        assert (b[p].shape, b[p].nbits, b[p].group_size) == (a[p].shape, a[p].nbits, a[p].group_size)
        assert b[p].packed.shape == a[p].packed.shape and b[p].lut.shape == a[p].lut.shape
        assert b[p].lut.dtype == a[p].lut.dtype
        if method == "lut":
            np.testing.assert_array_equal(np.asarray(b[p].packed), np.asarray(a[p].packed))
    assert any(not np.array_equal(np.asarray(a[p].lut), np.asarray(b[p].lut)) for p in a)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(pipe, q2, samples, tmp_path):
    kw = dict(FAST, method="ste", steps=4, lr=1e-3, save_every=2, samples=samples)
    whole = qat.finetune(pipe, q2, PROMPTS, out_dir=str(tmp_path / "a"), **kw)
    with pytest.raises(qat.Interrupted):
        qat.finetune(pipe, q2, PROMPTS, out_dir=str(tmp_path / "b"), interrupt_after=3, **kw)
    resumed = qat.finetune(pipe, q2, PROMPTS, out_dir=str(tmp_path / "b"), **kw)
    a, b = _palettized(whole), _palettized(resumed)
    for p in a:
        assert np.asarray(a[p].packed).tobytes() == np.asarray(b[p].packed).tobytes()
        assert np.asarray(a[p].lut).tobytes() == np.asarray(b[p].lut).tobytes()
    # a finished run is loaded, not retrained
    again = qat.finetune(pipe, q2, PROMPTS, out_dir=str(tmp_path / "a"), **kw)
    assert all(np.asarray(_palettized(again)[p].lut).tobytes() == np.asarray(a[p].lut).tobytes() for p in a)


def test_a_resume_with_other_settings_is_refused(pipe, q2, samples, tmp_path):
    kw = dict(FAST, method="ste", steps=1, lr=1e-3, samples=samples, prompts=PROMPTS)
    qat.finetune(pipe, q2, out_dir=str(tmp_path), **kw)
    for change, name in [(dict(method="lut"), "method"), (dict(lr=2e-3), "lr"), (dict(steps=5), "steps"),
                         (dict(seed=1), "seed"), (dict(prompts=PROMPTS[:2]), "prompts")]:
        with pytest.raises(ValueError, match=f"other settings: '{name}'"):
            qat.finetune(pipe, q2, out_dir=str(tmp_path), **dict(kw, **change))
    q4 = quant.apply_recipe(pipe.params, "palette-4bit")["unet"]
    with pytest.raises(ValueError, match="starting quantized model"):
        qat.finetune(pipe, q4, out_dir=str(tmp_path), **kw)


def test_evaluation_prompts_are_refused(pipe, q2):
    with pytest.raises(ValueError, match=f"evaluation prompts.*{EVAL_PROMPTS[1]!r}"):
        qat.finetune(pipe, q2, PROMPTS + EVAL_PROMPTS[1:], eval_prompts=EVAL_PROMPTS, steps=1, **FAST)


@pytest.mark.parametrize("kw, match", [(dict(steps=0), "steps=0"), (dict(steps=2.5), "steps=2.5"),
                                       (dict(lr=0), "lr=0"), (dict(lr=1.5), "lr=1.5"),
                                       (dict(lr=float("nan")), "lr=nan"), (dict(w_lr=-1.0), "w_lr=-1.0"),
                                       (dict(method="kmeans"), "unknown fine-tuning method"),
                                       (dict(method="dkm"), "temperature"),
                                       (dict(loss="l1"), "loss='l1'"), (dict(schedule="step"), "schedule='step'"),
                                       (dict(w_init="zeros"), "w_init='zeros'"), (dict(train_bias=1), "train_bias=1")])
def test_bad_settings_are_refused(pipe, q2, kw, match):
    with pytest.raises(ValueError, match=match):
        qat.finetune(pipe, q2, PROMPTS, **dict(dict(steps=1, **FAST), **kw))


def test_the_guided_loss_is_the_mse_of_the_guided_predictions():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 6, 4, 4, 3))
    d = pred.astype(np.float64) - target
    u, c = d[:3], d[3:]   # [negative rows; the same latents' prompt rows]
    want = np.mean((u + 7.5 * (c - u)) ** 2)
    np.testing.assert_allclose(float(qat._loss(pred.astype(np.float32), target.astype(np.float32), 7.5)), want, rtol=1e-5)
    np.testing.assert_allclose(float(qat._loss(pred.astype(np.float32), target.astype(np.float32), None)),
                               np.mean(d ** 2), rtol=1e-5)


def test_the_cosine_schedule_decays_to_zero():
    rate = qat._rate(1e-3, "cosine", 10)
    assert float(rate(0)) == pytest.approx(1e-3) and float(rate(5)) == pytest.approx(5e-4) and float(rate(10)) == 0
    assert qat._rate(1e-3, "constant", 10) == 1e-3


def _shuffled_indices(q):
    """``q`` with every palettized weight's indices rolled by one place: indices a nearest-entry
    assignment of its float weights would not give."""
    from quant.palettize import pack_bits, unpack_bits
    out = {}
    for p, w in flatten(q).items():
        if isinstance(w, PalettizedWeight):
            idx = np.roll(np.asarray(unpack_bits(w.packed, w.nbits, int(np.prod(w.shape)))), 1)
            w = dataclasses.replace(w, packed=pack_bits(idx, w.nbits))
        out[p] = w
    from sdjax.nn import unflatten
    return unflatten(out)


@pytest.mark.slow  # kept out of CI for time (the CI suite must stay under 30 min); run with -m slow
def test_w_init_quantized_starts_from_the_starts_indices(pipe, q2, samples):
    start = _shuffled_indices(q2)
    kw = dict(FAST, method="ste", steps=1, lr=1e-9, w_lr=1e-9, samples=samples)
    kept = _palettized(qat.finetune(pipe, start, PROMPTS, w_init="quantized", **kw))
    snapped = _palettized(qat.finetune(pipe, start, PROMPTS, w_init="float", **kw))
    a = _palettized(start)
    assert all(np.array_equal(np.asarray(kept[p].packed), np.asarray(a[p].packed)) for p in a)
    assert sum(not np.array_equal(np.asarray(snapped[p].packed), np.asarray(a[p].packed)) for p in a) > len(a) // 2


@pytest.mark.parametrize("train_bias", [pytest.param(False, marks=pytest.mark.slow), True])  # False: slow (CI time)
def test_train_bias_trains_the_palettized_layers_biases_only(pipe, q2, samples, train_bias):
    out = flatten(qat.finetune(pipe, q2, PROMPTS, method="lut", steps=2, lr=1e-2, samples=samples,
                               train_bias=train_bias, **FAST))
    before = flatten(q2)
    tuned = {p[:-len("weight")] + "bias" for p, v in before.items() if isinstance(v, PalettizedWeight)}
    changed = set()
    for p, v in before.items():
        if isinstance(v, PalettizedWeight):
            continue
        assert np.asarray(out[p]).dtype == np.asarray(v).dtype and np.asarray(out[p]).shape == np.asarray(v).shape
        if not np.array_equal(np.asarray(out[p]), np.asarray(v)):
            changed.add(p)
    assert changed <= tuned and (bool(changed) == train_bias), sorted(changed)[:5]


def test_weights_that_cannot_be_trained_are_refused(pipe):
    w8 = quant.apply_recipe(pipe.params, {"rules": [{"pattern": "*", "kind": "linear", "method": "llm-int8"}]})
    with pytest.raises(ValueError, match="no palettized weight"):
        qat.finetune(pipe, w8["unet"], PROMPTS, steps=1, **FAST)


@pytest.mark.slow  # builds an Evaluator (about 70 s on 2 cores)
def test_the_result_runs_where_post_training_params_run(pipe, q2, samples):
    tuned = qat.finetune(pipe, q2, PROMPTS, method="lut", steps=2, lr=1e-3, samples=samples, **FAST)
    ev = Evaluator(pipe, Settings(prompts=EVAL_PROMPTS, seeds=(0,), steps=2, batch=2, n_one_step=2),
                   progress=False)
    for unet in (q2, tuned):
        psnr = ev.one_step_psnr(unet)
        assert np.isfinite(psnr) and psnr > 0
        m, _ = ev.metrics(ev.outputs(dict(pipe.params, unet=unet)))
        assert np.isfinite(m["latent_psnr_1step_db"])
    qpipe = dataclasses.replace(pipe, params=dict(pipe.params, unet=tuned))
    img = qpipe.generate(EVAL_PROMPTS[0], steps=2, output_type="np", progress=False)
    assert np.all(np.isfinite(np.asarray(img)))


def test_dkm_trains_and_re_snaps_to_the_same_layout(pipe, q2, samples):
    out = qat.finetune(pipe, q2, PROMPTS, method="dkm", temperature=1e-4, steps=2, lr=1e-3, samples=samples,
                       refine=True, **FAST)
    a, b = _palettized(q2), _palettized(out)
    assert a.keys() == b.keys()
    for p in a:
        assert b[p].packed.shape == a[p].packed.shape and b[p].lut.shape == a[p].lut.shape
        assert np.all(np.isfinite(np.asarray(b[p].lut, np.float32)))
    assert np.isfinite(qat.distillation_loss(out, pipe.configs["unet"], samples))


@pytest.mark.slow  # kept out of CI for time (the CI suite must stay under 30 min); run with -m slow
def test_remat_and_donation_leave_the_result_and_the_callers_arrays(pipe, q2, samples):
    """``remat`` changes memory, not the result; the donated steps never take the caller's arrays
    (the teacher's float weights "ste" starts from, the start's biases): all still readable."""
    kw = dict(FAST, method="ste", steps=3, lr=1e-3, w_lr=1e-3, samples=samples, train_bias=True)
    plain = qat.finetune(pipe, q2, PROMPTS, remat=False, **kw)
    remat = qat.finetune(pipe, q2, PROMPTS, remat=True, **kw)
    a, b = _palettized(plain), _palettized(remat)
    for p in a:
        np.testing.assert_allclose(np.asarray(b[p].lut, np.float32), np.asarray(a[p].lut, np.float32),
                                   rtol=2e-3, atol=1e-4)
    for tree in (pipe.params["unet"], q2):
        for leaf in flatten(tree).values():
            np.asarray(leaf.dequantize() if hasattr(leaf, "dequantize") else leaf)   # raises if deleted
    assert qat._remat("auto", pipe.configs["unet"]) is False
    from sdjax import configs
    assert qat._remat("auto", configs.unet_config(configs.PRESETS["sd15"]["unet"])) is True
    with pytest.raises(ValueError, match="remat='yes'"):
        qat.finetune(pipe, q2, PROMPTS, remat="yes", **kw)
