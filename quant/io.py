"""Quantized models on disk: a diffusers-layout folder whose quantized components are sdjax files.

``save`` writes a folder with ``model_index.json``, ``tokenizer/`` (and SDXL's ``tokenizer_2/``),
``scheduler/`` and one folder per component with its ``config.json``, like a diffusers pipeline. A
component holding quantized weights is written as ``<component>/sdjax_quantized.safetensors``
(diffusers and transformers cannot read it); a component left float is written as the usual
diffusers safetensors file.

An ``sdjax_quantized.safetensors`` file holds every tensor of the component in **sdjax layout**
(linear ``(in, out)``, conv ``HWIO``) under its diffusers parameter name. A quantized weight at
``<layer>.weight`` becomes several tensors:

=================  =====================================  =========================================
method             tensors                                static fields (in the metadata)
=================  =====================================  =========================================
palettize          ``.indices`` uint8 (bit-packed, LSB    shape, nbits, group_size
                   first), ``.lut`` float16 (groups,
                   2**nbits), ``.scale`` float16 (out,)
                   if per-channel scaled; int8 LUTs:
                   ``.lut`` int8 and ``.lut_scale``
                   float16 (groups,); int8 activations:
                   ``.act_scale`` float32 ()
int8, int8-w8a8    ``.int8`` int8, ``.w_scale`` float32   path
                   (out,), ``.act_scale`` float32 () or
                   (in,) for W8A8
llm-int8           ``.int8`` int8, ``.absmax`` float32    threshold, path, max_outlier_cols
                   (out,)
=================  =====================================  =========================================

e.g. ``down_blocks.0.resnets.0.conv1.weight.indices``. The safetensors header's ``__metadata__``
(string values) holds:

- ``format``: ``"sdjax-quantized"``; ``sdjax_format_version``: ``"1"`` (``FORMAT_VERSION``);
  ``sdjax_version``: the writing sdjax's version; ``component``: ``"unet"``...;
- ``recipe``: the recipe as JSON (``quant.recipes.Recipe.to_json``), or ``null``;
- ``layers``: JSON ``{parameter name: {"method": ..., static fields...}}`` for every conv/linear
  weight (``{"method": "float", "dtype": ...}`` for those left float) and every quantized weight.

``load`` rebuilds the same weight objects bit for bit (arrays keep their stored dtypes; float
tensors are cast to the requested dtype). A file without this metadata, or written in a newer
format version, is refused with a ``CheckpointError`` naming it.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import sdjax.version
from sdjax import checkpoint, configs as cfgs
from sdjax.nn import flatten, method_of as nn_method_of, unflatten
from sdjax.params import CheckpointError, canonical_dtype, check_shapes
from sdjax.safetensors_io import Reader, SafetensorsError, write

from . import calibrate
from .int8 import Int8Weight
from .llm_int8 import LLMInt8Weight
from .palettize import PalettizedWeight
from sdjax.nn import is_quantized

from .recipes import Recipe

FORMAT = "sdjax-quantized"
FORMAT_VERSION = 1
WEIGHTS_NAME = "sdjax_quantized.safetensors"
COMPONENTS = tuple(checkpoint.MODELS)


@dataclasses.dataclass(frozen=True)
class Codec:
    """How one weight type is stored: tensor suffix -> dataclass field (the first one holds the
    weight's shape unless "shape" is a static field), optional suffixes, and static fields."""
    cls: type
    arrays: dict
    optional: tuple
    static: tuple


CODECS = {
    "palettize": Codec(PalettizedWeight, {"indices": "packed", "lut": "lut", "scale": "scale", "lut_scale": "lut_scale",
                                          "act_scale": "act_scale"}, ("scale", "lut_scale", "act_scale"),
                       ("shape", "nbits", "group_size")),
    "int8": Codec(Int8Weight, {"int8": "data", "w_scale": "scale", "act_scale": "act_scale"}, ("act_scale",),
                  ("path",)),
    "llm-int8": Codec(LLMInt8Weight, {"int8": "data", "absmax": "absmax"}, (),
                      ("threshold", "path", "max_outlier_cols")),
}
METHODS = ("palettize", "int8", "int8-w8a8", "llm-int8")


def method_of(w):
    """The recipe method a weight represents: "float", "palettize", "int8", "int8-w8a8", "llm-int8"."""
    return nn_method_of(w)


def _codec(method):
    return CODECS["int8" if method == "int8-w8a8" else method]


def label(w):
    """A short description of a weight's method: "palettize 4b g16 +scale", "int8", "float32"..."""
    m = method_of(w)
    if m == "palettize":
        return (f"palettize {w.nbits}b" + (f" g{w.group_size}" if w.group_size else "")
                + (" +scale" if w.scale is not None else "") + (" int8lut" if w.lut_scale is not None else "")
                + (" a8" if w.act_scale is not None else ""))
    if m == "int8-w8a8":
        return "int8-w8a8" + (" ch" if w.act_scale.ndim else "")
    if m == "float":
        return np.dtype(w.dtype).name
    return m


def nbytes(w):
    return int(w.nbytes)


def bits_per_weight(w):
    """Stored bits per weight, overhead (LUTs, scales) included."""
    return 8 * nbytes(w) / int(np.prod(w.shape))


def encode(key, w):
    """(tensors, layer info) of the weight at parameter ``key``."""
    method = method_of(w)
    if method == "float":
        return {key: w}, {"method": "float", "dtype": np.dtype(w.dtype).name}
    if method not in METHODS:
        raise CheckpointError(f"{key}: cannot save a {type(w).__name__} (no codec in quant.io.CODECS)")
    codec = _codec(method)
    tensors = {f"{key}.{suffix}": getattr(w, field) for suffix, field in codec.arrays.items()
               if getattr(w, field) is not None}
    info = {"method": method}
    for field in codec.static:
        v = getattr(w, field)
        info[field] = list(v) if isinstance(v, tuple) else v
    return tensors, info


def decode(key, info, get, where):
    """The weight at ``key`` from its layer info and ``get(tensor name) -> array or None``."""
    method = info.get("method") if isinstance(info, dict) else None
    if method == "float":
        return get(key)
    if method not in METHODS:
        raise CheckpointError(f"{where}: layer {key!r} has method {method!r}, which this sdjax "
                              f"({sdjax.version.__version__}) cannot read")
    codec = _codec(method)
    required = [s for s in codec.arrays if s not in codec.optional] + (["act_scale"] if method == "int8-w8a8" else [])
    kw = {}
    for suffix, field in codec.arrays.items():
        a = get(f"{key}.{suffix}")
        if a is None and suffix in required:
            raise CheckpointError(f"{where}: {method} weight {key!r} has no tensor {key}.{suffix}")
        kw[field] = None if a is None else jnp.asarray(a)
    for field in codec.static:
        if field not in info:
            raise CheckpointError(f"{where}: layer {key!r} ({method}) lacks {field!r} in the metadata")
        v = info[field]
        kw[field] = tuple(v) if field == "shape" else v
    if codec.cls is PalettizedWeight:  # the packed bytes and LUTs must fit the shape and nbits
        n, nbits = int(np.prod(kw["shape"])), kw["nbits"]
        groups = 1 if not kw["group_size"] else kw["shape"][-1] // kw["group_size"]
        if kw["packed"].shape != (-(-n * nbits // 8),) or kw["lut"].shape != (groups, 2 ** nbits):
            raise CheckpointError(f"{where}: palettized weight {key!r}: indices {tuple(kw['packed'].shape)} and "
                                  f"LUT {tuple(kw['lut'].shape)} do not fit shape {kw['shape']} at {nbits} bits")
        int8_lut, ls, act = kw["lut"].dtype == jnp.int8, kw["lut_scale"], kw["act_scale"]
        if int8_lut != (ls is not None) or (ls is not None and ls.shape != (groups,)):
            raise CheckpointError(f"{where}: palettized weight {key!r}: an int8 LUT ({key}.lut is {kw['lut'].dtype}) "
                                  f"comes with one scale per LUT, {key}.lut_scale of shape ({groups},); got "
                                  f"{None if ls is None else tuple(ls.shape)}")
        if act is not None and (act.shape != () or not bool(jnp.isfinite(act)) or not float(act) > 0):
            raise CheckpointError(f"{where}: palettized weight {key!r}: {key}.act_scale must be one finite scale "
                                  f"> 0; got shape {tuple(act.shape)}")
    return codec.cls(**kw)


def shape_of(w):
    return tuple(int(d) for d in w.shape)


# --- saving -----------------------------------------------------------------------------------

def metadata(component, params, recipe=None):
    """The ``__metadata__`` of a component's quantized file."""
    layers = {}
    flat = flatten(params)
    for n in calibrate.layer_names(params):
        layers[n + ".weight"] = None
    for k, w in flat.items():
        if is_quantized(w):
            layers[k] = None
    for k in layers:
        layers[k] = encode(k, flat[k])[1]
    if isinstance(recipe, Recipe):
        recipe = recipe.to_json()
    return {"format": FORMAT, "sdjax_format_version": str(FORMAT_VERSION), "sdjax_version": sdjax.version.__version__,
            "component": component, "layout": "sdjax (linear (in, out), conv HWIO)",
            "recipe": json.dumps(recipe, separators=(",", ":")), "layers": json.dumps(layers, separators=(",", ":"))}


def save_component(path, component, params, recipe=None, progress=True):
    """Write one component's params (quantized or not) as an sdjax quantized file at ``path``."""
    meta = metadata(component, params, recipe)
    tensors = {}
    for k, w in tqdm(flatten(params).items(), desc=f"writing {component}", unit="tensor",
                     disable=not progress, leave=False):
        for name, a in encode(k, w)[0].items():
            tensors[name] = a  # pulled to the host one at a time by write()
    write(path, tensors, meta)
    return path


def has_quantized(params):
    return any(is_quantized(w) for w in flatten(params).values())


def save(pipe, out_dir, recipe=None, overwrite=False, progress=True):
    """Write ``pipe`` (anything with ``params``, ``configs``, ``tokenizer``, ``scheduler_config``,
    ``source``) as a quantized folder; see the module docstring. ``recipe``: recorded in the
    metadata (default: ``pipe.quantization["recipe"]`` when there is one). Written under a
    temporary name and renamed when complete."""
    if recipe is None:
        recipe = (getattr(pipe, "quantization", None) or {}).get("recipe")
    index = getattr(pipe, "model_index", None)
    src_index = os.path.join(getattr(pipe, "source", "") or "", "model_index.json")
    if not index and os.path.isfile(src_index):
        with open(src_index) as f:
            index = json.load(f)
    index = dict(index or checkpoint.default_model_index(pipe.configs))
    quantized = [c for c in COMPONENTS if c in pipe.params and has_quantized(pipe.params[c])]
    # keys starting with "_" are ignored by diffusers; this one is for people reading the file
    index["_sdjax_quantized"] = {"format_version": FORMAT_VERSION, "components": quantized,
                                 "weights": WEIGHTS_NAME, "note": "sdjax format: diffusers cannot load "
                                 "the quantized components; load with sdjax.load"}
    loras = [[os.fspath(f), float(scale)] for f, scale in getattr(pipe, "loras", ()) or ()]
    if loras:  # the LoRAs merged into the float weights before quantizing, as [file, scale] pairs
        index["_sdjax_quantized"]["loras"] = loras
    else:
        index["_sdjax_quantized"].pop("loras", None)

    def write_weights(folder, comp, params):
        if comp in quantized:
            save_component(os.path.join(folder, WEIGHTS_NAME), comp, params, recipe, progress)
        else:
            checkpoint.write_float_component(folder, comp, params)

    tok, tok_2 = getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)
    ckpt = checkpoint.Checkpoint(pipe.params, pipe.configs, getattr(tok, "folder", None) if tok is not None else None,
                                 getattr(pipe, "scheduler_config", None), index, getattr(pipe, "source", ""),
                                 getattr(tok_2, "folder", None) if tok_2 is not None else None)
    return checkpoint.save(ckpt, out_dir, overwrite=overwrite, progress=progress, write_weights=write_weights)


# --- loading ----------------------------------------------------------------------------------

def is_quantized_folder(path):
    """Whether ``path`` is a folder with at least one sdjax quantized component."""
    path = os.fspath(path)
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, c, WEIGHTS_NAME)) for c in COMPONENTS)


