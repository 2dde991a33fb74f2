"""ControlNet generation end to end against diffusers' StableDiffusionControlNet{,Img2Img}Pipeline (every
sampler), MultiControlNetModel (per-net scales, guidance windows and resized control images) and
StableDiffusionXLControlNet{,Img2Img}Pipeline on tiny random models; the CLI; bad input.

The SD model has one level (a small program to compile once per sampler); img2img runs as many model
calls as txt2img (8 steps at strength 0.5 against 4), so it reuses txt2img's compiled step."""
import os

import numpy as np
import pytest
import torch

import sdjax
import tiny_models
from sdjax import control as control_nets, generate as gen
from sdjax.images import ImageError
from tiny_models import DIFFUSERS_SCHEDULERS, psnr
import test_generate as sd_tests  # noqa: E402  (the SD parity helpers: schedulers, injected noise)
from controlnet_fixtures import build_controlnet, control_image

PSNR_MIN = sd_tests.PSNR_MIN
PROMPTS, NEGATIVE = sd_tests.PROMPTS, sd_tests.NEGATIVE
H, W = 32, 48
LATENT = (2, H // 2, W // 2, 4)  # the tiny VAE halves each side
STEPS, I2I_STEPS, STRENGTH = 4, 8, 0.5  # img2img: the same number of model calls as txt2img
SCALE, START, END = 0.8, 0.1, 0.8  # a guidance window that switches the ControlNet off at some calls

ONE_LEVEL = dict(tiny_models.STYLES["sd1"], unet=dict(
    tiny_models.STYLES["sd1"]["unet"], block_out_channels=(32,), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)))
SMALL_SDXL = dict(tiny_models.SDXL_STYLES["sdxl"], unet=dict(tiny_models.SDXL_STYLES["sdxl"]["unet"],
                                                             layers_per_block=1))
FIGURES = {}  # test id -> PSNR (dB), printed at the end of the module for the README


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if FIGURES:
        print("\nControlNet parity (image PSNR, dB): " + ", ".join(f"{k} {v:.1f}" for k, v in FIGURES.items()))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (folder, diffusers pipeline, sdjax pipeline, [diffusers ControlNets], [sdjax ControlNets],
    [ControlNet folders]), built on first use: "sd" (one level, two ControlNets), "sdxl" (two levels, one)."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = str(tmp_path_factory.mktemp(name))
            if name == "sd":
                ref = tiny_models.build_pipeline(folder, ONE_LEVEL)
            else:
                ref = tiny_models.build_sdxl_pipeline(folder, SMALL_SDXL)
            ref.set_progress_bar_config(disable=True)
            nets, ours, dirs = [], [], []
            for seed in range(2 if name == "sd" else 1):
                dirs.append(str(tmp_path_factory.mktemp(f"{name}-cn{seed}")))
                nets.append(build_controlnet(ref.unet, dirs[-1], seed=10 + seed))
                ours.append(sdjax.load_controlnet(dirs[-1], progress=False))
            cache[name] = (folder, ref, sdjax.load(folder, progress=False), nets, ours, dirs)
        return cache[name]
    return get


def _diffusers(cls_name, ref, nets, **kw):
    import diffusers
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    cn = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    p = getattr(diffusers, cls_name)(**ref.components, controlnet=cn, **kw)
    p.set_progress_bar_config(disable=True)
    return p


def _sd_pipelines(models, kind, sampler, monkeypatch, seed):
    folder, ref, pipe, nets, ours, _ = models(kind)
    sd = kind == "sd"
    cls = {("sd", False): "StableDiffusionControlNetPipeline", ("sd", True): "StableDiffusionControlNetImg2ImgPipeline",
           ("sdxl", False): "StableDiffusionXLControlNetPipeline",
           ("sdxl", True): "StableDiffusionXLControlNetImg2ImgPipeline"}
    extra = {} if sd else {"add_watermarker": False}
    sd_tests._inject_step_noise(monkeypatch, sampler, seed, LATENT)
    out = {}
    for i2i in (False, True):
        p = _diffusers(cls[kind, i2i], ref, nets[:1], **extra)
        p.scheduler = sd_tests._scheduler(folder, sampler)
        out[i2i] = p
    return pipe, ours[0], out


def _i2i_patches(monkeypatch, cls_module, noise):
    """diffusers samples the VAE's latent distribution (sdjax takes its mean) and draws the img2img noise
    with randn_tensor: give both sides the same."""
    sd_tests._mean_latents(monkeypatch, cls_module)
    monkeypatch.setattr(cls_module, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise))


