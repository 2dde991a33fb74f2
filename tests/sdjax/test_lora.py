"""LoRA merging (sdjax.lora, sdjax.load(loras=...)) against diffusers: random PEFT adapters on the tiny
SD 1.x and SDXL pipelines, saved with save_lora_weights (diffusers/PEFT format) or rewritten under
kohya names; diffusers' load_lora_weights + fuse_lora / set_adapters is the oracle, and the images
from the same x_T must agree (PSNR >= 70 dB). Then each bad input and its error."""
import json
import os
import re

import numpy as np
import pytest
import torch

import sdjax
from sdjax import lora
from sdjax.nn import flatten
from sdjax.safetensors_io import Reader, write
from tiny_models import params_from_torch, psnr, rel_err

PSNR_MIN = 70.0
PROMPTS, NEGATIVE = ["a red circle", "the small blue square"], ["green", ""]
H = W = 32
STEPS = 4
SAMPLER = {"sd1": "ddim", "sdxl": "euler"}  # the tiny folders' own schedulers
SD1_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # SD 1.x proj_in: a 1x1 conv; conv1: 3x3
SDXL_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv2"]


@pytest.fixture(scope="module", autouse=True)
def _peft_for_transformers():
    """transformers 5 refuses PEFT < 0.22 for text-encoder adapters, a release PyPI does not have yet
    (0.21.2 is the newest); the adapter API it uses works with 0.21, so lift the version gate here."""
    import importlib.metadata
    from packaging import version
    pytest.importorskip("peft")
    tip = pytest.importorskip("transformers.integrations.peft")
    with pytest.MonkeyPatch.context() as m:
        if version.parse(importlib.metadata.version("peft")) < version.parse(getattr(tip, "MIN_PEFT_VERSION", "0")):
            m.setattr(tip, "check_peft_version", lambda min_version: None)
        yield


def _diffusers(folder, style):
    import diffusers
    cls = diffusers.StableDiffusionXLPipeline if style == "sdxl" else diffusers.StableDiffusionPipeline
    extra = dict(add_watermarker=False) if style == "sdxl" else {}
    return cls.from_pretrained(folder, local_files_only=True, **extra)


def make_lora(folder, style, path, seed, unet=SD1_UNET, text=("q_proj", "fc1"), text_2=("k_proj", "fc2"), r=4,
              alpha=8, metadata=True):
    """Random PEFT adapters (rank r, lora_alpha alpha) on a fresh copy of the tiny pipeline, written
    by diffusers' save_lora_weights (with the PEFT configs in the header when ``metadata``);
    returns {component: PEFT state dict} as torch tensors."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    pipe = _diffusers(folder, style)
    torch.manual_seed(seed)
    targets = {"unet": unet, "text_encoder": text}
    if style == "sdxl":
        targets["text_encoder_2"] = text_2
    layers, meta = {}, {}
    for comp, modules in targets.items():
        if not modules:
            continue
        model = getattr(pipe, comp)
        model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), init_lora_weights=False))
        layers[comp] = get_peft_model_state_dict(model)
        meta[comp] = model.peft_config["default"].to_dict()
    kw = {f"{c}_lora_layers": sd for c, sd in layers.items()}
    if metadata:
        kw.update({f"{c}_lora_adapter_metadata": m for c, m in meta.items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    type(pipe).save_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), **kw)
    return layers


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 4, H // 2, W // 2)).astype(np.float32)


def _reference_image(ref, style, x_t):
    with torch.no_grad():
        return ref(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0, height=H,
                   width=W, latents=torch.from_numpy(x_t), output_type="np").images


def _sdjax_image(pipe, style, x_t):
    return pipe.generate(PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=5.0, sampler=SAMPLER[style],
                         height=H, width=W, latents=x_t, output_type="np", progress=False)


def _check_images(folder, style, ref, loras, x_t):
    """sdjax with ``loras`` against diffusers' ``ref`` (LoRAs loaded); also that the LoRAs matter."""
    want = _reference_image(ref, style, x_t)
    got = _sdjax_image(sdjax.load(folder, loras=loras, progress=False), style, x_t)
    plain = _sdjax_image(sdjax.load(folder, progress=False), style, x_t)
    assert psnr(plain, want) < 45, psnr(plain, want)  # the LoRAs change the image: the test has teeth
    assert psnr(got, want) >= PSNR_MIN, psnr(got, want)
    print(f"LoRA parity: {psnr(got, want):.1f} dB (without the LoRAs {psnr(plain, want):.1f} dB)")


