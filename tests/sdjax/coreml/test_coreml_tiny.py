"""Every component of the tiny diffusers test pipelines (SD 1.x style: conv projections, quick_gelu;
SD 2.x style: linear projections, per-block heads, gelu, "!" padding), exported by
``sdjax.coreml.export.export_pipeline`` at float32 and float16 compute precision, read back from the
saved packages and run by sdjax.coreml.interp, against sdjax on the same inputs: >= 60 dB at
float32, >= 35 dB at float16 (Apple's conversion check)."""
import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import sdjax  # noqa: E402
from sdjax.coreml import export as cx, interp, mil, vae as cvae  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
FLOOR = {"float32": 60, "float16": 35}
MEASURED = {}


@pytest.mark.parametrize("style", ["sd1", "sd2"])
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_every_component_matches_sdjax(pipeline_dirs, tmp_path, style, precision):
    pipe = sdjax.load(pipeline_dirs(style)[0], progress=False)
    out = tmp_path / "cm"
    cx.export_pipeline(pipe, out, cx.Settings(compute_precision=precision), progress=False, log=lambda *a: None)
    rng = np.random.default_rng(0)
    got, want = {}, {}

    # text encoder: the ids the Swift package feeds (as float32)
    tc = pipe.configs["text_encoder"]
    ids = pipe.tokenizer(["a red circle on a white background"])
    o = interp.run(interp.load_program(out / "TextEncoder.mlpackage"), {"input_ids": ids.astype(np.float32)})
    last, _, pooled = sdjax.clip.apply(pipe.params["text_encoder"], tc, ids)
    got["text last"], want["text last"] = o["last_hidden_state"], np.asarray(last)
    got["text pooled"], want["text pooled"] = o["pooled_outputs"], np.asarray(pooled)

    # UNet: batch 2, the context in the (B, D, 1, L) layout
    uc = pipe.configs["unet"]
    h, w = cvae.default_latent_shape(pipe.configs["vae"])
    sample = rng.standard_normal((2, uc.in_channels, h, w)).astype(np.float32)
    t = np.array([999.0, 1.0], np.float32)
    ctx = rng.standard_normal((2, 77, uc.cross_attention_dim)).astype(np.float32)
    o = interp.run(interp.load_program(out / "Unet.mlpackage"),
                   {"sample": sample, "timestep": t, "encoder_hidden_states": ctx.transpose(0, 2, 1)[:, :, None]})
    ref = sdjax.unet.apply(pipe.params["unet"], uc, sample.transpose(0, 2, 3, 1), t, ctx)
    got["unet"], want["unet"] = o["noise_pred"], np.asarray(ref).transpose(0, 3, 1, 2)

    # VAE decoder (z = latents / 0.18215, as Decoder.swift divides) and encoder (image in [-1, 1])
    vc = pipe.configs["vae"]
    latents = rng.standard_normal((1, vc.latent_channels, h, w)).astype(np.float32)
    o = interp.run(interp.load_program(out / "VAEDecoder.mlpackage"), {"z": latents / cvae.SWIFT_SCALING_FACTOR})
    ref = sdjax.vae.decode(pipe.params["vae"], vc, latents.transpose(0, 2, 3, 1) / vc.scaling_factor)
    got["vae decoder"], want["vae decoder"] = o["image"], np.asarray(ref).transpose(0, 3, 1, 2)
    f = pipe.vae_scale_factor
    image = np.tanh(rng.standard_normal((1, 3, h * f, w * f))).astype(np.float32)
    o = interp.run(interp.load_program(out / "VAEEncoder.mlpackage"), {"x": image})
    mean, logvar = sdjax.vae.encode(pipe.params["vae"], vc, image.transpose(0, 2, 3, 1))
    r = vc.scaling_factor / cvae.SWIFT_SCALING_FACTOR
    moments = np.concatenate([np.asarray(mean) * r, np.clip(np.asarray(logvar), -30, 20) + 2 * np.log(r)], -1)
    got["vae encoder"], want["vae encoder"] = o["latent"], moments.transpose(0, 3, 1, 2)

    for k in got:
        assert got[k].shape == want[k].shape, k
        MEASURED[f"{style} {precision} {k}"] = p = mil.psnr(want[k], got[k])
        assert p >= FLOOR[precision], (k, p)


def test_print_measured():
    print("\nCore ML tiny pipelines, PSNR vs sdjax (dB):", {k: round(v, 1) for k, v in MEASURED.items()})
