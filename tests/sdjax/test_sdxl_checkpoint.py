"""SDXL checkpoints: diffusers folders (base and refiner: text_encoder_2, tokenizer_2), saving them back
for diffusers, and single SGM-layout files, with diffusers' own loaders as the oracle.

Single files are written from tiny diffusers pipelines with ``convert_sdxl.diffusers_to_sgm`` (weights
shifted by 1, so a loader reading the folder instead of the file could not pass); diffusers'
``from_single_file`` reads them offline with the folder as its config, and sdjax's load of the file must
give exactly the tensors diffusers' conversion gives.
"""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sdjax
import tiny_models
from sdjax import checkpoint, clip, convert_sdxl
from sdjax.nn import flatten
from sdjax.params import CheckpointError, torch_to_sdjax
from sdjax.safetensors_io import Reader, write

COMPONENTS = {"sdxl": ("text_encoder", "text_encoder_2", "unet", "vae"),
              "sdxl-refiner": ("text_encoder_2", "unet", "vae")}
CLASSES = {"sdxl": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}
STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
         "text_encoder_2": "model"}


def _pipeline_class(style):
    import diffusers
    return getattr(diffusers, CLASSES[style])


def _sdjax_state(module):
    """A torch module's state dict under sdjax's names and layouts (flat)."""
    out = {}
    for k, v in module.state_dict().items():
        n = checkpoint.normalize_key("text_encoder", k) if "text_model" in k or k.startswith("text_projection") else k
        if n is not None:
            out[n] = torch_to_sdjax(n, v.detach().float().numpy())
    return out


def _assert_params_equal(params, module, what):
    got, want = flatten(params), _sdjax_state(module)
    assert got.keys() == want.keys(), what
    for k, a in want.items():
        assert np.array_equal(np.asarray(got[k]), a), f"{what}: {k}"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _weights(d, comp):
    return os.path.join(d, comp, f"{STEMS[comp]}.safetensors")


# --- diffusers folders ------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["sdxl", "sdxl-refiner"])
def test_folder_loads_every_component_as_diffusers_has_it(pipeline_dirs, style):
    folder, ref = pipeline_dirs(style)
    pipe = sdjax.load(folder, progress=False)
    assert tuple(pipe.params) == tuple(pipe.configs) == COMPONENTS[style]
    for comp in COMPONENTS[style]:
        _assert_params_equal(pipe.params[comp], getattr(ref, comp), comp)
    assert pipe.architecture == style and pipe.model_index["_class_name"] == CLASSES[style]
    te2 = pipe.configs["text_encoder_2"]
    assert te2.with_projection and te2.projection_dim == ref.text_encoder_2.config.projection_dim
    assert pipe.configs["unet"].time_ids_length(te2.projection_dim) == {"sdxl": 6, "sdxl-refiner": 5}[style]
    assert pipe.scheduler_config["_class_name"] == "EulerDiscreteScheduler"

    # tokenizer_2 is the folder's own (pads with "!"); the refiner has no first tokenizer
    prompts = ["a red cat", "a photo of the large blue square"]
    assert np.array_equal(pipe.tokenizer_2(prompts), ref.tokenizer_2(prompts, padding="max_length", max_length=77,
                                                                      truncation=True).input_ids)
    assert pipe.tokenizer_2.folder == os.path.join(folder, "tokenizer_2")
    if style == "sdxl":
        assert np.array_equal(pipe.tokenizer(prompts), ref.tokenizer(prompts, padding="max_length", max_length=77,
                                                                      truncation=True).input_ids)
        assert pipe.tokenizer.pad_token_id != pipe.tokenizer_2.pad_token_id
    else:
        assert pipe.tokenizer is None and "text_encoder" not in pipe.params

    # text_projection is held (hidden, proj): the pooled output is CLIPTextModelWithProjection's text_embeds
    ids = pipe.tokenizer_2(prompts)
    _, _, pooled = clip.apply(pipe.params["text_encoder_2"], te2, jnp.asarray(ids))
    with torch.no_grad():
        want = ref.text_encoder_2(torch.from_numpy(ids).long()).text_embeds.numpy()
    assert tiny_models.rel_err(pooled, want) < tiny_models.TOL