# --- parity: diffusers/PEFT files --------------------------------------------------------------

def test_peft_lora_with_metadata_and_conv_layers_matches_diffusers_fuse_lora(pipeline_dirs, tmp_path):
    """One LoRA (lora_alpha 8, rank 4: factor 2, from the header's PEFT config) on attention,
    1x1-conv proj_in, 3x3 conv1 (LoCon) and the text encoder, fused at scale 0.7."""
    folder, _ = pipeline_dirs("sd1")
    path = str(tmp_path / "a.safetensors")
    make_lora(folder, "sd1", path, seed=1)
    assert json.loads(Reader(path).metadata[lora.METADATA_KEY])["unet.lora_alpha"] == 8
    ref = _diffusers(folder, "sd1")
    ref.load_lora_weights(path)
    ref.fuse_lora(lora_scale=0.7)
    _check_images(folder, "sd1", ref, [(path, 0.7)], _latents())


def test_several_loras_with_scales_match_diffusers_set_adapters(pipeline_dirs, tmp_path):
    """Two LoRAs on overlapping layers, one without header metadata (alpha = rank), at scales 0.8
    and -0.5: diffusers runs both adapters unfused with set_adapters' weights."""
    folder, _ = pipeline_dirs("sd1")
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    make_lora(folder, "sd1", a, seed=2, r=4, alpha=2)
    make_lora(folder, "sd1", b, seed=3, unet=["to_q", "ff.net.0.proj", "conv2", "time_emb_proj"], text=["v_proj"],
              r=2, metadata=False)
    ref = _diffusers(folder, "sd1")
    ref.load_lora_weights(a, adapter_name="a")
    ref.load_lora_weights(b, adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.8, -0.5])
    _check_images(folder, "sd1", ref, [(a, 0.8), (b, -0.5)], _latents(1))


def test_sdxl_loras_on_unet_and_both_text_encoders_match_diffusers(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sdxl")
    a, b = str(tmp_path / "xa.safetensors"), str(tmp_path / "xb.safetensors")
    make_lora(folder, "sdxl", a, seed=4, unet=SDXL_UNET, r=4, alpha=6)
    make_lora(folder, "sdxl", b, seed=5, unet=["to_v", "conv1", "ff.net.0.proj"], text=["out_proj"],
              text_2=["q_proj", "text_projection"], r=3, alpha=3)
    ref = _diffusers(folder, "sdxl")
    ref.load_lora_weights(a, adapter_name="a")
    ref.load_lora_weights(b, adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[1.0, 0.6])
    _check_images(folder, "sdxl", ref, [a, (b, 0.6)], _latents(2))


# --- parity: kohya files -----------------------------------------------------------------------

def _kohya_name(comp, module, prefixes):
    if comp != "unet":
        module = "text_model." + module.removeprefix("text_model.")
    return prefixes[comp] + module.replace(".", "_")


def write_kohya(path, layers, prefixes, rename=lambda comp, module: module, alphas=None):
    """The PEFT tensors of ``layers`` under kohya names (lora_down/lora_up/alpha), module names
    passed through ``rename``; alpha per module from ``alphas(i)`` (None: no alpha tensor)."""
    out = {}
    for comp, sd in layers.items():
        for i, key in enumerate(k for k in sd if k.endswith("lora_A.weight")):
            module = key[:-len(".lora_A.weight")]
            name = _kohya_name(comp, rename(comp, module), prefixes)
            out[f"{name}.lora_down.weight"] = sd[key].detach().numpy()
            out[f"{name}.lora_up.weight"] = sd[module + ".lora_B.weight"].detach().numpy()
            alpha = alphas(i) if alphas else None
            if alpha is not None:
                out[f"{name}.alpha"] = np.array(alpha, np.float16)  # kohya stores a 0-d tensor
    write(path, out)
    return out


def test_kohya_lora_matches_diffusers_loading_the_same_file(pipeline_dirs, tmp_path):
    """kohya names in diffusers' layout (as SD 1.x LoRAs have), alpha 2 at rank 4, a LoCon 3x3 conv;
    diffusers converts the file itself. (One alpha for all: diffusers 0.42 gives modules whose kohya
    alpha differs from the most common one the common alpha, and drops text-encoder self-attention
    LoRAs under transformers 5; the next test checks those against kohya's own formula.)"""
    folder, _ = pipeline_dirs("sd1")
    layers = make_lora(folder, "sd1", str(tmp_path / "peft" / "p.safetensors"), seed=6,
                       unet=["to_k", "to_out.0", "proj_out", "conv1", "ff.net.2"], text=["fc1", "fc2"])
    path = str(tmp_path / "kohya.safetensors")
    written = write_kohya(path, layers, {"unet": "lora_unet_", "text_encoder": "lora_te_"}, alphas=lambda i: 2.0)
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") and v.ndim == 4 and v.shape[2:] == (3, 3)
               for k, v in written.items())
    ref = _diffusers(folder, "sd1")
    ref.load_lora_weights(path)
    ref.fuse_lora(lora_scale=0.9)
    _check_images(folder, "sd1", ref, [(path, 0.9)], _latents(3))


