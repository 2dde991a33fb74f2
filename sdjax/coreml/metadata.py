"""Model metadata written into every package ``sdjax export-coreml`` saves: author, license,
version, a short description, a description of every input and output, and user-defined
``sdjax.*`` entries -- the fields Apple's converter fills (``torch2coreml.py`` sets
``model.author``, ``license``, ``version``, ``short_description``, ``input_description[...]``,
``output_description[...]``) and Xcode's model viewer shows.

    from sdjax.coreml import metadata
    metadata.write("out/Unet.mlpackage", metadata.describe_model(pipe, license=None), "float16")

The fields go into the saved package's spec (``Data/<root model path>/model.mlmodel``, the path
``Manifest.json`` names), which is rewritten in place through a temporary file; the weights are
not touched, so it costs milliseconds whatever the package size, and works on any ML package.

* license: ``license=`` (``sdjax export-coreml --license``) when given, else the model card's:
  the ``license:`` entry of the YAML front matter of ``README.md`` in the model folder (the
  diffusers folder, or the folder of a single-file checkpoint; ``license_name``/``license_link``
  are added for ``license: other``); the embedded reference model is sdjax's own (MIT); else
  ``"unknown"`` (a folder written by ``sdjax quantize`` has no model card: pass ``--license``).
* version: ``"sdjax <version> / <model name>"``, the model name being the folder's or file's name.
* author: the model's name, pointing to its model card, and that sdjax converted it.
* user-defined: ``sdjax.version``, ``sdjax.model``, ``sdjax.component``, ``sdjax.recipe`` (the
  recipe's name, or ``float``), ``sdjax.compute_precision``, beside coremltools' own
  ``com.github.apple.coremltools.*`` entries.
* descriptions: by package name (TextEncoder, Unet, UnetChunk1, VAEDecoder, controlnet/NAME, ...)
  and by input/output name (``input_ids``, ``sample``, ``noise_pred``, ``additional_residual_3``,
  ...); a name this module does not know keeps an empty description.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

from ..version import __version__

UNKNOWN_LICENSE = "unknown"
REFERENCE_MODEL_LICENSE = "MIT (sdjax's embedded reference model, shipped in the sdjax package)"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What every package of one model says about it (``describe_model``)."""
    name: str                    # the folder's or file's name
    license: str
    recipe: str = "float"        # the quantization recipe's name
    prediction_type: str = ""    # the scheduler's ("epsilon", "v_prediction"); "" when unknown
    swift_scaling_factor: float | None = None  # what the Swift pipeline divides latents by (VAE decoder)


def model_name(source) -> str:
    """The name a model is known by: its folder's or file's name (``source`` a path), else ``source``."""
    s = os.fspath(source or "")
    base = os.path.basename(os.path.normpath(s)) if s else ""
    return base or s or "unknown model"


