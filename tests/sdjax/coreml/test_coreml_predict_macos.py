"""On macOS: Core ML itself runs the exported packages (``MLModel.predict``) on the inputs the Linux
tests give sdjax.coreml.interp, and must agree with sdjax (PSNR >= 60 dB at float32 compute
precision on the CPU, >= 35 dB at float16, Apple's own conversion check). Skipped elsewhere: Core ML
does not run on Linux, where sdjax.coreml.interp stands in for it."""
import sys

import numpy as np
import pytest

if sys.platform != "darwin":
    pytest.skip("Core ML runs only on macOS (sdjax.coreml.interp checks the packages elsewhere)",
                allow_module_level=True)

ct = pytest.importorskip("coremltools")

import sdjax  # noqa: E402
from sdjax.coreml import mil, text_encoder, unet, vae  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def pipe():
    return sdjax.load(None).quantize("palette-6bit")


def _predict(path, feeds, precision):
    units = ct.ComputeUnit.CPU_ONLY if precision == "float32" else ct.ComputeUnit.ALL
    model = ct.models.MLModel(str(path), compute_units=units)
    return model.predict({k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items()})


def _floor(precision):
    return 60 if precision == "float32" else 35


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_unet_predict_matches_sdjax(tmp_path, pipe, precision):
    p, cfg = pipe.params["unet"], pipe.configs["unet"]
    rng = np.random.default_rng(0)
    h, w = vae.default_latent_shape(pipe.configs["vae"])
    sample = rng.standard_normal((2, cfg.in_channels, h, w)).astype(np.float32)
    t = np.array([981.0, 17.0], np.float32)
    ctx = rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)
    path = unet.export(p, cfg, tmp_path / "Unet.mlpackage", compute_precision=precision, latent_shape=(h, w))
    got = _predict(path, {"sample": sample, "timestep": t,
                          "encoder_hidden_states": ctx.transpose(0, 2, 1)[:, :, None]}, precision)["noise_pred"]
    ref = np.asarray(sdjax.unet.apply(p, cfg, sample.transpose(0, 2, 3, 1), t, ctx)).transpose(0, 3, 1, 2)
    assert mil.psnr(ref, got) >= _floor(precision)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_text_encoder_predict_matches_sdjax(tmp_path, pipe, precision):
    p, cfg = pipe.params["text_encoder"], pipe.configs["text_encoder"]
    ids = pipe.tokenizer(["a small red circle at the top left on a white background"])
    path = text_encoder.export(p, cfg, tmp_path / "TextEncoder.mlpackage", compute_precision=precision)
    out = _predict(path, {"input_ids": ids.astype(np.float32)}, precision)
    last, _, pooled = sdjax.clip.apply(p, cfg, ids)
    assert mil.psnr(np.asarray(last), out["last_hidden_state"]) >= _floor(precision)
    assert mil.psnr(np.asarray(pooled), out["pooled_outputs"]) >= _floor(precision)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_vae_predict_matches_sdjax(tmp_path, pipe, precision):
    p, cfg = pipe.params["vae"], pipe.configs["vae"]
    h, w = vae.default_latent_shape(cfg)
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((1, cfg.latent_channels, h, w)).astype(np.float32)
    path = vae.export_decoder(p, cfg, tmp_path / "VAEDecoder.mlpackage", compute_precision=precision)
    got = _predict(path, {"z": latents / vae.SWIFT_SCALING_FACTOR}, precision)["image"]
    ref = np.asarray(sdjax.vae.decode(p, cfg, latents.transpose(0, 2, 3, 1) / cfg.scaling_factor))
    assert mil.psnr(ref.transpose(0, 3, 1, 2), got) >= _floor(precision)

    f = pipe.vae_scale_factor
    image = np.clip(rng.standard_normal((1, 3, h * f, w * f)), -1, 1).astype(np.float32)
    path = vae.export_encoder(p, cfg, tmp_path / "VAEEncoder.mlpackage", compute_precision=precision)
    got = _predict(path, {"x": image}, precision)["latent"]
    mean, logvar = sdjax.vae.encode(p, cfg, image.transpose(0, 2, 3, 1))
    r = cfg.scaling_factor / vae.SWIFT_SCALING_FACTOR
    ref_mean = np.asarray(mean).transpose(0, 3, 1, 2) * r
    assert mil.psnr(ref_mean, got[:, :cfg.latent_channels]) >= _floor(precision)