def test_kohya_alphas_per_module_follow_kohyas_formula(pipeline_dirs, tmp_path):
    """Each module its own alpha, or none (alpha = rank): W + scale * alpha / rank * up @ down, as
    kohya-ss' networks/lora.py merges (a conv's update: einsum("or,rihw->oihw", up, down)), computed
    here in PyTorch on diffusers' modules."""
    folder, _ = pipeline_dirs("sd1")
    layers = make_lora(folder, "sd1", str(tmp_path / "peft" / "p.safetensors"), seed=11,
                       unet=["to_k", "to_out.0", "proj_in", "conv1"], text=["q_proj", "out_proj", "fc1"])
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    path = str(tmp_path / "kohya.safetensors")
    written = write_kohya(path, layers, prefixes, alphas=lambda i: None if i % 3 == 2 else (1.0, 8.0)[i % 2])
    scale = 0.6
    ref = _diffusers(folder, "sd1")
    with torch.no_grad():
        for comp, sd in layers.items():
            modules = dict(getattr(ref, comp).named_modules())
            for key in (k for k in sd if k.endswith(".lora_A.weight")):
                module = key[:-len(".lora_A.weight")]
                name = _kohya_name(comp, module, prefixes)
                down = torch.from_numpy(written[f"{name}.lora_down.weight"])
                up = torch.from_numpy(written[f"{name}.lora_up.weight"]).flatten(1)
                rank = down.shape[0]
                alpha = float(written[f"{name}.alpha"]) if f"{name}.alpha" in written else rank
                w = modules[module].weight
                delta = torch.einsum("or,rihw->oihw", up, down) if down.ndim == 4 else up @ down
                w += scale * alpha / rank * delta.reshape(w.shape)
    got = sdjax.load(folder, loras=[(path, scale)], progress=False)
    for comp, strip in (("unet", ""), ("text_encoder", "text_model.")):
        want = flatten(params_from_torch(getattr(ref, comp), strip))
        for k, v in flatten(got.params[comp]).items():
            assert rel_err(v, want[k]) <= 1e-6, (comp, k, rel_err(v, want[k]))


SGM_LEVEL = 3  # the tiny SDXL UNet: layers_per_block 2, so 3 input/output blocks per level


def _sgm_unet_name(comp, module):
    """A diffusers UNet module name in Stability's SGM layout, written out here for the tiny SDXL UNet
    (what kohya's SDXL LoRAs use) independently of sdjax's key tables."""
    if comp != "unet":
        return module
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}

    def block(kind, level, j, rest):
        if kind == "down":
            n = 1 + level * SGM_LEVEL + j
        else:
            n = level * SGM_LEVEL + j
        return n, rest

    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", module)
    if m:
        kind, level, what, j, rest = m.groups()
        n, rest = block(kind, int(level), int(j), rest)
        top = "input_blocks" if kind == "down" else "output_blocks"
        return f"{top}.{n}.1.{rest}" if what == "attentions" else f"{top}.{n}.0.{resnet[rest]}"
    m = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", module)
    if m:
        what, j, rest = m.groups()
        return f"middle_block.1.{rest}" if what == "attentions" else f"middle_block.{2 * int(j)}.{resnet[rest]}"
    raise AssertionError(module)