@pytest.mark.parametrize("style", ["sdxl", "sdxl-refiner"])
def test_save_writes_a_folder_diffusers_reads(pipeline_dirs, tmp_path, style):
    folder, ref = pipeline_dirs(style)
    pipe = sdjax.load(folder, progress=False)
    out = pipe.save(tmp_path / "saved")
    listing = sorted(os.listdir(out))
    want_dirs = sorted(COMPONENTS[style] + ("scheduler", "tokenizer_2") + (("tokenizer",) if style == "sdxl" else ()))
    assert listing == sorted(want_dirs + ["model_index.json"])
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == CLASSES[style]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    if style == "sdxl-refiner":
        assert index["text_encoder"] == index["tokenizer"] == [None, None] and index["requires_aesthetics_score"]

    theirs = _pipeline_class(style).from_pretrained(out, local_files_only=True, add_watermarker=False)
    for comp in COMPONENTS[style]:
        got, want = getattr(theirs, comp).state_dict(), getattr(ref, comp).state_dict()
        assert got.keys() == want.keys(), comp
        assert all(torch.equal(got[k], want[k]) for k in want), comp
    kw = dict(padding="max_length", max_length=77, return_tensors="pt")
    for tok in ("tokenizer", "tokenizer_2") if style == "sdxl" else ("tokenizer_2",):
        assert getattr(theirs, tok)(["a green circle"], **kw).input_ids.equal(
            getattr(ref, tok)(["a green circle"], **kw).input_ids)
    if style == "sdxl-refiner":
        assert theirs.config.requires_aesthetics_score
    else:
        assert theirs.config.force_zeros_for_empty_prompt

    again = sdjax.load(out, progress=False)
    assert again.configs == pipe.configs and again.architecture == style
    for comp in COMPONENTS[style]:
        a, b = flatten(pipe.params[comp]), flatten(again.params[comp])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), comp


def test_fp16_variant_and_sharded_text_encoder_2(pipeline_dirs, tmp_path):
    folder, ref = pipeline_dirs("sdxl")
    cls = _pipeline_class("sdxl")
    half = cls.from_pretrained(folder, torch_dtype=torch.float16, local_files_only=True, add_watermarker=False)
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert os.path.exists(tmp_path / "fp16" / "text_encoder_2" / "model.fp16.safetensors")
    pipe = sdjax.load(tmp_path / "fp16", progress=False)
    w = flatten(pipe.params["text_encoder_2"])["text_projection.weight"]
    assert w.dtype == jnp.float32
    want = ref.text_encoder_2.text_projection.weight.detach().half().float().numpy().T
    np.testing.assert_array_equal(np.asarray(w), want)

    d = _copy(folder, tmp_path / "sharded")
    shutil.rmtree(os.path.join(d, "text_encoder_2"))
    ref.text_encoder_2.save_pretrained(os.path.join(d, "text_encoder_2"), max_shard_size="100KB")
    files = os.listdir(os.path.join(d, "text_encoder_2"))
    assert "model.safetensors.index.json" in files and len(files) > 3
    _assert_params_equal(sdjax.load(d, progress=False).params["text_encoder_2"], ref.text_encoder_2, "sharded")


def test_quantized_sdxl_saves_and_loads_with_both_encoders(pipeline_dirs, tmp_path):
    import dataclasses

    import quant
    from quant import io as qio
    pipe = sdjax.load(pipeline_dirs("sdxl")[0], progress=False)
    unet_q = quant.apply_recipe(pipe.params["unet"], "w8-int8", component="unet")
    q = dataclasses.replace(pipe, params={**pipe.params, "unet": unet_q})
    out = q.save(tmp_path / "q")
    assert os.path.exists(os.path.join(out, "unet", qio.WEIGHTS_NAME))
    assert os.path.exists(_weights(out, "text_encoder_2")) and os.path.isdir(os.path.join(out, "tokenizer_2"))
    again = sdjax.load(out, progress=False)
    assert again.is_quantized and again.architecture == "sdxl" and again.tokenizer_2 is not None
    assert tuple(again.params) == COMPONENTS["sdxl"] and again.configs == pipe.configs
    for comp in ("text_encoder", "text_encoder_2"):
        a, b = flatten(pipe.params[comp]), flatten(again.params[comp])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), comp
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == CLASSES["sdxl"] and index["_sdjax_quantized"]["components"] == ["unet"]


# --- bad folders ------------------------------------------------------------------------------

