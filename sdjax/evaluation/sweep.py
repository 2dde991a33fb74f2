"""``sdjax eval``: the float model and every recipe on one prompt x seed set, into a report folder.

    from sdjax.evaluation import sweep
    results = sweep.run(pipe, ["palette-6bit", "palette-4bit", "apple-mbp", "mixed-sdjax"], "eval-out")

Recipes are preset names, recipe JSON files (sdjax's or Apple's), or four generated families:

- ``apple-mbp``: Apple's mixed-bit palettization as Apple runs it (``apple``, ``apple_sweep``): its
  reading (the pipeline's own scheduler for one step, ``apple_latent_psnr_db``), candidates, clustering,
  sweeps at 1, 2, 4, 6, 8 bits, baselines and thresholds ``linspace(original - 1, linear_8bit + 5, 7)``;
  named by Apple's bits (``nbits x numel`` over its candidates, no LUTs);
- ``apple-rule``: Apple's threshold rule (``quant.mixed_bit.apple_recipes``) applied to sdjax's
  measurements instead (sdjax's one-step reading, candidates, exact k-means, per-channel int8 baseline):
  what sdjax called Apple's recipes before it ran Apple's own pre-analysis;
- ``mixed-sdjax``: our allocator (``quant.allocation.allocate``) at the same stored size as each of
  Apple's recipes (apple-mbp's, else apple-rule's), so the two are compared at equal bytes, and
  ``mixed-sdjax-u6-B``, the smallest of its recipes that keeps uniform 6-bit palettization's one-step
  PSNR (``allocation.allocate_for_quality``);
- ``mixed-gptq``: the same allocator over GPTQ-palettized layers (``quant.gptq``: the same LUTs and
  bytes, indices chosen for the layer's output on calibration inputs), with its own per-layer sweep,
  at the same sizes up to ``GPTQ_MAX_BITS``, ``mixed-gptq-u6-B`` as above, and ``mixed-gptq-u6img-B``,
  the smallest keeping uniform 6-bit's (plain k-means) final latents', images' PSNR and SSIM too;
- ``qat-mixed-gptq``: ``mixed-gptq-u6-B`` fine-tuned (``qat-mixed-gptq-u6-B``), beside the ``qat-Nbit``
  presets (uniform palettization fine-tuned).

Fine-tuned recipes (``"finetune"`` settings: the qat-* ones, or a recipe file's) train their palettized
UNet weights after the rules are applied (``qat.finetune`` through ``qat_recipe.finetune_callable``) on the
calibration prompts, with the evaluation's sampler, steps and guidance, never on an evaluation prompt; a
killed run resumes the fine-tuning from OUT/state/finetune/ (removed once the recipe is done), and each
result records its ``finetune_seconds``.

All need the per-layer sensitivity sweep, which is run once and also reported (the heatmap, and how
well the cheap Fisher estimate ranks layers).

Selection and evaluation use different pairs. The sweeps, Apple's thresholds and our searches run on
the *selection pairs*: the first ``SELECTION_PROMPTS`` calibration prompts (never evaluation prompts;
GPTQ and fine-tuning use all of them, where more prompts keep helping) with x_T from
``SELECTION_SEED`` (never a calibration generation's x_T, which GPTQ has fitted); each sweep
measurement takes the first ``SWEEP_PAIRS`` of them (as many as Apple's 8 prompts), the quality
searches all of them; Apple's sweep takes 8 of the calibration prompts through Apple's reading. Every recipe is then measured on the evaluation pairs: a recipe searched on
the pairs it is reported on is fitted to them (the README gives the measurement).

GPTQ recipes (``mixed-gptq``, ``palette-*-gptq``,
files with ``"gptq": true`` rules) need each layer's input statistics: one guided generation of the
calibration prompts (``calibration``; never the evaluation prompts) with probes on every UNet
conv/linear layer, kept in OUT/state/hessians.npz. "original" is the float model with its weights rounded
to float16 (what Core ML ships; on a deterministic CPU the unmodified model's PSNR against itself is
infinite); "linear8" is the ``w8-int8`` preset.

Resumable: OUT/state/ holds the float outputs, each finished recipe's metrics and images, and the
sensitivity sweep as it goes; a rerun with the same model and settings loads them and computes only
what is missing. A folder holding another model's or other settings' results is refused. Every file
is written to a temporary name and renamed.

Average bits: the UNet's conv/linear weights, stored bits (indices, LUTs, scales) per weight; layers
left float count 16 bits (the float16 model is the baseline, as in Apple's analysis).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np
from tqdm.auto import tqdm

import quant
from quant import calibrate, gptq, metrics, mixed_bit
from sdjax import nn
from sdjax.files import atomic_write_json
from sdjax.version import __version__

from . import act_sensitivity, qat_recipe, report
from .calibration import Calibration, hessian_run
from .evaluator import Evaluator, Settings
from .apple import apple_min_size, module_order  # noqa: F401
from .apple_sweep import AppleSweep
from .families import (FINETUNED, GENERATED, GPTQ_MAX_BITS, RENAMED, ROLES, family, finetuned_mixed,  # noqa: F401
                       gptq_recipe, mixed_recipes, quality_margin)
from .layer_sweep import CANDIDATE_MIN, FISHER_TIMESTEPS, SWEEP_PAIRS, LayerSweep  # noqa: F401
from .outcome import EvalResult, RecipeResult, TargetResult  # noqa: F401
from .state import EvalError, State, _check_manifest, _safe, fingerprint  # noqa: F401
from .targets import targets

# llm-int8 and w8-int8conv are left out of the default set (add them with recipe_names / -r): the
# default run must stay under 10 minutes on 2 cores, and llm-int8's integer path alone takes 36 s
DEFAULT_RECIPES = ("palette-8bit", "palette-6bit", "palette-4bit", "palette-3bit", "palette-2bit",
                   "palette-4bit-gptq", "palette-2bit-gptq",   # the fine-tuned qat-*-gptq recipes' starts
                   "w8-int8", "apple-mbp", "apple-rule", "mixed-sdjax", "mixed-gptq") + FINETUNED

CALIBRATION_SEED = 1000   # x_T seeds of the calibration generation (the evaluation's are the user's)

SELECTION_SEED = 2000     # x_T seed of the selection pairs (the calibration generation's are 1000 + batch)
SELECTION_PROMPTS = 32    # the selection pairs' prompts: the first of the calibration prompts

def resolve(names):
    """Check recipe names -> [(name, recipe or None for generated)]; unknown names list the known."""
    out = []
    for n in names:
        if n in RENAMED:
            raise EvalError(f"recipe family {n!r} is now {RENAMED[n]}")
        if n in GENERATED:
            out.append((n, None))
            continue
        try:
            r = quant.parse_recipe(n)
        except quant.RecipeError as e:
            if os.path.sep in n or n.endswith(".json"):
                raise EvalError(f"recipe {n!r}: {e}") from None
            raise EvalError(f"unknown recipe {n!r}; known: {', '.join(quant.PRESETS + GENERATED)}, "
                            f"or a recipe JSON file") from None
        out.append((n if os.path.sep not in n else os.path.splitext(os.path.basename(n))[0], r))
    return out

def avg_bits(unet_params, min_numel=0):
    """Stored bits per UNet conv/linear weight; float layers count 16. ``min_numel``: only layers with
    more weights than that (the mixed-bit candidates: Apple's recipes name their bits over those)."""
    flat = nn.flatten(unet_params)
    numel = {name: k for name, k in calibrate.layer_numel(unet_params).items() if k > min_numel}
    if not numel:
        return 0.0

    def stored(name, _nbits):  # what the weight holds, whatever a recipe asked of it
        w = flat[name + ".weight"]
        return 8 * int(w.nbytes) if nn.is_quantized(w) else 16 * numel[name]
    return mixed_bit.average_bits({}, numel, stored)

def apple_bits(unet_params, numel):
    """Apple's count of a quantized UNet: ``nbits x numel`` over the layers of ``numel`` (a palettized
    layer its width, an int8 one 8, a float one 16), no LUTs or scales, over their total."""
    flat = nn.flatten(unet_params)
    return mixed_bit.average_bits({}, numel, lambda n, _b: numel[n] * (
        getattr(flat[n + ".weight"], "nbits", 8) if nn.is_quantized(flat[n + ".weight"]) else 16))

def weight_only(params):
    """True when every quantized weight is a weight-only type (palettized, int8 W8A16): then the
    model computes exactly what it computes with the dequantized weights."""
    from quant.int8 import Int8Weight
    from quant.palettize import PalettizedWeight
    leaves = jax.tree.leaves(params, is_leaf=nn.is_quantized)
    return all(isinstance(w, (PalettizedWeight, Int8Weight)) and getattr(w, "act_scale", None) is None
               for w in leaves if nn.is_quantized(w))

def dequantized(params, dtype=np.float32):
    """``params`` with every quantized weight replaced by its float value."""
    return jax.tree.map(lambda w: np.asarray(w.dequantize(dtype)) if nn.is_quantized(w) else w,
                        params, is_leaf=nn.is_quantized)

def component_bytes(params):
    return {c: quant.size_bytes(params[c]) for c in quant.recipes.COMPONENTS if c in params}

def _not_evaluation(prompts, settings, what):
    prompts = list(dict.fromkeys(prompts))
    overlap = sorted(set(prompts) & set(settings.prompts))
    if overlap:
        raise EvalError(f"{what} must not be evaluation prompts; both have {overlap[0]!r}"
                        f"{f' and {len(overlap) - 1} more' if len(overlap) > 1 else ''}")
    return prompts

def selection(pipe, prompts, settings: Settings, state: State, devices=None, progress=True):
    """The Evaluator of the selection pairs (see the module docstring): ``prompts`` (never evaluation
    prompts) x ``SELECTION_SEED`` (and the next seeds while there are fewer than ``SWEEP_PAIRS``
    pairs), the evaluation's sampler, steps and guidance, one-step references for every pair. Its
    float outputs are kept in OUT/state/selection.npz, reused when they came from the same prompts and
    settings, refused (named) otherwise."""
    prompts = _not_evaluation(prompts, settings, "selection (calibration) prompts")
    seeds = tuple(range(SELECTION_SEED, SELECTION_SEED + -(-SWEEP_PAIRS // len(prompts))))  # >= SWEEP_PAIRS pairs
    s = dataclasses.replace(settings, prompts=tuple(prompts), seeds=seeds, n_one_step=len(prompts) * len(seeds))
    meta = s.to_json()
    ref = state.load_recorded("selection.json", "selection.npz", meta,
                              "the saved selection pairs come from other settings")
    ev = Evaluator(pipe, s, devices=devices, progress=progress, reference=ref)
    if ref is None:
        state.save_recorded("selection.json", "selection.npz", meta, ev.reference)
    return ev

def hessians(pipe, prompts, settings: Settings, state: State, progress=True):
    """{layer: H} of every UNet conv/linear layer (``gptq.collect``) over ``gptq.calibration_run``:
    the guided generation of the calibration ``prompts`` with the evaluation's sampler, steps and
    guidance (seeds from ``CALIBRATION_SEED``), and their images noised at stratified timesteps;
    saved in OUT/state/hessians.npz. A saved set is reused when it came from the same prompts and
    settings, and refused (named) otherwise."""
    prompts = _not_evaluation(prompts, settings, "calibration prompts")
    meta = {"prompts": prompts, "seed": CALIBRATION_SEED, "steps": settings.steps, "sampler": settings.sampler,
            "guidance_scale": settings.guidance_scale, "batch": settings.batch,
            "n_timesteps": Calibration.n_timesteps}
    saved = state.load_recorded("hessians.json", "hessians.npz", meta,
                                "the saved GPTQ input statistics come from other calibration settings")
    if saved is not None:
        return saved
    unet = pipe.params["unet"]
    run = hessian_run(pipe, Calibration(tuple(prompts), steps=settings.steps, guidance_scale=settings.guidance_scale,
                                        sampler=settings.sampler, negative_prompt=settings.negative_prompt,
                                        seed=CALIBRATION_SEED, batch=settings.batch), progress=progress)
    t0 = time.perf_counter()
    H = gptq.collect(unet, run, calibrate.layer_names(unet))
    state.save_recorded("hessians.json", "hessians.npz", meta, H)
    state.write({"seconds": time.perf_counter() - t0}, "hessians-time.json")
    return H

def is_finetuned(name, recipe):
    """Whether ``resolve``'s ``(name, recipe)`` is a fine-tuned recipe (or the generated qat-mixed-gptq)."""
    return name == "qat-mixed-gptq" if recipe is None else recipe.needs_finetune


def _check_finetuning(names, calibration, settings, state):
    """Fine-tuned recipes' prompts: calibration prompts that are not evaluation prompts, the same as the
    saved runs' (OUT/state/finetune.json)."""
    if not names:
        return
    if not calibration:
        raise EvalError(f"{', '.join(names)}: fine-tuned recipes train on calibration prompts, never on evaluation "
                        "prompts: pass calibration prompts (calibration=, `sdjax eval --calibration-prompts`)")
    prompts = _not_evaluation(calibration, settings, "fine-tuning (calibration) prompts")
    state.check_settings("finetune.json", {"prompts": prompts},
                         "the saved fine-tuning runs come from other calibration prompts")


def _finetune_dir(state, name, recipe):
    """OUT/state/finetune/NAME-DIGEST: the resumable fine-tuning of this recipe (its settings changed: another
    folder; those of its earlier settings are removed)."""
    digest = hashlib.blake2b(json.dumps(recipe, sort_keys=True).encode(), digest_size=6).hexdigest()
    base = state.path("finetune")
    folder = os.path.join(base, f"{_safe(name)}-{digest}")
    if os.path.isdir(base):
        for old in os.listdir(base):
            if old.rsplit("-", 1)[0] == _safe(name) and os.path.join(base, old) != folder:
                shutil.rmtree(os.path.join(base, old), ignore_errors=True)
    return folder


@dataclasses.dataclass(frozen=True)
class Options:
    """What a run measures besides the generation settings, and how it builds mixed-bit recipes.

    ``calibration``: prompts for GPTQ's input statistics and fine-tuning's training samples, whose
    first ``SELECTION_PROMPTS`` are the prompts of the selection pairs (needed by GPTQ, fine-tuned
    and generated mixed-bit recipes; none may be an evaluation prompt).
    ``adherence``: (images, prompts) -> scores (the embedded model's ``shapes.score``); ``plugins``:
    ``quant.metrics`` plug-ins; ``fisher``: also rank layers by the Fisher estimate;
    ``model_label``: the model's name in the report; ``candidate_min``, ``mixed_nbits``: the
    mixed-bit candidate layers (at least this many weights) and their bit widths; ``apple_min_size``:
    apple-mbp's candidates (more weights than this; default Apple's 1e5 scaled to the model,
    ``apple.apple_min_size``)."""
    calibration: tuple = ()
    adherence: object = None
    plugins: tuple = ()
    fisher: bool = True
    model_label: str | None = None
    candidate_min: int = CANDIDATE_MIN
    mixed_nbits: tuple = tuple(mixed_bit.NBITS)
    apple_min_size: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "calibration", tuple(self.calibration or ()))
        object.__setattr__(self, "plugins", tuple(self.plugins or ()))
        object.__setattr__(self, "mixed_nbits", tuple(self.mixed_nbits))


def run(pipe, recipe_names=DEFAULT_RECIPES, out_dir="eval-out", settings: Settings | None = None,
        options: Options | None = None, *, devices=None, progress=True, **option_fields) -> EvalResult:
    """Evaluate ``pipe`` (float) and every recipe; write OUT/report.{md,json}, plots and grids, and
    OUT/recipes/. Returns an ``EvalResult`` (see the module docstring).

    ``options``: an ``Options``, or its fields as keywords (``calibration=``, ``adherence=``, ...)."""
    if option_fields:
        if options is not None:
            raise TypeError("pass options= or its fields as keywords, not both")
        options = Options(**option_fields)
    o = options or Options()
    adherence, plugins, calibration = o.adherence, o.plugins, list(o.calibration)
    candidate_min, mixed_nbits = o.candidate_min, o.mixed_nbits
    recipes = resolve(list(recipe_names))
    if settings is None:
        raise EvalError("settings: an sdjax.evaluation.evaluator.Settings (prompts, seeds, ...)")
    if pipe.is_quantized:
        raise EvalError(f"{pipe.source}: sdjax eval needs the float model (the reference every recipe is compared with)")
    # under jax.distributed every process runs the same computation (its devices take their share
    # of each batch); the first one writes the folder
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    state = State(out_dir, writer)
    apple_min = o.apple_min_size if o.apple_min_size is not None else apple_min_size(pipe.params["unet"])
    manifest = {"sdjax_version": __version__, "fingerprint": fingerprint(pipe.params), "settings": settings.to_json(),
                "mixed": {"candidate_min": candidate_min, "nbits": list(mixed_nbits), "selection_seed": SELECTION_SEED,
                          "sweep_pairs": SWEEP_PAIRS, "apple_min_size": apple_min}}
    _check_manifest(state, manifest, out_dir)
    _check_finetuning([n for n, r in recipes if is_finetuned(n, r)], calibration, settings, state)

    ref = state.load_arrays("float.npz")
    ev = Evaluator(pipe, settings, devices=devices, progress=progress, reference=ref)
    if ref is None:
        state.save_arrays(ev.reference, "float.npz")
    float_entry = state.read("float.json")
    if float_entry is None:
        fm = {"adherence": adherence(ev.reference["images"], ev.prompts) if adherence else None}
        float_entry = {"bytes": component_bytes(pipe.params), "avg_bits": 16.0, "metrics": fm}
        state.write(float_entry, "float.json")

    cache = {}  # quantized weights shared by the sensitivity sweep and every recipe
    samples_cache = {}  # fine-tuning's training samples, shared by the fine-tuned recipes
    apple_numel = {n: k for n, k in calibrate.layer_numel(pipe.params["unet"]).items() if k > apple_min}
    roles = {}
    todo = [(n, r.to_json() if hasattr(r, "to_json") else r) for n, r in recipes if r is not None]
    want = {n for n, r in recipes if r is None}
    act = act_sensitivity.prepare(pipe, calibration, settings, state, want, [r for _, r in todo], progress)  # W8A8
    want -= set(act_sensitivity.W8A8_FAMILIES)
    H = None
    gptq_families = want & {"mixed-gptq", "qat-mixed-gptq"}
    if gptq_families or any(r is not None and r.needs_hessian for _, r in recipes):
        if not calibration:
            raise EvalError("GPTQ recipes need calibration prompts (calibration=, `sdjax eval --calibration-prompts`) "
                            "for their input statistics")
        H = hessians(pipe, calibration, settings, state, progress)
    S = G = A = None
    if want:
        if not calibration:
            raise EvalError(f"{', '.join(sorted(want))}: mixed-bit recipes are chosen on selection pairs that are not "
                            "evaluation pairs: pass calibration prompts (calibration=, `sdjax eval --calibration-prompts`)")
        sel = selection(pipe, calibration[:SELECTION_PROMPTS], settings, state, devices, progress)
        S = LayerSweep(sel, state, progress, candidate_min, mixed_nbits, cache=cache)
        G = LayerSweep(sel, state, progress, candidate_min, mixed_nbits, cache=cache, hessians=H) \
            if gptq_families else None
        A = AppleSweep(sel, state, progress, apple_min, mixed_nbits, cache=cache) if "apple-mbp" in want else None
        key = sorted(want)
        saved = state.read("mixed.json")
        if saved is not None and saved.get("families") == key:
            mixed = [tuple(x) for x in saved["recipes"]]
        else:
            mixed = finetuned_mixed(mixed_recipes(S, want, G, A, calibrate.layer_numel(pipe.params["unet"])), want)
            state.write({"families": key, "recipes": [list(x) for x in mixed]}, "mixed.json")
        S.single()   # the report's sensitivity section, whichever families used it
        if o.fisher:
            S.fisher(S.single(), sel.s.prompts)
        todo += [(n, r) for n, r, _ in mixed]
        roles = {n: role for n, _, role in mixed}
    todo += [(n, r) for n, r, _ in act.recipes]
    roles.update({n: role for n, _, role in act.recipes})

    results = {"sdjax_version": __version__,
               "model": {"source": o.model_label or pipe.source, "fingerprint": manifest["fingerprint"]},
               "settings": dict(settings.to_json(), metrics=list(metrics.BUILTIN) + [p.name for p in plugins]),
               "float": float_entry, "recipes": [], "sensitivity": S.block() if S else None,
               "sensitivity_gptq": G.block() if G else None, "sensitivity_apple": A.block() if A else None,
               "act_sensitivity": act.block(),
               "targets": None}
    images = {"float": report.to_uint8(ev.reference["images"])}
    bar = tqdm(todo, desc="recipes", unit="recipe", disable=not progress)
    for name, r in bar:
        bar.set_postfix_str(name)
        key = _safe(name)
        res = state.read("recipes", key + ".json")
        imgs = None
        if res is None or res.get("recipe") != json.loads(json.dumps(r)):
            t0 = time.perf_counter()
            tune = None
            if quant.parse_recipe(r).needs_finetune:  # on the calibration prompts, resumable in OUT/state/finetune/
                tune_dir = _finetune_dir(state, name, r) if writer else None
                tune = qat_recipe.finetune_callable(
                    pipe, calibration, out_dir=tune_dir, eval_prompts=settings.prompts, progress=progress,
                    samples_cache=samples_cache, generation_steps=settings.steps, guidance_scale=settings.guidance_scale,
                    sampler=settings.sampler, negative_prompt=settings.negative_prompt)
            try:
                qparams = quant.apply_recipe(pipe.params, r, act.calibration(r), cache=cache,
                                             hessian=None if H is None else {"unet": H}, finetune=tune)
            except quant.RecipeError as e:
                if tune is None:
                    raise
                raise EvalError(f"recipe {name!r}: {e}") from None
            path = "simulated" if weight_only(qparams) else "quantized"
            # weight-only types compute exactly their dequantized weights' function, and float weights
            # reuse the float model's compiled programs: no compilation per recipe
            out = ev.outputs(dequantized(qparams) if path == "simulated" else qparams, desc=name)
            m, bad = ev.metrics(out, adherence=adherence, plugins=plugins)
            res = {"name": name, "family": family(name, r), "avg_bits": avg_bits(qparams["unet"]),
                   "avg_bits_candidates": avg_bits(qparams["unet"], candidate_min),
                   "apple_bits": apple_bits(qparams["unet"], apple_numel),
                   "bytes": component_bytes(qparams), "metrics": m, "finite": bad is None, "nonfinite": bad,
                   "seconds": time.perf_counter() - t0, "recipe": r, "path": path,
                   "int8_mac_fraction": act.mac_fraction(qparams["unet"])}
            if tune is not None:   # every session's, when the fine-tuning was resumed
                res["finetune_seconds"] = tune.seconds
                res["seconds"] += tune.seconds - tune.session_seconds
            imgs = report.to_uint8(out["images"])
            state.save_arrays({"images": imgs}, "recipes", key + ".npz")
            state.write(res, "recipes", key + ".json")  # last: its presence marks the recipe done
            if tune is not None and writer:
                shutil.rmtree(tune_dir, ignore_errors=True)
        if name in roles:
            res = dict(res, chosen_for=ROLES[roles[name]])
        results["recipes"].append(res)
        images[name] = imgs if imgs is not None else state.load_arrays("recipes", key + ".npz")["images"]
    results["targets"] = targets(results)
    if not writer:
        return EvalResult.from_json(results)
    write_recipes(results, out_dir)
    captions = [f"{p} (seed {s})" for p, s in settings.pairs]
    results["files"] = report.write_report(results, out_dir, images=images, captions=captions)
    return EvalResult.from_json(results)


def write_recipes(results, out_dir):
    """OUT/recipes/NAME.json (sdjax rules) and, for Apple's mixed-bit recipes, NAME.apple.json (Apple's
    ``{layer: nbits}``, for Apple's tools): ready for ``sdjax quantize --recipe``."""
    d = os.path.join(out_dir, "recipes")
    os.makedirs(d, exist_ok=True)
    for r in results["recipes"]:
        rec = r["recipe"]
        if r["name"].startswith("apple-mbp-"):  # Apple's tools cluster as coremltools does, as the rules say
            atomic_write_json(os.path.join(d, _safe(r["name"]) + ".apple.json"),
                              {x["pattern"]: x["nbits"] for x in rec["rules"] if x["method"] == "palettize"})
        if quant.recipes.is_apple_recipe(rec):
            atomic_write_json(os.path.join(d, _safe(r["name"]) + ".apple.json"), rec)
            rec = quant.parse_recipe(rec).to_json() | {"name": r["name"]}
        atomic_write_json(os.path.join(d, _safe(r["name"]) + ".json"), rec)
