"""Checkpoint I/O: diffusers folders and single-file (CompVis/LDM, SDXL's SGM) checkpoints, streamed.

Every tensor is read, converted to sdjax layout and dtype, and handed to JAX one at a
time, so peak memory is the final params plus one tensor. Keys and shapes are checked
against the config from the file headers before any tensor data is read, and every
problem is reported at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
from tqdm.auto import tqdm

from . import clip, configs as cfgs, controlnet, tokenizer as clip_tokenizer, unet, vae
from .files import atomic_folder, atomic_write_json
from .nn import flatten, unflatten
from .params import CheckpointError, canonical_dtype, check_shapes, sdjax_to_torch, torch_shape, torch_to_sdjax
from .safetensors_io import Lazy, Reader, SafetensorsError, write

MODELS = {"text_encoder": clip, "text_encoder_2": clip, "unet": unet, "vae": vae}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
WEIGHT_STEMS = {"text_encoder": "model", "text_encoder_2": "model", "unet": "diffusion_pytorch_model",
                "vae": "diffusion_pytorch_model", "controlnet": "diffusion_pytorch_model"}
SHAPES = {**MODELS, "controlnet": controlnet}  # every model load_component reads (a ControlNet is no pipeline part)
CLASS_NAMES = {"text_encoder": ["transformers", "CLIPTextModel"],
               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
TOKENIZERS = ("tokenizer", "tokenizer_2")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                   "tokenizer.json", "added_tokens.json")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclasses.dataclass
class Checkpoint:
    """What a checkpoint holds: params and configs per component ("unet", "vae", and "text_encoder"
    and/or "text_encoder_2"), and the pipeline's files. ``model_index``: the folder's
    model_index.json (for a single file, the one diffusers would write: its ``_class_name`` says
    "StableDiffusionXLPipeline" or "StableDiffusionXLImg2ImgPipeline" for an SDXL base or refiner)."""
    params: dict
    configs: dict
    tokenizer_dir: str | None = None
    scheduler_config: dict | None = None
    model_index: dict | None = None
    source: str = ""
    tokenizer_2_dir: str | None = None

    @property
    def architecture(self) -> str:
        return architecture(self.configs)


def architecture(configs) -> str:
    """"sd" (SD 1.x/2.x), "sdxl" (SDXL base: 6 time ids) or "sdxl-refiner" (5: an aesthetic score
    instead of the target size) from a checkpoint's configs, as its UNet's conditioning says
    ("sdxl-like" for a text_time UNet that fits neither; loading refuses those)."""
    u = configs.get("unet")
    if u is None or not u.is_sdxl:
        return "sd"
    te2 = configs.get("text_encoder_2")
    try:
        n = u.time_ids_length(te2.projection_dim) if te2 is not None and te2.with_projection else None
    except ValueError:  # they do not fit: check_conditioning says how
        n = None
    return {6: "sdxl", 5: "sdxl-refiner"}.get(n, "sdxl-like")


def check_conditioning(configs, source):
    """An SDXL UNet (text_time) needs text_encoder_2's projected pooled output and SDXL's 6
    (base) or 5 (refiner) time ids, and cross-attends to its text encoders' states side by side:
    CheckpointError naming what does not fit."""
    u = configs.get("unet")
    if u is None or not u.is_sdxl:
        return
    te2 = configs.get("text_encoder_2")
    if te2 is None or not te2.with_projection:
        raise CheckpointError(f"{source}: the UNet takes SDXL's text_time conditioning (pooled text embeds and "
                              "time ids), which needs a text_encoder_2 (CLIPTextModelWithProjection); this checkpoint "
                              + ("has a text_encoder_2 without a projection" if te2 else "has none"))
    try:
        n = u.time_ids_length(te2.projection_dim)
    except ValueError as e:
        raise CheckpointError(f"{source}: unet and text_encoder_2 do not fit: {e}") from None
    if n not in cfgs.SDXL_TIME_IDS:
        raise CheckpointError(f"{source}: the UNet takes {n} time ids beside text_encoder_2's pooled embeds; "
                              "SDXL's take 6 (base) or 5 (refiner)")
    texts = [c for c in TEXT_ENCODERS if c in configs]
    width = sum(configs[c].hidden_size for c in texts)
    if u.cross_attention_dim != width:
        raise CheckpointError(f"{source}: the UNet cross-attends to {u.cross_attention_dim} features, its text "
                              f"encoders give {width} (" + " + ".join(f"{c} {configs[c].hidden_size}" for c in texts)
                              + ")")


# --- tensor sources -------------------------------------------------------------------

class TorchPickle:
    """A .ckpt/.bin through ``torch.load(weights_only=True)``: PyTorch's restricted unpickler,
    which builds only tensors and plain containers, never arbitrary objects."""

    def __init__(self, path):
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path}: reading a pickled checkpoint needs PyTorch "
                                  "(pip install torch==2.13.0), or convert it to .safetensors") from None
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (pre-zip) pickles cannot be memory-mapped
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt zips and refused globals
            raise CheckpointError(f"{path}: cannot be read as a weights-only PyTorch checkpoint: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
        self.path = path
        self.tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}

    def keys(self):
        return list(self.tensors)

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def get(self, key):
        import torch
        t = self.tensors[key]
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            a = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            a = t.numpy()
        out = a.copy()
        _drop_pages(t.data_ptr(), t.numel() * t.element_size())
        return out

    def close(self):
        self.tensors = {}


def _drop_pages(address, nbytes):
    """Tell the kernel this process is done with a memory-mapped tensor's pages: file pages
    read through torch's mmap otherwise stay in RSS, and a 4 GB .ckpt would cost 8 GB."""
    import ctypes
    import mmap
    page = mmap.PAGESIZE
    start = (address + page - 1) // page * page  # only whole pages inside this tensor
    end = (address + nbytes) // page * page
    if end > start:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
        except (OSError, AttributeError):
            pass


