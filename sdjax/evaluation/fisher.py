"""Per-weight sensitivities for sensitive k-means: the diagonal Fisher of the denoising loss.

    from sdjax.evaluation import fisher
    imp = fisher.fisher(pipe, prompts)                # {layer name: array of the weight's shape}
    qparams = quant.apply_recipe(pipe.params, {"rules": [{"pattern": "*", "method": "palettize",
                                 "nbits": 4, "sensitive": True}]}, importance=imp)

For a conv/linear weight ``w`` the importance is the mean over calibration samples of the squared
gradient of the per-sample denoising loss, ``F = mean_i (dL_i/dw)**2`` with

    L_i = mean((unet(x_t, t, c) - target)**2),   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,

the loss the model was trained with (target ``eps`` for an epsilon model, ``v`` for v-prediction,
``x0`` for "sample", from the scheduler config; ``abar`` from its beta schedule, DDPM defaults for
keys it leaves out). To second order the loss a small weight change ``dw`` costs is
``sum(F * dw**2)`` (the empirical Fisher approximation of the Hessian, as SqueezeLLM and coremltools'
sensitive k-means use), which is exactly what ``palettize.kmeans(..., importance=F)`` minimises.

Calibration data: each prompt gives ``n_timesteps`` samples, its x0 latents at timesteps spread
over ``[0, num_train_timesteps)`` (one per stratum, stratified at random) with Gaussian noise, all
drawn from ``seed`` (``calibration_samples``). The x0 latents are the caller's (``latents=``) or, by
default, *self-generated*: the float model's own image for the prompt (``steps`` steps of
``sampler`` with classifier-free guidance, as a user would generate) encoded back with its VAE
(the mean, times the scaling factor, as training data are made). So any model works with nothing
but prompts, and no dataset is needed. The loss itself is conditioned on the prompt only (no
guidance: it is the training objective); for SDXL with the prompt's pooled embeds and text-to-image
time ids (``sdjax.conditioning.prompt_conditions``) at the latents' size.

Cost and memory: samples go through one jitted step per ``batch_size`` samples that computes their
per-sample gradients (vmap of grad), squares them and adds them to a float32 accumulator of the
layer weights' size. Only the accumulator lives between steps; the ``batch_size`` per-sample
gradients exist only inside the step. The default batch keeps them under 1 GiB (at most 8 samples;
1 for SD 1.5's 860M-parameter UNet, whose accumulator and gradient then take 3.4 GB each).
Low-precision (float16/bfloat16) models are differentiated in float32 (squared float16 gradients
underflow).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sdjax import clip, conditioning, nn, unet as unet_model

from quant.calibrate import layer_names

from .calibration import Calibration, calibration_samples, noise_schedule, self_generated_latents

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")   # the components the denoising loss runs through
DEFAULT_TIMESTEPS = 8
DEFAULT_BATCH = 8                       # largest automatic gradient batch
GRADIENT_BUDGET = 1 << 28               # automatic batch: per-sample gradients up to 1 GiB (float32)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _check_float(params, component, source):
    quantized = [k for k, w in nn.flatten(params).items() if nn.is_quantized(w)]
    if quantized:
        raise ValueError(f"component {component!r} of {source or 'the pipeline'} holds quantized weights "
                         f"({quantized[0]}, ...): sensitivities are gradients of the float model; load it")


def _as_float32(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _condition(component, architecture, ccfg, p, cond):
    """The UNet's (context, added_cond) of one sample; ``p``: the differentiated text encoder's
    params when ``component`` is one (its output spliced between the fixed ``before``/``after``
    states of the other SDXL encoder), unused for the UNet."""
    if component == "unet":
        return conditioning.unet_inputs(cond)
    last, hidden, pooled = clip.apply(p, ccfg, cond["ids"][None])
    if architecture == "sd":
        return last[0], None
    ctx = jnp.concatenate([cond["before"], hidden[-2][0].astype(jnp.float32), cond["after"]], axis=-1)
    embeds = pooled[0].astype(jnp.float32) if component == "text_encoder_2" else cond["text_embeds"]
    return ctx, {"text_embeds": embeds, "time_ids": cond["time_ids"]}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def _step(component, architecture, ucfg, ccfg, acc, weights, rest, other, batch, mask):
    """acc + sum_i mask_i * (dL_i/dw)**2 over one batch of samples (see the module docstring)."""
    x0, t, eps, cond, coef = batch

    def loss(w, x0, t, eps, cond, coef):
        flat = dict(rest)
        flat.update({k + ".weight": v for k, v in w.items()})
        p = nn.unflatten(flat)
        up = p if component == "unet" else other["unet"]
        ctx, added = _condition(component, architecture, ccfg, p, cond)
        if added is not None:
            added = {k: v[None] for k, v in added.items()}
        a = coef[0]  # alpha_bar_t; then the target's coefficients (eps, v or x0, set on the host)
        xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
        pred = unet_model.apply(up, ucfg, xt[None], t[None], ctx[None], added_cond=added)[0].astype(jnp.float32)
        target = coef[1] * eps + coef[2] * x0
        return jnp.mean(jnp.square(pred - target))

    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0, 0, 0))(weights, x0, t, eps, cond, coef)
    return {k: acc[k] + jnp.einsum("b,b...->...", mask, jnp.square(g[k])) for k in acc}


def _cond_table(pipe, component, prompts, image_size):
    """{name: (n_prompts, ...) float32/int32}: each prompt's fixed conditioning for ``_condition``."""
    if component != "unet":
        if pipe.architecture == "sd":
            return {"ids": np.asarray(pipe.tokenizer(prompts))}
        ids = np.asarray(dict(conditioning.text_encoders(pipe))[component](prompts))
    _, pos = conditioning.prompt_conditions(pipe, prompts, "", *image_size)
    if component == "unet":
        return pos
    ctx = pos["context"]
    w1 = pipe.configs["text_encoder"].hidden_size if "text_encoder" in pipe.params else 0
    before, after = (ctx[..., :0], ctx[..., w1:]) if component == "text_encoder" else (ctx[..., :w1], ctx[..., :0])
    return {"ids": ids, "before": before, "after": after, "text_embeds": pos["text_embeds"],
            "time_ids": pos["time_ids"]}


