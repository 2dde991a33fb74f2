"""The ControlNet computes the same function as diffusers' ControlNetModel, its residuals enter the UNet
as diffusers adds them, it loads from diffusers folders and original-layout single files (diffusers'
own single-file loader is the oracle of that layout), every bad file and misfit is named, and
quantization recipes apply to it as a "controlnet" component."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sdjax
import tiny_models
from sdjax import checkpoint, configs, controlnet, convert_controlnet, unet
from sdjax.params import CheckpointError
from tiny_models import TOL, in_torch_layout, nchw, nhwc, rel_err, torch_shapes
from controlnet_fixtures import build_controlnet, controlnet_inputs

controlnet_apply = jax.jit(controlnet.apply, static_argnums=1)
unet_apply = jax.jit(unet.apply, static_argnums=1)


ERRORS = {}  # case -> the largest relative error of the residuals and of the controlled UNet (for the README)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """diffusers' tiny models run several times faster on one thread on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if ERRORS:
        print("\nControlNet parity (max relative error: residuals, UNet): "
              + ", ".join(f"{k} {a:.1e}, {b:.1e}" for k, (a, b) in ERRORS.items()))


# tiny UNets: SD 1.x-like (conv projections, 8 heads, two resnets a level) and SDXL-like (linear
# projections, per-level heads and transformer depths, text_time conditioning; a mid block that
# scales its resnets' outputs, as the ControlNet copies it)
UNETS = {
    "sd1": dict(tiny_models.STYLES["sd1"]["unet"]),
    "sdxl": dict(tiny_models.SDXL_STYLES["sdxl"]["unet"], layers_per_block=1, mid_block_scale_factor=1.5),
}
POOLED = tiny_models.SDXL_CLIP_2["projection_dim"]
# (UNet, conditioning_embedding_out_channels, from_unet keywords)
CASES = {"sd1": ("sd1", (8, 16), {}), "sdxl": ("sdxl", (8, 16), {}),
         "sd1-bgr-4-levels": ("sd1", (16, 32, 96, 256), {"controlnet_conditioning_channel_order": "bgr"})}


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """case -> (diffusers ControlNetModel, its folder, diffusers UNet, (sdjax UNet params, config), UNet
    folder), built on first use."""
    from diffusers import UNet2DConditionModel
    unets, cache = {}, {}

    def get(case):
        name, channels, kw = CASES[case]
        if name not in unets:
            torch.manual_seed(7)
            u = UNet2DConditionModel(**UNETS[name])
            with torch.no_grad():
                for p in u.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            folder = str(tmp_path_factory.mktemp(f"unet-{name}"))
            u.save_pretrained(folder)
            unets[name] = (u, folder, checkpoint.load_component(folder, "unet", progress=False))
        if case not in cache:
            u, _, sj = unets[name]
            cn_dir = str(tmp_path_factory.mktemp(f"cn-{case}"))
            cache[case] = (build_controlnet(u, cn_dir, seed=1, cond_channels=channels, **kw), cn_dir, u, sj,
                           unets[name][1])
        return cache[case]
    return get


def _added_cond(unet_config, b, seed=0):
    if not unet_config.is_sdxl:
        return None, None
    g = torch.Generator().manual_seed(seed)
    te = torch.randn(b, POOLED, generator=g)
    ids = torch.tensor([[32.0, 48, 0, 0, 32, 48], [64, 64, 4, 8, 32, 48]])[:b]
    return {"text_embeds": te, "time_ids": ids}, {"text_embeds": jnp.asarray(te.numpy()),
                                                 "time_ids": jnp.asarray(ids.numpy())}


