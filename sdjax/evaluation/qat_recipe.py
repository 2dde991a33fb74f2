"""Fine-tuning as a recipe step: the ``finetune=`` callable of ``quant.apply_recipe`` (and
``Pipeline.quantize``) for recipes with ``"finetune"`` settings, built over ``qat.finetune`` for one
pipeline and its calibration prompts. ``quant`` drives no model, so the callable comes from here, as
GPTQ's ``hessian=`` run comes from ``calibration.hessian_run``.

    tune = finetune_callable(pipe, calibration_prompts, out_dir="q4.finetune")
    q = pipe.quantize("qat-4bit", finetune=tune)     # palette-4bit, then fine-tuned (quant.recipes.qat_defaults(4))
    tune.seconds                                     # time spent fine-tuning (every session of out_dir)
"""
from __future__ import annotations

import inspect
import json
import os
import time

from sdjax.files import atomic_write_json

from . import qat

TIME_FILE = "time.json"   # beside qat's settings.json and checkpoint.msgpack: seconds of every session


def _elapsed(out_dir):
    if out_dir is None:
        return 0.0
    try:
        with open(os.path.join(out_dir, TIME_FILE), encoding="utf-8") as f:
            return float(json.load(f)["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _sample_settings(kw):
    """Every setting ``qat.training_samples`` takes, as ``qat.finetune`` would pass it (its defaults,
    else training_samples', for those not given): runs that agree on them train on the same samples."""
    tune, make = inspect.signature(qat.finetune).parameters, inspect.signature(qat.training_samples).parameters
    out = {}
    for n, p in make.items():
        if n in ("pipe", "prompts", "progress") or p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        default = tune[n].default if n in tune and tune[n].default is not inspect.Parameter.empty else p.default
        out[n] = kw.get(n, default)
    return out


def finetune_callable(pipe, prompts, *, out_dir=None, eval_prompts=(), progress=True, samples_cache=None, **fixed):
    """``run(unet_params, settings) -> fine-tuned unet params`` for ``quant.apply_recipe(finetune=run)``:
    ``qat.finetune(pipe, unet_params, prompts, **fixed, **settings)``, the recipe's ``settings`` over
    ``fixed`` (qat.finetune's other keywords, e.g. the generation's ``generation_steps``,
    ``guidance_scale``, ``sampler``, ``negative_prompt``).

    ``out_dir``: qat's resumable checkpoint folder (a rerun with the same settings continues from it)
    and ``time.json``, the seconds every session spent in it; ``run.seconds`` holds that total after a
    call (this call's alone without ``out_dir``, and in ``run.session_seconds``), generating training
    samples included. ``eval_prompts``: prompts never trained on (qat
    refuses them). ``samples_cache``: a dict shared by several callables over the same pipeline and
    prompts, so runs whose sample settings agree generate their training samples once."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)

    def run(unet_params, settings):
        kw = dict(fixed, **settings)
        t0 = time.perf_counter()
        if samples_cache is not None and "samples" not in kw:
            key = json.dumps([prompts, sorted(_sample_settings(kw).items())])
            if key not in samples_cache:
                samples_cache[key] = qat.training_samples(pipe, prompts, progress=progress, **_sample_settings(kw))
            kw["samples"] = samples_cache[key]
        refused = False
        try:      # an interrupted session's time counts towards the resumed run's
            return qat.finetune(pipe, unet_params, prompts, out_dir=out_dir, eval_prompts=eval_prompts,
                                progress=progress, **kw)
        except ValueError:   # refused (settings, prompts): nothing trained
            refused = True
            raise
        finally:
            if not refused:
                run.session_seconds = time.perf_counter() - t0
                run.seconds = _elapsed(out_dir) + run.session_seconds
                if out_dir is not None and os.path.isdir(out_dir):
                    atomic_write_json(os.path.join(out_dir, TIME_FILE), {"seconds": run.seconds})
    run.seconds = run.session_seconds = None
    return run


__all__ = ["TIME_FILE", "finetune_callable"]