class Sharded:
    """Several safetensors shards behind one ``*.safetensors.index.json``."""

    def __init__(self, index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from None
        folder = os.path.dirname(index_path)
        self.readers = {name: open_source(os.path.join(folder, name)) for name in sorted(set(weight_map.values()))}
        self.where = {}
        for name, r in self.readers.items():
            for k in r.keys():
                self.where[k] = r
        missing = [k for k, shard in weight_map.items() if k not in self.where]
        if missing:
            raise CheckpointError(f"{index_path}: keys listed in the index but in no shard: {missing[:8]}")

    def keys(self):
        return list(self.where)

    def shape(self, key):
        return self.where[key].shape(key)

    def get(self, key):
        return self.where[key].get(key)

    def close(self):
        for r in self.readers.values():
            r.close()


def open_source(path):
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    if path.endswith(".index.json"):
        return Sharded(path)
    if path.endswith(".safetensors"):
        try:
            return Reader(path)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
    return TorchPickle(path)


def _find_weights(folder, component, variant):
    stem = WEIGHT_STEMS[component]
    suffixes = [".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"]
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        for suf in suffixes:
            name = f"{stem}.{v}{suf}" if v else f"{stem}{suf}"
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
    raise CheckpointError(f"{folder}: no weights file for {component} (looked for "
                          f"{stem}[.{variant or 'fp16'}].safetensors, sharded index, .bin)")


# --- key normalisation ----------------------------------------------------------------

_VAE_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalize_key(component, key):
    """The sdjax name of a diffusers/transformers key, or None for buffers we do not keep."""
    if component in TEXT_ENCODERS:
        if key.endswith("position_ids"):
            return None
        return key[len("text_model."):] if key.startswith("text_model.") else key
    if component == "vae" and ".attentions." in key:
        # diffusers < 0.14 named the VAE attention query/key/value/proj_attn (1x1 convs)
        head, _, leaf = key.rpartition(".")
        mod_head, _, mod = head.rpartition(".")
        if mod in _VAE_LEGACY:
            return f"{mod_head}.{_VAE_LEGACY[mod]}.{leaf}"
    return key


def _expected_torch_shapes(component, config):
    return {n: torch_shape(n, s) for n, s in SHAPES[component].param_shapes(config).items()}


def _squeeze_1x1(name, shape):
    # attention projections stored as 1x1 convs (old VAE checkpoints) are linear layers
    if len(shape) == 4 and shape[2:] == (1, 1) and ".attentions." in name and ".to_" in name:
        return shape[:2]
    return shape


def _convert(name, a, dtype):
    a = a.reshape(_squeeze_1x1(name, a.shape))
    return jax.numpy.asarray(np.ascontiguousarray(torch_to_sdjax(name, a), dtype=dtype))


def _stream(entries, dtype, source, progress):
    """entries: list of (sdjax_name, fetch) with fetch() -> torch-layout array. -> flat params."""
    flat = {}
    for name, fetch in tqdm(entries, desc=f"loading {os.path.basename(source)}", unit="tensor",
                            disable=not progress, leave=False):
        flat[name] = _convert(name, fetch(), dtype)
    return flat


def load_component(folder, component, dtype="float32", variant=None, progress=True):
    """(params, config) of one component folder of a diffusers pipeline."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: missing {component} folder")
    config = cfgs.read(component, os.path.join(folder, "config.json"))
    path = _find_weights(folder, component, variant)
    src = open_source(path)
    try:
        names = {}
        for k in src.keys():
            n = normalize_key(component, k)
            if n is not None:
                names[n] = k
        check_shapes({n: _squeeze_1x1(n, tuple(src.shape(k))) for n, k in names.items()},
                     _expected_torch_shapes(component, config), path)
        dt = canonical_dtype(dtype)
        flat = _stream([(n, (lambda k=k: src.get(k))) for n, k in names.items()], dt, path, progress)
    finally:
        src.close()
    return unflatten(flat), config


def read_json(path):
    """The JSON at ``path``, or None when there is no such file."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def folder_components(path, model_index):
    """The model components of the diffusers folder ``path`` to load, in ``MODELS`` order: unet and
    vae always; a text encoder that model_index.json names (not [null, null], as the SDXL refiner's
    text_encoder), or that it does not mention and whose folder exists; text_encoder when no text
    encoder was found. A named component whose folder is missing is an error at load."""
    if model_index is not None and not isinstance(model_index, dict):
        raise CheckpointError(f"{os.path.join(path, 'model_index.json')}: not a JSON object")
    out, dropped = [], set()
    for comp in MODELS:
        entry = (model_index or {}).get(comp)
        listed = isinstance(entry, (list, tuple)) and len(entry) == 2
        if comp in ("unet", "vae") or (listed and None not in entry):
            out.append(comp)
        elif listed:
            dropped.add(comp)
        elif os.path.isdir(os.path.join(path, comp)):
            out.append(comp)
    if not any(c in out for c in TEXT_ENCODERS) and "text_encoder" not in dropped:
        out.insert(0, "text_encoder")  # loading names the missing folder
    return out


def folder_tokenizers(path):
    """{"tokenizer_dir", "tokenizer_2_dir"}: the folder's tokenizer folders that exist (else None)."""
    return {f"{t}_dir": (d if os.path.isdir(d := os.path.join(path, t)) else None) for t in TOKENIZERS}


def load_folder(path, dtype="float32", variant=None, progress=True) -> Checkpoint:
    model_index = read_json(os.path.join(path, "model_index.json"))
    if model_index is None and not os.path.isdir(os.path.join(path, "unet")):
        raise CheckpointError(f"{path}: not a diffusers pipeline folder (no model_index.json, no unet/)")
    params, configs = {}, {}
    for comp in folder_components(path, model_index):
        params[comp], configs[comp] = load_component(os.path.join(path, comp), comp, dtype, variant, progress)
    check_conditioning(configs, path)
    sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    return Checkpoint(params, configs, scheduler_config=sched, model_index=model_index, source=path,
                      **folder_tokenizers(path))


def load_single_file(path, dtype="float32", configs=None, progress=True) -> Checkpoint:
    """A CompVis/LDM (SD 1.x/2.x) or SGM (SDXL base or refiner) single file (.safetensors or
    .ckpt); architecture inferred from shapes.

    ``configs`` may override the inferred config dicts per component (e.g. attention heads,
    which shapes cannot tell)."""
    from . import convert_ldm, convert_sdxl
    src = open_source(path)
    try:
        shapes = {k: tuple(src.shape(k)) for k in src.keys()}
        inferred, mapping, _skipped = (convert_sdxl if convert_sdxl.is_sgm(shapes) else convert_ldm).plan(shapes)
        kind = inferred.pop("kind", None)
        comps = [c for c in MODELS if c in inferred]
        for comp, override in (configs or {}).items():
            if comp not in inferred:
                raise CheckpointError(f"{path}: configs= overrides {comp!r}, which this {kind} file does not "
                                      f"have (it has {', '.join(comps)})")
            inferred[comp] = {**inferred[comp], **override}
        conf = {c: cfgs.READERS[c](inferred[c], source=f"{path} ({c}, inferred)") for c in comps}
        check_conditioning(conf, path)
        # a mapping entry may fan one ldm tensor out to several params (packed qkv)
        found = {c: {} for c in comps}
        for ldm_key, targets in mapping:
            for comp, dkey, fn in targets:
                n = normalize_key(comp, dkey)
                if n is None:
                    continue
                found[comp][n] = (ldm_key, dkey, fn)
        for comp in comps:
            got = {n: _squeeze_1x1(n, tuple(fn(np.broadcast_to(np.zeros((), np.float32), shapes[lk])).shape))
                   for n, (lk, _, fn) in found[comp].items()}
            check_shapes(got, _expected_torch_shapes(comp, conf[comp]), f"{path} ({comp})")
        dt = canonical_dtype(dtype)
        cache = {}

        def fetch(ldm_key, fn):
            # keep a packed tensor only until all of its parts are taken
            if ldm_key not in cache:
                cache.clear()
                cache[ldm_key] = src.get(ldm_key)
            return fn(cache[ldm_key])

        params = {}
        for comp in comps:
            entries = sorted(found[comp].items(), key=lambda kv: kv[1][0])
            flat = _stream([(n, (lambda lk=lk, fn=fn: fetch(lk, fn))) for n, (lk, _, fn) in entries],
                           dt, f"{path} {comp}", progress)
            params[comp] = unflatten(flat)
        cache.clear()
    finally:
        src.close()
    # A single file carries no scheduler: SD's training schedule, and v-prediction for SD 2
    # as diffusers' single-file loader assumes (SD 2.x-base files need prediction_type="epsilon");
    # SDXL's folders' EulerDiscreteScheduler config.
    sched = dict(convert_sdxl.SCHEDULER) if kind in convert_sdxl.LAYOUTS else {
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
        "prediction_type": "v_prediction" if kind == "sd2" else "epsilon"}
    # nor a tokenizer: the vendored CLIP BPE, when a text encoder has CLIP's vocabulary, padded
    # with <|endoftext|> (SD 1.x, SDXL's tokenizer) or "!" (SD 2.x, SDXL's tokenizer_2)
    tokenizers = convert_sdxl.TOKENIZERS if kind in convert_sdxl.LAYOUTS else {"text_encoder": ("tokenizer", kind)}
    dirs = {f"{tok}_dir": clip_tokenizer.tokenizer_dir(tok_kind) for comp, (tok, tok_kind) in tokenizers.items()
            if comp in conf and conf[comp].vocab_size == 49408}
    return Checkpoint(params, conf, scheduler_config=sched, model_index=default_model_index(conf), source=path,
                      **dirs)


def load(path, dtype="float32", variant=None, configs=None, progress=True) -> Checkpoint:
    """A diffusers folder or a single-file checkpoint, dispatched on what ``path`` is."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_folder(path, dtype, variant, progress)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if path.endswith(SINGLE_FILE_SUFFIXES):
        return load_single_file(path, dtype, configs, progress)
    raise CheckpointError(f"{path}: not a diffusers folder nor a single-file checkpoint "
                          f"({', '.join(SINGLE_FILE_SUFFIXES)})")


def load_controlnet(path, dtype="float32", variant=None, config=None, progress=True):
    """(params, ControlNetConfig) of a diffusers ControlNet folder (``ControlNetModel.save_pretrained``)
    or a single file in the original layout (``convert_controlnet``; ``config``: a dict of config
    fields overriding those inferred from shapes, or a config.json path for a file in diffusers' names)."""
    from . import convert_controlnet
    path = os.fspath(path)
    if os.path.isdir(path):
        if config is not None:
            raise CheckpointError(f"{path}: config= is for single files; a folder has its config.json")
        return load_component(path, "controlnet", dtype, variant, progress)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such ControlNet file or folder")
    if not path.endswith(SINGLE_FILE_SUFFIXES):
        raise CheckpointError(f"{path}: not a ControlNet folder nor a single file ({', '.join(SINGLE_FILE_SUFFIXES)})")
    src = open_source(path)
    try:
        shapes = {k: tuple(src.shape(k)) for k in src.keys()}
        if isinstance(config, (str, os.PathLike)):
            conf = cfgs.read("controlnet", os.fspath(config))
            mapping = [(k, [("controlnet", k, None)]) for k in shapes]
        else:
            try:
                inferred, mapping, _ = convert_controlnet.plan(shapes, config)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
            conf = cfgs.controlnet_config(inferred, source=f"{path} (inferred)")
        found = {t[1]: (k, t[2]) for k, targets in mapping for t in targets}
        check_shapes({n: shapes[k] for n, (k, _) in found.items()}, _expected_torch_shapes("controlnet", conf), path)
        flat = _stream([(n, (lambda k=k, fn=fn: fn(src.get(k)) if fn else src.get(k)))
                        for n, (k, fn) in sorted(found.items())], canonical_dtype(dtype), path, progress)
    finally:
        src.close()
    return unflatten(flat), conf


# --- saving ---------------------------------------------------------------------------

DEFAULT_MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                       "safety_checker": [None, None], "feature_extractor": [None, None]}
# what diffusers writes for SDXL base and refiner pipelines, less the components listed on save
MODEL_INDEX = {
    "sd": DEFAULT_MODEL_INDEX,
    "sdxl": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "feature_extractor": [None, None], "image_encoder": [None, None]},
    "sdxl-refiner": {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
                     "force_zeros_for_empty_prompt": False, "text_encoder": [None, None], "tokenizer": [None, None],
                     "feature_extractor": [None, None], "image_encoder": [None, None]},
}


