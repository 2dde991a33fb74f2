"""``sdjax verify-coreml`` (sdjax.coreml.verify) on packages sdjax exports for the tiny diffusers
pipelines: every component found by its Swift name (chunks paired, ``controlnet/NAME`` matched to
its ControlNet) or by torch2coreml's file names, checked against the float model; a package with
a corrupted weight fails, a package of another model is named with the input that does not fit,
a folder with nothing to read (or only compiled .mlmodelc) is refused with the reason."""
import os
import shutil
import struct
import sys

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import sdjax  # noqa: E402
from sdjax.cli import main  # noqa: E402
from sdjax.coreml import export as cx, vae as cvae, verify  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/sdjax: the ControlNet fixtures
from controlnet_fixtures import build_controlnet_one_thread  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
MEASURED = {}


@pytest.fixture(scope="module")
def sd1(pipeline_dirs, tmp_path_factory):
    """(model folder, ControlNet folder, export folder): the tiny SD 1.x pipeline with a ControlNet,
    through ``sdjax export-coreml`` at float16 with --chunk-unet: TextEncoder, UnetChunk1/2,
    ControlledUnetChunk1/2, controlnet/canny, VAEDecoder, VAEEncoder."""
    folder, diffusers_pipe = pipeline_dirs("sd1")
    cn = str(tmp_path_factory.mktemp("cn") / "canny")
    build_controlnet_one_thread(diffusers_pipe.unet, cn, seed=5, cond_channels=(8, 16))
    out = str(tmp_path_factory.mktemp("verify") / "coreml")
    assert main(["export-coreml", "-m", folder, "--controlnet", cn, "--chunk-unet", "-o", out, "-q"]) == 0
    return folder, cn, out


def test_every_component_of_an_export_passes(sd1):
    folder, cn, out = sd1
    pipe = sdjax.load(folder, progress=False)
    packages, skipped = verify.find_packages(out)
    assert not skipped
    by_label = {p.label: p for p in packages}
    assert set(by_label) == {"TextEncoder.mlpackage", "UnetChunk1.mlpackage + UnetChunk2.mlpackage",
                             "ControlledUnetChunk1.mlpackage + ControlledUnetChunk2.mlpackage",
                             os.path.join("controlnet", "canny.mlpackage"), "VAEDecoder.mlpackage",
                             "VAEEncoder.mlpackage"}
    assert by_label[os.path.join("controlnet", "canny.mlpackage")].role == "controlnet"
    results = verify.verify(out, pipe, controlnets={"canny": sdjax.load_controlnet(cn, progress=False)}, fp16=True,
                            progress=False)
    for r in results:
        assert not r.error, r.error
        assert set(r.psnr) == set(r.psnr16)
        for k in r.psnr:
            MEASURED[f"sd1 float16 package {r.label} {k}"] = (round(r.psnr[k], 1), round(r.psnr16[k], 1))
        assert r.passed(verify.DEFAULT_MIN_PSNR), (r.label, r.psnr, r.psnr16)
    outs = {r.label: set(r.psnr) for r in results}
    assert outs["TextEncoder.mlpackage"] == {"last_hidden_state", "pooled_outputs"}
    assert len(outs[os.path.join("controlnet", "canny.mlpackage")]) == 7  # 6 skips + the mid block
    assert "all 6 passed" in verify.table(results)


def test_cli_exit_status_and_table(sd1, capsys):
    """The model and ControlNet come from sdjax_export.json; 0 when every output is above --min-psnr, 1 below it."""
    out = sd1[2]
    assert main(["verify-coreml", os.path.join(out, "VAEDecoder.mlpackage"), "-m", sd1[0], "-q"]) == 0
    text = capsys.readouterr().out
    assert "VAEDecoder.mlpackage" in text and "image" in text and "all 1 passed (>= 35 dB)" in text
    assert main(["verify-coreml", out, "--min-psnr", "200", "-q"]) == 1  # the ControlNet from sdjax_export.json too
    text = capsys.readouterr().out
    assert "FAILED (below 200 dB" in text and "additional_residual_6" in text and "error" not in text


