"""Model metadata in every package ``sdjax export-coreml`` writes (sdjax.coreml.metadata): author,
license (``--license``, else the model card's ``license:``), version, short description, a
description of every input and output and ``sdjax.*`` user-defined entries, read back through
coremltools' own ``MLModel`` accessors; the package still loads and runs after the spec is rewritten."""
import os
import shutil
import sys

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import sdjax  # noqa: E402
from sdjax.cli import main  # noqa: E402
from sdjax.coreml import interp, metadata  # noqa: E402
from sdjax.version import __version__  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/sdjax: the ControlNet fixtures
from controlnet_fixtures import build_controlnet_one_thread  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

CARD = """---
language:
  - en
license: creativeml-openrail-m
tags:
- stable-diffusion
---
# A model
license: not-this-one (outside the front matter)
"""


def _readme(folder, text):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return folder


@pytest.mark.parametrize("text, want", [
    (CARD, "creativeml-openrail-m"),
    ("---\nlicense: 'openrail++'\n---\n", "openrail++"),
    ("---\r\nlicense: other\r\nlicense_name: my-license\r\nlicense_link: https://example.com/LICENSE\r\n---\r\n",
     "other (my-license, https://example.com/LICENSE)"),
    ("---\ntags: [a]\n---\nlicense: mit\n", None),           # only the front matter counts
    ("# no front matter\nlicense: mit\n", None),
    ("---\n  license: nested\n---\n", None),                  # not a top-level key
])
def test_card_license(tmp_path, text, want):
    assert metadata.card_license(_readme(str(tmp_path / "m"), text)) == want


def test_find_license(tmp_path):
    assert metadata.find_license(str(tmp_path)) == metadata.UNKNOWN_LICENSE  # no README.md
    assert metadata.find_license(_readme(str(tmp_path / "m"), CARD)) == "creativeml-openrail-m"
    single = tmp_path / "m" / "model.safetensors"
    single.write_bytes(b"")
    assert metadata.find_license(str(single)) == "creativeml-openrail-m"  # the card beside a single file
    assert metadata.find_license(sdjax.reference_model_path()) == metadata.REFERENCE_MODEL_LICENSE
    assert metadata.find_license("") == metadata.UNKNOWN_LICENSE


def test_descriptions_by_name():
    assert metadata.package_kind("out/UnetChunk2.mlpackage")[0] == "unet"
    assert "Chunk 2 of 2" in metadata.package_kind("out/ControlledUnetChunk2.mlpackage")[1]
    assert metadata.package_kind("out/controlnet/canny.mlpackage") == (
        "controlnet", "ControlNet canny: residuals for the ControlledUnet's skip connections and mid block, "
        "from a control image.")
    assert metadata.package_kind("out/TextEncoder2.mlpackage")[0] == "text_encoder"
    assert metadata.package_kind("out/Other.mlpackage") == ("unknown", "")
    info = metadata.ModelInfo("m", "x", prediction_type="v_prediction")
    assert "v (velocity)" in metadata.describe_io("noise_pred", False, info)
    assert "residual 3" in metadata.describe_io("additional_residual_3", True)
    assert metadata.describe_io("chunk_skip2", True).startswith("Tensor handed from the UNet's first chunk")
    assert metadata.describe_io("z", True, metadata.ModelInfo("m", "x", swift_scaling_factor=0.13025)) == (
        "Latents divided by 0.13025 (the Swift pipeline's scale factor).")
    assert metadata.describe_io("nothing_known", True) == ""


@pytest.fixture(scope="module")
def exported(pipeline_dirs, tmp_path_factory):
    """A copy of the tiny SD 1.x model with a model card, exported by the CLI with --license, a
    ControlNet and --chunk-unet."""
    src, diffusers_pipe = pipeline_dirs("sd1")
    folder = str(tmp_path_factory.mktemp("card") / "tiny-sd")
    shutil.copytree(src, folder)
    _readme(folder, CARD)
    cn = str(tmp_path_factory.mktemp("cn") / "canny")
    build_controlnet_one_thread(diffusers_pipe.unet, cn, seed=3, cond_channels=(8, 16))
    out = str(tmp_path_factory.mktemp("meta") / "coreml")
    assert main(["export-coreml", "-m", folder, "--controlnet", cn, "--chunk-unet", "--license", "my license",
                 "--compute-precision", "float32", "-o", out, "-q"]) == 0
    return folder, out


PACKAGES = ["TextEncoder.mlpackage", "UnetChunk1.mlpackage", "UnetChunk2.mlpackage", "ControlledUnetChunk1.mlpackage",
            "ControlledUnetChunk2.mlpackage", os.path.join("controlnet", "canny.mlpackage"), "VAEDecoder.mlpackage",
            "VAEEncoder.mlpackage"]