def test_kohya_sdxl_lora_in_sgm_layout_matches_diffusers(pipeline_dirs, tmp_path):
    """SDXL kohya LoRAs name the UNet's layers in the SGM layout (lora_unet_input_blocks_4_1_...) and
    the text encoders lora_te1_ / lora_te2_."""
    folder, _ = pipeline_dirs("sdxl")
    layers = make_lora(folder, "sdxl", str(tmp_path / "peft" / "x.safetensors"), seed=7,
                       unet=["to_q", "to_v", "proj_in", "ff.net.0.proj", "conv1", "conv2"], text=["fc1"],
                       text_2=["fc2"])
    path = str(tmp_path / "kohya_xl.safetensors")
    written = write_kohya(path, layers, {"unet": "lora_unet_", "text_encoder": "lora_te1_",
                                         "text_encoder_2": "lora_te2_"}, rename=_sgm_unet_name, alphas=lambda i: 2.0)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in written)
    assert any(k.startswith("lora_unet_middle_block_2_in_layers_2.") for k in written)
    ref = _diffusers(folder, "sdxl")
    ref.load_lora_weights(path)
    ref.fuse_lora(lora_scale=1.2)
    _check_images(folder, "sdxl", ref, [(path, 1.2)], _latents(4))


# --- older diffusers spellings: the same weights as the PEFT file -------------------------------

