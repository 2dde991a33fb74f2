"""quant.lora_branch: a LoRA run beside a quantized weight. The weight type against a float64 NumPy
statement of y = x W_base + ((x down) * scale) up (linear, 1x1 and LoCon k x k convolutions, bases
palettized, int8, LLM.int8 or float); ``apply`` on a tiny UNet with a PEFT-format LoRA file against
``sdjax.lora.merge`` (float base: the same function; quantized base: the dequantized base plus the
merged update); ``sdjax.lora.factors`` against the merge; bad inputs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quant
from quant import int8, llm_int8, lora_branch, palettize
from quant.lora_branch import LoraBranchWeight
from sdjax import configs as cfgs, lora, nn, unet
from sdjax.safetensors_io import write

RTOL = 2e-5


def _f64(w):
    return np.asarray(nn.float_value(w), np.float64)


def _conv64(x, w, stride, padding):
    """Float64 NHWC x HWIO convolution by explicit patches (padding ((top, bottom), (left, right)))."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), padding[0], padding[1], (0, 0)))
    kh, kw, _, cout = w.shape
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, cout))
    for dy in range(kh):
        for dx in range(kw):
            out += x[:, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride] @ w[dy, dx]
    return out


def _close(got, want, rtol=RTOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < rtol, err


@pytest.mark.parametrize("base_kind", ["palettize", "float"])
def test_linear_branch_equals_float64_statement(base_kind):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 40)).astype(np.float32) * 0.1
    base = palettize.kmeans(w, 4) if base_kind == "palettize" else jnp.asarray(w)
    down = rng.standard_normal((48, 3)).astype(np.float32) * 0.2
    up = rng.standard_normal((3, 40)).astype(np.float32) * 0.2
    scale = np.array([0.5, -1.5, 2.0], np.float32)
    bw = lora_branch.branch(base, down, up, scale)
    d16, u16 = down.astype(np.float16).astype(np.float64), up.astype(np.float16).astype(np.float64)  # stored float16
    x = rng.standard_normal((2, 5, 48)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    want = x.astype(np.float64) @ _f64(base) + ((x.astype(np.float64) @ d16) * scale) @ u16 + bias
    got = jax.jit(lambda x, p: nn.linear(x, p))(jnp.asarray(x), {"weight": bw, "bias": jnp.asarray(bias)})
    _close(got, want)
    _close(bw.dequantize(), _f64(base) + (d16 * scale) @ u16)
    assert bw.shape == (48, 40) and bw.method == "lora-branch" and bw.rank == 3 and nn.is_quantized(bw)
    assert bw.nbytes == int(base.nbytes) + 2 * (48 * 3 + 3 * 40) + 4 * 3
    assert quant.size_bytes({"w": bw}) == bw.nbytes


@pytest.mark.parametrize("k,stride,padding", [(3, 1, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))), (1, 1, ((0, 0), (0, 0)))])
def test_conv_branch_equals_float64_statement(k, stride, padding):
    """A LoCon down of the layer's kernel size (stride and padding as the layer's), a 1x1 up."""
    rng = np.random.default_rng(k * 10 + stride)
    w = rng.standard_normal((k, k, 16, 24)).astype(np.float32) * 0.1
    base = palettize.kmeans(w, 6, group_size=8)
    down = rng.standard_normal((k, k, 16, 2)).astype(np.float32) * 0.2
    up = rng.standard_normal((2, 24)).astype(np.float32) * 0.2
    bw = lora_branch.branch(base, down, up, 0.8, dtype=jnp.float32)
    x = rng.standard_normal((2, 9, 9, 16)).astype(np.float32)
    want = _conv64(x, _f64(base), stride, padding) + 0.8 * _conv64(x, down.astype(np.float64), stride, padding) \
        @ up.astype(np.float64)
    _close(nn.conv2d(jnp.asarray(x), {"weight": bw}, stride, padding), want)
    # the expanded weight is base + the update (einsum("hwir,ro->hwio")), and a float conv with it gives the same
    _close(bw.dequantize(), _f64(base) + 0.8 * np.einsum("hwir,ro->hwio", down.astype(np.float64), up.astype(np.float64)))
    _close(_conv64(x, _f64(bw), stride, padding), want, 1e-6)


@pytest.mark.parametrize("make", [lambda w: int8.quantize(w, act_scale=0.05),
                                  lambda w: llm_int8.quantize(w, threshold=2.0)], ids=["int8-w8a8", "llm-int8"])