def fisher(pipe, prompts, *, latents=None, n_timesteps=DEFAULT_TIMESTEPS, seed=0, component="unet",
           batch_size=None, steps=25, guidance_scale=7.5, sampler="dpmpp_2m", progress=True):
    """Diagonal Fisher of the denoising loss for every conv/linear weight of ``component``.

    ``pipe``: a float ``sdjax`` Pipeline. ``prompts``: calibration prompts (a string or a list).
    ``latents``: x0 latents, one per prompt, NCHW like ``Pipeline.generate``'s ``latents`` and
    scaled as the UNet sees them (``vae.encode`` mean times ``scaling_factor``); default: the
    model's own generations (``steps`` steps of ``sampler`` at ``guidance_scale``, seeds from
    ``seed``; see the module docstring). ``n_timesteps`` samples per prompt; ``seed`` also draws
    their timesteps and noise (``calibration_samples``). ``component``: "unet", "text_encoder" or
    (SDXL) "text_encoder_2"; an SDXL text encoder is differentiated through its penultimate states
    (and text_encoder_2's pooled embeds) with the other encoder's states held fixed.
    ``batch_size``: samples per gradient step (default: as many as fit 1 GiB of per-sample
    gradients, at most 8; see the module docstring).

    Returns ``{layer name: float32 importance}`` (names as ``quant.calibrate.layer_names``:
    diffusers paths without ".weight"; arrays in the sdjax layout of the weight, i.e. its shape),
    ready for ``quant.apply_recipe(..., importance=...)`` or ``palettize.kmeans(importance=...)``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if prompts is not None else []
    if not prompts:
        raise ValueError("prompts must be a non-empty list of calibration prompts; got none")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; got {bad[0]!r}")
    n_timesteps = _positive_int("n_timesteps", n_timesteps)
    if batch_size is not None:
        batch_size = _positive_int("batch_size", batch_size)
    steps = _positive_int("steps", steps)
    if component not in COMPONENTS:
        why = " (the VAE is not part of the denoising loss)" if component == "vae" else ""
        raise ValueError(f"component must be one of {COMPONENTS}; got {component!r}{why}")
    if component not in pipe.params:
        raise ValueError(f"component {component!r}: {pipe.source} has none (it has "
                         f"{', '.join(c for c in COMPONENTS if c in pipe.params)})")
    if pipe.tokenizer is None and pipe.architecture == "sd":
        raise ValueError(f"{pipe.source}: this pipeline has no tokenizer, so prompts cannot be encoded")
    ucfg = pipe.configs["unet"]
    ccfg = pipe.configs[component] if component != "unet" else None
    _check_float(pipe.params[component], component, pipe.source)
    if ucfg.in_channels != ucfg.out_channels:
        raise ValueError(f"{pipe.source}: a UNet with {ucfg.in_channels} input and {ucfg.out_channels} output "
                         "channels (inpainting) has no plain denoising loss; not supported")
    abar_table, prediction_type = noise_schedule(pipe.scheduler_config)

    if latents is None:
        x0 = self_generated_latents(pipe, Calibration(tuple(prompts), steps=steps, guidance_scale=guidance_scale,
                                                      sampler=sampler, seed=seed, n_timesteps=n_timesteps),
                                    progress)
    else:
        x0 = np.asarray(latents, np.float32)
        c = ucfg.in_channels
        if x0.ndim != 4 or x0.shape[0] != len(prompts) or x0.shape[1] != c:
            raise ValueError(f"latents must be NCHW ({len(prompts)}, {c}, height, width): one x0 per prompt; "
                             f"got shape {x0.shape}")
        x0 = x0.transpose(0, 2, 3, 1)
    if not np.all(np.isfinite(x0)):
        raise ValueError("latents must be finite")
    prompt_idx, t, noise = calibration_samples(len(prompts), n_timesteps, x0.shape[1:], seed, len(abar_table))
    a = abar_table[t]
    # target = c_eps * eps + c_x0 * x0
    c_eps, c_x0 = {"epsilon": (np.ones_like(a), np.zeros_like(a)),
                   "v_prediction": (np.sqrt(a), -np.sqrt(1 - a)),
                   "sample": (np.zeros_like(a), np.ones_like(a))}[prediction_type]
    coef = np.stack([a, c_eps, c_x0], 1).astype(np.float32)

    params = _as_float32(pipe.params[component])
    names = layer_names(params)
    flat = nn.flatten(params)
    weights = {n: flat[n + ".weight"] for n in names}
    rest = {k: v for k, v in flat.items() if not (k.endswith(".weight") and k[:-len(".weight")] in weights)}
    f = pipe.vae_scale_factor
    cond_table = _cond_table(pipe, component, prompts, (x0.shape[1] * f, x0.shape[2] * f))
    other = {} if component == "unet" else {"unet": _as_float32(pipe.params["unet"])}

    n = len(t)
    if batch_size is None:
        size = sum(math.prod(w.shape) for w in weights.values())
        batch_size = max(1, min(DEFAULT_BATCH, GRADIENT_BUDGET // max(size, 1)))
    acc = {k: jnp.zeros(w.shape, jnp.float32) for k, w in weights.items()}
    bar = tqdm(total=n, desc=f"fisher {component}", unit="sample", disable=not progress)
    for start in range(0, n, batch_size):
        sel = np.arange(start, start + batch_size)
        mask = (sel < n).astype(np.float32)
        sel = np.where(sel < n, sel, 0)  # the last batch is padded with masked-out repeats
        batch = (jnp.asarray(x0[prompt_idx[sel]]), jnp.asarray(t[sel]), jnp.asarray(noise[sel]),
                 {k: jnp.asarray(v[prompt_idx[sel]]) for k, v in cond_table.items()}, jnp.asarray(coef[sel]))
        acc = _step(component, pipe.architecture, ucfg, ccfg, acc, weights, rest, other, batch, jnp.asarray(mask))
        bar.update(int(mask.sum()))
    bar.close()
    return {k: np.asarray(v, np.float32) / n for k, v in acc.items()}


def for_recipe(pipe, recipe, prompts, n_timesteps=DEFAULT_TIMESTEPS, progress=True):
    """``{component: {layer: importance}}`` for the components whose layers ``recipe`` (a parsed
    ``quant.Recipe``) palettizes with sensitive k-means (``apply_recipe(..., importance=)``)."""
    import quant
    comps = sorted({c for c, table in quant.plan(pipe.params, recipe).items() for a in table.values()
                    if a.method == "palettize" and a.options.get("sensitive")})
    out = {}
    for comp in comps:
        try:
            out[comp] = fisher(pipe, prompts, n_timesteps=n_timesteps, component=comp, progress=progress)
        except ValueError as e:
            raise ValueError(f"sensitivities of {comp} for recipe {recipe.name!r}: {e}") from None
    return out


__all__ = ["COMPONENTS", "fisher", "for_recipe"]
