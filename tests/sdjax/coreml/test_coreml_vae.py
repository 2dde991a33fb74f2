"""Core ML export of the VAE decoder and encoder, checked by reading the saved .mlpackage back
and running it with sdjax.coreml.interp against sdjax.vae.decode / sdjax.vae.encode (and the
encoder against diffusers' AutoencoderKL)."""
import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import quant  # noqa: E402
import sdjax  # noqa: E402
from sdjax.coreml import interp, mil, vae  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

PSNRS = {}  # filled by the tests, printed with -s for the record


@pytest.fixture(scope="module")
def pipe():
    return sdjax.load(None)


@pytest.fixture(scope="module")
def z(pipe):
    cfg = pipe.configs["vae"]
    h, w = vae.default_latent_shape(cfg)
    # what the Swift Decoder feeds: scaled latents (~ N(0, 1)) divided by SD's 0.18215
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, cfg.latent_channels, h, w)) / vae.SWIFT_SCALING_FACTOR).astype(np.float32)


def _reference(params, config, z):
    """sdjax's decode of the same latents: latents / scaling_factor, the model's own factor."""
    unscaled = z * vae.SWIFT_SCALING_FACTOR / config.scaling_factor
    return np.asarray(sdjax.vae.decode(params, config, np.transpose(unscaled, (0, 2, 3, 1)))).transpose(0, 3, 1, 2)


def _export_run(tmp_path, params, config, z, name, **kw):
    path = tmp_path / f"{name}.mlpackage"
    vae.export_decoder(params, config, path, **kw)
    prog = interp.load_program(path)
    return prog, interp.run(prog, {"z": z})["image"]


def _leaves(tree, prefix=""):
    """(dotted name, leaf) of a params tree, quantized weights kept whole."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def test_default_latent_shape(pipe):
    assert vae.default_latent_shape(pipe.configs["vae"]) == (16, 16)
    assert vae.default_latent_shape(sdjax.configs.VAEConfig(block_out_channels=(1, 2, 3, 4), sample_size=512)) == (64, 64)


def test_decoder_fp32_and_fp16(pipe, z, tmp_path):
    params, cfg = pipe.params["vae"], pipe.configs["vae"]
    ref = _reference(params, cfg, z)
    assert ref.shape == (1, 3, 64, 64)
    prog, got = _export_run(tmp_path, params, cfg, z, "fp32")
    assert got.shape == ref.shape and got.dtype == np.float32
    ops = {op.op_type for op in prog.functions["main"].operations}
    assert "upsample_nearest_neighbor" in ops and "layer_norm" in ops
    PSNRS["fp32"] = mil.psnr(ref, got)
    assert PSNRS["fp32"] >= 60, PSNRS

    _, got16 = _export_run(tmp_path, params, cfg, z, "fp16", compute_precision="float16")
    assert got16.shape == ref.shape
    PSNRS["fp16"] = mil.psnr(ref, got16)
    assert PSNRS["fp16"] >= 35, PSNRS
    print("VAE decoder PSNR", PSNRS)


def test_decoder_split_einsum_matches(pipe, z, tmp_path):
    params, cfg = pipe.params["vae"], pipe.configs["vae"]
    ref = _reference(params, cfg, z)
    _, got = _export_run(tmp_path, params, cfg, z, "se", attention="split_einsum_v2")
    PSNRS["fp32_split_einsum_v2"] = mil.psnr(ref, got)
    assert PSNRS["fp32_split_einsum_v2"] >= 60, PSNRS


@pytest.fixture(scope="module")
def pal6(pipe):
    """The reference VAE with every weight 6-bit palettized (shared by decoder and encoder)."""
    return quant.apply_recipe(pipe.params, {"components": ["vae"],
                                            "rules": [{"pattern": "*", "method": "palettize", "nbits": 6}]})["vae"]


def _assert_luts_stored(stored, pal):
    """Every palettized weight in ``pal`` ({name: PalettizedWeight}) has its LUT, bit for bit (as
    float32 tables), among the package's constexprs ``stored``."""
    assert len(stored) >= len(pal)
    luts = [np.asarray(v["lut"]) for v in stored.values()]
    for dotted, w in pal.items():
        want = np.asarray(w.lut)[0].astype(np.float32)
        assert any(lut.dtype == want.dtype and lut.shape == want.shape and
                   np.array_equal(lut.view(np.uint32), want.view(np.uint32)) for lut in luts), dotted


def _assert_conv_stored(s, w):
    """A palettized HWIO conv weight ``w`` stored as the constexpr ``s``: sdjax's LUT bit for bit, the
    OIHW shape, and indices that expand to sdjax's dense weight transposed to OIHW."""
    assert type(w).__name__ == "PalettizedWeight"
    assert np.array_equal(np.asarray(s["lut"]).view(np.uint32), np.asarray(w.lut)[0].astype(np.float32).view(np.uint32))
    shape = [int(d) for d in np.asarray(s["shape"])]
    assert shape == [int(w.shape[i]) for i in (3, 2, 0, 1)]
    dense = np.asarray(s["lut"])[interp._unpack_bits(s["indices"], w.nbits, w.size)].reshape(shape)
    np.testing.assert_array_equal(dense, np.transpose(np.asarray(w.dequantize(np.float32)), (3, 2, 0, 1)))


