"""sdjax export-coreml end to end on a tiny diffusers model: the resource folder the Swift package
loads, the quantized weights carried over as they are, and the bad-input rules (existing folder,
interrupted export, targets that cannot express a recipe)."""
import json
import os

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import sdjax  # noqa: E402
from quant.palettize import PalettizedWeight  # noqa: E402
from quant.recipes import layers  # noqa: E402
from sdjax.cli import main  # noqa: E402
from sdjax.coreml import interp, mil, unet as cunet, vae as cvae  # noqa: E402
import test_cli_quantize as cli_tests  # noqa: E402

cli, folder = cli_tests.cli, cli_tests.folder  # the CLI runner and the tiny SD1 folder fixture

pytestmark = pytest.mark.filterwarnings("ignore")

PACKAGES = {"TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage", "VAEEncoder.mlpackage"}


@pytest.fixture(scope="module")
def exported(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cx") / "coreml"
    assert main(["export-coreml", "--model", folder, "-r", "palette-4bit", "-o", str(out), "-q",
                 "--compute-precision", "float32"]) == 0
    return out


def _io(path):
    fn = interp.load_program(path).functions["main"]
    return ({k: tuple(int(d) for d in v.shape) for k, v in fn.inputs.items()},
            {o.name: tuple(int(d) for d in o.shape) for o in fn.outputs})


def test_resource_folder_as_the_swift_package_reads_it(exported, folder, tmp_path):
    names = set(os.listdir(exported))
    assert names == PACKAGES | {"vocab.json", "merges.txt", "sdjax_export.json"}
    assert not os.path.exists(str(exported) + ".partial")
    pipe = sdjax.load(folder, progress=False)
    u, v, t = pipe.configs["unet"], pipe.configs["vae"], pipe.configs["text_encoder"]
    h, w = cvae.default_latent_shape(v)
    f = pipe.vae_scale_factor
    ins, outs = _io(exported / "Unet.mlpackage")
    assert ins == {"sample": (2, u.in_channels, h, w), "timestep": (2,),
                   "encoder_hidden_states": (2, u.cross_attention_dim, 1, 77)}
    assert outs == {"noise_pred": (2, u.out_channels, h, w)}
    ins, outs = _io(exported / "TextEncoder.mlpackage")
    assert ins == {"input_ids": (1, 77)}
    assert outs == {"last_hidden_state": (1, 77, t.hidden_size), "pooled_outputs": (1, t.hidden_size)}
    ins, outs = _io(exported / "VAEDecoder.mlpackage")
    assert ins == {"z": (1, v.latent_channels, h, w)} and outs == {"image": (1, 3, h * f, w * f)}
    ins, _ = _io(exported / "VAEEncoder.mlpackage")
    assert list(ins.values()) == [(1, 3, h * f, w * f)]
    # the Swift BPETokenizer reads these two files: they must tokenize as the checkpoint's tokenizer does
    from transformers import CLIPTokenizer
    import shutil
    for n in ("vocab.json", "merges.txt"):
        shutil.copyfile(exported / n, tmp_path / n)
    swift_like = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "a photo of an astronaut riding a horse"
    assert swift_like(text).input_ids == pipe.tokenizer._tok(text).input_ids
    manifest = json.load(open(exported / "sdjax_export.json"))
    assert manifest["settings"]["recipe"]["name"] == "palette-4bit"
    assert set(manifest["packages"]) == PACKAGES and all(r["bytes"] > 0 for r in manifest["packages"].values())


def test_quantized_weights_carried_over_bit_identical(exported, folder):
    """The LUTs and indices in Unet.mlpackage are the ones sdjax quantized (k-means is deterministic)."""
    q = sdjax.load(folder, progress=False).quantize("palette-4bit")
    assert_carried_over(exported / "Unet.mlpackage", q.params["unet"])


def assert_carried_over(package, unet_params):
    """Every palettized weight of ``unet_params`` is in ``package`` with its LUT and indices as they are."""
    table = {k: w for k, w in layers(unet_params).items() if isinstance(w, PalettizedWeight)}
    stored = interp.constexpr_values(interp.load_program(package))
    assert stored
    checked = 0
    # the exporter names each weight after its op: match by content, every stored LUT is one of sdjax's
    luts = {np.asarray(w.lut)[0].astype(np.float32).tobytes(): w for w in table.values()}
    for k, v in stored.items():
        lut = np.asarray(v["lut"])
        w = luts.get(lut.astype(np.float32).tobytes())
        assert w is not None, k
        idx = mil.lut_indices(w)
        perm = (3, 2, 0, 1) if idx.ndim == 4 else (1, 0)
        want = np.transpose(idx, perm).ravel()
        n = want.size
        got = (np.unpackbits(np.asarray(v["indices"], np.uint8), bitorder="little")[: w.nbits * n]
               .reshape(n, w.nbits) @ (1 << np.arange(w.nbits)))
        np.testing.assert_array_equal(got, want)
        checked += 1
    assert checked == len(table)


def test_quantized_folder_exports_and_runs(folder, tmp_path, capsys):
    qdir = tmp_path / "q"
    assert main(["quantize", "--model", folder, "--recipe", "palette-6bit", "-o", str(qdir), "-q"]) == 0
    out = tmp_path / "cm"
    rc, text, err = cli(capsys, "export-coreml", "--quantized", qdir, "-o", out, "-q", "--chunk-unet",
                        "--compute-precision", "float32")
    assert rc == 0, err
    assert "UnetChunk1.mlpackage" in text and "xcrun coremlcompiler compile" in text
    names = set(os.listdir(out))
    assert {"UnetChunk1.mlpackage", "UnetChunk2.mlpackage"} <= names and "Unet.mlpackage" not in names
    # the chunks run, fed as the Swift package feeds them, to sdjax's quantized UNet
    pipe = sdjax.load(str(qdir), progress=False)
    cfg = pipe.configs["unet"]
    h, w = cvae.default_latent_shape(pipe.configs["vae"])
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, cfg.in_channels, h, w)).astype(np.float32)
    t = np.array([900.0, 3.0], np.float32)
    ctx = rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)
    feeds = {"sample": sample, "timestep": t,
             "encoder_hidden_states": np.ascontiguousarray(ctx.transpose(0, 2, 1)[:, :, None])}
    p1, p2 = (interp.load_program(out / n) for n in cunet.CHUNK_NAMES)
    merged = {**feeds, **interp.run(p1, feeds)}
    got = interp.run(p2, {k: merged[k] for k in p2.functions["main"].inputs})["noise_pred"]
    import jax
    ref = np.asarray(jax.jit(sdjax.unet.apply, static_argnums=1)(pipe.params["unet"], cfg,
                                                                 sample.transpose(0, 2, 3, 1), t, ctx))
    assert mil.psnr(ref.transpose(0, 3, 1, 2), got) >= 60