def test_older_diffusers_key_spellings_merge_like_the_peft_file(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sd1")
    path = str(tmp_path / "p.safetensors")
    make_lora(folder, "sd1", path, seed=8, metadata=False)
    r = Reader(path)
    old = {}
    for k in r.keys():
        k2 = re.sub(r"\.(to_[qkv])\.lora_([AB])\.weight$",
                    lambda m: f".processor.{m[1]}_lora.{'down' if m[2] == 'A' else 'up'}.weight", k)
        k2 = re.sub(r"\.to_out\.0\.lora_([AB])\.weight$",
                    lambda m: f".processor.to_out_lora.{'down' if m[1] == 'A' else 'up'}.weight", k2)
        k2 = k2.replace("self_attn.q_proj.lora_A.weight", "self_attn.to_q_lora.down.weight")
        k2 = k2.replace("self_attn.q_proj.lora_B.weight", "self_attn.to_q_lora.up.weight")
        k2 = k2.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight")
        if k2.startswith("text_encoder."):
            k2 = k2.replace("text_encoder.", "text_encoder.text_model.", 1).replace(".lora.", ".lora_linear_layer.")
        old[k2] = r.get(k)
    assert any(".processor.to_out_lora.down.weight" in k for k in old)
    write(str(tmp_path / "old.safetensors"), old)
    base = sdjax.load(folder, progress=False)
    want = lora.merge(base.params, base.configs, [path])
    got = lora.merge(base.params, base.configs, [str(tmp_path / "old.safetensors")])
    for comp in ("unet", "text_encoder"):
        for k, v in flatten(want[comp]).items():
            np.testing.assert_array_equal(flatten(got[comp])[k], v, err_msg=k)


def test_merge_in_float32_then_cast_to_bfloat16(pipeline_dirs, tmp_path):
    """The float32 merge equals diffusers' fused weights; in bfloat16 it is that merge rounded once."""
    folder, _ = pipeline_dirs("sd1")
    path = str(tmp_path / "a.safetensors")
    make_lora(folder, "sd1", path, seed=9)
    ref = _diffusers(folder, "sd1")
    ref.load_lora_weights(path)
    ref.fuse_lora(lora_scale=1.5)
    ref.unload_lora_weights()
    f32 = flatten(sdjax.load(folder, loras=[(path, 1.5)], progress=False).params["unet"])
    want = flatten(params_from_torch(ref.unet))
    for k, v in f32.items():
        assert rel_err(v, want[k]) <= 1e-6, k
    bf = flatten(sdjax.load(folder, dtype="bfloat16", loras=[(path, 1.5)], progress=False).params["unet"])
    for k, v in bf.items():
        assert v.dtype == np.dtype("bfloat16") and rel_err(np.asarray(v, np.float32), f32[k]) <= 2 ** -7, k


# --- FILE:SCALE ----------------------------------------------------------------------------------

def test_parse_spec(tmp_path):
    assert lora.parse_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert lora.parse_spec("style.safetensors:0.75") == ("style.safetensors", 0.75)
    assert lora.parse_spec("a:b.safetensors:-1e-1") == ("a:b.safetensors", -0.1)
    assert lora.parse_spec("dir:x/style.safetensors") == ("dir:x/style.safetensors", 1.0)
    odd = tmp_path / "odd:name"
    odd.write_bytes(b"")
    assert lora.parse_spec(str(odd)) == (str(odd), 1.0)
    for bad, message in (("style.safetensors:strong", "'strong' is not a scale"), (":0.5", "no file"),
                         ("style.safetensors:nan", "not a finite number"), ("x:inf", "not a finite number")):
        with pytest.raises(ValueError, match=message):
            lora.parse_spec(bad)
    assert lora.normalize(["a", ("b", 2)]) == [("a", 1.0), ("b", 2.0)]
    assert lora.normalize("a") == [("a", 1.0)] and lora.normalize(None) == []
    for bad in ([("a", "0.5")], [("a", float("nan"))], [("a", True)], [42]):
        with pytest.raises(ValueError):
            lora.normalize(bad)


# --- errors ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1_lora(pipeline_dirs, tmp_path_factory):
    folder, _ = pipeline_dirs("sd1")
    path = str(tmp_path_factory.mktemp("lora") / "good.safetensors")
    make_lora(folder, "sd1", path, seed=10, metadata=False)
    r = Reader(path)
    return folder, path, {k: r.get(k) for k in r.keys()}


def _variant(tmp_path, tensors, name="bad.safetensors", metadata=None):
    path = str(tmp_path / name)
    write(path, tensors, metadata)
    return path


def _merge_error(folder, path, monkeypatch=None):
    pipe = sdjax.load(folder, progress=False)
    if monkeypatch is not None:  # the check must come before any merge work
        monkeypatch.setattr(lora, "_delta", lambda *a: pytest.fail("merged before checking"))
    with pytest.raises(lora.LoraError) as e:
        lora.merge(pipe.params, pipe.configs, [path, path])
    assert path in str(e.value)
    return str(e.value)


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("edit,expected", [
    (lambda t: {**t, "unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": t[f"{Q}.lora_A.weight"],
                "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": t[f"{Q}.lora_B.weight"]},
     r"unet\.down_blocks\.7\.attentions\.0\.proj_in\.lora_A\.weight: matches no layer of this model's unet"),
    (lambda t: {**t, f"{Q}.lora_B.weight": np.zeros((32, 3), np.float32)},
     rf"{re.escape(Q)}\.lora_B\.weight: rank 3, but its down factor .* has rank 4"),
    (lambda t: {**t, f"{Q}.lora_A.weight": np.zeros((4, 48), np.float32)},
     rf"{re.escape(Q)}\.lora_A\.weight: down \(4, 48\) and up \(32, 4\) make an update of shape \(32, 48\), but "
     r"unet down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q\.weight is \(32, 32\) "
     r"\(expected down \(4, 32\), up \(32, 4\)\)"),
    (lambda t: {k: v for k, v in t.items() if k != f"{Q}.lora_B.weight"},
     rf"{re.escape(Q)}\.lora_A\.weight: unet .*to_q has down but no up tensor"),
    (lambda t: {**t, f"{Q}.lora_magnitude_vector": np.ones(32, np.float32)}, "DoRA is not supported"),
    (lambda t: {**t, "lora_unet_x.hada_w1_a": np.ones((2, 2), np.float32)}, r"LoHa \(LyCORIS\) is not supported"),
    (lambda t: {**t, "vae.decoder.conv_in.lora_A.weight": np.ones((2, 2), np.float32)},
     "vae.decoder.conv_in.lora_A.weight: not a LoRA tensor sdjax reads"),
    (lambda t: {**t, f"{Q}.alpha": np.ones(3, np.float32)}, r"alpha is one number, this tensor has shape \(3,\)"),
    (lambda t: {**t, "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 4), np.float32),
                "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_B.weight": np.ones((4, 2), np.float32)},
     r"it updates text_encoder_2 \(an SDXL text encoder\), which this model does not have"),
    (lambda t: {**t, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
                t[f"{Q}.lora_A.weight"],
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
                t[f"{Q}.lora_B.weight"]},
     r"updates unet down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q\.weight, as .* does already"),
    (lambda t: {"model.diffusion_model.out.2.weight": np.ones((4, 32, 3, 3), np.float32)},
     "cannot merge this LoRA: none of its tensors is a LoRA factor"),
], ids=["no-layer", "rank", "shape", "half-pair", "dora", "loha", "not-lora", "alpha", "no-component", "twice",
        "checkpoint"])
def test_bad_updates_name_the_file_and_key(sd1_lora, tmp_path, monkeypatch, edit, expected):
    folder, _, tensors = sd1_lora
    message = _merge_error(folder, _variant(tmp_path, edit(tensors)), monkeypatch)
    assert re.search(expected, message), message


def test_rank_in_metadata_must_match_the_tensors(sd1_lora, tmp_path):
    folder, _, tensors = sd1_lora
    meta = {lora.METADATA_KEY: json.dumps({"unet.r": 8, "unet.lora_alpha": 8})}
    message = _merge_error(folder, _variant(tmp_path, tensors, metadata=meta))
    assert "lora_adapter_metadata says rank 8 for down_blocks" in message and "the tensors have rank 4" in message
    message = _merge_error(folder, _variant(tmp_path, tensors, "m.safetensors", {lora.METADATA_KEY: "[1"}))
    assert "lora_adapter_metadata is not a JSON object" in message


def test_an_sd1_lora_on_sdxl_is_refused_before_merging(pipeline_dirs, sd1_lora, monkeypatch):
    """The tiny SD 1.x UNet cross-attends to 32 features, the SDXL one to 80."""
    folder, _ = pipeline_dirs("sdxl")
    message = _merge_error(folder, sd1_lora[1], monkeypatch)
    assert "made for a UNet whose cross-attention takes 32 features" in message
    assert "this model's takes 80" in message and "match no layer of this model" in message


def test_corrupt_missing_and_pickled_files_fail_before_the_model_loads(sd1_lora, tmp_path, monkeypatch):
    folder, path, _ = sd1_lora
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) - 100])
    from sdjax import checkpoint
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("loaded the model first"))
    cases = [(str(cut), "truncated"), (str(tmp_path / "none.safetensors"), "LoRA file not found"),
             (str(tmp_path), "is a folder"), (str(tmp_path / "x.pt"), "sdjax reads LoRAs as .safetensors")]
    (tmp_path / "x.pt").write_bytes(b"\x80\x04")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    cases.append((str(tmp_path / "junk.safetensors"), "corrupt or truncated"))
    for bad, message in cases:
        with pytest.raises(lora.LoraError, match=message) as e:
            sdjax.load(folder, loras=[(bad, 0.5)], progress=False)
        assert bad in str(e.value)
    with pytest.raises(ValueError, match="not a number"):
        sdjax.load(folder, loras=[(path, "strong")], progress=False)


