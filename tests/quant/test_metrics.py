"""quant.metrics against plain float64 NumPy statements of each formula (written here, not copied
output values), its edge cases, SSIM against Wang et al.'s formula, plug-in loading, and CLIP score
against the same computation done directly in torch on a tiny random CLIP saved to disk."""
import math
import pathlib
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from quant import metrics


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------
# plain statements of the formulas


def np_sqnr(r, x):
    r, x = np.float64(r), np.float64(x)
    return 10 * np.log10(np.sum(r ** 2) / np.sum((r - x) ** 2))


def np_psnr(r, x, peak=None):
    r, x = np.asarray(r, np.float64), np.asarray(x, np.float64)
    peak = np.abs(r).max() if peak is None else peak
    return 20 * np.log10(peak / np.sqrt(np.mean((r - x) ** 2)))


def gaussian_window(size=11, sigma=1.5):
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g)
    return w / w.sum()


def np_ssim(a, b, k1=0.01, k2=0.03, L=1.0):
    """Wang et al. 2004, eqs. (13)-(14) with the Gaussian-weighted local statistics of their section
    III-C, on each channel, the map kept where the 11x11 window fits ("valid"), averaged over
    positions and channels; one value per image."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = gaussian_window()
    win = lambda z: np.lib.stride_tricks.sliding_window_view(z, (11, 11), axis=(1, 2))  # N,h,w,C,11,11
    wmean = lambda z: np.einsum("nhwcij,ij->nhwc", win(z), w)
    mu_a, mu_b = wmean(a), wmean(b)
    var_a = np.einsum("nhwcij,ij->nhwc", (win(a) - mu_a[..., None, None]) ** 2, w)
    var_b = np.einsum("nhwcij,ij->nhwc", (win(b) - mu_b[..., None, None]) ** 2, w)
    cov = np.einsum("nhwcij,ij->nhwc", (win(a) - mu_a[..., None, None]) * (win(b) - mu_b[..., None, None]), w)
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return m.mean(axis=(1, 2, 3))


def smooth_images(n, h=32, w=32, c=3, seed=0):
    """Images in [0, 1] with structure at several scales (like decoded images, unlike white noise)."""
    r = rng(seed)
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    out = np.zeros((n, h, w, c))
    for k in range(4):
        f = r.uniform(1, 12, (n, 1, 1, c))
        ph = r.uniform(0, 6.3, (n, 1, 1, c))
        out += r.uniform(0.05, 0.2, (n, 1, 1, c)) * np.sin(f * (xx[None, ..., None] * r.uniform(-1, 1)
                                                                 + yy[None, ..., None] * r.uniform(-1, 1)) + ph)
    out += 0.03 * r.standard_normal(out.shape)
    return np.clip(0.5 + out, 0, 1)


# ---------------------------------------------------------------------------------------------------
# SQNR, PSNR, mean_db


def test_sqnr_matches_formula():
    r = rng(1).standard_normal((4, 8, 8))
    x = r + 0.01 * rng(2).standard_normal(r.shape)
    assert metrics.sqnr_db(r, x) == pytest.approx(np_sqnr(r, x), rel=1e-12)
    assert isinstance(metrics.sqnr_db(r, x), float)
    # a uniformly scaled error: -20 dB per factor 10
    assert metrics.sqnr_db(r, r + 10 * (x - r)) == pytest.approx(np_sqnr(r, x) - 20, rel=1e-9)


def test_sqnr_edge_cases():
    r = rng(1).standard_normal((5, 3))
    assert metrics.sqnr_db(r, r) == math.inf
    assert metrics.sqnr_db(np.zeros(3), np.zeros(3)) == math.inf
    assert metrics.sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    for bad in (np.nan, np.inf, -np.inf):
        x = r.copy()
        x[2, 1] = bad
        assert math.isnan(metrics.sqnr_db(r, x))
        assert math.isnan(metrics.sqnr_db(x, r))


def test_psnr_default_peak_is_max_abs_reference():
    r = 3 * rng(3).standard_normal((2, 5, 7))
    x = r + 0.05 * rng(4).standard_normal(r.shape)
    got = metrics.psnr_db(r, x)
    assert isinstance(got, float)
    assert got == pytest.approx(np_psnr(r, x), rel=1e-12)
    assert metrics.psnr_db(r, x, peak=2.0) == pytest.approx(np_psnr(r, x, 2.0), rel=1e-12)
    # doubling the error costs 20 log10(2) = 6.02 dB
    assert metrics.psnr_db(r, r + 2 * (x - r)) == pytest.approx(got - 20 * np.log10(2), rel=1e-9)


def test_psnr_axis_reduces_over_given_axes():
    r = rng(5).standard_normal((3, 4, 6))
    x = r + rng(6).uniform(0.01, 0.2, (3, 1, 1)) * rng(7).standard_normal(r.shape)
    got = metrics.psnr_db(r, x, axis=(1, 2))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, [np_psnr(r[i], x[i]) for i in range(3)], rtol=1e-12)
    got = metrics.psnr_db(r, x, axis=0)                 # per position, each its own peak
    assert got.shape == (4, 6)
    np.testing.assert_allclose(got, [[np_psnr(r[:, j, k], x[:, j, k]) for k in range(6)] for j in range(4)],
                               rtol=1e-12)
    np.testing.assert_allclose(metrics.psnr_db(r, x, axis=(-1, -2)), metrics.psnr_db(r, x, axis=(1, 2)))
    with pytest.raises(ValueError, match="out of range"):
        metrics.psnr_db(r, x, axis=3)


def test_per_sample_psnr():
    r = rng(8).standard_normal((4, 3, 5, 2)) * np.array([1, 10, 0.1, 3])[:, None, None, None]
    x = r + 0.01 * rng(9).standard_normal(r.shape)
    got = metrics.per_sample_psnr_db(r, x)
    np.testing.assert_allclose(got, [np_psnr(r[i], x[i]) for i in range(4)], rtol=1e-12)
    got = metrics.per_sample_psnr_db(r, x, peak=2.5)
    np.testing.assert_allclose(got, [np_psnr(r[i], x[i], 2.5) for i in range(4)], rtol=1e-12)
    peaks = np.array([1.0, 2.0, 3.0, 4.0])[:, None]   # an array of peaks broadcasts to the result
    np.testing.assert_allclose(metrics.psnr_db(r.reshape(4, -1), x.reshape(4, -1), peak=peaks[:, 0], axis=1),
                               [np_psnr(r[i], x[i], peaks[i, 0]) for i in range(4)], rtol=1e-12)
    x2 = x.copy()
    x2[1] = r[1]
    x2[2, 0, 0, 0] = np.nan
    got = metrics.per_sample_psnr_db(r, x2)
    assert got[1] == np.inf and np.isnan(got[2]) and np.isfinite(got[[0, 3]]).all()


def test_psnr_edge_cases():
    r = rng(10).standard_normal((2, 4))
    assert metrics.psnr_db(r, r) == math.inf
    assert metrics.psnr_db(np.zeros(4), np.zeros(4)) == math.inf
    assert metrics.psnr_db(np.zeros(4), np.ones(4)) == -math.inf
    x = r.copy()
    x[0, 0] = np.inf
    assert math.isnan(metrics.psnr_db(r, x))          # not an exception
    x[0, 0] = np.nan
    assert math.isnan(metrics.psnr_db(r, x))
    assert math.isnan(metrics.psnr_db(x, r))
    for peak in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match="peak"):
            metrics.psnr_db(r, r + 0.1, peak=peak)


def test_accepts_jax_arrays_and_low_precision():
    r = rng(11).standard_normal((2, 8, 8, 4)).astype(np.float32)
    x = (r + 0.1 * rng(12).standard_normal(r.shape)).astype(np.float32)
    assert metrics.psnr_db(jnp.asarray(r), jnp.asarray(x)) == pytest.approx(np_psnr(r, x), rel=1e-12)
    assert metrics.sqnr_db(jnp.asarray(r), x) == pytest.approx(np_sqnr(r, x), rel=1e-12)
    xb = jnp.asarray(x, jnp.bfloat16)                  # compared as the bfloat16 values it holds
    assert metrics.latent_psnr_db(r, xb) == pytest.approx(
        np.mean([np_psnr(r[i], np.asarray(xb[i]).astype(np.float64)) for i in range(2)]), rel=1e-12)


def test_mean_db():
    assert metrics.mean_db([10.0, 20.0, 33.0]) == pytest.approx(21.0)
    assert metrics.mean_db(np.array([10.0, np.inf, 20.0])) == pytest.approx(15.0)   # identical left out
    assert metrics.mean_db([np.inf, np.inf]) == math.inf
    assert math.isnan(metrics.mean_db([10.0, np.nan, np.inf]))
    assert metrics.mean_db([10.0, -np.inf]) == -math.inf
    assert isinstance(metrics.mean_db(np.float32([1, 2])), float)
    with pytest.raises(ValueError):
        metrics.mean_db([])


@pytest.mark.parametrize("fn", [metrics.sqnr_db, metrics.psnr_db, metrics.per_sample_psnr_db,
                                metrics.noise_psnr_db, metrics.latent_psnr_db, metrics.image_psnr_db,
                                metrics.ssim, metrics.mean_ssim])
def test_shape_mismatch_names_both_shapes(fn):
    a, b = np.zeros((2, 16, 16, 3)), np.zeros((2, 16, 15, 3))
    with pytest.raises(ValueError) as e:
        fn(a, b)
    assert "(2, 16, 16, 3)" in str(e.value) and "(2, 16, 15, 3)" in str(e.value)


# ---------------------------------------------------------------------------------------------------
# the evaluation's metrics


def test_noise_psnr_is_pooled():
    r = rng(13).standard_normal((3, 4, 4, 4)) * np.array([0.5, 1.0, 2.0])[:, None, None, None]
    x = r + 0.02 * rng(14).standard_normal(r.shape)
    want = 20 * np.log10(np.abs(r).max() / np.sqrt(np.mean((r - x) ** 2)))
    assert metrics.noise_psnr_db(r, x) == pytest.approx(want, rel=1e-12)
    # not the per-sample average: the samples' scales differ
    assert abs(metrics.noise_psnr_db(r, x) - metrics.latent_psnr_db(r, x)) > 0.1


def test_latent_psnr_is_apples_protocol():
    r = rng(15).standard_normal((3, 8, 8, 4)) * np.array([0.5, 1.0, 4.0])[:, None, None, None]
    x = r + 0.01 * rng(16).standard_normal(r.shape)
    want = np.mean([20 * np.log10(np.abs(r[i]).max() / np.sqrt(np.mean((r[i] - x[i]) ** 2))) for i in range(3)])
    assert metrics.latent_psnr_db(r, x) == pytest.approx(want, rel=1e-12)
    assert metrics.latent_psnr_db(r, r) == math.inf
    x[0, 0, 0, 0] = np.nan
    assert math.isnan(metrics.latent_psnr_db(r, x))


def test_image_psnr_peak_one_per_image_then_mean():
    r = smooth_images(3, 16, 16, seed=1)
    x = np.clip(r + 0.02 * rng(17).standard_normal(r.shape), 0, 1)
    want = np.mean([10 * np.log10(1.0 / np.mean((r[i] - x[i]) ** 2)) for i in range(3)])
    assert metrics.image_psnr_db(r, x) == pytest.approx(want, rel=1e-12)
    x[1] = r[1]                                        # an identical image is left out of the mean
    want = np.mean([10 * np.log10(1.0 / np.mean((r[i] - x[i]) ** 2)) for i in (0, 2)])
    assert metrics.image_psnr_db(r, x) == pytest.approx(want, rel=1e-12)
    assert metrics.image_psnr_db(r, r) == math.inf
    with pytest.raises(ValueError, match=r"NHWC.*\(16, 16, 3\)"):
        metrics.image_psnr_db(r[0], x[0])


def test_finite_report():
    x = np.ones((3, 4), np.float32)
    assert metrics.finite_report(x) == {"finite": True, "nan": 0, "inf": 0}
    x[0, 0] = x[1, 1] = np.nan
    x[2, 3] = np.inf
    x[2, 2] = -np.inf
    assert metrics.finite_report(x) == {"finite": False, "nan": 2, "inf": 2}
    assert metrics.finite_report(jnp.asarray(x, jnp.bfloat16)) == {"finite": False, "nan": 2, "inf": 2}
    assert metrics.finite_report(np.arange(5)) == {"finite": True, "nan": 0, "inf": 0}
    rep = metrics.finite_report(x)
    assert type(rep["finite"]) is bool and type(rep["nan"]) is int and type(rep["inf"]) is int


def test_builtin_registry():
    assert metrics.BUILTIN == ("noise_psnr_db", "latent_psnr_1step_db", "apple_latent_psnr_db", "image_psnr_db", "ssim",
                               "adherence")
    for name in ("noise_psnr_db", "image_psnr_db", "ssim", "latent_psnr_db"):
        assert callable(getattr(metrics, name))
    for name in metrics.BUILTIN:
        assert name in metrics.__doc__


# ---------------------------------------------------------------------------------------------------
# SSIM


def test_ssim_matches_wang_et_al():
    r = smooth_images(5, 40, 48, seed=2)
    sig = np.array([0.0, 0.01, 0.05, 0.1, 0.3])[:, None, None, None]
    x = np.clip(r + sig * rng(18).standard_normal(r.shape), 0, 1)
    x[0] = np.clip(0.8 * r[0] + 0.1, 0, 1)                       # a contrast/brightness change
    got = metrics.ssim(r, x)
    assert got.shape == (5,) and got.dtype == np.float64
    np.testing.assert_allclose(got, np_ssim(r, x), atol=1e-9, rtol=0)
    assert metrics.mean_ssim(r, x) == pytest.approx(np_ssim(r, x).mean(), abs=1e-9)
    assert isinstance(metrics.mean_ssim(r, x), float)
    assert jnp.asarray(np.float64(1.0)).dtype == jnp.float32      # float64 stayed inside ssim


def test_ssim_identical_and_ordering():
    r = smooth_images(2, 64, 64, seed=3)
    np.testing.assert_allclose(metrics.ssim(r, r), 1.0, atol=1e-6)
    vals = []
    for s in (0.005, 0.02, 0.05, 0.1, 0.2):
        vals.append(metrics.mean_ssim(r, np.clip(r + s * rng(19).standard_normal(r.shape), 0, 1)))
    assert all(a > b for a, b in zip(vals, vals[1:])), vals
    assert vals[0] < 1.0


def test_ssim_grayscale_single_channel_and_jax_input():
    r = smooth_images(2, 16, 16, c=1, seed=4)
    x = np.clip(r + 0.05 * rng(20).standard_normal(r.shape), 0, 1)
    np.testing.assert_allclose(metrics.ssim(jnp.asarray(r, jnp.float32), jnp.asarray(x, jnp.float32)),
                               np_ssim(r.astype(np.float32), x.astype(np.float32)), atol=1e-9)


def test_ssim_window_minimum_and_rank():
    r = np.full((1, 10, 64, 3), 0.5)
    with pytest.raises(ValueError, match=r"\(1, 10, 64, 3\).*11x11"):
        metrics.ssim(r, r)
    with pytest.raises(ValueError, match=r"\(1, 64, 8, 3\)"):
        metrics.ssim(np.zeros((1, 64, 8, 3)), np.zeros((1, 64, 8, 3)))
    assert metrics.ssim(np.full((1, 11, 11, 3), 0.5), np.full((1, 11, 11, 3), 0.5)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"NHWC.*\(64, 64, 3\)"):
        metrics.ssim(np.zeros((64, 64, 3)), np.zeros((64, 64, 3)))


def test_ssim_non_finite_image_is_nan():
    r = smooth_images(3, 16, 16, seed=5)
    x = r.copy()
    x[1, 3, 4, 0] = np.nan
    x[2, 0, 0, 2] = np.inf
    got = metrics.ssim(r, x)
    assert got[0] == pytest.approx(1.0) and np.isnan(got[1]) and np.isnan(got[2])
    assert math.isnan(metrics.mean_ssim(r, x))


# ---------------------------------------------------------------------------------------------------
# plug-ins


PLUGIN_SOURCE = '''
import numpy as np

class _Brightness:
    name = "brightness"
    def __call__(self, images, prompts, ref_images=None):
        return np.asarray(images).mean(axis=(1, 2, 3))

metric = _Brightness()

def factory():
    return _Brightness()

def factory_with_args(scale):
    m = _Brightness()
    m.name = f"brightness_x{scale}"
    return m

class Klass:
    def __init__(self):
        self.name = "klass"
    def __call__(self, images, prompts, ref_images=None):
        return np.zeros(len(images))

def nameless_metric(images, prompts, ref_images):
    return np.zeros(len(images))

def gives_number():
    return 3

class Holder:
    metric = metric

not_callable = 42
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_plugins.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    (tmp_path / "broken_plugins.py").write_text("import a_module_that_is_not_there_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_plugins"
    for m in ("my_plugins", "broken_plugins"):
        sys.modules.pop(m, None)


def test_load_plugin_variants(plugin_module):
    images = smooth_images(2, 12, 12, seed=6)
    m = metrics.load_plugin("my_plugins:metric")
    assert m.name == "brightness"
    np.testing.assert_allclose(metrics.run_plugin(m, images, ["a", "b"]), images.mean(axis=(1, 2, 3)))
    assert metrics.load_plugin("my_plugins:factory").name == "brightness"
    assert metrics.load_plugin("my_plugins:Klass").name == "klass"
    assert metrics.load_plugin("my_plugins:Holder.metric").name == "brightness"
    assert metrics.load_plugin("my_plugins:factory_with_args", scale=2).name == "brightness_x2"


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:metric", "module 'no_such_module_xyz' not found"),
    ("my_plugins.sub:metric", "module 'my_plugins.sub' not found"),
    ("broken_plugins:metric", "importing module 'broken_plugins' failed.*a_module_that_is_not_there_xyz"),
    ("my_plugins:missing", "no attribute 'missing'"),
    ("my_plugins:not_callable", "'not_callable' is a int, not callable"),
    ("my_plugins:nameless_metric", "no `name` attribute.*factory"),
    ("my_plugins:gives_number", "returned a int, not a callable metric"),
    ("my_plugins", "expected 'module.path:callable'"),
    ("my_plugins:", "expected 'module.path:callable'"),
    ("a:b:c", "expected 'module.path:callable'"),
])
def test_load_plugin_errors_name_the_spec(plugin_module, spec, match):
    with pytest.raises(metrics.PluginError, match=match) as e:
        metrics.load_plugin(spec)
    assert repr(spec) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_load_plugin_factory_argument_error(plugin_module):
    with pytest.raises(metrics.PluginError, match=r"'my_plugins:factory'.*bogus=1"):
        metrics.load_plugin("my_plugins:factory", bogus=1)


def test_run_plugin_checks_shape(plugin_module):
    class Bad:
        name = "bad"

        def __call__(self, images, prompts, ref_images=None):
            return np.zeros((len(images), 2))
    with pytest.raises(ValueError, match=r"'bad' returned shape \(3, 2\) for 3 images"):
        metrics.run_plugin(Bad(), np.zeros((3, 4, 4, 3)), ["a"] * 3)


# ---------------------------------------------------------------------------------------------------
# CLIP score


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel with its tokenizer and image processor, saved like a hub folder."""
    torch = pytest.importorskip("torch")
    import tiny_models
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    tok_dir = folder / "_tok"
    n_vocab = tiny_models.write_tokenizer(str(tok_dir))
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n_vocab, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=n_vocab - 2,
                         eos_token_id=n_vocab - 1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder, model, tokenizer, processor.image_processor