def test_every_package_is_described(exported):
    folder, out = exported
    for name in PACKAGES:
        m = ct.models.MLModel(os.path.join(out, name), skip_model_load=True)
        assert m.license == "my license", name  # the flag wins over the card
        model = "canny" if name.startswith("controlnet") else "tiny-sd"
        assert m.version == f"sdjax {__version__} / {model}"
        assert m.author == f"{model} (see its model card); converted to Core ML by sdjax {__version__}"
        assert m.short_description.startswith(("Stable Diffusion", "ControlNet canny")), name
        user = m.user_defined_metadata
        assert user["sdjax.version"] == __version__ and user["sdjax.model"] == model
        assert user["sdjax.recipe"] == "float" and user["sdjax.compute_precision"] == "float32"
        assert user["sdjax.component"] == metadata.package_kind(name)[0]
        assert "com.github.apple.coremltools.version" in user  # coremltools' own entries kept
        spec = m.get_spec()
        for feature in list(spec.description.input) + list(spec.description.output):
            assert feature.shortDescription, (name, feature.name)
    m = ct.models.MLModel(os.path.join(out, "UnetChunk1.mlpackage"), skip_model_load=True)
    assert m.input_description["sample"].startswith("Latents, NCHW")
    assert m.output_description["chunk_x"].startswith("Tensor handed from the UNet's first chunk")
    m = ct.models.MLModel(os.path.join(out, "VAEDecoder.mlpackage"), skip_model_load=True)
    assert m.input_description["z"] == "Latents divided by 0.18215 (the Swift pipeline's scale factor)."
    assert "epsilon" not in m.output_description["image"]
    m = ct.models.MLModel(os.path.join(out, "UnetChunk2.mlpackage"), skip_model_load=True)
    assert m.output_description["noise_pred"] == "The UNet's prediction of noise for each latent."


def test_license_from_the_card_and_package_still_runs(exported, tmp_path):
    """Without --license the card's license is written; rewriting the spec leaves a package that loads
    (weights untouched) and computes the same."""
    folder, out = exported
    pkg = tmp_path / "VAEDecoder.mlpackage"
    shutil.copytree(os.path.join(out, "VAEDecoder.mlpackage"), pkg)
    z = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    before = interp.run(interp.load_program(pkg), {"z": z})["image"]
    weights = (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes()
    pipe = sdjax.load(folder, progress=False)
    metadata.write(pkg, metadata.describe_model(pipe), "float32")
    assert ct.models.MLModel(str(pkg), skip_model_load=True).license == "creativeml-openrail-m"
    assert (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes() == weights
    np.testing.assert_array_equal(interp.run(interp.load_program(pkg), {"z": z})["image"], before)
    assert not [p for p in os.listdir(pkg / "Data" / "com.apple.CoreML") if p.endswith(".sdjax-tmp")]


def test_describer_picks_the_model_of_each_package(exported, tmp_path):
    """The refiner's packages describe the refiner, controlnet/NAME the ControlNet's own folder (and its card)."""
    folder, out = exported
    pipe = sdjax.load(folder, progress=False)
    cn_dir = _readme(str(tmp_path / "cn-card"), "---\nlicense: apache-2.0\n---\n")
    (tmp_path / "controlnet").mkdir()
    target = tmp_path / "controlnet" / "x.mlpackage"
    shutil.copytree(os.path.join(out, "controlnet", "canny.mlpackage"), target)
    refiner_pkg = tmp_path / "UnetRefinerChunk1.mlpackage"
    shutil.copytree(os.path.join(out, "UnetChunk1.mlpackage"), refiner_pkg)

    class Refiner:
        source = "/models/my-refiner"
        quantization = {"recipe": {"name": "palette-6bit"}}
        scheduler_config = {"prediction_type": "epsilon"}
    describe = metadata.describer(pipe, None, Refiner(), {"x": (None, None, {"model": cn_dir, "recipe": None})})
    describe([str(target), str(refiner_pkg)], "float16")
    m = ct.models.MLModel(str(target), skip_model_load=True)
    assert (m.license, m.user_defined_metadata["sdjax.model"]) == ("apache-2.0", "cn-card")
    m = ct.models.MLModel(str(refiner_pkg), skip_model_load=True)
    assert m.license == metadata.UNKNOWN_LICENSE and m.version == f"sdjax {__version__} / my-refiner"
    assert m.user_defined_metadata["sdjax.recipe"] == "palette-6bit"
    assert m.short_description.endswith("The SDXL refiner's.")