def test_missing_text_encoder_2_is_named(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sdxl")
    d = _copy(folder, tmp_path / "no-te2")
    shutil.rmtree(os.path.join(d, "text_encoder_2"))
    with pytest.raises(CheckpointError, match="missing text_encoder_2 folder"):
        sdjax.load(d, progress=False)
    # without a model_index entry either, the SDXL UNet says what it lacks
    p = os.path.join(d, "model_index.json")
    index = json.load(open(p))
    del index["text_encoder_2"]
    json.dump(index, open(p, "w"))
    with pytest.raises(CheckpointError, match="text_time conditioning .* needs a text_encoder_2"):
        sdjax.load(d, progress=False)


def test_refiner_unet_beside_base_encoders_is_refused(pipeline_dirs, tmp_path):
    base, _ = pipeline_dirs("sdxl")
    refiner, _ = pipeline_dirs("sdxl-refiner")
    d = _copy(base, tmp_path / "mixed")
    shutil.rmtree(os.path.join(d, "unet"))
    shutil.copytree(os.path.join(refiner, "unet"), os.path.join(d, "unet"))
    with pytest.raises(CheckpointError, match="cross-attends to 48 features, its text encoders give 80"):
        sdjax.load(d, progress=False)


def test_truncated_and_corrupt_text_encoder_2(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sdxl")
    d = _copy(folder, tmp_path / "trunc")
    f = _weights(d, "text_encoder_2")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(CheckpointError, match=r"text_encoder_2/model.safetensors.*truncated|truncated.*text_encoder_2"):
        sdjax.load(d, progress=False)
    with open(f, "wb") as fh:
        fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt"):
        sdjax.load(d, progress=False)


def test_text_encoder_2_missing_and_misshapen_keys_are_named(pipeline_dirs, tmp_path):
    folder, _ = pipeline_dirs("sdxl-refiner")
    d = _copy(folder, tmp_path / "keys")
    from safetensors.numpy import load_file, save_file
    sd = load_file(_weights(d, "text_encoder_2"))
    del sd["text_model.final_layer_norm.bias"]
    sd["text_projection.weight"] = sd["text_projection.weight"][:-1]
    save_file(sd, _weights(d, "text_encoder_2"))
    with pytest.raises(CheckpointError) as e:
        sdjax.load(d, progress=False)
    msg = str(e.value)
    assert os.path.join("text_encoder_2", "model.safetensors") in msg
    assert "missing keys (1): final_layer_norm.bias" in msg
    proj, hidden = tiny_models.SDXL_CLIP_2["projection_dim"], tiny_models.SDXL_CLIP_2["hidden_size"]
    assert f"text_projection.weight expected ({proj}, {hidden}) got ({proj - 1}, {hidden})" in msg


# --- single SGM files -------------------------------------------------------------------------
# SDXL's conventions, which a single file leaves implicit: 32 norm groups, heads 64 wide, 1024 px;
# the two text encoders differ in width (diffusers tells them apart by it)
_UNET = dict(norm_num_groups=32, sample_size=128, use_linear_projection=True, addition_embed_type="text_time",
             addition_time_embed_dim=8, layers_per_block=1, upcast_attention=False)
_CLIP = dict(hidden_size=64, intermediate_size=96, num_attention_heads=1, num_hidden_layers=2, hidden_act="quick_gelu")
_CLIP_2 = dict(hidden_size=128, intermediate_size=160, num_attention_heads=2, num_hidden_layers=3, hidden_act="gelu",
               projection_dim=48)
_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=1024)
SINGLE_FILE_STYLES = {
    "sdxl": dict(clip=_CLIP, clip_2=_CLIP_2, time_ids=6, vae=_VAE, unet=dict(
        _UNET, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 1),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64 + 128, projection_class_embeddings_input_dim=48 + 6 * 8)),
    "sdxl-refiner": dict(clip=None, clip_2=_CLIP_2, time_ids=5, vae=_VAE, unet=dict(
        _UNET, block_out_channels=(32, 64, 64, 64), transformer_layers_per_block=2, attention_head_dim=(1, 1, 1, 1),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, projection_class_embeddings_input_dim=48 + 5 * 8)),
}
# tensors real SDXL files carry that belong to no component
EXTRA = {
    "sdxl": {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": np.arange(77)[None],
             "conditioner.embedders.1.model.logit_scale": np.array(4.6, np.float32),
             "denoiser.sigmas": np.linspace(0.03, 14.6, 1000, dtype=np.float32),
             "first_stage_model.loss.logvar": np.zeros((), np.float32)},
    "sdxl-refiner": {"conditioner.embedders.0.model.logit_scale": np.array(4.6, np.float32),
                     "model_ema.decay": np.array(0.9999, np.float32)},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(style):
        if style not in cache:
            folder = str(tmp_path_factory.mktemp(f"sgm-{style}"))
            tiny_models.build_sdxl_pipeline(folder, SINGLE_FILE_STYLES[style])
            cache[style] = folder
        return cache[style]
    return get


def read_state_dicts(folder):
    out = {}
    for comp in COMPONENTS["sdxl"]:
        if os.path.exists(_weights(folder, comp)):
            with Reader(_weights(folder, comp)) as r:
                out[comp] = {k: r.get(k) for k in r.keys()}
    return out


def save_single_file(tensors, path):
    if path.endswith(".safetensors"):
        write(path, tensors)
    else:
        torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in tensors.items()}}, path)