def default_model_index(configs) -> dict:
    """The model_index.json diffusers' pipeline class for these configs starts from."""
    arch = architecture(configs)
    return dict(MODEL_INDEX.get(arch, MODEL_INDEX["sdxl"]))


def write_float_component(folder, comp, params):
    """One component's float weights as diffusers writes them (PyTorch layouts, safetensors)."""
    flat = flatten(params)
    bad = [k for k, v in flat.items() if not hasattr(v, "dtype") or not np.issubdtype(
        np.dtype(v.dtype), np.floating) and np.dtype(v.dtype).name != "bfloat16"]
    if bad:
        raise CheckpointError(f"{comp}: cannot save non-float weights as a diffusers "
                              f"checkpoint: {bad[:5]} (quantized models have their own format)")
    def name(k):  # read by transformers v4 and v5; the projection sits beside text_model
        return "text_model." + k if comp in TEXT_ENCODERS and not k.startswith("text_projection.") else k
    tensors = {name(k): Lazy(torch_shape(k, v.shape), v.dtype, lambda k=k, v=v: np.ascontiguousarray(
        sdjax_to_torch(k, np.asarray(v)))) for k, v in flat.items()}
    write(os.path.join(folder, f"{WEIGHT_STEMS[comp]}.safetensors"), tensors, {"format": "pt"})


