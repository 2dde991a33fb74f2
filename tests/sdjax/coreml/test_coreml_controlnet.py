"""Core ML export of ControlNets as apple/ml-stable-diffusion's Swift package runs them: each
``controlnet/NAME.mlpackage`` and the ``ControlledUnet`` (whole and chunked) read back from disk and run by
sdjax.coreml.interp, the ControlNets' outputs summed and fed to the ControlledUnet by name as
ControlNet.swift and Unet.swift do, against sdjax's ``controlnet.apply`` + ``unet.apply`` with the summed
residuals: >= 60 dB at float32, >= 35 dB at float16. Tiny diffusers SD 1.x and SDXL pipelines
(tests/tiny_models.py) with ControlNets made from their UNets (controlnet_fixtures.py: random zero
convs, so the residuals move the UNet's output). Names and shapes are asserted against the literals
Apple's code uses; palettized ControlNet weights carry sdjax's LUTs and indices."""
import json
import os
import sys

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import quant  # noqa: E402
import sdjax  # noqa: E402
from quant.palettize import PalettizedWeight  # noqa: E402
from quant.recipes import layers  # noqa: E402
from sdjax.cli import main  # noqa: E402
from sdjax.coreml import controlnet as ccn, export as cx, interp, mil, unet as cunet, vae as cvae  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/sdjax: the ControlNet fixtures
from controlnet_fixtures import build_controlnet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
FLOOR = {"float32": 60, "float16": 35}
MEASURED = {}

# --- what Apple's code reads (apple/ml-stable-diffusion, main branch) -------------------------------
# swift/StableDiffusion/pipeline/ControlNet.swift, execute(): the ControlNet's input dictionary
SWIFT_CONTROLNET_INPUTS = {"sample", "timestep", "encoder_hidden_states", "controlnet_cond"}
# swift/StableDiffusion/pipeline/Unet.swift, predictNoise(): the UNet's inputs; the ControlNets'
# outputs (additionalResiduals) are added to this dictionary under their own names
SWIFT_UNET_INPUTS = {"sample", "timestep", "encoder_hidden_states"}
# python_coreml_stable_diffusion/torch2coreml.py: convert_controlnet's output_keys and convert_unet's
# sample_unet_inputs with unet_support_controlnet: f"additional_residual_{i}"
APPLE_RESIDUAL = "additional_residual_{}"
# swift/StableDiffusion/pipeline/StableDiffusionPipeline+Resources.swift: ResourceURLs
SWIFT_CONTROLLED_UNET = "ControlledUnet.mlmodelc"
SWIFT_CONTROLLED_CHUNKS = ("ControlledUnetChunk1.mlmodelc", "ControlledUnetChunk2.mlmodelc")
SWIFT_UNET = "Unet.mlmodelc"
SWIFT_CONTROLNET_DIR = "controlnet"  # controlNetDirURL; each named model + ".mlmodelc" inside


def _package(compiled):
    return compiled.replace(".mlmodelc", ".mlpackage")


def _apple_num_residuals(cfg):
    """python_coreml_stable_diffusion/controlnet.py get_num_residuals: 2 (conv_in's output and the mid
    block) + each down block's resnets + its downsamplers."""
    n = len(cfg.block_out_channels)
    return 2 + n * cfg.layers_per_block + (n - 1)


@pytest.fixture(scope="module")
def nets(pipeline_dirs, tmp_path_factory):
    """style -> (sdjax pipeline, {name: ControlNet folder}) for the tiny "sd1" and "sdxl" pipelines:
    two ControlNets for sd1 (one bgr), one for sdxl."""
    import torch
    cache = {}

    def get(style):
        if style not in cache:
            folder, diffusers_pipe = pipeline_dirs(style)
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                dirs = {}
                kws = ({"canny": {}, "depth": {"controlnet_conditioning_channel_order": "bgr"}} if style == "sd1"
                       else {"xl-canny": {}})
                for i, (name, kw) in enumerate(kws.items()):
                    d = str(tmp_path_factory.mktemp("cn") / name)
                    build_controlnet(diffusers_pipe.unet, d, seed=11 + i, cond_channels=(8, 16), **kw)
                    dirs[name] = d
            finally:
                torch.set_num_threads(n)
            cache[style] = (sdjax.load(folder, progress=False), dirs)
        return cache[style]
    return get