def _zero_largest_blob(package):
    """Overwrite the data of the biggest weight in ``package``'s weight.bin with zeros (the blob
    headers stay valid: the package still loads)."""
    path = os.path.join(package, "Data", "com.apple.CoreML", "weights", "weight.bin")
    with open(path, "r+b") as f:
        data = f.read()
        pos, blobs = 64, []
        while pos < len(data):
            sentinel, _, size, offset = struct.unpack_from("<IIQQ", data, pos)
            assert sentinel == 0xDEADBEEF
            blobs.append((size, offset))
            pos = -(-(offset + size) // 64) * 64
        size, offset = max(blobs)
        f.seek(offset)
        f.write(bytes(size))


def test_corrupted_weight_fails(sd1, tmp_path, capsys):
    folder, _, out = sd1
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copytree(os.path.join(out, "VAEDecoder.mlpackage"), bad / "VAEDecoder.mlpackage")
    _zero_largest_blob(bad / "VAEDecoder.mlpackage")
    (r,) = verify.verify(bad, sdjax.load(folder, progress=False), progress=False)
    assert not r.error and r.psnr["image"] < 25, r.psnr
    assert main(["verify-coreml", str(bad), "-m", folder, "-q"]) == 1
    assert "FAILED (below 35 dB or not checked): VAEDecoder.mlpackage" in capsys.readouterr().out


def test_package_of_another_model_is_named(sd1, pipeline_dirs, capsys):
    """sd1's packages against the SD 2.x-style tiny model (48-wide text, 3 levels): each error names the
    package and the input that does not fit; nothing is compared."""
    other = pipeline_dirs("sd2")[0]
    assert main(["verify-coreml", sd1[2], "-m", other, "--controlnet", sd1[1], "-q"]) == 1
    text = capsys.readouterr().out
    assert ("error: UnetChunk1.mlpackage + UnetChunk2.mlpackage: input 'encoder_hidden_states' has shape "
            "(2, 32, 1, 77), but the UNet cross-attends to (B, 48, 1, L): a package of another model?") in text
    results = verify.verify(sd1[2], sdjax.load(other, progress=False), progress=False)
    assert all(r.error and not r.psnr for r in results if "Unet" in r.label)
    enc = next(r for r in results if r.label == "TextEncoder.mlpackage")
    assert enc.error or enc.worst() < 35  # same input shape, other weights: at most a low PSNR


def test_empty_or_compiled_folder_is_refused(tmp_path, capsys):
    assert main(["verify-coreml", str(tmp_path), "-m", str(tmp_path), "-q"]) == 2
    assert "no Core ML packages to check (no .mlpackage files)" in capsys.readouterr().err
    (tmp_path / "Unet.mlmodelc").mkdir()
    assert main(["verify-coreml", str(tmp_path), "-m", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "Unet.mlmodelc: Core ML's compiled format (.mlmodelc) cannot be read outside Apple's runtime" in err
    assert main(["verify-coreml", str(tmp_path / "missing"), "-m", str(tmp_path), "-q"]) == 2


def test_torch2coreml_file_names(tmp_path):
    """The names apple/ml-stable-diffusion's torch2coreml writes (before bundling for Swift): roles from the
    suffix, chunks paired, ControlNet_<name> matched, the safety checker and compiled models skipped."""
    stem = "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5"
    for n in ["text_encoder", "text_encoder_2", "unet_chunk1", "unet_chunk2", "control-unet", "refiner",
              "vae_decoder", "vae_encoder", "safety_checker"]:
        (tmp_path / f"{stem}_{n}.mlpackage").mkdir()
    (tmp_path / "ControlNet_lllyasviel_sd-controlnet-canny.mlpackage").mkdir()
    (tmp_path / "Resources").mkdir()
    (tmp_path / "Resources" / "Unet.mlmodelc").mkdir()
    packages, skipped = verify.find_packages(tmp_path)
    roles = {p.label: p.role for p in packages}
    assert roles == {f"{stem}_text_encoder.mlpackage": "text_encoder", f"{stem}_text_encoder_2.mlpackage": "text_encoder_2",
                     f"{stem}_unet_chunk1.mlpackage + {stem}_unet_chunk2.mlpackage": "unet",
                     f"{stem}_control-unet.mlpackage": "unet", f"{stem}_refiner.mlpackage": "refiner",
                     f"{stem}_vae_decoder.mlpackage": "vae_decoder", f"{stem}_vae_encoder.mlpackage": "vae_encoder",
                     "ControlNet_lllyasviel_sd-controlnet-canny.mlpackage": "controlnet"}
    assert next(p for p in packages if p.role == "controlnet").name == "lllyasviel_sd-controlnet-canny"
    assert sorted(os.path.basename(p) for p, _ in skipped) == sorted(["Unet.mlmodelc", f"{stem}_safety_checker.mlpackage"])


def test_renamed_packages_found_by_name_or_inputs(sd1, tmp_path):
    """sdjax's packages under torch2coreml's names, and under names nobody uses (found by their inputs)."""
    folder, _, out = sd1
    shutil.copytree(os.path.join(out, "VAEEncoder.mlpackage"), tmp_path / "Stable_Diffusion_version_x_vae_encoder.mlpackage")
    shutil.copytree(os.path.join(out, "TextEncoder.mlpackage"), tmp_path / "my_text_model.mlpackage")
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3))])
    def other(foo):
        return mb.relu(x=foo, name="bar")
    ct.convert(other, convert_to="mlprogram", skip_model_load=True).save(str(tmp_path / "Other.mlpackage"))
    results = verify.verify(tmp_path, sdjax.load(folder, progress=False), progress=False)
    assert {r.label: r.passed(35) for r in results} == {"Stable_Diffusion_version_x_vae_encoder.mlpackage": True,
                                                         "my_text_model.mlpackage": True, "Other.mlpackage": False}
    assert next(r.error for r in results if r.label == "Other.mlpackage").endswith(
        "Other.mlpackage: not a Stable Diffusion component (inputs ['foo'])")