def _features(torch, out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_score_matches_direct_torch(tiny_clip):
    import torch
    folder, model, tokenizer, improc = tiny_clip
    images = smooth_images(5, 32, 32, seed=7).astype(np.float32)
    prompts = ["a red circle", "a photo of the cat", "blue square", "small green circle", "large red square"]
    plugin = metrics.clip_score(folder, batch_size=2)
    assert plugin.name == "clip_score"
    got = metrics.run_plugin(plugin, images, prompts, None)

    # the same, by hand: 8-bit images, CLIP's normalisation, NCHW; token ids from the tokenizer
    u8 = np.round(np.clip(images.astype(np.float64), 0, 1) * 255)
    pix = (u8 / 255 - np.array(improc.image_mean)) / np.array(improc.image_std)
    pix = torch.tensor(pix.transpose(0, 3, 1, 2), dtype=torch.float32)
    tok = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = _features(torch, model.get_image_features(pixel_values=pix)).double()
        txt = _features(torch, model.get_text_features(input_ids=tok["input_ids"],
                                                       attention_mask=tok["attention_mask"])).double()
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1).numpy()
    assert (cos < 0).any() and (cos > 0).any()         # this seed exercises the clamp both ways
    want = 100 * np.maximum(cos, 0)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # a single prompt applies to every image
    np.testing.assert_allclose(plugin(images[:2], "a red circle"), plugin(images[:2], ["a red circle"] * 2))
    with pytest.raises(ValueError, match="one prompt"):
        plugin(images, prompts[:3])