def _loaded(dirs):
    return {n: sdjax.load_controlnet(d, progress=False) for n, d in dirs.items()}


def _inputs(pipe, nets, seed=0):
    """The Swift pipeline's inputs at batch 2: NCHW latents, a timestep pair, the context, SDXL's
    time_ids/text_embeds and one control image per ControlNet (image-sized, in [0, 1])."""
    uc = pipe.configs["unet"]
    h, w = cvae.default_latent_shape(pipe.configs["vae"])
    rng = np.random.default_rng(seed)
    x = {"sample": rng.standard_normal((2, uc.in_channels, h, w)).astype(np.float32),
         "timestep": np.array([801.0, 801.0], np.float32),
         "context": rng.standard_normal((2, 77, uc.cross_attention_dim)).astype(np.float32),
         "cond": {n: rng.random((2, c.conditioning_channels, h * c.downscale, w * c.downscale)).astype(np.float32)
                  for n, (_, c) in nets.items()}}
    if uc.is_sdxl:
        p = pipe.configs["text_encoder_2"].projection_dim
        x["time_ids"] = np.array([[64, 64, 0, 0, 32, 32], [32, 32, 0, 0, 32, 32]], np.float32)
        x["text_embeds"] = rng.standard_normal((2, p)).astype(np.float32)
    return x


def _feeds(x):
    """The inputs every package shares, as Swift names and lays them out (context (B, D, 1, L))."""
    f = {"sample": x["sample"], "timestep": x["timestep"],
         "encoder_hidden_states": np.ascontiguousarray(x["context"].transpose(0, 2, 1)[:, :, None])}
    return f | {k: x[k] for k in ("time_ids", "text_embeds") if k in x}