def test_gptq_folder_exports_like_any_palettized_folder(folder, tmp_path, capsys):
    """GPTQ changes which LUT entry each weight takes, not the format: its folder exports as it is."""
    import quant
    from quant import io as qio
    pipe = sdjax.load(folder, progress=False)
    recipe = {"name": "gptq-export", "rules": [{"regex": r".*ff\.net\.0\.proj|down_blocks\.0\.downsamplers\.0\.conv",
                                                "method": "palettize", "nbits": 4, "gptq": True}]}
    rng = np.random.default_rng(0)
    hessian = {}  # any X^T X will do: a conv (d = 288) and six linears (d = 32, 64)
    for name, a in quant.plan(pipe.params["unet"], recipe)["unet"].items():
        if a.options.get("gptq"):
            d = int(np.prod(layers(pipe.params["unet"])[name].shape[:-1]))
            x = rng.standard_normal((4 * d, d)) @ (np.eye(d) + rng.standard_normal((d, d)) / np.sqrt(d))
            hessian[name] = x.T @ x / len(x)
    q = pipe.quantize(recipe, hessian=hessian)
    assert sum(isinstance(w, PalettizedWeight) for w in layers(q.params["unet"]).values()) == len(hessian) == 7
    qdir = tmp_path / "q"
    qio.save(q, str(qdir), progress=False)
    out = tmp_path / "cm"
    rc, _, err = cli(capsys, "export-coreml", "--quantized", qdir, "-o", out, "-q", "--compute-precision", "float32")
    assert rc == 0, err
    assert set(os.listdir(out)) >= PACKAGES
    assert_carried_over(out / "Unet.mlpackage", q.params["unet"])