def test_clip_score_clamps_negative_cosines(tiny_clip, monkeypatch):
    import torch
    folder = tiny_clip[0]
    plugin = metrics.clip_score(folder)
    images = smooth_images(2, 32, 32, seed=8)
    # make the text embedding the negated image embedding: cos = -1 -> 0; and equal: cos = 1 -> 100
    img_feat = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])
    monkeypatch.setattr(plugin.model, "get_image_features", lambda **k: img_feat)
    monkeypatch.setattr(plugin.model, "get_text_features", lambda **k: img_feat * torch.tensor([[-1.0], [2.0]]))
    np.testing.assert_allclose(plugin(images, ["a", "b"]), [0.0, 100.0], atol=1e-9)


def test_load_plugin_clip_score_with_kwargs(tiny_clip):
    m = metrics.load_plugin("quant.metrics:clip_score", model_dir=tiny_clip[0])
    assert m.name == "clip_score"


def test_clip_score_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        metrics.clip_score(missing)
    empty = tmp_path / "empty_clip"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_clip"):
        metrics.clip_score(empty)
    monkeypatch.setitem(sys.modules, "torch", None)        # as if torch were not installed
    with pytest.raises(ImportError, match="torch"):
        metrics.clip_score(empty)


def test_metrics_module_does_not_import_torch():
    import subprocess
    code = "import sys, quant.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(pathlib.Path(__file__).parents[2]))