def _sdjax(pipe, nets, x):
    """sdjax's residuals per ControlNet (NCHW, Apple's order), the UNet's output with their sums, and without."""
    from sdjax import controlnet, unet
    nhwc = (0, 2, 3, 1)
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]} if "time_ids" in x else None
    per_net, down, mid = {}, None, None
    for name, (p, c) in nets.items():
        d, m = controlnet.apply(p, c, x["sample"].transpose(nhwc), x["timestep"], x["context"],
                                x["cond"][name].transpose(nhwc), added_cond=added)
        per_net[name] = [np.asarray(r).transpose(0, 3, 1, 2) for r in (*d, m)]
        down = d if down is None else tuple(a + b for a, b in zip(down, d))
        mid = m if mid is None else mid + m
    args = (pipe.params["unet"], pipe.configs["unet"], x["sample"].transpose(nhwc), x["timestep"], x["context"])
    eps = unet.apply(*args, added_cond=added, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    plain = unet.apply(*args, added_cond=added)
    return per_net, np.asarray(eps).transpose(0, 3, 1, 2), np.asarray(plain).transpose(0, 3, 1, 2)


def _swift_run(cn_paths, unet_paths, x):
    """What the Swift pipeline does: each ControlNet on (sample, timestep, encoder_hidden_states, its
    controlnet_cond), the outputs summed by name (ControlNet.execute), added to the UNet's inputs
    (Unet.predictNoise) and, for chunks, every chunk fed the union of the inputs and the previous
    chunk's outputs (ManagedMLModel.predictions)."""
    base = _feeds(x)
    per_net, summed = {}, {}
    for name, path in cn_paths.items():
        prog = interp.load_program(path)
        assert set(prog.functions["main"].inputs) - {"time_ids", "text_embeds"} == SWIFT_CONTROLNET_INPUTS
        out = interp.run(prog, {**base, "controlnet_cond": x["cond"][name]})
        per_net[name] = out
        summed = {k: summed.get(k, 0) + v for k, v in out.items()}
    feeds = {**base, **summed}
    for path in unet_paths:
        prog = interp.load_program(path)
        out = interp.run(prog, {k: feeds[k] for k in prog.functions["main"].inputs})
        feeds = {**feeds, **out}
    return per_net, out["noise_pred"]


def _check(tag, pipe, nets, cn_paths, unet_paths, floor, seed=0):
    x = _inputs(pipe, nets, seed)
    ref_res, ref_eps, plain = _sdjax(pipe, nets, x)
    got_res, eps = _swift_run(cn_paths, unet_paths, x)
    for name in nets:
        assert list(got_res[name]) == [APPLE_RESIDUAL.format(i) for i in range(len(ref_res[name]))]
        p = min(mil.psnr(r, got_res[name][APPLE_RESIDUAL.format(i)]) for i, r in enumerate(ref_res[name]))
        MEASURED[f"{tag} controlnet {name} (worst residual)"] = p
        assert p >= floor, (tag, name, p)
    MEASURED[f"{tag} controlled unet"] = p = mil.psnr(ref_eps, eps)
    assert p >= floor, (tag, p)
    # the residuals move the UNet's output far more than the export's error: a residual dropped or
    # added at the wrong skip would show
    assert mil.psnr(ref_eps, plain) < 30


@pytest.fixture(scope="module")
def sd1_export(nets, tmp_path_factory):
    """The tiny SD 1.x pipeline with two ControlNets through export_pipeline, float32, UNets chunked."""
    pipe, dirs = nets("sd1")
    out = tmp_path_factory.mktemp("cx") / "coreml"
    m = cx.export_pipeline(pipe, out, cx.Settings(compute_precision="float32", chunk_unet=True), progress=False,
                           log=lambda *a: None, controlnets=_loaded(dirs))
    return out, m


def _io(path):
    fn = interp.load_program(path).functions["main"]
    return ({k: tuple(int(d) for d in v.shape) for k, v in fn.inputs.items()},
            {o.name: tuple(int(d) for d in o.shape) for o in fn.outputs})


def test_resource_folder_and_apple_names(nets, sd1_export):
    """The files StableDiffusionPipeline+Resources.swift looks up; the ControlNets' inputs by Apple's names,
    their outputs exactly the ControlledUnet chunks' residual inputs (name and shape), each residual read
    by one chunk."""
    pipe, dirs = nets("sd1")
    out, manifest = sd1_export
    uc = pipe.configs["unet"]
    h, w = cvae.default_latent_shape(pipe.configs["vae"])
    f = pipe.vae_scale_factor
    chunks = [_package(n) for n in SWIFT_CONTROLLED_CHUNKS]
    names = set(os.listdir(out))
    assert set(chunks) | {"UnetChunk1.mlpackage", "UnetChunk2.mlpackage", SWIFT_CONTROLNET_DIR} <= names
    assert _package(SWIFT_CONTROLLED_UNET) not in names and _package(SWIFT_UNET) not in names
    assert sorted(os.listdir(out / SWIFT_CONTROLNET_DIR)) == sorted(f"{n}.mlpackage" for n in dirs)
    assert {f"{SWIFT_CONTROLNET_DIR}/{n}.mlpackage" for n in dirs} | set(chunks) <= set(manifest["packages"])
    assert set(manifest["settings"]["controlnets"]) == set(dirs)
    ins = [_io(out / c)[0] for c in chunks]
    assert SWIFT_UNET_INPUTS <= set(ins[0])
    res = [{k: v for k, v in i.items() if k.startswith("additional_residual_")} for i in ins]
    assert not set(res[0]) & set(res[1])
    res = res[0] | res[1]
    n = _apple_num_residuals(uc)
    assert sorted(res) == sorted(APPLE_RESIDUAL.format(i) for i in range(n))
    for name in dirs:
        cins, couts = _io(out / SWIFT_CONTROLNET_DIR / f"{name}.mlpackage")
        assert list(cins) == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
        assert set(cins) == SWIFT_CONTROLNET_INPUTS
        assert cins["controlnet_cond"] == (2, 3, h * f, w * f)
        assert {k: cins[k] for k in SWIFT_UNET_INPUTS} == {k: ins[0][k] for k in SWIFT_UNET_INPUTS}
        assert list(couts) == [APPLE_RESIDUAL.format(i) for i in range(n)] and couts == res
    # the plain Unet's chunks beside them take no residuals (Swift loads them when no ControlNet is named)
    assert not any(k.startswith("additional") for c in ("UnetChunk1", "UnetChunk2")
                   for k in _io(out / f"{c}.mlpackage")[0])


def test_sd1_float32_two_controlnets_chunked(nets, sd1_export):
    pipe, dirs = nets("sd1")
    out, _ = sd1_export
    cn = {n: out / SWIFT_CONTROLNET_DIR / f"{n}.mlpackage" for n in dirs}
    _check("sd1 float32 (2 ControlNets, chunks)", pipe, _loaded(dirs), cn,
           [out / _package(n) for n in SWIFT_CONTROLLED_CHUNKS], FLOOR["float32"])


def test_sd1_float16(nets, tmp_path):
    pipe, dirs = nets("sd1")
    loaded = {"depth": _loaded(dirs)["depth"]}
    p, c = loaded["depth"]
    lat = cvae.default_latent_shape(pipe.configs["vae"])
    cn = {"depth": ccn.export(p, c, tmp_path / "depth16.mlpackage", "float16", latent_shape=lat)}
    u16 = cunet.export(pipe.params["unet"], pipe.configs["unet"], tmp_path / "cu16.mlpackage", "float16",
                       latent_shape=lat, residuals=True)
    _check("sd1 float16", pipe, loaded, cn, [u16], FLOOR["float16"])


@pytest.mark.parametrize("precision", ["float16", pytest.param("float32", marks=pytest.mark.slow)])
def test_sdxl(nets, tmp_path, precision):
    """An SDXL ControlNet (Apple's converter has none): both packages take time_ids and text_embeds too.
    Both mid blocks scale their resnets' outputs (mid_block_scale_factor 1.5, as test_controlnet.py's SDXL
    case: sdjax's value is diffusers' there), which the UNet exporter's mid block ignored before it
    shared the ControlNet's walk."""
    import dataclasses
    pipe, dirs = nets("sdxl")
    pipe = dataclasses.replace(pipe, configs={**pipe.configs, "unet": dataclasses.replace(
        pipe.configs["unet"], mid_block_scale_factor=1.5)})
    p, c = _loaded(dirs)["xl-canny"]
    c = dataclasses.replace(c, mid_block_scale_factor=1.5)
    loaded = {"xl-canny": (p, c)}
    lat = cvae.default_latent_shape(pipe.configs["vae"])
    te = pipe.configs["text_encoder_2"].projection_dim
    cn = {"xl-canny": ccn.export(p, c, tmp_path / "xl.mlpackage", precision, latent_shape=lat, text_embeds_dim=te)}
    u = cunet.export(pipe.params["unet"], pipe.configs["unet"], tmp_path / "cu.mlpackage", precision,
                     latent_shape=lat, text_embeds_dim=te, residuals=True)
    ins, _ = _io(cn["xl-canny"])
    assert list(ins) == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "time_ids", "text_embeds"]
    assert ins["time_ids"] == (2, 6) and ins["text_embeds"] == (2, te)
    assert list(_io(u)[0])[:5] == ["sample", "timestep", "encoder_hidden_states", "time_ids", "text_embeds"]
    _check(f"sdxl {precision}", pipe, loaded, cn, [u], FLOOR[precision])


