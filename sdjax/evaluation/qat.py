"""Data-free quantization-aware fine-tuning of a palettized UNet: the float UNet (teacher) distilled
into the palettized one (student), weight-level parts in ``quant.finetune``.

    q = quant.apply_recipe(pipe.params, "palette-4bit")["unet"]
    tuned = finetune(pipe, q, calibration_prompts, method="lut", steps=300, lr=1e-3, out_dir="qat-run")
    # tuned: the UNet params with ordinary PalettizedWeight leaves, the same bytes as q

The training samples (``training_samples``) need nothing but the checkpoint and the prompts: x0 are
the float model's own guided generations of the calibration prompts encoded back by the VAE
(``calibration.self_generated_latents``), noised at stratified timesteps of the training range
(``calibration.calibration_samples``) with the scheduler's alphas, each with both guidance contexts
(the prompt's and the negative prompt's). The loss (``loss="guided"``) is the mean squared difference of
the student's and the teacher's *guided* predictions ``u + g * (c - u)`` (``g`` the generation's guidance
scale; a batch holds both contexts of each latent), what the sampler steps with: guidance multiplies the
difference of the two contexts' errors by ``g``, and the plain per-prediction MSE (``loss="eps"``) fell 3x
on the embedded model while the sampler's readings barely moved. The teacher's predictions are computed
once. ``train_bias`` also trains the palettized layers' float biases; ``w_init="quantized"`` starts
"dkm"/"ste"'s float weights at the start's dequantized weights (a GPTQ start keeps GPTQ's indices until
training moves them), ``"float"`` at the checkpoint's; ``schedule="cosine"`` decays both rates to 0.

Memory: a step donates the train params and optimizer state to the next step (they are copies:
the caller's arrays, the teacher's among them, are never taken). With ``remat`` (default "auto": on
for UNets over ``REMAT_AUTO_PARAMS`` parameters) it recomputes each block's activations in the
backward pass (``unet.apply(..., remat=True)``) and expands each trainable weight where its layer
runs (``quant.finetune.TrainingWeight``) instead of the whole UNet's before the forward pass. A
full-size SD 1.5 UNet then trains at batch 2 in 18.0 GiB ("ste"; "lut" 7.2 GiB) on CPU, about a
minute a step on 2 cores (experiments/qat_full_size.py); without remat "ste" needs ~28 GiB. On the
embedded model remat is off: it would only cost time.

Each step draws ``batch`` of the samples from ``(seed, step)`` alone, so a run resumed from its
checkpoint (``out_dir``: train params, optimizer state and step, written atomically every
``save_every`` steps, beside the run's settings in ``settings.json``) ends with the weights of an
uninterrupted run; a resume with other settings is refused, naming the setting.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from quant import finetune as ft
from quant.palettize import PalettizedWeight
from sdjax import conditioning
from sdjax import unet as unet_model
from sdjax.files import atomic_write, atomic_write_json
from sdjax.generate import check_int, unet_output
from sdjax.nn import flatten

from .calibration import Calibration, noised_latents, self_generated_latents

SETTINGS_FILE = "settings.json"
CHECKPOINT_FILE = "checkpoint.msgpack"
DEFAULT_SAVE_EVERY = 25
REMAT_AUTO_PARAMS = 200_000_000   # remat="auto": UNets with more parameters rematerialise (SD 1.5: 860M)


class Interrupted(RuntimeError):
    """Raised by ``finetune(..., interrupt_after=n)`` after step ``n`` is saved (tests of resuming)."""


@dataclasses.dataclass(frozen=True)
class Samples:
    """Training samples, one row per (noised latent, guidance context): ``x`` NHWC float32,
    ``t`` float32 timesteps, ``cond`` a conditions dict (``{"context": ...}`` plus SDXL's), and the
    teacher's noise prediction ``target``."""
    x: np.ndarray
    t: np.ndarray
    cond: dict
    target: np.ndarray

    def __len__(self):
        return len(self.t)

    def rows(self, index):
        return self.x[index], self.t[index], conditioning.rows(self.cond, index)


def _eval_rows(unet_params, config, samples, batch):
    out = []
    for start in range(0, len(samples), batch):
        x, t, cond = samples.rows(slice(start, start + batch))
        context, added = conditioning.unet_inputs(cond)
        out.append(np.asarray(unet_output(unet_params, config, x, t, context, added)))
    return np.concatenate(out)


def training_samples(pipe, prompts, *, seed=0, n_timesteps=8, generation_steps=25, guidance_scale=7.5,
                     sampler="dpmpp_2m", negative_prompt="", batch=8, progress=False):
    """The data-free training samples of ``prompts`` (see the module docstring): ``2 * len(prompts) *
    n_timesteps`` rows (each noised latent with the negative and the prompt's context), the float
    UNet's (``pipe.params["unet"]``) predictions as targets."""
    cal = Calibration(prompts=tuple(prompts), steps=generation_steps, guidance_scale=guidance_scale,
                      sampler=sampler, negative_prompt=negative_prompt, seed=seed, batch=batch,
                      n_timesteps=n_timesteps)
    x0 = self_generated_latents(pipe, cal, progress=progress)
    idx, t, xt, neg, pos = noised_latents(pipe, cal, x0)   # as GPTQ's calibration run noises them
    n = len(t)
    cond = {k: np.concatenate([np.repeat(neg[k], n, 0), pos[k][idx]]) for k in neg}
    samples = Samples(x=np.concatenate([xt, xt]), t=np.concatenate([t, t]).astype(np.float32), cond=cond,
                      target=None)
    target = _eval_rows(pipe.params["unet"], pipe.configs["unet"], samples, batch)
    return dataclasses.replace(samples, target=target)


def distillation_loss(unet_params, config, samples: Samples, batch=8):
    """Mean squared difference of ``unet_params``' noise predictions and the samples' targets, over
    every sample (UNet params of any kind: float, quantized, fine-tuned)."""
    pred = _eval_rows(unet_params, config, samples, batch)
    return float(np.mean(np.square(pred.astype(np.float64) - samples.target)))


# --- checks and settings -----------------------------------------------------------------------

def _check(steps, lr, w_lr, method, temperature, prompts, eval_prompts, save_every):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r}: the number of fine-tuning steps must be an integer >= 1")
    for name, v in (("lr", lr), ("w_lr", w_lr)):
        if v is None and name == "w_lr":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                or not np.isfinite(v) or not 0 < v <= 1:
            raise ValueError(f"{name}={v!r}: the learning rate must be a number with 0 < {name} <= 1")
    if method not in ft.METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; valid methods: {', '.join(ft.METHODS)}")
    if method == "dkm" and temperature is None:
        raise ValueError('method "dkm" needs a temperature > 0 (units of the weights squared)')
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or ())
    if not prompts:
        raise ValueError("prompts: a non-empty list of calibration prompts")
    ev = {eval_prompts} if isinstance(eval_prompts, str) else set(eval_prompts or ())
    overlap = [p for p in prompts if p in ev]
    if overlap:
        raise ValueError(f"calibration prompts must not be evaluation prompts; both have {overlap[0]!r}"
                         f"{f' and {len(overlap) - 1} more' if len(overlap) > 1 else ''}")
    check_int("save_every", save_every, error=ValueError)
    return prompts