def test_recipes_needing_calibration_are_refused_with_the_two_commands(folder, tmp_path, capsys):
    sensitive = tmp_path / "sensitive.json"
    sensitive.write_text(json.dumps({"rules": [{"pattern": "*", "method": "palettize", "nbits": 4,
                                                "sensitive": True}]}))
    for recipe, what in (("palette-4bit-gptq", "calibration statistics (GPTQ palettize rules)"),
                         (str(sensitive), "sensitivities (sensitive palettize rules)")):
        out = tmp_path / "cm"
        rc, text, err = cli(capsys, "export-coreml", "--model", folder, "-r", recipe, "-o", out, "-q")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert what in err
        assert f"`sdjax quantize --recipe {recipe} -o Q ...` then `sdjax export-coreml --quantized Q`" in err
        assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


def test_existing_folder_refused_then_overwritten(exported, folder, capsys, tmp_path):
    out = tmp_path / "cm"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, _, err = cli(capsys, "export-coreml", "--model", folder, "-o", out, "-q")
    assert rc == 2 and "--out" in err and "--overwrite" in err
    assert os.listdir(out) == ["keep.txt"]
    rc, _, err = cli(capsys, "export-coreml", "--model", folder, "-o", out, "-q", "--overwrite")
    assert rc == 0, err
    assert set(os.listdir(out)) >= PACKAGES and "keep.txt" not in os.listdir(out)


def test_interrupted_export_leaves_no_folder_and_resumes(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cm"
    real = cvae.export_decoder

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cvae, "export_decoder", boom)
    rc, _, _ = cli(capsys, "export-coreml", "--model", folder, "-o", out, "-q")
    assert rc == 130
    assert not os.path.exists(out)
    partial = str(out) + ".partial"
    assert {"TextEncoder.mlpackage", "Unet.mlpackage"} <= set(os.listdir(partial))
    assert "VAEDecoder.mlpackage" not in os.listdir(partial)
    assert not [n for n in os.listdir(partial) if n.endswith(".tmp")]

    # other settings: refused, naming what differs
    monkeypatch.setattr(cvae, "export_decoder", real)
    rc, _, err = cli(capsys, "export-coreml", "--model", folder, "-o", out, "-q", "--attention", "original")
    assert rc == 2 and "attention" in err and "--overwrite" in err
    # the same settings: resumes, keeping the finished packages
    before = os.stat(os.path.join(partial, "Unet.mlpackage")).st_ino
    rc, text, err = cli(capsys, "export-coreml", "--model", folder, "-o", out, "-q")
    assert rc == 0, err
    assert set(os.listdir(out)) >= PACKAGES and not os.path.exists(partial)
    assert os.stat(out / "Unet.mlpackage").st_ino == before


def test_grouped_luts_need_ios18(folder, tmp_path, capsys):
    out = tmp_path / "cm"
    rc, _, err = cli(capsys, "export-coreml", "--model", folder, "-r", "palette-4bit-g4", "-o", out, "-q")
    assert rc == 2
    assert "iOS18" in err and "LUT groups" in err and "--min-deployment-target" in err
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