@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_and_controlled_unet_match_diffusers(nets, case):
    cn, cn_dir, ref_unet, (unet_params, unet_cfg), _ = nets(case)
    params, cfg = sdjax.load_controlnet(cn_dir, progress=False)
    x, t, ctx, cond = controlnet_inputs(cfg, scale=cfg.downscale)
    torch_cond, jax_cond = _added_cond(unet_cfg, 2)
    with torch.no_grad():
        down, mid = cn(x, t, ctx, cond, conditioning_scale=0.7, added_cond_kwargs=torch_cond, return_dict=False)
        want = ref_unet(x, t, ctx, added_cond_kwargs=torch_cond, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample.numpy()
        plain = ref_unet(x, t, ctx, added_cond_kwargs=torch_cond).sample.numpy()
    args = [jnp.asarray(a) for a in (nhwc(x.numpy()), t.numpy(), ctx.numpy())]
    got_down, got_mid = controlnet_apply(params, cfg, *args, jnp.asarray(nhwc(cond.numpy())),
                                         conditioning_scale=0.7, added_cond=jax_cond)
    assert len(got_down) == len(down) == len(unet.skip_channels(unet_cfg)) - 1
    errs = [rel_err(nchw(g), w.numpy()) for g, w in zip(got_down + (got_mid,), tuple(down) + (mid,))]
    got = unet_apply(unet_params, unet_cfg, *args, added_cond=jax_cond,
                     down_block_additional_residuals=got_down, mid_block_additional_residual=got_mid)
    ERRORS[case] = (max(errs), rel_err(nchw(got), want))
    assert max(errs) <= TOL and ERRORS[case][1] <= TOL
    assert rel_err(plain, want) > 100 * TOL  # the residuals are far from zero: they are tested


def test_param_shapes_match_diffusers_and_init(nets):
    cn, cn_dir, *_ = nets("sdxl")
    cfg = configs.read("controlnet", os.path.join(cn_dir, "config.json"))
    assert in_torch_layout(controlnet.param_shapes(cfg)) == torch_shapes(cn)
    p = controlnet.init_params(cfg, seed=3)
    assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, sdjax.load_controlnet(cn_dir, progress=False)[0])


def test_full_size_sd15_controlnet_param_shapes_match_diffusers():
    from diffusers import ControlNetModel
    with torch.device("meta"):
        ref = ControlNetModel(cross_attention_dim=768)
    cfg = configs.controlnet_config(dict(ref.config))
    assert in_torch_layout(controlnet.param_shapes(cfg)) == torch_shapes(ref)


# --- single files ----------------------------------------------------------------------------------

def _state_dict(cn):
    return {k: v.numpy() for k, v in cn.state_dict().items()}


def _config(cn_dir):
    with open(os.path.join(cn_dir, "config.json")) as f:
        return json.load(f)


def _save(path, tensors):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return str(path)


# what shapes cannot tell about the tiny models (heads, norm groups; SDXL's time id width)
def _overrides(cfg):
    o = {k: cfg[k] for k in ("attention_head_dim", "norm_num_groups", "upcast_attention", "mid_block_scale_factor")}
    if cfg.get("addition_embed_type"):
        o["addition_time_embed_dim"] = cfg["addition_time_embed_dim"]
    if cfg["controlnet_conditioning_channel_order"] != "rgb":  # the original layout has no such notion
        o["controlnet_conditioning_channel_order"] = cfg["controlnet_conditioning_channel_order"]
    return o


def _same_params(a, b):
    fa, fb = sdjax.nn.flatten(a), sdjax.nn.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_single_file_in_the_original_layout_reads_as_diffusers_reads_it(nets, tmp_path):
    """diffusers' ControlNetModel.from_single_file (its config given, offline) reads the file written
    by the key table: the table is the original layout. sdjax reads the same weights and config."""
    from diffusers import ControlNetModel
    cn, cn_dir, *_ = nets("sd1-bgr-4-levels")  # diffusers' converter assumes 4 embedding levels
    cfg = _config(cn_dir)
    path = _save(tmp_path / "cn.safetensors", convert_controlnet.diffusers_to_ldm(_state_dict(cn), cfg))
    oracle = ControlNetModel.from_single_file(path, config=cn_dir, local_files_only=True)
    want = cn.state_dict()
    assert oracle.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in oracle.state_dict().items())
    folder_params, folder_cfg = sdjax.load_controlnet(cn_dir, progress=False)
    params, got_cfg = sdjax.load_controlnet(path, config=_overrides(cfg), progress=False)
    assert got_cfg == folder_cfg
    _same_params(params, folder_params)