def card_license(folder) -> str | None:
    """The ``license:`` of the YAML front matter of ``folder/README.md`` (a Hugging Face model card),
    with ``license_name`` and ``license_link`` for ``license: other``; None without one."""
    path = os.path.join(os.fspath(folder), "README.md")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(65536)
    except (OSError, UnicodeDecodeError):
        return None
    m = re.match(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", text, re.S)
    if not m:
        return None
    fields = {}
    for line in m.group(1).splitlines():  # top-level scalars only: a model card's license is one
        kv = re.match(r"^(license|license_name|license_link):[ \t]*(.*?)[ \t]*$", line)
        if kv and kv.group(2) and kv.group(1) not in fields:
            fields[kv.group(1)] = kv.group(2).strip("'\"")
    lic = fields.get("license")
    if not lic:
        return None
    extra = [fields[k] for k in ("license_name", "license_link") if k in fields]
    return f"{lic} ({', '.join(extra)})" if extra else lic


def find_license(source) -> str:
    """``card_license`` of the model at ``source`` (a folder, or a file beside its README.md);
    the embedded reference model's MIT; else UNKNOWN_LICENSE."""
    s = os.fspath(source or "")
    if not s or not os.path.exists(s):  # "random sd15 (seed 0)", a name: no card to read
        return UNKNOWN_LICENSE
    from ..pipeline import reference_model_path
    try:
        if os.path.samefile(s, reference_model_path()):
            return REFERENCE_MODEL_LICENSE
    except OSError:
        pass
    folder = s if os.path.isdir(s) else os.path.dirname(os.path.abspath(s))
    return card_license(folder) or UNKNOWN_LICENSE


def _recipe_name(recipe) -> str:
    return recipe.get("name", "quantized") if recipe else "float"


def describe_model(pipe, license=None) -> ModelInfo:
    """ModelInfo of an ``sdjax.Pipeline``: ``license`` wins over the model card's (``find_license``)."""
    source = getattr(pipe, "source", "")
    recipe = (getattr(pipe, "quantization", None) or {}).get("recipe")
    sched = getattr(pipe, "scheduler_config", None) or {}
    return ModelInfo(model_name(source), license or find_license(source), _recipe_name(recipe),
                     str(sched.get("prediction_type") or ""))


# --------------------------------------------------------------------------- descriptions

_PACKAGES = [  # (package name pattern, component, short description)
    (r"TextEncoder2?", "text_encoder",
     "Stable Diffusion text encoder (CLIP): the prompt's token ids to the embeddings the UNet attends to."),
    (r"(Controlled)?Unet(Refiner)?(Chunk[12])?", "unet",
     "Stable Diffusion UNet: the noise prediction for latents at a timestep, conditioned on text embeddings."),
    (r"VAEDecoder", "vae_decoder", "Stable Diffusion VAE decoder: latents to an RGB image in [-1, 1]."),
    (r"VAEEncoder", "vae_encoder",
     "Stable Diffusion VAE encoder: an RGB image in [-1, 1] to the mean and log-variance of its latents."),
]

_INPUTS = {
    "input_ids": "Token ids of the prompt (as float32), padded to the sequence length by the CLIP tokenizer "
                 "(vocab.json, merges.txt).",
    "sample": "Latents, NCHW (the two halves of classifier-free guidance at batch 2).",
    "timestep": "The scheduler's timestep for each latent.",
    "encoder_hidden_states": "Text embeddings in the (batch, channels, 1, tokens) layout (SDXL: both text "
                             "encoders' penultimate states side by side).",
    "time_ids": "SDXL size conditioning: original size, crop top-left and target size (refiner: original size, "
                "crop top-left and aesthetic score).",
    "text_embeds": "SDXL: text_encoder_2's pooled, projected embeddings.",
    "controlnet_cond": "Control image, planar RGB in [0, 1], at image size.",
    "z": "Latents divided by the Swift pipeline's scale factor.",
    "x": "Image, planar RGB in [-1, 1].",
}
_OUTPUTS = {
    "last_hidden_state": "Hidden states of the last layer after the final layer norm, one per token.",
    "hidden_embeds": "Hidden states of the penultimate layer, one per token (what SDXL's UNet attends to).",
    "pooled_outputs": "The hidden state at the end-of-text token (text_encoder_2: projected, SDXL's text_embeds).",
    "image": "RGB image in [-1, 1], NCHW.",
    "latent": "Mean (first half of the channels) and log-variance (second half) of the latent distribution, "
              "scaled for the Swift pipeline's scale factor.",
}


def _residual(name, role):
    m = re.fullmatch(r"additional_residual_(\d+)", name)
    if not m:
        return None
    return (f"ControlNet residual {m.group(1)} {role}: added to the UNet's skip connection of that index "
            "(the last one: to the mid block's output).")


def _chunk(name, role):
    if name.startswith("chunk_"):
        return f"Tensor {role} the UNet's first chunk to its second ({name[len('chunk_'):]})."
    return None


def describe_io(name, is_input, info: ModelInfo | None = None) -> str:
    """The description of an input or output called ``name`` ('' when unknown)."""
    if is_input:
        text = _INPUTS.get(name) or _residual(name, "(summed over the ControlNets)") or _chunk(name, "handed from")
    else:
        text = _OUTPUTS.get(name) or _residual(name, "of this ControlNet") or _chunk(name, "handed from")
        if name == "noise_pred":
            kind = {"v_prediction": "v (velocity)", "epsilon": "noise"}.get(info.prediction_type if info else "")
            text = f"The UNet's prediction{' of ' + kind if kind else ''} for each latent."
    if info is not None and name == "z" and info.swift_scaling_factor:
        text = f"Latents divided by {info.swift_scaling_factor:g} (the Swift pipeline's scale factor)."
    return text or ""


def package_kind(path) -> tuple[str, str]:
    """(component, short description) of a package from its file name (``controlnet/NAME.mlpackage``:
    a ControlNet)."""
    path = os.path.normpath(os.fspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    if os.path.basename(os.path.dirname(path)) == "controlnet":
        return "controlnet", (f"ControlNet {stem}: residuals for the ControlledUnet's skip connections and mid "
                              "block, from a control image.")
    for pattern, comp, text in _PACKAGES:
        if re.fullmatch(pattern, stem):
            if stem.endswith(("Chunk1", "Chunk2")):
                text += f" Chunk {stem[-1]} of 2 (the Swift pipeline feeds chunk 2 the UNet's inputs and chunk 1's outputs)."
            if stem.startswith("Controlled"):
                text += " Takes the ControlNets' summed residuals as extra inputs."
            if "Refiner" in stem:
                text += " The SDXL refiner's."
            return comp, text
    return "unknown", ""


# --------------------------------------------------------------------------- writing

def spec_path(package) -> str:
    """The path of the model spec inside an .mlpackage (from its Manifest.json)."""
    package = os.fspath(package)
    try:
        with open(os.path.join(package, "Manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{package}: not a readable .mlpackage (Manifest.json: {type(e).__name__}: {e})") from None
    return os.path.join(package, "Data", root)


def read_spec(package):
    """The ``Model`` protobuf of an .mlpackage, read without coremltools' model loading."""
    from coremltools.proto import Model_pb2
    spec = Model_pb2.Model()
    with open(spec_path(package), "rb") as f:
        spec.ParseFromString(f.read())
    return spec


def write(package, info: ModelInfo, compute_precision: str | None = None) -> None:
    """Write ``info``'s metadata and the input/output descriptions into the saved ``package``."""
    path = spec_path(package)
    spec = read_spec(package)
    comp, short = package_kind(package)
    md = spec.description.metadata
    md.author = f"{info.name} (see its model card); converted to Core ML by sdjax {__version__}"
    md.license = info.license
    md.versionString = f"sdjax {__version__} / {info.name}"
    md.shortDescription = short
    user = {"sdjax.version": __version__, "sdjax.model": info.name, "sdjax.component": comp,
            "sdjax.recipe": info.recipe}
    if compute_precision:
        user["sdjax.compute_precision"] = compute_precision
    for k, v in user.items():
        md.userDefined[k] = str(v)
    for feature, is_input in [(f, True) for f in spec.description.input] + [(f, False) for f in spec.description.output]:
        feature.shortDescription = describe_io(feature.name, is_input, info)
    tmp = path + ".sdjax-tmp"
    with open(tmp, "wb") as f:
        f.write(spec.SerializeToString())
    os.replace(tmp, path)


def describer(pipe, license=None, refiner=None, controlnets=None):
    """``fn(paths, compute_precision)`` that writes the metadata into each package of an export of
    ``pipe`` (``sdjax.coreml.export.export_pipeline``): the refiner's packages (``UnetRefiner*``)
    describe ``refiner``, ``controlnet/NAME`` the ControlNet ``NAME`` (``controlnets``: ``{name:
    (params, config, info)}``, ``info["model"]`` its path), the others ``pipe``."""
    from .export import is_xl
    from .vae import SWIFT_SCALING_FACTOR, SWIFT_XL_SCALING_FACTOR
    base = dataclasses.replace(describe_model(pipe, license), swift_scaling_factor=(
        SWIFT_XL_SCALING_FACTOR if is_xl(pipe) else SWIFT_SCALING_FACTOR))
    ref = describe_model(refiner, license) if refiner is not None else None
    nets = {name: _controlnet_info(name, v[2] if len(v) > 2 else None, license) for name, v in (controlnets or {}).items()}

    def fn(paths, compute_precision=None):
        for p in paths:
            stem = os.path.splitext(os.path.basename(os.fspath(p)))[0]
            comp, _ = package_kind(p)
            if comp == "controlnet":
                info = nets.get(stem) or _controlnet_info(stem, None, license)
            elif ref is not None and stem.startswith("UnetRefiner"):
                info = ref
            else:
                info = base
            write(p, info, compute_precision)
    return fn


def _controlnet_info(name, info, license):
    """ModelInfo of a ControlNet exported as ``controlnet/name``: ``info`` the export's record
    (``{"model": path, "recipe": recipe dict or None}``)."""
    model = (info or {}).get("model")
    return ModelInfo(model_name(model or name), license or find_license(model), _recipe_name((info or {}).get("recipe")))