@pytest.mark.parametrize("argv, words", [
    (["--min-deployment-target", "iOS15"], ["iOS15", "iOS16"]),
    (["-r", "w8a8-int8conv"], ["int8-w8a8", "iOS17", "iOS16"]),
    (["-r", "w8a8-int8conv", "--min-deployment-target", "iOS17"], ["int8-w8a8", "calibration", "sdjax quantize"]),
    (["-r", "palette-4bit-gptq"], ["GPTQ", "sdjax quantize", "--quantized"]),
    (["-r", "no-such-recipe"], ["no-such-recipe"]),
    (["--height", "64"], ["--width"]),
    (["--height", "63", "--width", "64"], ["--height 63", "multiple"]),
])
def test_bad_arguments_named(folder, tmp_path, capsys, argv, words):
    rc, _, err = cli(capsys, "export-coreml", "--model", folder, "-o", tmp_path / "cm", "-q", *argv)
    assert rc == 2, err
    for word in words:
        assert word in err, err


def test_quantized_flag_needs_a_quantized_folder(folder, tmp_path, capsys):
    rc, _, err = cli(capsys, "export-coreml", "--quantized", folder, "-o", tmp_path / "cm", "-q")
    assert rc == 2 and "not an sdjax quantized folder" in err


def test_float16_export_loads_float16_and_writes_the_same_packages(folder, tmp_path, capsys):
    """The command loads float weights as float16 for a float16 export (half the memory): the packages
    are byte for byte those exported from the float32 weights."""
    from sdjax.coreml.export import Settings, export_pipeline
    rc, _, err = cli(capsys, "export-coreml", "--model", folder, "-o", tmp_path / "a", "-q")
    assert rc == 0, err
    export_pipeline(sdjax.load(folder, dtype="float32", progress=False), tmp_path / "b", Settings(),
                    progress=False, log=lambda *a: None)
    for name in PACKAGES:
        for part in ("weights/weight.bin", "model.mlmodel"):
            a = (tmp_path / "a" / name / "Data" / "com.apple.CoreML" / part).read_bytes()
            b = (tmp_path / "b" / name / "Data" / "com.apple.CoreML" / part).read_bytes()
            assert a == b, (name, part)


def test_weights_without_a_core_ml_form_are_refused_by_layer():
    """LLM.int8() has no Core ML form, and W8A8 (activation scales) none below iOS17: named, before any work."""
    import jax.numpy as jnp
    from quant import int8, llm_int8
    from sdjax.coreml.export import ExportError, check_exportable
    w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    w8a8 = int8.quantize(w)
    w8a8 = type(w8a8)(data=w8a8.data, scale=w8a8.scale, act_scale=jnp.float32(0.1))
    for bad, words, target in ((w8a8, "W8A8.*iOS17", "iOS16"), (w8a8, "W8A8.*iOS17", "macOS13"),
                               (llm_int8.quantize(w), "LLMInt8Weight", "iOS18")):
        params = {"text_encoder": {}, "vae": {}, "unet": {"mid_block": {"proj": {"weight": bad}}}}
        with pytest.raises(ExportError, match=f"unet.mid_block.proj .*{words}"):
            check_exportable(params, target)
    check_exportable({"unet": {"p": {"weight": w8a8}}}, "iOS17")
    check_exportable({"text_encoder": {}, "vae": {}, "unet": {"p": {"weight": int8.quantize(w)}}}, "iOS16")


def test_exporter_refusal_is_an_error_line_not_a_traceback(folder, tmp_path, capsys, monkeypatch):
    """Should the up-front check miss a weight, the exporter's own refusal (mil.weight) still ends the
    command with one error line naming it, exit 1, and no output folder."""
    from sdjax.coreml import export as cx
    monkeypatch.setattr(cx, "check_exportable", lambda params, target: None)
    out = tmp_path / "cm"
    rc, _, err = cli(capsys, "export-coreml", "--model", folder, "-r", "palette-4bit-g4", "-o", out, "-q")
    assert rc == 1 and "cannot export" in err and "iOS18" in err and "Traceback" not in err
    assert not os.path.exists(out)