def save(ckpt: Checkpoint, out_dir, overwrite=False, progress=True, write_weights=write_float_component):
    """Write a diffusers-layout folder (safetensors) that diffusers' from_pretrained reads.

    ``write_weights(folder, component, params)`` writes each component's weights (the quantized
    format passes its own). Written under a temporary name and renamed when complete."""
    out_dir = os.fspath(out_dir)
    if os.path.lexists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists (pass overwrite=True to replace it)")
    with atomic_folder(out_dir, overwrite) as tmp:
        index = dict(ckpt.model_index or default_model_index(ckpt.configs))
        written = set()
        for comp in [c for c in MODELS if c in ckpt.params]:
            d = os.path.join(tmp, comp)
            os.makedirs(d)
            config = cfgs.to_dict(ckpt.configs[comp])
            atomic_write_json(os.path.join(d, "config.json"), config, indent=2)
            write_weights(d, comp, ckpt.params[comp])
            index[comp] = ["transformers", config["architectures"][0]] if comp in TEXT_ENCODERS else CLASS_NAMES[comp]
            written.add(comp)
        for tok, folder in (("tokenizer", ckpt.tokenizer_dir), ("tokenizer_2", ckpt.tokenizer_2_dir)):
            if folder:
                os.makedirs(os.path.join(tmp, tok))
                for name in TOKENIZER_FILES:
                    src = os.path.join(folder, name)
                    if os.path.exists(src):
                        shutil.copy(src, os.path.join(tmp, tok, name))
                index[tok] = CLASS_NAMES[tok]
                written.add(tok)
        if ckpt.scheduler_config:
            os.makedirs(os.path.join(tmp, "scheduler"))
            atomic_write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), ckpt.scheduler_config, indent=2)
            index["scheduler"] = ["diffusers", ckpt.scheduler_config.get("_class_name", "PNDMScheduler")]
            written.add("scheduler")
        # components the source listed that are not written (a safety checker, an image encoder,
        # a dropped text encoder) become [null, null], which diffusers loads as None
        for k, v in index.items():
            if not k.startswith("_") and k not in written and isinstance(v, list) and len(v) == 2 and v[1] is not None:
                index[k] = [None, None]
        atomic_write_json(os.path.join(tmp, "model_index.json"), index, indent=2)
    return out_dir