def test_vae_checked_as_swift_scales_it(tmp_path):
    """The embedded model's VAE (scaling_factor 0.599): its packages rescale for Swift's 0.18215, and the check
    feeds them as Swift does (z = latents / 0.18215)."""
    pipe = sdjax.load(None, progress=False)
    assert abs(pipe.configs["vae"].scaling_factor - cvae.SWIFT_SCALING_FACTOR) > 0.1
    cvae.export_decoder(pipe.params["vae"], pipe.configs["vae"], tmp_path / "VAEDecoder.mlpackage")
    cvae.export_encoder(pipe.params["vae"], pipe.configs["vae"], tmp_path / "VAEEncoder.mlpackage")
    for r in verify.verify(tmp_path, pipe, progress=False):
        MEASURED[f"embedded float32 {r.label}"] = round(r.worst(), 1)
        assert r.passed(60), (r.label, r.psnr, r.error)


@pytest.mark.slow  # kept out of CI for time (the CI suite must stay under 30 min); run with -m slow
def test_sdxl_export_passes(pipeline_dirs, tmp_path):
    """SDXL: TextEncoder (hidden_embeds) and TextEncoder2 (projected pooled_outputs), the UNet's time_ids and
    text_embeds, the VAE for Swift's 0.13025, at float32."""
    folder = pipeline_dirs("sdxl")[0]
    pipe = sdjax.load(folder, progress=False)
    cx.export_pipeline(pipe, tmp_path / "xl", cx.Settings(compute_precision="float32"), progress=False,
                       log=lambda *a: None)
    results = verify.verify(tmp_path / "xl", pipe, progress=False)
    assert {r.label for r in results} == {"TextEncoder.mlpackage", "TextEncoder2.mlpackage", "Unet.mlpackage",
                                          "VAEDecoder.mlpackage", "VAEEncoder.mlpackage"}
    for r in results:
        assert not r.error, r.error
        MEASURED.update({f"sdxl float32 {r.label} {k}": round(v, 1) for k, v in r.psnr.items()})
        assert r.passed(60), (r.label, r.psnr)
    assert set(next(r for r in results if r.label == "TextEncoder.mlpackage").psnr) == {"hidden_embeds",
                                                                                       "pooled_outputs"}


def test_print_measured():
    print("\nverify-coreml PSNR (dB; float32 ops, package precision):", MEASURED)


def test_min_psnr_default_is_apples_floor():
    from sdjax.cli import build_parser
    assert verify.DEFAULT_MIN_PSNR == 35.0
    args = build_parser().parse_args(["verify-coreml", "x"])
    assert args.min_psnr == 35.0 and args.fp16 is False and np.isfinite(args.min_psnr)
