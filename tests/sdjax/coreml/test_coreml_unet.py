"""Core ML export of the UNet, checked by reading the saved .mlpackage back and running it with
sdjax.coreml.interp against sdjax.unet.apply."""
import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import quant  # noqa: E402
import sdjax  # noqa: E402
from sdjax.coreml import interp, mil, unet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

PSNRS = {}  # filled by the tests, printed with -s for the record


@pytest.fixture(scope="module")
def pipe():
    return sdjax.load(None)


@pytest.fixture(scope="module")
def inputs(pipe):
    cfg = pipe.configs["unet"]
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, cfg.in_channels, 16, 16)).astype(np.float32)
    timestep = np.array([981.0, 17.0], np.float32)
    context = rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)
    return sample, timestep, context


def _reference(params, config, inputs):
    sample, timestep, context = inputs
    out = sdjax.unet.apply(params, config, np.transpose(sample, (0, 2, 3, 1)), timestep, context)
    return np.asarray(out, np.float32).transpose(0, 3, 1, 2)


def _export_run(tmp_path, params, config, inputs, name, **kw):
    sample, timestep, context = inputs
    path = tmp_path / f"{name}.mlpackage"
    unet.export(params, config, path, latent_shape=sample.shape[2:], **kw)
    prog = interp.load_program(path)
    feeds = {"sample": sample, "timestep": timestep,
             "encoder_hidden_states": np.ascontiguousarray(np.transpose(context, (0, 2, 1))[:, :, None, :])}
    return prog, interp.run(prog, feeds)


def test_io_names_and_shapes(tmp_path, pipe, inputs):
    cfg = pipe.configs["unet"]
    prog = unet.build(pipe.params["unet"], cfg, batch=2, latent_shape=(16, 16), context_len=77)
    fn = prog.functions["main"]
    assert {k: tuple(v.shape) for k, v in fn.inputs.items()} == {
        "sample": (2, cfg.in_channels, 16, 16), "timestep": (2,),
        "encoder_hidden_states": (2, cfg.cross_attention_dim, 1, 77)}
    assert [o.name for o in fn.outputs] == ["noise_pred"]
    assert tuple(fn.outputs[0].shape) == (2, cfg.out_channels, 16, 16)


@pytest.mark.parametrize("attention", ["split_einsum_v2", "original"])
def test_fp32_matches_sdjax(tmp_path, pipe, inputs, attention):
    params, cfg = pipe.params["unet"], pipe.configs["unet"]
    _, out = _export_run(tmp_path, params, cfg, inputs, f"unet_{attention}", attention=attention)
    got = out["noise_pred"]
    ref = _reference(params, cfg, inputs)
    assert got.shape == ref.shape
    PSNRS[f"fp32 {attention}"] = p = mil.psnr(ref, got)
    assert p >= 60, p


def test_fp16_matches_sdjax(tmp_path, pipe, inputs):
    params, cfg = pipe.params["unet"], pipe.configs["unet"]
    _, out = _export_run(tmp_path, params, cfg, inputs, "unet_fp16", compute_precision="float16")
    PSNRS["fp16 split_einsum_v2"] = p = mil.psnr(_reference(params, cfg, inputs), out["noise_pred"])
    assert p >= 35, p


def test_palettized_6bit_matches_sdjax(tmp_path, pipe, inputs):
    qparams = quant.apply_recipe(pipe.params, "palette-6bit")["unet"]
    cfg = pipe.configs["unet"]
    prog, out = _export_run(tmp_path, qparams, cfg, inputs, "unet_p6")
    assert any(op.op_type == "constexpr_lut_to_dense" for op in prog.functions["main"].operations)
    PSNRS["fp32 palette-6bit"] = p = mil.psnr(_reference(qparams, cfg, inputs), out["noise_pred"])
    assert p >= 60, p


def test_chunks_compose_to_the_unet(tmp_path, pipe, inputs):
    """--chunk-unet: chunk 1 takes the UNet's inputs, chunk 2 the union of those and chunk 1's outputs
    (as the Swift package feeds it); together they compute sdjax's UNet, and the cut halves the weights."""
    params, cfg = pipe.params["unet"], pipe.configs["unet"]
    sample, timestep, context = inputs
    paths = [tmp_path / n for n in unet.CHUNK_NAMES]
    unet.export_chunks(params, cfg, paths, latent_shape=sample.shape[2:])
    p1, p2 = (interp.load_program(p) for p in paths)
    feeds = {"sample": sample, "timestep": timestep,
             "encoder_hidden_states": np.ascontiguousarray(np.transpose(context, (0, 2, 1))[:, :, None, :])}
    assert set(p1.functions["main"].inputs) == set(feeds)
    out1 = interp.run(p1, feeds)
    assert "noise_pred" not in out1 and all(k.startswith(unet.CHUNK_PREFIX) for k in out1)
    inputs2 = set(p2.functions["main"].inputs)
    assert inputs2 <= set(out1) | set(feeds) and set(out1) <= inputs2
    merged = {**feeds, **out1}  # ManagedMLModel.swift: chunk outputs win over the original inputs
    out2 = interp.run(p2, {k: merged[k] for k in inputs2})
    assert list(out2) == ["noise_pred"]
    PSNRS["fp32 chunked"] = p = mil.psnr(_reference(params, cfg, inputs), out2["noise_pred"])
    assert p >= 60, p
    sizes = [b for _, b in unet.stage_bytes(params, cfg)]
    k = unet.chunk_split(params, cfg)
    total, first = sum(sizes), sum(sizes[:k])
    best = min(abs(sum(sizes[:j]) - total / 2) for j in range(1, len(sizes)))
    assert abs(first - total / 2) == best and 0.3 < first / total < 0.7


def test_unsupported_config_raises(pipe):
    import dataclasses
    cfg = dataclasses.replace(pipe.configs["unet"], mid_block_type="UNetMidBlock2DSimpleCrossAttn")
    with pytest.raises(NotImplementedError, match="mid_block_type"):
        unet.build(pipe.params["unet"], cfg, latent_shape=(16, 16))


def test_print_psnrs():
    print("\nCore ML UNet PSNR vs sdjax (dB):", {k: round(v, 1) for k, v in PSNRS.items()})