def test_cli_palettized_controlnet(nets, pipeline_dirs, tmp_path, capsys):
    """`sdjax export-coreml --controlnet DIR` with a recipe naming only the controlnet component and
    --controlled-unet-only: the ControlNet's package holds sdjax's LUTs and indices (k-means is
    deterministic; the numbers such weights give are test_coreml_unet's and test_coreml_weights'
    concern); the whole ControlledUnet takes Apple's inputs in Apple's order."""
    pipe, dirs = nets("sd1")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "cn-p4", "components": ["controlnet"],
                                  "rules": [{"pattern": "*", "method": "palettize", "nbits": 4}]}))
    out = tmp_path / "cm"
    assert main(["export-coreml", "--model", pipeline_dirs("sd1")[0], "--controlnet", dirs["canny"], "-r", str(recipe),
                 "--controlled-unet-only", "--compute-precision", "float32", "-o", str(out), "-q"]) == 0
    assert "canny" in capsys.readouterr().out
    names = set(os.listdir(out))
    assert _package(SWIFT_CONTROLLED_UNET) in names and _package(SWIFT_UNET) not in names
    manifest = json.load(open(out / "sdjax_export.json"))
    assert manifest["settings"]["controlnets"]["canny"] == {"model": dirs["canny"], "recipe": manifest["settings"]
                                                           ["recipe"]} and manifest["settings"]["recipe"]["name"] == "cn-p4"
    p, c = sdjax.load_controlnet(dirs["canny"], progress=False)
    q = quant.apply_recipe(p, str(recipe), component="controlnet")
    package = out / SWIFT_CONTROLNET_DIR / "canny.mlpackage"
    assert _carried_over(package, q) > 10
    uc = pipe.configs["unet"]
    n = _apple_num_residuals(uc)
    ins, _ = _io(out / _package(SWIFT_CONTROLLED_UNET))
    assert list(ins) == ["sample", "timestep", "encoder_hidden_states"] + [APPLE_RESIDUAL.format(i) for i in range(n)]
    assert _io(package)[1] == {k: v for k, v in ins.items() if k.startswith("additional_residual_")}


