"""Core ML export of the VAE decoder, checked by reading the saved .mlpackage back and running
it with sdjax.coreml.interp against sdjax.vae.decode."""
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


def test_decoder_palettized(pipe, z, tmp_path):
    q = quant.apply_recipe(pipe.params, {"components": ["vae"],
                                         "rules": [{"pattern": "*", "method": "palettize", "nbits": 6}]})
    params, cfg = q["vae"], pipe.configs["vae"]
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
    assert len(stored) >= len(pal)
    luts = [np.asarray(v["lut"]) for v in stored.values()]
    for dotted, w in pal.items():
        want = np.asarray(w.lut)[0].astype(np.float32)
        assert any(lut.dtype == want.dtype and lut.shape == want.shape and
                   np.array_equal(lut.view(np.uint32), want.view(np.uint32)) for lut in luts), dotted
    # a 3x3 conv by name: its HWIO indices were repacked as OIHW, the dense weight is sdjax's transposed
    w = params["decoder"]["conv_in"]["weight"]
    assert type(w).__name__ == "PalettizedWeight"
    s = stored["conv_in_w"]
    assert np.array_equal(np.asarray(s["lut"]).view(np.uint32), np.asarray(w.lut)[0].astype(np.float32).view(np.uint32))
    shape = [int(d) for d in np.asarray(s["shape"])]
    assert shape == [int(w.shape[i]) for i in (3, 2, 0, 1)]
    dense = np.asarray(s["lut"])[interp._unpack_bits(s["indices"], w.nbits, w.size)].reshape(shape)
    np.testing.assert_array_equal(dense, np.transpose(np.asarray(w.dequantize(np.float32)), (3, 2, 0, 1)))


def test_export_refuses_existing(pipe, tmp_path):
    path = tmp_path / "x.mlpackage"
    path.mkdir()
    with pytest.raises(FileExistsError):
        vae.export_decoder(pipe.params["vae"], pipe.configs["vae"], path)
