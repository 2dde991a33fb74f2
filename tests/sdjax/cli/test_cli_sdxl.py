"""sdjax generate with SDXL models: micro-conditioning flags, guidance rescale, the base + refiner
ensemble (--refiner, --denoising-end), and the usage errors for flags a model does not take."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdjax
from sdjax.cli import main

H, W = 32, 32


def _xt(path, batch=1, seed=0):
    x = np.random.default_rng(seed).standard_normal((batch, 4, H // 2, W // 2)).astype(np.float32)
    np.save(path, x)
    return x


def test_micro_conditioning_flags_reach_the_library(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sdxl")
    x = _xt(tmp_path / "xt.npy")
    out = tmp_path / "a.npy"
    rc = main(["generate", "--model", folder, "--prompt", "a red circle", "--steps", "3", "--sampler", "euler",
               "--height", str(H), "--width", str(W), "--latents", str(tmp_path / "xt.npy"), "--original-size", "64,48",
               "--crops-coords-top-left", "4,8", "--target-size", "32,32", "--negative-original-size", "16,16",
               "--negative-crops-coords-top-left", "0,2", "--negative-target-size", "24,24",
               "--guidance-rescale", "0.5", "--out", str(out), "-q"])
    assert rc == 0
    want = sdjax.load(folder, progress=False).generate(
        ["a red circle"], steps=3, sampler="euler", height=H, width=W, latents=x, output_type="np", progress=False,
        original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(32, 32), negative_original_size=(16, 16),
        negative_crops_coords_top_left=(0, 2), negative_target_size=(24, 24), guidance_rescale=0.5)
    np.testing.assert_array_equal(np.load(out), want)


def test_refiner_ensemble_matches_the_library_and_png_says_so(pipeline_dirs, tmp_path):
    base_dir, _ = pipeline_dirs("sdxl")
    refiner_dir, _ = pipeline_dirs("sdxl-refiner")
    x = _xt(tmp_path / "xt.npy", batch=2)
    args = ["generate", "--model", base_dir, "--refiner", refiner_dir, "--denoising-end", "0.7", "--prompt", "a cat",
            "--negative-prompt", "green", "--steps", "6", "--sampler", "dpmpp_2m", "--seed", "3", "--height", str(H),
            "--width", str(W), "--latents", str(tmp_path / "xt.npy"), "--batch-size", "2", "--aesthetic-score", "5",
            "--original-size", "64,64", "-q"]
    assert main([*args, "--out", str(tmp_path / "e.npy")]) == 0
    base, refiner = sdjax.load(base_dir, progress=False), sdjax.load(refiner_dir, progress=False)
    kw = dict(negative_prompt="green", steps=6, sampler="dpmpp_2m", seed=3, progress=False, original_size=(64, 64))
    lat = base.generate(["a cat"] * 2, height=H, width=W, latents=x, denoising_end=0.7, output_type="latent", **kw)
    want = refiner.generate(["a cat"] * 2, init_latents=lat, denoising_start=0.7, aesthetic_score=5.0,
                            output_type="np", **kw)
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), want)
    assert main([*args, "--out", str(tmp_path / "e.png")]) == 0
    meta = Image.open(tmp_path / "e-0.png").text
    assert meta["refiner"] == refiner_dir and meta["denoising_end"] == "0.7"
    assert meta["aesthetic_score"] == "5.0" and meta["original_size"] == "64,64"


def test_refiner_default_cut_and_refiner_img2img(pipeline_dirs, tmp_path):
    base_dir, _ = pipeline_dirs("sdxl")
    refiner_dir, _ = pipeline_dirs("sdxl-refiner")
    common = ["--prompt", "a cat", "--steps", "5", "--sampler", "euler", "--height", str(H), "--width", str(W), "-q"]
    assert main(["generate", "--model", base_dir, "--refiner", refiner_dir, *common,
                 "--out", str(tmp_path / "d.png")]) == 0
    assert Image.open(tmp_path / "d.png").text["denoising_end"] == "0.8"
    # a refiner on its own refines an image (diffusers' StableDiffusionXLImg2ImgPipeline)
    assert main(["generate", "--model", refiner_dir, *common, "--init-image", str(tmp_path / "d.png"),
                 "--strength", "0.3", "--aesthetic-score", "7", "--out", str(tmp_path / "r.png")]) == 0


@pytest.mark.parametrize("style,extra,message", [
    ("sd1", ["--original-size", "64,64"], "--original-size: only applies to SDXL models"),
    ("sd1", ["--aesthetic-score", "6"], "--aesthetic-score: only applies to SDXL models"),
    ("sdxl-refiner", [], "this is a refiner (5 time ids): pass it with --refiner"),
    ("sdxl", ["--aesthetic-score", "6"], "--aesthetic-score: only the SDXL refiner takes it; pass one with --refiner"),
    ("sdxl", ["--refiner", "BASE"], "not an SDXL refiner (5 time ids); it is an SDXL base (6 time ids)"),
    ("sdxl", ["--refiner", "SD1"], "not an SDXL refiner (5 time ids); it is an SD 1.x/2.x model"),
    ("sd1", ["--refiner", "REFINER"], "--refiner: only applies to SDXL models"),
    ("sdxl", ["--denoising-end", "0.5"], "--denoising-end: only with --refiner"),
    ("sdxl", ["--refiner", "REFINER", "--denoising-end", "1.5"], "--denoising-end 1.5: must be a fraction"),
    ("sdxl", ["--guidance-rescale", "2"], "guidance_rescale=2.0: must be in [0, 1]"),
    ("sdxl-refiner", ["--init-image", "IMG", "--target-size", "32,32"], "--target-size: only the SDXL base takes it"),
])
def test_flags_a_model_does_not_take_are_named(pipeline_dirs, tmp_path, capsys, style, extra, message):
    dirs = {"BASE": pipeline_dirs("sdxl")[0], "SD1": pipeline_dirs("sd1")[0],
            "REFINER": pipeline_dirs("sdxl-refiner")[0], "IMG": str(tmp_path / "i.png")}
    Image.new("RGB", (W, H)).save(tmp_path / "i.png")
    out = tmp_path / "o.png"
    rc = main(["generate", "--model", pipeline_dirs(style)[0], "--prompt", "a cat", "--steps", "2", "--height", str(H),
               "--width", str(W), "-q", "--out", str(out), *[dirs.get(a, a) for a in extra]])
    assert rc == 2 and message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--original-size", "64", "'64': expected H,W, two integers (got 1)"),
    ("--target-size", "64,48,2", "expected H,W, two integers (got 3)"),
    ("--original-size", "64,x", "'64,x': expected H,W, two integers separated by a comma"),
    ("--crops-coords-top-left", "-1,0", "both values must be >= 0"),
    ("--negative-original-size", "0,64", "both values must be >= 1"),
    ("--guidance-rescale", "nan", "is not a finite number"),
    ("--aesthetic-score", "inf", "is not a finite number"),
    ("--denoising-end", "x", "is not a number"),
])
def test_bad_values_exit_2_naming_the_flag(tmp_path, flag, value, message):
    out = tmp_path / "o.png"
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", "--prompt", "a cat", f"{flag}={value}",
                        "--out", str(out), "-q"], capture_output=True, text=True)
    assert r.returncode == 2 and f"argument {flag}" in r.stderr and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_help_describes_every_sdxl_flag():
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", "--help"], capture_output=True, text=True)
    text = " ".join(r.stdout.split())
    for flag in ("--original-size H,W", "--crops-coords-top-left Y,X", "--target-size H,W",
                 "--negative-original-size H,W", "--negative-crops-coords-top-left Y,X", "--negative-target-size H,W",
                 "--guidance-rescale F", "--aesthetic-score S", "--negative-aesthetic-score S", "--refiner MODEL",
                 "--denoising-end F"):
        assert flag in text, flag
    assert "ensemble of experts" in text and "refiner only" in text and "base only" in text