def _carried_over(package, params):
    """Every palettized weight of ``params`` is in ``package`` with its LUT and indices as they are
    (matched by LUT content); returns how many."""
    table = {k: w for k, w in layers(params).items() if isinstance(w, PalettizedWeight)}
    luts = {np.asarray(w.lut)[0].astype(np.float32).tobytes(): w for w in table.values()}
    stored = interp.constexpr_values(interp.load_program(package))
    for k, v in stored.items():
        w = luts.get(np.asarray(v["lut"]).astype(np.float32).tobytes())
        assert w is not None, k
        idx = mil.lut_indices(w)
        want = np.transpose(idx, (3, 2, 0, 1) if idx.ndim == 4 else (1, 0)).ravel()
        got = (np.unpackbits(np.asarray(v["indices"], np.uint8), bitorder="little")[: w.nbits * want.size]
               .reshape(want.size, w.nbits) @ (1 << np.arange(w.nbits)))
        np.testing.assert_array_equal(got, want)
    assert len(stored) == len(table)
    return len(stored)


def test_refused_before_any_work(nets, tmp_path, capsys):
    sd1, dirs = nets("sd1")
    xl, xl_dirs = nets("sdxl")
    one = {"canny": _loaded(dirs)["canny"]}
    out = tmp_path / "never"
    with pytest.raises(cx.ExportError, match="does not fit the UNet"):
        cx.export_pipeline(xl, out, controlnets=one, progress=False)
    with pytest.raises(cx.ExportError, match="batch of 2"):
        cx.export_pipeline(sd1, out, cx.Settings(unet_batch=1), controlnets=one, progress=False)
    with pytest.raises(cx.ExportError, match="same"):
        cx.export_pipeline(sd1, out, controlnets={"Canny": one["canny"], "canny": one["canny"]}, progress=False)
    with pytest.raises(cx.ExportError, match="needs ControlNets"):
        cx.export_pipeline(sd1, out, cx.Settings(controlled_unet_only=True), progress=False)
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")
    for argv, msg in ((["--controlnet", dirs["canny"], "--controlnet", dirs["canny"]], "two ControlNets named"),
                      (["--controlled-unet-only"], "needs --controlnet")):
        assert main(["export-coreml", "-o", str(out), "-q", *argv]) == 2
        assert msg in capsys.readouterr().err
    assert cx.controlnet_name("/a/b/control_sd15_depth.pth") == "control_sd15_depth"
    assert cx.controlnet_name("/a/b/sd-controlnet-canny/") == "sd-controlnet-canny"


def test_print_measured():
    print("\nCore ML ControlNet export, interpreter vs sdjax (dB):",
          {k: round(v, 1) for k, v in MEASURED.items()})