def test_quantized_weights_are_refused(sd1_lora, tmp_path):
    folder, path, _ = sd1_lora
    q = sdjax.load(folder, progress=False).quantize("w8-int8")
    with pytest.raises(lora.LoraError, match="is quantized; LoRAs merge into float weights"):
        lora.merge(q.params, q.configs, [path])
    q.save(str(tmp_path / "q"))
    with pytest.raises(lora.LoraError, match="load the float model with loras"):
        sdjax.load(str(tmp_path / "q"), loras=[path], progress=False)


def test_merge_leaves_its_input_and_records_the_loras(sd1_lora):
    folder, path, _ = sd1_lora
    pipe = sdjax.load(folder, progress=False)
    before = {k: np.asarray(v).copy() for k, v in flatten(pipe.params["unet"]).items()}
    merged = lora.merge(pipe.params, pipe.configs, [(path, 2.0)])
    assert merged["vae"] is pipe.params["vae"]
    for k, v in flatten(pipe.params["unet"]).items():
        np.testing.assert_array_equal(v, before[k])
    assert sdjax.load(folder, loras=[(path, 2.0)], progress=False).loras == ((path, 2.0),)
    zero = lora.merge(pipe.params, pipe.configs, [(path, 0.0)])
    for k, v in flatten(zero["unet"]).items():
        np.testing.assert_array_equal(v, before[k])