def _check(name, got, want):
    assert got.shape == want.shape
    FIGURES[name] = psnr(got, want)
    assert FIGURES[name] >= PSNR_MIN, FIGURES[name]


@pytest.mark.parametrize("sampler", list(DIFFUSERS_SCHEDULERS))
def test_txt2img_and_img2img_match_diffusers(models, monkeypatch, sampler):
    """txt2img: the output size from the control image (no height/width given, as diffusers); img2img with
    its init image and control image (the init image fixes the size)."""
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as i2i_mod
    seed = 3
    pipe, net, ref = _sd_pipelines(models, "sd", sampler, monkeypatch, seed)
    ctl = control_image(H, W, seed=1)
    x_t = sd_tests._latents(pipe, 2, H, W, seed=0)
    kw = dict(negative_prompt=NEGATIVE, guidance_scale=6.0, controlnet_conditioning_scale=SCALE,
              control_guidance_start=START, control_guidance_end=END)
    mine = dict(sampler=sampler, seed=seed, output_type="np", progress=False, controlnet=net, control_image=ctl, **kw)
    with torch.no_grad():
        want = ref[False](PROMPTS, image=ctl, num_inference_steps=STEPS, latents=torch.from_numpy(x_t),
                          output_type="np", **kw).images
    _check(f"txt2img-{sampler}", pipe.generate(PROMPTS, steps=STEPS, latents=x_t, **mine), want)
    if sampler == "ddim":  # the ControlNet's residuals change the image: its parity is tested above
        with torch.no_grad():
            plain = _plain_pipeline(models)(PROMPTS, negative_prompt=NEGATIVE, guidance_scale=6.0, height=H, width=W,
                                              num_inference_steps=STEPS, latents=torch.from_numpy(x_t),
                                              output_type="np").images
        assert psnr(plain, want) < 40

    init = control_image(H, W, seed=2, block=8)
    noise = sd_tests._latents(pipe, 2, H, W, seed=4)
    _i2i_patches(monkeypatch, i2i_mod, noise)
    sd_tests._inject_step_noise(monkeypatch, sampler, seed, LATENT)
    n = gen.denoise_step._cache_size()
    with torch.no_grad():
        want = ref[True](PROMPTS, image=init, control_image=ctl, strength=STRENGTH, num_inference_steps=I2I_STEPS,
                         output_type="np", **kw).images
    got = pipe.generate(PROMPTS, steps=I2I_STEPS, init_image=init, strength=STRENGTH, latents=noise, **mine)
    assert gen.denoise_step._cache_size() == n  # img2img reused txt2img's program
    _check(f"img2img-{sampler}", got, want)


def _plain_pipeline(models):
    from diffusers import StableDiffusionPipeline
    folder, ref, *_ = models("sd")
    p = StableDiffusionPipeline(**ref.components)
    p.set_progress_bar_config(disable=True)
    p.scheduler = sd_tests._scheduler(folder, "ddim")
    return p