def _fingerprint(tree):
    """sha256 of every leaf's bytes (paths sorted): which quantized model a run started from."""
    h = hashlib.sha256()
    for path, leaf in sorted(flatten(tree).items()):
        h.update(path.encode())
        for a in jax.tree.leaves(leaf):
            h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()


def _check_resume(out_dir, settings):
    path = os.path.join(out_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    for key in sorted(set(saved) | set(settings)):
        if saved.get(key) != settings.get(key):
            what = "the starting quantized model" if key == "start" else repr(key)
            raise ValueError(f"{out_dir} holds a fine-tuning run with other settings: {what} was "
                             f"{saved.get(key)!r}, now {settings.get(key)!r}; use another out_dir "
                             "or the same settings")
    return os.path.exists(os.path.join(out_dir, CHECKPOINT_FILE))


# --- the training loop ---------------------------------------------------------------------------

def _labels(train):
    return {"pal": {p: {k: "w" if k == "w" else "palette" for k in v} for p, v in train["pal"].items()},
            "bias": {p: "palette" for p in train["bias"]}}


def _with_leaves(tree, flat, prefix=""):
    """``tree`` with the leaves at the dotted paths of ``flat`` replaced by its values."""
    return {k: _with_leaves(v, flat, f"{prefix}{k}.") if isinstance(v, dict) else flat.get(f"{prefix}{k}", v)
            for k, v in tree.items()}


def _params(tr, fz, method, temperature, lazy=False):
    """The UNet params a training step runs: the palettized layers' weights (with ``lazy``, each
    expanded where its layer runs), the trained biases."""
    return _with_leaves(ft.weights_tree(tr["pal"], fz, method, temperature, lazy=lazy), tr["bias"])


def _remat(remat, ucfg):
    """``finetune``'s (checked) ``remat`` resolved to a bool ("auto": the UNet's size decides)."""
    if remat == "auto":
        n = sum(int(np.prod(s)) for s in flatten(unet_model.param_shapes(ucfg)).values())
        return n > REMAT_AUTO_PARAMS
    return remat


SCHEDULES = ("constant", "cosine")
W_INITS = ("float", "quantized")   # where "dkm"/"ste" start the float weights: the checkpoint's, the start's
LOSSES = ("guided", "eps")


def _rate(lr, schedule, steps):
    """The learning rate of each step: ``lr`` throughout, or a cosine decay from ``lr`` to 0 over
    ``steps``."""
    return lr if schedule == "constant" else optax.cosine_decay_schedule(lr, steps)


def _optimizer(method, lr, w_lr, schedule="constant", steps=1):
    if method == "lut":
        return optax.multi_transform({"palette": optax.adam(_rate(lr, schedule, steps))}, _labels)
    return optax.multi_transform({"w": optax.adam(_rate(w_lr, schedule, steps)),
                                  "palette": optax.adam(_rate(lr, schedule, steps))}, _labels)


def _loss(pred, target, guidance):
    """Per-prediction MSE (``guidance`` None), or the MSE of the guided predictions
    ``u + guidance * (c - u)`` of a batch laid out as [negative rows; the same latents' prompt rows]."""
    if guidance is None:
        return jnp.mean(jnp.square(pred - target))
    d = pred - target
    du, dc = jnp.split(d, 2)
    return jnp.mean(jnp.square(du + guidance * (dc - du)))


@functools.lru_cache(maxsize=16)
def _step_fn(ucfg, method, temperature, lr, w_lr, guidance=None, schedule="constant", steps=1, remat=False):
    """``(optimizer, jitted training step)`` of these settings (cached: a rerun with the same
    settings, or a resume in the same process, reuses the compilation). The step donates its train
    params and optimizer state."""
    opt = _optimizer(method, lr, w_lr, schedule, steps)

    def loss_fn(tr, fz, x, t, cond, target):
        context, added = conditioning.unet_inputs(cond)
        pred = unet_model.apply(_params(tr, fz, method, temperature, lazy=remat), ucfg, x, t, context,
                                added_cond=added, remat=remat).astype(jnp.float32)
        return _loss(pred, target, guidance)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(tr, opt_state, fz, x, t, cond, target):
        loss, grads = jax.value_and_grad(loss_fn)(tr, fz, x, t, cond, target)
        updates, opt_state = opt.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, loss
    return opt, step


def finetune(pipe, quantized_unet, prompts, *, method="lut", steps=200, lr=1e-3, w_lr=None, seed=0,
             out_dir=None, temperature=None, eval_prompts=(), progress=True, batch=8, n_timesteps=8,
             generation_steps=25, guidance_scale=7.5, sampler="dpmpp_2m", negative_prompt="",
             save_every=DEFAULT_SAVE_EVERY, refine=False, interrupt_after=None, samples=None, loss="guided", schedule="constant",
             w_init="float", train_bias=False, remat="auto"):
    """Fine-tune the palettized UNet params ``quantized_unet`` against the float ``pipe.params["unet"]``
    on the data-free samples of the calibration ``prompts`` (see the module docstring). Returns the
    UNet params with ordinary ``PalettizedWeight`` leaves (``quant.finetune.finalize_tree``): the
    same bytes as ``quantized_unet``; with "lut", the same packed indices.

    ``method``: "lut", "dkm" (needs ``temperature``) or "ste"; "dkm"/"ste" start the float weights
    as ``w_init`` says and train them with Adam at ``w_lr`` (default ``lr / 100``), the LUTs, scales
    (and with ``train_bias`` the biases) at ``lr``. ``loss``, ``schedule``, ``w_init``, ``train_bias``:
    see the module docstring. ``batch``: samples per step (and per generation batch). ``out_dir``: a
    folder for the resumable checkpoint. ``eval_prompts``: prompts that must not be trained on.
    ``samples``: precomputed ``training_samples`` of the same settings (saves regenerating them).
    ``interrupt_after``: raise ``Interrupted`` after that step (tests). ``remat``: True, False or "auto"
    (see the module docstring; it changes memory and time, not the result)."""
    prompts = _check(steps, lr, w_lr, method, temperature, prompts, eval_prompts, save_every)
    for name, value, valid in (("loss", loss, LOSSES), ("schedule", schedule, SCHEDULES), ("w_init", w_init, W_INITS),
                               ("train_bias", train_bias, (False, True)), ("remat", remat, (False, True, "auto"))):
        if not any(value is v or (isinstance(value, str) and value == v) for v in valid):
            raise ValueError(f"{name}={value!r}: one of {', '.join(map(repr, valid))}")
    w_lr = lr / 100 if w_lr is None else w_lr
    ucfg = pipe.configs["unet"]
    remat = _remat(remat, ucfg)
    init = None
    if method != "lut" and w_init == "float":
        floats = flatten(pipe.params["unet"])
        pal = [p for p, v in flatten(quantized_unet).items() if isinstance(v, PalettizedWeight)]
        init = {p: floats[p] for p in pal if p in floats}
    pal, frozen = ft.trainable_tree(quantized_unet, method, init=init)
    flat = flatten(frozen)
    bias = {p[:-len("weight")] + "bias": None for p in pal if p.endswith(".weight")} if train_bias else {}
    train = {"pal": pal, "bias": {p: jnp.asarray(flat[p], jnp.float32) for p in bias if p in flat}}
    # the step donates its train params: copies, never the caller's (or the teacher's) own arrays
    train = jax.tree.map(lambda a: jnp.array(a, copy=True), train)
    if not pal:
        raise ValueError("quantized_unet holds no palettized weight (PalettizedWeight) to fine-tune")
    settings = dict(method=method, steps=int(steps), lr=float(lr), w_lr=float(w_lr), seed=int(seed),
                    temperature=None if temperature is None else float(temperature), prompts=list(prompts),
                    batch=int(batch), n_timesteps=int(n_timesteps), generation_steps=int(generation_steps),
                    guidance_scale=float(guidance_scale), sampler=sampler, negative_prompt=negative_prompt,
                    refine=bool(refine), loss=loss, schedule=schedule, w_init=w_init, train_bias=bool(train_bias), start=_fingerprint(quantized_unet))
    guidance = float(guidance_scale) if loss == "guided" else None
    opt, step_fn = _step_fn(ucfg, method, settings["temperature"], settings["lr"], settings["w_lr"], guidance,
                            schedule, int(steps), remat)
    state = {"train": train, "opt": opt.init(train), "step": 0}
    ckpt = None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        ckpt = os.path.join(out_dir, CHECKPOINT_FILE)
        if _check_resume(out_dir, settings):
            with open(ckpt, "rb") as f:
                state = flax.serialization.from_bytes(state, f.read())
        else:
            atomic_write_json(os.path.join(out_dir, SETTINGS_FILE), settings)
    start = int(state["step"])
    train, opt_state = state["train"], state["opt"]

    if samples is None and start < steps:
        samples = training_samples(pipe, prompts, seed=seed, n_timesteps=n_timesteps,
                                   generation_steps=generation_steps, guidance_scale=guidance_scale,
                                   sampler=sampler, negative_prompt=negative_prompt, batch=batch,
                                   progress=progress)

    def save(step):
        if ckpt is not None:
            data = flax.serialization.to_bytes({"train": train, "opt": opt_state, "step": step})
            atomic_write(ckpt, lambda f: f.write(data))

    bar = tqdm(total=steps, initial=start, desc=f"fine-tuning ({method})", unit="step", disable=not progress)
    for step in range(start, steps):
        rng = np.random.default_rng([int(seed), 0x9A7, step])
        if guidance is None:
            sel = rng.choice(len(samples), size=min(batch, len(samples)), replace=False)
        else:  # pairs: each latent's negative row and its prompt row (training_samples' layout)
            half = len(samples) // 2
            pick = rng.choice(half, size=min(max(batch // 2, 1), half), replace=False)
            sel = np.concatenate([pick, pick + half])
        x, t, cond = samples.rows(sel)
        train, opt_state, loss = step_fn(train, opt_state, frozen, x, t, cond, samples.target[sel])
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.4g}")
        done = step + 1
        if done % save_every == 0 or done == steps or done == interrupt_after:
            save(done)
        if interrupt_after is not None and done == interrupt_after:
            bar.close()
            raise Interrupted(f"interrupted after step {done} of {steps}")
    bar.close()
    dtypes = {p: np.asarray(flat[p]).dtype for p in train["bias"]}
    return _with_leaves(ft.finalize_tree(train["pal"], frozen, refine),
                        {p: np.asarray(v).astype(dtypes[p]) for p, v in train["bias"].items()})


__all__ = ["Interrupted", "Samples", "distillation_loss", "finetune", "training_samples"]