@pytest.mark.parametrize("case,form", [("sd1", "bare"), ("sd1", "full-ckpt"), ("sdxl", "cldm")])
def test_single_file_layouts_load_the_folders_weights(nets, tmp_path, case, form):
    """Files of the ControlNet alone (no prefix), a whole cldm checkpoint (.ckpt, the ControlNet beside
    an SD model whose tensors are skipped), and an SDXL ControlNet (label_emb, as SGM names SDXL's
    add_embedding)."""
    cn, cn_dir, *_ = nets(case)
    cfg = _config(cn_dir)
    ldm = convert_controlnet.diffusers_to_ldm(_state_dict(cn), cfg, prefix="" if form == "bare" else "control_model.")
    if form == "full-ckpt":
        ldm["model.diffusion_model.out.2.weight"] = np.zeros((4, 32, 3, 3), np.float32)
        ldm["first_stage_model.decoder.conv_in.bias"] = np.zeros(8, np.float32)
        path = str(tmp_path / "control_sd15.ckpt")
        torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm.items()}}, path)
    else:
        path = _save(tmp_path / "cn.safetensors", ldm)
    params, got_cfg = sdjax.load_controlnet(path, config=_overrides(cfg), progress=False)
    folder_params, folder_cfg = sdjax.load_controlnet(cn_dir, progress=False)
    # SDXL's first level has no attention: its transformer count is not in the file, nor needed
    assert got_cfg.unet.transformer_depths == folder_cfg.unet.transformer_depths
    assert dataclasses.replace(got_cfg, transformer_layers_per_block=folder_cfg.transformer_layers_per_block) \
        == folder_cfg
    _same_params(params, folder_params)


def test_single_file_in_diffusers_names_takes_its_config_json(nets, tmp_path):
    cn, cn_dir, *_ = nets("sd1")
    path = _save(tmp_path / "cn.safetensors", _state_dict(cn))
    with pytest.raises(CheckpointError, match="carries no config: pass its config.json"):
        sdjax.load_controlnet(path, progress=False)
    params, cfg = sdjax.load_controlnet(path, config=os.path.join(cn_dir, "config.json"), progress=False)
    folder_params, folder_cfg = sdjax.load_controlnet(cn_dir, progress=False)
    assert cfg == folder_cfg
    _same_params(params, folder_params)


# --- bad files and misfits ---------------------------------------------------------------------------

def _ldm_file(nets, tmp_path, edit):
    cn, cn_dir, *_ = nets("sd1")
    cfg = _config(cn_dir)
    ldm = convert_controlnet.diffusers_to_ldm(_state_dict(cn), cfg)
    edit(ldm)
    return _save(tmp_path / "cn.safetensors", ldm), _overrides(cfg)


def test_missing_and_unknown_keys_are_named(nets, tmp_path):
    def edit(ldm):
        del ldm["control_model.zero_convs.3.0.weight"]
        ldm["control_model.zero_convs.9.0.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    path, over = _ldm_file(nets, tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        sdjax.load_controlnet(path, config=over, progress=False)
    msg = str(e.value)
    assert "missing keys (1): control_model.zero_convs.3.0.weight" in msg
    assert "unrecognised keys (1): control_model.zero_convs.9.0.weight" in msg


def test_wrong_shape_names_the_key_and_both_shapes(nets, tmp_path):
    def edit(ldm):
        ldm["control_model.middle_block_out.0.weight"] = np.zeros((64, 32, 1, 1), np.float32)
    path, over = _ldm_file(nets, tmp_path, edit)
    want = r"cn.safetensors.*\n.*shape mismatches \(1\): controlnet_mid_block.weight expected \(64, 64, 1, 1\) got"
    with pytest.raises(CheckpointError, match=want + r" \(64, 32, 1, 1\)"):
        sdjax.load_controlnet(path, config=over, progress=False)


def test_wrong_shape_in_a_folder_is_named(nets, tmp_path):
    cn, cn_dir, *_ = nets("sd1")
    sd = _state_dict(cn)
    sd["controlnet_down_blocks.0.bias"] = np.zeros(7, np.float32)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_config(cn_dir)))
    _save(folder / "diffusion_pytorch_model.safetensors", sd)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: the weights do not match the "
                                              r"config\n.*controlnet_down_blocks.0.bias expected \(32,\) got \(7,\)"):
        sdjax.load_controlnet(str(folder), progress=False)


@pytest.mark.parametrize("content,match", [
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "cn.safetensors"),
    (b"garbage", "cn.safetensors"),
])
def test_corrupt_file_is_named(tmp_path, content, match):
    path = tmp_path / "cn.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        sdjax.load_controlnet(str(path), progress=False)