def test_a_base_with_its_own_compute_path_keeps_it(make):
    """The base's integer path runs (not its dequantized weight); the branch adds the float64 LoRA term."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((32, 16)).astype(np.float32) * 0.1)
    base = make(w)
    down = rng.standard_normal((32, 4)).astype(np.float32) * 0.2
    up = rng.standard_normal((4, 16)).astype(np.float32) * 0.2
    bw = lora_branch.branch(base, down, up, 1.25, dtype=jnp.float32)
    x = jnp.asarray(rng.standard_normal((6, 32)).astype(np.float32) * 2)
    want = np.asarray(nn.linear(x, {"weight": base}), np.float64) + 1.25 * (np.asarray(x, np.float64) @ down) @ up
    _close(nn.linear(x, {"weight": bw}), want)


def test_factors_that_do_not_fit_are_refused():
    base = palettize.kmeans(np.ones((8, 6), np.float32) * np.arange(6), 2)
    for down, up in [(np.ones((8, 2)), np.ones((3, 6))), (np.ones((6, 2)), np.ones((2, 6))),
                     (np.ones((8, 2)), np.ones((2, 8)))]:
        with pytest.raises(ValueError, match="do not fit a weight of shape"):
            lora_branch.branch(base, down, up, 1.0)
    with pytest.raises(ValueError, match="not finite"):
        lora_branch.branch(base, np.ones((8, 2)), np.ones((2, 6)), float("nan"))


# --- apply on a tiny UNet with LoRA files --------------------------------------------------------

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[64], layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)  # one level: compiles in seconds
ATTN = "down_blocks.0.attentions.0"
LAYERS = {  # module -> (PyTorch weight shape, down shape (rank 4)); 64x64 attention, 1x1 proj_in, 3x3 conv1
    f"{ATTN}.transformer_blocks.0.attn1.to_q": ((64, 64), (4, 64)),
    f"{ATTN}.transformer_blocks.0.attn1.to_out.0": ((64, 64), (4, 64)),
    f"{ATTN}.transformer_blocks.0.attn2.to_k": ((64, 32), (4, 32)),     # 2048 weights: left float by the recipe
    f"{ATTN}.proj_in": ((64, 64, 1, 1), (4, 64, 1, 1)),
    "down_blocks.0.resnets.0.conv1": ((64, 64, 3, 3), (4, 64, 3, 3)),    # LoCon
    "up_blocks.0.resnets.0.conv1": ((64, 128, 3, 3), (4, 128, 3, 3)),
}


@pytest.fixture(scope="module")
def tiny():
    cfg = cfgs.unet_config(UNET)
    params = {"unet": jax.tree.map(np.asarray, unet.init_params(cfg, seed=1))}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    # one jitted function for the module: params of one structure (all float) compile once
    run = jax.jit(lambda p: unet.apply(p, cfg, x, jnp.array([10, 700]), ctx))
    return params, {"unet": cfg}, run


@pytest.fixture(scope="module")
def palettized(tiny):
    return quant.apply_recipe(tiny[0], "palette-4bit")


def write_lora(path, seed, modules=LAYERS, alpha=8, extra=None):
    """A diffusers/PEFT-format file: lora_A (rank, in[, k, k]) and lora_B (out, rank[, 1, 1])."""
    rng = np.random.default_rng(seed)
    t = {}
    for module, (w, d) in modules.items():
        t[f"unet.{module}.lora_A.weight"] = (rng.standard_normal(d) * 0.3).astype(np.float32)
        t[f"unet.{module}.lora_B.weight"] = (rng.standard_normal((w[0], 4) + ((1, 1) if len(w) == 4 else ()))
                                              * 0.3).astype(np.float32)
    t.update(extra or {})
    write(str(path), t, {lora.METADATA_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": alpha})})
    return str(path)


def test_factors_give_the_merge(tiny, tmp_path):
    params, configs, _ = tiny
    path = write_lora(tmp_path / "a.safetensors", 1)
    merged = nn.flatten(lora.merge(params, configs, [(path, 0.7)])["unet"])
    table = lora.factors(params, configs, [(path, 0.7)])["unet"]
    assert sorted(table) == sorted(m + ".weight" for m in LAYERS)
    base = nn.flatten(params["unet"])
    for name, [(down, up, s)] in table.items():
        assert s == pytest.approx(0.7 * 8 / 4)
        want = base[name] + s * np.einsum("...ir,ro->...io", down, up)
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6)


def test_on_float_weights_branches_compute_the_merged_model(tiny, tmp_path):
    params, configs, run = tiny
    path = write_lora(tmp_path / "a.safetensors", 1)
    merged = lora.merge(params, configs, [(path, 0.7)])
    branched = lora_branch.apply(params, [(path, 0.7)], configs, dtype=jnp.float32, merge_float=False)
    flat = nn.flatten(branched["unet"])
    assert all(isinstance(flat[m + ".weight"], LoraBranchWeight) for m in LAYERS)
    want = np.asarray(run(merged["unet"]))
    for m in LAYERS:  # the LoRA matters
        w0, w1 = nn.flatten(params["unet"])[m + ".weight"], nn.flatten(merged["unet"])[m + ".weight"]
        assert np.abs(w1 - w0).max() > 0.1 * np.abs(w0).max()
    _close(run(branched["unet"]), want, 1e-5)
    # merge_float (the default): the float layers merged, as sdjax.lora.merge merges them
    merged_here = nn.flatten(lora_branch.apply(params, [(path, 0.7)], configs)["unet"])
    for name, w in nn.flatten(merged["unet"]).items():
        np.testing.assert_allclose(np.asarray(merged_here[name]), np.asarray(w), rtol=1e-6, atol=1e-7)
    for name, w in nn.flatten(params["unet"]).items():  # params left as they were
        assert w is nn.flatten(params["unet"])[name]


def test_on_a_palettized_model_quantized_layers_get_branches_and_float_layers_the_merge(tiny, palettized, tmp_path):
    params, configs, run = tiny
    a, b = write_lora(tmp_path / "a.safetensors", 1), write_lora(tmp_path / "b.safetensors", 2, alpha=4)
    loras = [(a, 0.7), (b, -0.4)]
    q = palettized
    wrapped = lora_branch.apply(q, loras, configs)
    flat, qflat = nn.flatten(wrapped["unet"]), nn.flatten(q["unet"])
    merged = nn.flatten(lora.merge(params, configs, loras)["unet"])
    want_params = {n: nn.float_value(w) if nn.is_quantized(w) else w for n, w in qflat.items()}  # all float
    for m in LAYERS:
        name = m + ".weight"
        w = flat[name]
        if nn.is_quantized(qflat[name]):
            assert isinstance(w, LoraBranchWeight) and w.base is qflat[name] and w.rank == 8  # two LoRAs, one branch
            assert w.down.dtype == jnp.float16
            # the update is the merge's: merged float weight - float base = branch's delta (float16 factors)
            np.testing.assert_allclose(np.asarray(w.delta()), merged[name] - nn.flatten(params["unet"])[name],
                                       rtol=2e-2, atol=2e-3)
            want_params[name] = np.asarray(w.dequantize())
        else:  # the recipe left it float (2048 weights): merged, exactly as sdjax.lora.merge merges it
            assert not nn.is_quantized(w)
            np.testing.assert_allclose(np.asarray(w), merged[name], rtol=1e-6, atol=1e-7)
            want_params[name] = np.asarray(w)
    assert sum(isinstance(w, LoraBranchWeight) for w in flat.values()) == len(LAYERS) - 1
    _close(run(wrapped["unet"]), run(nn.unflatten(want_params)), 1e-5)
    extra = sum(2 * (np.prod(LAYERS[m][1]) + LAYERS[m][0][0] * 4) * 2 + 4 * 8 for m in LAYERS if "attn2" not in m)
    assert quant.size_bytes(wrapped["unet"]) == quant.size_bytes(q["unet"]) + extra  # the float layer: no byte more
    assert lora_branch.lora_bytes(wrapped) == extra
    # a second apply adds its LoRA to the existing branches: the same weights
    again = nn.flatten(lora_branch.apply(lora_branch.apply(q, [loras[0]], configs), [loras[1]], configs)["unet"])
    for name, w in flat.items():
        np.testing.assert_allclose(nn.float_value(again[name]), nn.float_value(w), rtol=1e-6, atol=1e-6)


def test_a_lora_naming_no_layer_is_the_merge_error(tiny, palettized, tmp_path):
    params, configs, _ = tiny
    bad = write_lora(tmp_path / "bad.safetensors", 3, extra={
        "unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": np.ones((4, 64), np.float32),
        "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": np.ones((64, 4), np.float32)})
    q = palettized
    with pytest.raises(lora.LoraError, match=r"down_blocks\.7\.attentions\.0\.proj_in\.lora_A\.weight: matches no "
                                             "layer of this model's unet"):
        lora_branch.apply(q, [bad], configs)
    with pytest.raises(lora.LoraError, match="is quantized; LoRAs merge into float weights"):
        lora.merge(q, configs, [write_lora(tmp_path / "ok.safetensors", 4)])  # the merge still refuses