def test_decoder_palettized(pipe, pal6, z, tmp_path):
    params, cfg = pal6, pipe.configs["vae"]
    ref = _reference(params, cfg, z)
    prog, got = _export_run(tmp_path, params, cfg, z, "pal6")
    PSNRS["fp32_palettized6"] = mil.psnr(ref, got)
    assert PSNRS["fp32_palettized6"] >= 60, PSNRS
    print("VAE decoder PSNR", PSNRS)

    stored = interp.constexpr_values(prog)
    # every palettized decoder-side weight is a constexpr holding sdjax's LUT, bit for bit
    pal = {}
    for dotted, w in _leaves(params):
        if type(w).__name__ == "PalettizedWeight" and not dotted.startswith(("encoder", "quant_conv")):
            pal[dotted] = w
    assert pal, "the recipe palettized nothing in the decoder"
    _assert_luts_stored(stored, pal)
    # a 3x3 conv by name: its HWIO indices were repacked as OIHW, the dense weight is sdjax's transposed
    _assert_conv_stored(stored["conv_in_w"], params["decoder"]["conv_in"]["weight"])


def test_export_refuses_existing(pipe, tmp_path):
    path = tmp_path / "x.mlpackage"
    path.mkdir()
    with pytest.raises(FileExistsError):
        vae.export_decoder(pipe.params["vae"], pipe.configs["vae"], path)
    with pytest.raises(FileExistsError):
        vae.export_encoder(pipe.params["vae"], pipe.configs["vae"], path)


# --- encoder ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image(pipe):
    """A smooth random RGB image in [-1, 1], NCHW: what Encoder.swift feeds (planar RGB)."""
    h, w = vae.default_image_shape(pipe.configs["vae"])
    rng = np.random.default_rng(1)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([np.sin(6 * xx + 2 * c) * np.cos(4 * yy - c) for c in range(3)])[None]
    return np.clip(0.8 * img + 0.2 * rng.uniform(-1, 1, img.shape), -1, 1).astype(np.float32)


def _moments(params, config, image):
    """sdjax's encoder moments, NCHW: (mean, logvar), logvar clamped to [-30, 20]."""
    mean, logvar = sdjax.vae.encode(params, config, np.transpose(image, (0, 2, 3, 1)))
    return tuple(np.asarray(a, np.float32).transpose(0, 3, 1, 2) for a in (mean, logvar))


def _encoder_reference(params, config, image):
    """What the package must output: the moments rescaled so that Swift's fixed 0.18215 gives
    the model's own scaling_factor (r * mean, logvar + 2 ln r)."""
    mean, logvar = _moments(params, config, image)
    r = config.scaling_factor / vae.SWIFT_SCALING_FACTOR
    return np.concatenate([mean * r, logvar + 2 * np.log(r)], axis=1)


def _export_run_encoder(tmp_path, params, config, image, name, **kw):
    path = tmp_path / f"enc_{name}.mlpackage"
    vae.export_encoder(params, config, path, **kw)
    prog = interp.load_program(path)
    return prog, interp.run(prog, {"x": image})


def _swift_encode(out, eps, scale_factor=vae.SWIFT_SCALING_FACTOR):
    """Encoder.swift's post-processing of the model output: mean = out[0][0..<4], logvar =
    clamp(out[0][4..<8], -30, 20), latent = (mean + exp(logvar / 2) * eps) * scaleFactor."""
    mean = out[0, 0:4]
    logvar = np.clip(out[0, 4:8], -30, 20)
    return ((mean + np.exp(0.5 * logvar) * eps) * scale_factor)[None]


def _check_swift_io(prog, image_shape, latent_channels, latent_hw):
    """One input "x" (1, 3, H, W) and one output "latent" (1, 2 * latent_channels, h, w):
    Encoder.swift reads the first input/output of each and torch2coreml names them so."""
    f = prog.functions["main"]
    assert [(name, tuple(v.shape)) for name, v in f.inputs.items()] == [("x", (1, 3, *image_shape))]
    assert [(v.name, tuple(v.shape)) for v in f.outputs] == [("latent", (1, 2 * latent_channels, *latent_hw))]


def test_default_image_shape(pipe):
    assert vae.default_image_shape(pipe.configs["vae"]) == (64, 64)
    assert vae.default_image_shape(sdjax.configs.VAEConfig(block_out_channels=(1, 2, 3, 4), sample_size=512)) == (512, 512)
    with pytest.raises(ValueError, match="multiple"):
        vae.build_encoder(pipe.params["vae"], pipe.configs["vae"], image_shape=(62, 64))