def write_single_file(folder, path, style, shift=0.0, extra=None):
    """The folder's weights (+ ``shift``) as an SGM single file at ``path``; returns {key: array}."""
    sd = {c: {k: a + np.asarray(shift, a.dtype) for k, a in d.items()} for c, d in read_state_dicts(folder).items()}
    tensors = {**convert_sdxl.diffusers_to_sgm(sd, style), **(extra or {})}
    save_single_file(tensors, path)
    return tensors


@pytest.mark.parametrize("style,suffix", [("sdxl", ".safetensors"), ("sdxl-refiner", ".ckpt")])
def test_single_file_loads_as_diffusers_converts_it(folders, tmp_path, style, suffix):
    folder = folders(style)
    path = str(tmp_path / f"model{suffix}")
    tensors = write_single_file(folder, path, style, shift=1.0, extra=EXTRA[style])
    theirs = _pipeline_class(style).from_single_file(path, config=folder, local_files_only=True)

    pipe = sdjax.load(path, progress=False)
    assert tuple(pipe.params) == COMPONENTS[style]
    for comp in COMPONENTS[style]:
        _assert_params_equal(pipe.params[comp], getattr(theirs, comp), comp)
    # the configs inferred from shapes and SDXL's conventions are the folder's
    ref = sdjax.load(folder, progress=False)
    assert pipe.configs == ref.configs
    assert pipe.configs["vae"].scaling_factor == 0.13025
    assert pipe.architecture == style and pipe.model_index["_class_name"] == CLASSES[style]
    assert pipe.scheduler_config == convert_sdxl.SCHEDULER
    assert pipe.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert pipe.tokenizer is None and pipe.tokenizer_2 is None  # a tiny vocabulary: not CLIP's

    configs, mapping, skipped = convert_sdxl.plan({k: a.shape for k, a in tensors.items()})
    assert configs["kind"] == style and set(skipped) == set(EXTRA[style])
    # the mapping read backwards gives the file again
    ours = {c: {} for c in COMPONENTS[style]}
    for key, targets in mapping:
        for comp, dkey, fn in targets:
            ours[comp][dkey] = fn(tensors[key])
    back = convert_sdxl.diffusers_to_sgm(ours, style)
    assert back.keys() == tensors.keys() - set(EXTRA[style])
    assert all(np.array_equal(back[k], tensors[k]) for k in back)

    if style == "sdxl":  # and saved from sdjax, diffusers reads the same weights from the folder
        out = pipe.save(tmp_path / "saved")
        again = _pipeline_class(style).from_pretrained(out, local_files_only=True, add_watermarker=False)
        for comp in COMPONENTS[style]:
            got, want = getattr(again, comp).state_dict(), getattr(theirs, comp).state_dict()
            assert all(torch.equal(got[k], want[k]) for k in want), comp