def read_metadata(path):
    """The checked metadata of a quantized file: {"component", "recipe" (dict or None), "layers",
    "sdjax_version", "sdjax_format_version"}; CheckpointError naming the file otherwise."""
    try:
        with Reader(path) as r:
            meta = dict(r.metadata)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    return _check_metadata(path, meta)


def _check_metadata(path, meta):
    if meta.get("format") != FORMAT or "sdjax_format_version" not in meta:
        raise CheckpointError(f"{path}: not an sdjax quantized weights file (its safetensors header has no "
                              f"sdjax metadata: format={meta.get('format')!r}); re-create it with `sdjax quantize`")
    try:
        version = int(meta["sdjax_format_version"])
    except ValueError:
        version = None
    if version is None or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: sdjax quantized format version {meta['sdjax_format_version']!r} "
                              f"(written by sdjax {meta.get('sdjax_version', '?')}); this sdjax "
                              f"({sdjax.version.__version__}) reads version {FORMAT_VERSION}: upgrade sdjax or re-quantize")
    out = {"sdjax_format_version": version, "sdjax_version": meta.get("sdjax_version"),
           "component": meta.get("component")}
    for field in ("recipe", "layers"):
        try:
            out[field] = json.loads(meta[field])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt sdjax metadata: {field!r} is missing or not JSON") from None
    if not isinstance(out["layers"], dict) or not all(isinstance(v, dict) for v in out["layers"].values()):
        raise CheckpointError(f"{path}: corrupt sdjax metadata: 'layers' is not an object of objects")
    return out