def test_multi_controlnet_matches_diffusers(models, monkeypatch):
    """Two ControlNets (MultiControlNetModel): per-net scales and guidance windows, control images per
    prompt (diffusers' nested lists: per prompt, an image per ControlNet) of other sizes than the output:
    PIL images for the first (Lanczos-resized), float arrays for the second (nearest-resized as torch does)."""
    folder, ref, pipe, nets, ours, _ = models("sd")
    sampler, seed, h, w = "dpmpp_2m", 5, 32, 32
    p = _diffusers("StableDiffusionControlNetPipeline", ref, nets)
    p.scheduler = sd_tests._scheduler(folder, sampler)
    first = [control_image(44, 40, seed=3 + i, block=2) for i in range(len(PROMPTS))]
    g = np.random.default_rng(6)
    second = [g.random((20, 24, 3)).astype(np.float32) for _ in PROMPTS]
    images = [list(pair) for pair in zip(first, second)]
    x_t = sd_tests._latents(pipe, 2, h, w, seed=7)
    kw = dict(negative_prompt=NEGATIVE, guidance_scale=5.0, height=h, width=w, controlnet_conditioning_scale=[0.6, 1.3],
              control_guidance_start=[0.0, 0.2], control_guidance_end=[1.0, 0.9])
    with torch.no_grad():
        want = p(PROMPTS, image=images, num_inference_steps=5, latents=torch.from_numpy(x_t), output_type="np",
                 **kw).images
    got = pipe.generate(PROMPTS, steps=5, sampler=sampler, seed=seed, latents=x_t, output_type="np", progress=False,
                        controlnet=ours, control_image=images, **kw)
    _check("multi-dpmpp_2m", got, want)
    # each ControlNet counts: either alone is far from both
    with torch.no_grad():
        one = _diffusers("StableDiffusionControlNetPipeline", ref, nets[:1])
        one.scheduler = p.scheduler
        alone = one(PROMPTS, image=first, num_inference_steps=5, latents=torch.from_numpy(x_t), output_type="np",
                    **dict(kw, controlnet_conditioning_scale=0.6, control_guidance_start=0.0,
                           control_guidance_end=1.0)).images
    assert psnr(alone, want) < 40


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sdxl_txt2img_and_img2img_match_diffusers(models, monkeypatch, sampler):
    """The ControlNet takes SDXL's text_time conditioning (pooled embeds, time ids) as the UNet does."""
    from diffusers.pipelines.controlnet import pipeline_controlnet_sd_xl_img2img as i2i_mod
    seed = 2
    pipe, net, ref = _sd_pipelines(models, "sdxl", sampler, monkeypatch, seed)
    ctl = control_image(H, W, seed=5)
    x_t = sd_tests._latents(pipe, 2, H, W, seed=8)
    kw = dict(negative_prompt=NEGATIVE, guidance_scale=5.0, controlnet_conditioning_scale=SCALE,
              control_guidance_end=END)
    mine = dict(sampler=sampler, seed=seed, output_type="np", progress=False, controlnet=net, control_image=ctl, **kw)
    with torch.no_grad():
        want = ref[False](PROMPTS, image=ctl, num_inference_steps=STEPS, latents=torch.from_numpy(x_t),
                          output_type="np", **kw).images
    _check(f"sdxl-txt2img-{sampler}", pipe.generate(PROMPTS, steps=STEPS, latents=x_t, **mine), want)
    init = control_image(H, W, seed=6, block=8)
    noise = sd_tests._latents(pipe, 2, H, W, seed=9)
    _i2i_patches(monkeypatch, i2i_mod, noise)
    sd_tests._inject_step_noise(monkeypatch, sampler, seed, LATENT)
    with torch.no_grad():
        want = ref[True](PROMPTS, image=init, control_image=ctl, strength=STRENGTH, num_inference_steps=I2I_STEPS,
                         output_type="np", **kw).images
    got = pipe.generate(PROMPTS, steps=I2I_STEPS, init_image=init, strength=STRENGTH, latents=noise, **mine)
    _check(f"sdxl-img2img-{sampler}", got, want)


# --- the command line ---------------------------------------------------------------------------------

def test_cli_equals_the_api(models, tmp_path, capsys):
    from sdjax.cli import main
    folder, _, pipe, _, ours, cn_dirs = models("sd")
    ctl = tmp_path / "ctl.png"
    control_image(H, W, seed=1).save(ctl)
    xt = tmp_path / "xt.npy"
    np.save(xt, sd_tests._latents(pipe, 2, H, W, seed=0))
    out = tmp_path / "x.npy"
    args = ["generate", "--model", folder, "--prompt", PROMPTS[0], "--batch-size", "2", "--steps", str(STEPS),
            "--sampler", "ddim", "--latents", str(xt), "--controlnet", cn_dirs[0], "--control-image", str(ctl),
            "--control-scale", "0.7", "-q", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    want = pipe.generate([PROMPTS[0]] * 2, steps=STEPS, sampler="ddim", latents=np.load(xt), output_type="np",
                         progress=False, controlnet=ours[0], control_image=str(ctl), controlnet_conditioning_scale=0.7)
    np.testing.assert_array_equal(np.load(out), want)
    png = tmp_path / "x.png"
    assert main(args[:-1] + [str(png)]) == 0
    from PIL import Image
    meta = Image.open(tmp_path / "x-0.png").text
    assert meta["controlnet"] == cn_dirs[0] and meta["control_image"] == str(ctl) and meta["control_scale"] == "0.7"


@pytest.mark.parametrize("extra,message", [
    (["--control-image", "C"], "--control-image: given without --controlnet"),
    (["--controlnet", "N"], "--controlnet: needs --control-image"),
    (["--controlnet", "N", "--controlnet", "N", "--control-image", "C"], "1 --control-image for 2 --controlnet"),
    (["--controlnet", "N", "--control-image", "C", "--control-scale", "1", "--control-scale", "2"],
     "2 --control-scale values for 1 --controlnet"),
    (["--controlnet", "missing", "--control-image", "C"], "missing: no such ControlNet file or folder"),
    (["--controlnet", "N", "--control-image", "missing.png"], "missing.png: file not found"),
])
def test_cli_usage_errors(models, tmp_path, capsys, extra, message):
    from sdjax.cli import main
    folder, *_, cn_dirs = models("sd")
    cn_dir = cn_dirs[0]
    control_image(H, W).save(tmp_path / "c.png")
    sub = {"N": cn_dir, "C": str(tmp_path / "c.png"), "missing.png": str(tmp_path / "missing.png")}
    args = ["generate", "--model", folder, "--prompt", "a cat", "--steps", "2", "-q", "--out", str(tmp_path / "o.png")]
    rc = main(args + [sub.get(a, a) for a in extra])
    err = capsys.readouterr().err
    assert rc in (1, 2) and message in err, err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "o.png")