def test_single_file_with_clip_vocabulary_gets_both_tokenizers(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("SDJAX_CACHE", str(tmp_path / "cache"))
    tensors = convert_sdxl.diffusers_to_sgm(read_state_dicts(folders("sdxl")), "sdxl")
    for key, hidden in (("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", 64),
                        ("conditioner.embedders.1.model.token_embedding.weight", 128)):
        tensors[key] = np.zeros((49408, hidden), np.float32)
    path = str(tmp_path / "clip-vocab.safetensors")
    save_single_file(tensors, path)
    pipe = sdjax.load(path, progress=False)
    assert pipe.configs["text_encoder"].vocab_size == pipe.configs["text_encoder_2"].vocab_size == 49408
    ids, ids_2 = pipe.tokenizer(["a cat"])[0], pipe.tokenizer_2(["a cat"])[0]
    assert ids[:4].tolist() == ids_2[:4].tolist() == [49406, 320, 2368, 49407]
    assert ids[4] == 49407 and ids_2[4] == 0  # SDXL's tokenizer pads with <|endoftext|>, tokenizer_2 with "!"


@pytest.fixture(scope="module")
def base_shapes(folders):
    return {k: a.shape for k, a in convert_sdxl.diffusers_to_sgm(read_state_dicts(folders("sdxl")), "sdxl").items()}


def _error(shapes):
    with pytest.raises(CheckpointError) as e:
        convert_sdxl.plan(shapes)
    return str(e.value)


def test_an_sgm_file_that_is_neither_base_nor_refiner_says_what_it_found(base_shapes):
    moved = {k.replace("conditioner.embedders.1.", "conditioner.embedders.2."): s for k, s in base_shapes.items()}
    msg = _error(moved)
    assert "embedders.0: CLIP (transformer.text_model.*), embedders.2: OpenCLIP (model.*)" in msg
    assert "SDXL base: embedders.0: CLIP" in msg and "SDXL refiner: embedders.0: OpenCLIP (model.*)" in msg
    clip_only = {k: s for k, s in base_shapes.items() if not k.startswith("conditioner.embedders.1.")}
    assert "its text encoders are embedders.0: CLIP (transformer.text_model.*), expected" in _error(clip_only)
    no_vae = {k: s for k, s in base_shapes.items() if not k.startswith("first_stage_model.")}
    assert "no VAE (first_stage_model.*)" in _error(no_vae)
    with pytest.raises(CheckpointError, match="SDXL"):  # the SD 1/2 planner sends it here
        from sdjax import convert_ldm
        convert_ldm.plan(base_shapes)


def test_time_ids_and_cross_attention_must_fit_the_layout(base_shapes):
    shapes = dict(base_shapes)
    t, _ = shapes["model.diffusion_model.label_emb.0.0.weight"]
    shapes["model.diffusion_model.label_emb.0.0.weight"] = (t, 48 + 5 * 8)  # a refiner's 5 time ids
    msg = _error(shapes)
    assert "label_emb.0.0.weight takes 88 features" in msg and "6 time ids" in msg
    shapes = {k: s for k, s in base_shapes.items() if "label_emb" not in k}
    assert "missing key model.diffusion_model.label_emb.0.0.weight" in _error(shapes)


def test_missing_and_unrecognised_text_encoder_2_keys_are_named(base_shapes):
    shapes = dict(base_shapes)
    gone = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias"
    del shapes[gone]
    shapes["conditioner.embedders.1.model.transformer.resblocks.1.attn.extra"] = (4,)
    msg = _error(shapes)
    assert gone in msg and "resblocks.1.attn.extra" in msg and "SDXL base architecture" in msg


def test_single_file_wrong_shape_and_truncation(folders, tmp_path):
    tensors = convert_sdxl.diffusers_to_sgm(read_state_dicts(folders("sdxl-refiner")), "sdxl-refiner")
    key = "conditioner.embedders.0.model.ln_final.weight"
    tensors[key] = tensors[key][:-1]
    path = str(tmp_path / "bad.safetensors")
    save_single_file(tensors, path)
    want = r"\(text_encoder_2\)[\s\S]*final_layer_norm.weight expected \(128,\) got \(127,\)"
    with pytest.raises(CheckpointError, match=want):
        sdjax.load(path, progress=False)
    path = str(tmp_path / "cut.safetensors")
    write_single_file(folders("sdxl-refiner"), path, "sdxl-refiner")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        sdjax.load(path, progress=False)
    with pytest.raises(CheckpointError, match="overrides 'text_encoder', which this sdxl-refiner file does not have"):
        sdjax.load(str(tmp_path / "bad.safetensors"), configs={"text_encoder": {"hidden_act": "gelu"}}, progress=False)