def test_not_a_controlnet(nets, tmp_path):
    unet_folder = nets("sd1")[4]
    with pytest.raises(configs.ConfigError, match="UNet2DConditionModel, not of a ControlNetModel"):
        sdjax.load_controlnet(unet_folder, progress=False)
    path = _save(tmp_path / "x.safetensors", {"model.diffusion_model.out.2.weight": np.zeros((4, 4, 3, 3), np.float32)})
    with pytest.raises(CheckpointError, match="x.safetensors: not a ControlNet checkpoint: no control_model"):
        sdjax.load_controlnet(path, progress=False)
    with pytest.raises(CheckpointError, match="no such ControlNet file or folder"):
        sdjax.load_controlnet(str(tmp_path / "nope"), progress=False)


def test_unsupported_config_option_is_refused():
    with pytest.raises(configs.ConfigError, match="global_pool_conditions=True is not implemented"):
        configs.controlnet_config({"global_pool_conditions": True, "block_out_channels": [32, 64]})
    with pytest.raises(configs.ConfigError, match="controlnet_conditioning_channel_order 'rbg'"):
        configs.controlnet_config({"controlnet_conditioning_channel_order": "rbg"})


MISFITS = [  # (changes to the SD 1 ControlNet's config, UNet style, message)
    ({}, "sdxl", "cross_attention_dim 32, the UNet's is 80"),
    ({"cross_attention_dim": 80}, "sdxl", "the UNet is an SDXL UNet \\(text_time conditioning\\) and the ControlNet"),
    ({"block_out_channels": [32, 32]}, "sd1", r"skips of channels \[32, 32, 32, 32, 32, 32\] at levels "
     r"\[0, 0, 0, 1, 1, 1\], mid 32; the UNet: block_out_channels \[32, 64\], layers_per_block 2: 6 skips of "
     r"channels \[32, 32, 32, 32, 64, 64\] at levels \[0, 0, 0, 1, 1, 1\], mid 64"),
    ({"layers_per_block": 1}, "sd1", "layers_per_block 1: 4 skips"),
    ({"in_channels": 9}, "sd1", "reads 9-channel latents, the pipeline's are 4-channel"),
]


@pytest.mark.parametrize("change,style,match", MISFITS)
def test_controlnet_that_does_not_fit_the_unet_is_named(nets, change, style, match):
    _, cn_dir, *_ = nets("sd1")
    cfg = configs.controlnet_config(dict(_config(cn_dir), **change))
    u = configs.unet_config(UNETS[style])
    with pytest.raises(ValueError, match=match):
        controlnet.check_fits(cfg, u, 4)


# --- quantization ------------------------------------------------------------------------------------

def test_recipes_quantize_a_controlnet_component(nets):
    import quant
    cn, cn_dir, _, (unet_params, _), _ = nets("sd1")
    params, cfg = sdjax.load_controlnet(cn_dir, progress=False)
    recipe = {"name": "cn-int8", "components": ["controlnet"], "weight_threshold": 0,
              "rules": [{"pattern": "*attn*.to_[qkv]", "method": "int8"},
                        {"pattern": "controlnet_mid_block", "method": "float"},
                        {"pattern": "controlnet_*", "kind": "conv", "method": "int8"}]}
    q = quant.apply_recipe(params, recipe, component="controlnet")
    qflat = sdjax.nn.flatten(q)
    assert sdjax.nn.method_of(qflat["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]) == "int8"
    assert sdjax.nn.method_of(qflat["controlnet_down_blocks.2.weight"]) == "int8"
    assert not sdjax.nn.is_quantized(qflat["controlnet_mid_block.weight"])
    assert quant.size_bytes(q) < quant.size_bytes(params)
    # beside a pipeline's components: only the named one changes
    both = quant.apply_recipe({"unet": unet_params, "controlnet": params}, recipe)
    assert not any(
        sdjax.nn.is_quantized(w) for w in jax.tree.leaves(both["unet"], is_leaf=sdjax.nn.is_quantized))
    assert sdjax.nn.method_of(sdjax.nn.flatten(both["controlnet"])["controlnet_down_blocks.0.weight"]) == "int8"
    # the quantized ControlNet runs, close to the float one
    x, t, ctx, cond = controlnet_inputs(cfg)
    args = [jnp.asarray(a) for a in (nhwc(x.numpy()), t.numpy(), ctx.numpy(), nhwc(cond.numpy()))]
    fd, fm = controlnet_apply(params, cfg, *args, conditioning_scale=0.7, added_cond=None)  # as compiled above
    qd, qm = controlnet_apply(q, cfg, *args, conditioning_scale=0.7, added_cond=None)
    assert 0 < rel_err(qm, fm) < 0.2
    assert all(rel_err(a, b) < 0.2 for a, b in zip(qd, fd))