def load_component(folder, component, dtype="float32", progress=True):
    """(params, config, metadata) of a quantized component folder."""
    config = cfgs.read(component, os.path.join(folder, "config.json"))
    path = os.path.join(folder, WEIGHTS_NAME)
    dt = canonical_dtype(dtype)
    try:
        r = Reader(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    try:
        meta = _check_metadata(path, dict(r.metadata))
        if meta["component"] not in (None, component):
            raise CheckpointError(f"{path}: holds the {meta['component']!r} component, found in {component}/")
        layers = meta["layers"]
        keys = set(r.keys())
        # every parameter: a plain tensor, or the tensors of a quantized weight named in "layers"
        params = {k for k in keys if k not in layers and not any(k.startswith(q + ".") for q in layers)}
        params |= set(layers)
        taken = set()

        def get(name):
            if name not in keys:
                return None
            taken.add(name)
            return r.get(name)

        shapes = {}
        for k in params:
            info = layers.get(k, {"method": "float"})
            if info.get("method") == "float":
                if k not in keys:
                    raise CheckpointError(f"{path}: missing tensor {k!r}")
                shapes[k] = r.shape(k)
            elif info.get("method") not in METHODS:
                decode(k, info, get, path)  # raises: a method this sdjax cannot read
            elif "shape" in info:
                shapes[k] = tuple(info["shape"])
            else:  # the first tensor (int8 data) has the weight's shape
                first = f"{k}.{next(iter(_codec(info['method']).arrays))}"
                if first not in keys:
                    raise CheckpointError(f"{path}: {info['method']} weight {k!r} has no tensor {first}")
                shapes[k] = r.shape(first)
        expected = checkpoint.MODELS[component].param_shapes(config)
        check_shapes(shapes, expected, path)
        flat = {}
        for k in tqdm(sorted(params), desc=f"loading {component}", unit="tensor", disable=not progress,
                      leave=False):
            info = layers.get(k, {"method": "float"})
            w = decode(k, info, get, path)
            if info.get("method") == "float":
                w = jnp.asarray(np.asarray(w, dtype=dt))
            flat[k] = w
        extra = sorted(keys - taken)
        if extra:
            raise CheckpointError(f"{path}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    finally:
        r.close()
    return unflatten(flat), config, meta


def load(path, dtype="float32", progress=True):
    """(Checkpoint, quantization info) of a quantized folder; float components load as usual.

    info: {"recipe": the recipe dict (or None), "components": {component: metadata},
    "loras": [[file, scale], ...] merged into the float weights before quantizing}."""
    path = os.fspath(path)
    params, configs, info = {}, {}, {"recipe": None, "components": {}}
    index = checkpoint.read_json(os.path.join(path, "model_index.json"))
    info["loras"] = [list(x) for x in ((index or {}).get("_sdjax_quantized") or {}).get("loras") or []]
    for comp in checkpoint.folder_components(path, index):
        folder = os.path.join(path, comp)
        if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            params[comp], configs[comp], meta = load_component(folder, comp, dtype, progress)
            info["components"][comp] = meta
            if info["recipe"] is None:
                info["recipe"] = meta["recipe"]
        else:
            params[comp], configs[comp] = checkpoint.load_component(folder, comp, dtype, None, progress)
    checkpoint.check_conditioning(configs, path)
    sched = checkpoint.read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    ckpt = checkpoint.Checkpoint(params, configs, scheduler_config=sched, model_index=index, source=path,
                                 **checkpoint.folder_tokenizers(path))
    return ckpt, info