def test_encoder_fp32_and_fp16(pipe, image, tmp_path):
    params, cfg = pipe.params["vae"], pipe.configs["vae"]
    assert cfg.scaling_factor != vae.SWIFT_SCALING_FACTOR  # 0.599: the rescaled path is the one tested
    ref = _encoder_reference(params, cfg, image)
    assert ref.shape == (1, 8, 16, 16)
    prog, out = _export_run_encoder(tmp_path, params, cfg, image, "fp32")
    _check_swift_io(prog, (64, 64), 4, (16, 16))
    got = out["latent"]
    assert got.dtype == np.float32
    ops = [op.op_type for op in prog.functions["main"].operations]
    strided = [op for op in prog.functions["main"].operations
               if op.op_type == "conv" and list(op.strides.val) == [2, 2]]
    assert len(strided) == 2 and all(list(op.pad.val) == [0, 1, 0, 1] for op in strided)
    assert "split" in ops and "concat" in ops
    PSNRS["enc_fp32"] = mil.psnr(ref, got)
    assert PSNRS["enc_fp32"] >= 60, PSNRS

    # in the Swift pipeline (encoderScaleFactor 0.18215) the sample is the model's own:
    # scaling_factor * (mean + std * eps), as diffusers' latent_dist.sample() * scaling_factor
    mean, logvar = _moments(params, cfg, image)
    eps = np.random.default_rng(2).standard_normal(mean.shape[1:]).astype(np.float32)
    want = cfg.scaling_factor * (mean + np.exp(0.5 * logvar) * eps)
    PSNRS["enc_fp32_swift_sample"] = mil.psnr(want, _swift_encode(got, eps))
    assert PSNRS["enc_fp32_swift_sample"] >= 60, PSNRS

    prog16, out16 = _export_run_encoder(tmp_path, params, cfg, image, "fp16", compute_precision="float16")
    _check_swift_io(prog16, (64, 64), 4, (16, 16))
    PSNRS["enc_fp16"] = mil.psnr(ref, out16["latent"])
    assert PSNRS["enc_fp16"] >= 35, PSNRS
    print("VAE encoder PSNR", PSNRS)


def test_encoder_palettized(pipe, pal6, image, tmp_path):
    params, cfg = pal6, pipe.configs["vae"]
    ref = _encoder_reference(params, cfg, image)
    prog, out = _export_run_encoder(tmp_path, params, cfg, image, "pal6")
    PSNRS["enc_fp32_palettized6"] = mil.psnr(ref, out["latent"])
    assert PSNRS["enc_fp32_palettized6"] >= 60, PSNRS

    stored = interp.constexpr_values(prog)
    pal = {dotted: w for dotted, w in _leaves(params)
           if type(w).__name__ == "PalettizedWeight" and dotted.startswith(("encoder", "quant_conv"))}
    assert pal, "the recipe palettized nothing in the encoder"
    _assert_luts_stored(stored, pal)
    # a strided downsampler conv by name: OIHW repacked indices, dense weight is sdjax's transposed
    _assert_conv_stored(stored["down0_downconv_w"],
                        params["encoder"]["down_blocks"]["0"]["downsamplers"]["0"]["conv"]["weight"])


def test_encoder_matches_diffusers(tmp_path):
    """A tiny diffusers AutoencoderKL (SD's 0.18215, so no rescale: the output is Apple's
    ``quant_conv(encoder(x))`` with logvar clamped), saved and loaded by sdjax, a non-square image
    with three levels, two resnets per block and split-einsum attention."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    n = 3
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
                                  latent_channels=4, sample_size=32, down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path / "vae")
    params, cfg = sdjax.checkpoint.load_component(str(tmp_path / "vae"), "vae", progress=False)
    assert cfg.scaling_factor == vae.SWIFT_SCALING_FACTOR

    image = np.random.default_rng(3).uniform(-1, 1, (1, 3, 24, 40)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(image)
        moments = ref.quant_conv(ref.encoder(x)).numpy()  # torch2coreml's VAEEncoder
        dist = ref.encode(x).latent_dist
        want = np.concatenate([dist.mean.numpy(), dist.logvar.numpy()], axis=1)
    prog, out = _export_run_encoder(tmp_path, params, cfg, image, "tiny", image_shape=(24, 40),
                                    attention="split_einsum_v2")
    _check_swift_io(prog, (24, 40), 4, (6, 10))
    names = {op.name for op in prog.functions["main"].operations}
    assert not names & {"mean_rescaled", "logvar_rescaled"}
    got = out["latent"]
    PSNRS["enc_tiny_vs_diffusers"] = mil.psnr(want, got)
    PSNRS["enc_tiny_vs_apple_moments"] = mil.psnr(moments, got)
    assert PSNRS["enc_tiny_vs_diffusers"] >= 60 and PSNRS["enc_tiny_vs_apple_moments"] >= 60, PSNRS
    print("VAE encoder PSNR", PSNRS)