def test_apple_psnr_is_apples_compute_psnr_rounded_then_averaged():
    """Apple's compute_psnr (ml-stable-diffusion torch2coreml.py) per sample: peak max|test| + 1e-5 over
    rmse + 1e-10, 20 log10, rounded with f"{:.1f}", summed and divided by the count."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((5, 4, 8, 8))
    test = ref + rng.standard_normal(ref.shape) * np.array([1e-3, 1e-2, 0.1, 1e-5, 0.0])[:, None, None, None]

    def statement(a, b):  # a: reference, b: test, float64
        rmse = np.sqrt(((a - b) * (a - b)).sum() / b.size)
        return 20 * np.log10((np.abs(b).max() + 1e-5) / (rmse + 1e-10))
    want = [round(float(statement(r, t)), 1) for r, t in zip(ref, test)]
    got = metrics.apple_psnr_per_sample(ref, test)
    assert got == want and got[4] == round(20 * np.log10((np.abs(test[4]).max() + 1e-5) / 1e-10), 1)
    assert metrics.apple_psnr_db(ref, test) == sum(want) / 5
    # the peak is the test's, not the reference's
    assert metrics.apple_psnr_per_sample(ref[:1], 2 * ref[:1])[0] == round(float(statement(ref[0], 2 * ref[0])), 1)
    bad = test.copy()
    bad[2, 0, 0, 0] = np.nan
    assert np.isnan(metrics.apple_psnr_per_sample(ref, bad)[2]) and np.isnan(metrics.apple_psnr_db(ref, bad))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.apple_psnr_db(ref, test[:2])