# --- bad input ------------------------------------------------------------------------------------------

def _bad(models, **kw):
    _, _, pipe, _, ours, _ = models("sd")
    return pipe, dict(dict(steps=2, progress=False, controlnet=ours[0], control_image=control_image(H, W)), **kw)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(controlnet=None), control_nets.ControlError, "control_image: given without a controlnet"),
    (dict(control_image=None), control_nets.ControlError, "control_image: a ControlNet needs a control image"),
    (dict(controlnet="x"), control_nets.ControlError, r"controlnet: expected a \(params, ControlNetConfig\) pair"),
    (dict(controlnet_conditioning_scale=[1.0, 2.0]), control_nets.ControlError,
     "controlnet_conditioning_scale: 2 values for 1 ControlNet"),
    (dict(controlnet_conditioning_scale=float("nan")), control_nets.ControlError, "must be finite"),
    (dict(control_guidance_start=0.5, control_guidance_end=0.5), control_nets.ControlError,
     "need 0 <= start < end <= 1"),
    (dict(control_image=np.zeros((H, W, 4), np.float32)), ImageError,
     "control image: has 4 channels, the ControlNet reads 3"),
    (dict(control_image=np.zeros((H, W), np.float32)), ImageError,
     r"expected an \(H, W, C\) array, got shape \(32, 48\)"),
    (dict(control_image=[np.zeros((H, W, 3), np.float32)] * 3), control_nets.ControlError,
     "control image: 3 images for 2 prompts"),
    (dict(control_image=5), control_nets.ControlError, "expected a path, a PIL image or an"),
    (dict(mask=np.zeros((H, W)), init_image=np.zeros((H, W, 3), np.float32)), gen.GenerationError,
     "mask: not implemented with a ControlNet"),
])
def test_bad_arguments_are_named_before_any_work(models, monkeypatch, kwargs, error, match):
    pipe, kw = _bad(models, **kwargs)

    def no_work(*a, **k):
        raise AssertionError("encoded prompts before the error")
    monkeypatch.setattr(pipe, "encode_prompt", no_work)
    with pytest.raises(error, match=match):
        pipe.generate(PROMPTS, **kw)


def test_misfit_controlnets_are_refused_before_any_work(models, monkeypatch, tmp_path):
    """An SD ControlNet on an SDXL model, and a ControlNet whose conditioning embedding halves the image
    three times for a VAE that halves it once."""
    _, ref, sd_pipe, _, ours, _ = models("sd")
    _, _, sdxl_pipe, *_ = models("sdxl")
    monkeypatch.setattr(gen.conditioning, "encode", lambda *a, **k: pytest.fail("encoded prompts"))
    with pytest.raises(control_nets.ControlError, match="controlnet: this ControlNet does not fit the UNet: "
                                                        "cross_attention_dim 32, the UNet's is 80"):
        sdxl_pipe.generate(PROMPTS, steps=2, progress=False, controlnet=ours[0], control_image=control_image(H, W))
    build_controlnet(ref.unet, str(tmp_path / "deep"), cond_channels=(8, 8, 8, 8))
    net = sdjax.load_controlnet(str(tmp_path / "deep"), progress=False)
    monkeypatch.setattr(sd_pipe, "encode_prompt", lambda *a, **k: pytest.fail("encoded prompts"))
    with pytest.raises(control_nets.ControlError, match="downscales control images 8x, so 32x48 images need 4x6 "
                                                        "latents, the VAE's are 16x24"):
        sd_pipe.generate(PROMPTS, steps=2, progress=False, controlnet=net, control_image=control_image(H, W))
