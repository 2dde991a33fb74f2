"""Activation sensitivity of the UNet: what int8 activations cost, layer by layer, for the W8A8 families.

    A = ActSensitivity(pipe, calibration_prompts, settings, state)
    A.single()              # {layer: PSNR (dB) of the UNet output with only that layer's activations int8}
    A.measure(["up_blocks.1.resnets.0.conv1", ...])   # the same with several layers' activations int8
    A.macs                  # {layer: MACs of one UNet call at the evaluation resolution}
    A.stats                 # {layer: quant.calibrate.LayerStats}: the activation scales of every W8A8 recipe

What is measured (compared with Apple's ``activation_quantization.py``, whose method it follows):

- **Base**: every conv/linear layer of the UNet with int8 weights (per-output-channel, ``quant.int8``) and
  float activations, i.e. W8A16 everywhere: a W8A8 recipe changes nothing else. (Apple measures one layer at
  W8A8 in an otherwise float model and ships the rest at W8A16; here each layer's reading adds only what its
  activations cost to the model it will run in.) One layer's activations are then quantized as sdjax's W8A8
  computes them, ``clip(round(x / s), -127, 127) * s`` at the layer input with the per-tensor scale ``s`` =
  max |x| / 127 of the calibration run (the ``int8-w8a8`` rule's defaults), and the output is compared with
  the *float* UNet's, so ``base_psnr`` is the W8A16 model's reading and every layer's is at most about that.
- **Scales** (``stats``): ``quant.calibrate.observe`` on ``calibration.hessian_run`` of the first
  ``SCALE_PROMPTS`` calibration prompts: their guided generation, then the generated images encoded back
  and noised at stratified timesteps (the inputs GPTQ sees). Apple records the UNet's inputs while
  generating 17 calibration prompts.
- **Readings**: the guided noise prediction ``eps_u + g (eps_c - eps_u)`` of the UNet on the
  model's own generations of ``MEASURE_PROMPTS`` other calibration prompts (``calibration[SCALE_PROMPTS:]``,
  or the first ones when there are no others), encoded, noised at ``MEASURE_TIMESTEPS`` stratified timesteps
  each; PSNR per sample with peak max |float output| (``quant.metrics.latent_psnr_db``), averaged. Never an
  evaluation prompt. Apple instead generates 8 COCO test captions for 50 steps per layer and compares the
  final latents: much costlier, and the selection is then made on its test prompts.
- **Every** conv/linear layer (Apple: every ``Conv2d`` of its UNet, whose linear layers are 1x1 convs, and
  the attention ``einsum`` products, which sdjax keeps float). One compiled program serves every
  measurement: each layer's weight is a probe holding its W8A16 value, scale and an on/off flag.
- **MACs** per layer at the evaluation resolution (``quant.act_alloc``): shapes recorded while tracing one
  UNet call of one sample, nothing computed.

Kept in OUT/state/ (``act-stats.npz`` + ``act-stats.json``, ``act-sensitivity.json``), reused by a rerun
with the same prompts and settings, refused (named) otherwise.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from quant import act_alloc, calibrate, int8, metrics
from sdjax import conditioning, nn
from sdjax.generate import unet_output

from .calibration import Calibration, hessian_run, noised_latents, self_generated_latents
from .families import W8A8_FAMILIES, w8a8_recipes
from .state import EvalError

SCALE_PROMPTS = 32        # calibration prompts whose generation calibrates the activation scales
MEASURE_PROMPTS = 8       # calibration prompts whose noised generations the layers are measured on
MEASURE_TIMESTEPS = 4     # noised samples per measurement prompt
SEED = 3000               # x_T seeds of these generations (1000: GPTQ's, 2000: the selection pairs')


@flax.struct.dataclass
class ActQuantProbe(calibrate.WeightProbe):
    """A weight (float, its W8A16 value) whose layer input is fake-quantized to int8 with ``act_scale``
    when ``on`` is 1: the simulated W8A8 of ``quant.int8`` with a switch that leaves the program as it is."""
    weight: jax.Array
    act_scale: jax.Array
    on: jax.Array

    def _quantized_input(self, x):
        xf = x.astype(jnp.float32)
        q = jnp.clip(jnp.round(xf / self.act_scale), -127, 127) * self.act_scale
        return jnp.where(self.on > 0, q, xf).astype(x.dtype)

    def linear(self, x):
        return nn.linear(self._quantized_input(x), {"weight": self.weight})

    def conv2d(self, x, stride, padding):
        return nn.conv2d(self._quantized_input(x), {"weight": self.weight}, stride, padding)


class _ShapeSink:
    def __init__(self):
        self.macs = {}


@flax.struct.dataclass
class _ShapeProbe(calibrate.WeightProbe):
    """Records each call's MACs from the shapes it is traced with."""
    weight: object
    name: str = flax.struct.field(pytree_node=False)
    sink: _ShapeSink = flax.struct.field(pytree_node=False)

    def _record(self, x):
        m = act_alloc.linear_macs(self.weight.shape, x.shape)
        self.sink.macs[self.name] = self.sink.macs.get(self.name, 0) + m

    def _record_conv(self, x, stride, padding):
        m = act_alloc.conv_macs(self.weight.shape, x.shape, stride, padding)
        self.sink.macs[self.name] = self.sink.macs.get(self.name, 0) + m


def unet_macs(unet_params, config, sample, timesteps, context, added=None):
    """{layer: MACs} of every conv/linear layer in one UNet call on these inputs (traced, not run)."""
    sink = _ShapeSink()
    flat = nn.flatten(unet_params)
    for name in calibrate.layer_names(unet_params):
        flat[name + ".weight"] = _ShapeProbe(flat[name + ".weight"], name, sink)
    jax.eval_shape(lambda p: unet_output(p, config, sample, timesteps, context, added), nn.unflatten(flat))
    return sink.macs


def _stats_arrays(stats):
    out = {}
    for n, s in stats.items():
        nz = np.flatnonzero(s.hist)
        out[n + "|absmax"] = s.absmax_channel
        out[n + "|bins"] = nz.astype(np.int32)
        out[n + "|counts"] = s.hist[nz]
        out[n + "|calls_numel"] = np.asarray([s.calls, s.numel], np.int64)
    return out


def _stats_from(arrays):
    out = {}
    for key in arrays:
        if key.endswith("|absmax"):
            n = key[:-len("|absmax")]
            hist = np.zeros(calibrate.N_BINS, np.int64)
            hist[arrays[n + "|bins"]] = arrays[n + "|counts"]
            calls, numel = (int(v) for v in arrays[n + "|calls_numel"])
            out[n] = calibrate.LayerStats(np.asarray(arrays[key], np.float32), hist, calls, numel)
    return out


def split_prompts(calibration):
    """(prompts calibrating the scales, prompts the layers are measured on): see the module docstring."""
    prompts = list(dict.fromkeys(calibration))
    if not prompts:
        raise EvalError("W8A8 recipes calibrate activation scales on calibration prompts: pass some "
                        "(calibration=, `sdjax eval --calibration-prompts`)")
    scale = prompts[:SCALE_PROMPTS]
    rest = prompts[SCALE_PROMPTS:]
    return scale, (rest or prompts)[:MEASURE_PROMPTS]


def activation_stats(pipe, calibration, settings, state, progress=True):
    """{UNet layer: LayerStats} over the scale prompts' calibration run (kept in OUT/state/act-stats.npz):
    what every W8A8 recipe of the evaluation takes its activation scales from."""
    scale_prompts, _ = split_prompts(calibration)
    meta = {"prompts": scale_prompts, "seed": SEED, "steps": settings.steps, "sampler": settings.sampler,
            "guidance_scale": settings.guidance_scale, "negative_prompt": settings.negative_prompt,
            "batch": settings.batch, "n_timesteps": Calibration.n_timesteps}
    saved = state.load_recorded("act-stats.json", "act-stats.npz", meta,
                                "the saved activation statistics come from other calibration settings")
    if saved is not None:
        return _stats_from(saved)
    cal = Calibration(tuple(scale_prompts), steps=settings.steps, guidance_scale=settings.guidance_scale,
                      sampler=settings.sampler, negative_prompt=settings.negative_prompt, seed=SEED, batch=settings.batch)
    unet = pipe.params["unet"]
    stats = calibrate.observe(unet, hessian_run(pipe, cal, progress=progress), calibrate.layer_names(unet))
    missing = [n for n in calibrate.layer_names(unet) if n not in stats]
    if missing:
        raise EvalError(f"the calibration run never reached UNet layer {missing[0]!r}: no activation scale for it")
    state.save_recorded("act-stats.json", "act-stats.npz", meta, _stats_arrays(stats))
    return stats


class ActSensitivity:
    """Per-layer activation sensitivity of ``pipe``'s UNet (see the module docstring); ``settings``: the
    evaluation's (sampler, steps, guidance, negative prompt, batch); ``state``: OUT/state/."""

    def __init__(self, pipe, calibration, settings, state, progress=True):
        self.pipe, self.state, self.progress = pipe, state, progress
        self._measured = {}
        self.ucfg = pipe.configs["unet"]
        self.unet = pipe.params["unet"]
        self.layers = calibrate.layer_names(self.unet)
        self.stats = activation_stats(pipe, calibration, settings, state, progress)
        self.scales = calibrate.act_scales(self.stats, "max", "tensor")
        _, self.measure_prompts = split_prompts(calibration)
        cal = Calibration(tuple(self.measure_prompts), steps=settings.steps, guidance_scale=settings.guidance_scale,
                          sampler=settings.sampler, negative_prompt=settings.negative_prompt, seed=SEED + 1,
                          batch=settings.batch, n_timesteps=MEASURE_TIMESTEPS)
        self.meta = {"prompts": list(self.measure_prompts), "seed": SEED + 1, "steps": settings.steps,
                     "sampler": settings.sampler, "guidance_scale": settings.guidance_scale,
                     "negative_prompt": settings.negative_prompt, "n_timesteps": MEASURE_TIMESTEPS,
                     "scale_prompts": split_prompts(calibration)[0]}
        self.data = state.read("act-sensitivity.json")
        if self.data is not None and self.data.get("meta") != self.meta:
            raise EvalError(f"{state.path('act-sensitivity.json')}: the saved activation sensitivity comes from "
                            f"other calibration settings; use another output folder or delete {state.dir}")
        self.data = self.data or {"meta": self.meta, "single": {}}
        x0 = self_generated_latents(pipe, cal, progress=progress)
        idx, t, xt, neg, pos = noised_latents(pipe, cal, x0)
        self.guidance = float(settings.guidance_scale)
        self.x2 = jnp.asarray(np.concatenate([xt, xt]))
        self.t2 = jnp.asarray(np.concatenate([t, t]).astype(np.float32))
        self.context, self.added = conditioning.guided(neg, conditioning.rows(pos, idx))
        flat = nn.flatten(self.unet)
        self._w16 = {n: np.asarray(int8.quantize(flat[n + ".weight"]).dequantize(jnp.float32)) for n in self.layers}
        self._flat = flat
        self.reference = self._guided(self.unet)
        if "macs" not in self.data:
            one = conditioning.rows(pos, slice(0, 1))
            ctx, added = conditioning.unet_inputs({k: jnp.asarray(v) for k, v in one.items()})
            self.data["macs"] = unet_macs(self.unet, self.ucfg, jnp.asarray(xt[:1]), jnp.asarray(t[:1], jnp.float32),
                                          ctx, added)
            self.data["kind"] = {n: "conv" if len(flat[n + ".weight"].shape) == 4 else "linear" for n in self.layers}
        self.macs = {n: int(self.data["macs"].get(n, 0)) for n in self.layers}
        if "base_psnr" not in self.data:
            self.data["base_psnr"] = self.measure([])
            self._save()

    def _save(self):
        self.state.write(self.data, "act-sensitivity.json")

    def _guided(self, unet_params):
        eps = np.asarray(unet_output(unet_params, self.ucfg, self.x2, self.t2, self.context, self.added))
        n = len(eps) // 2
        return eps[:n] + self.guidance * (eps[n:] - eps[:n])

    def unet_with(self, chosen):
        """The probed UNet params: every layer W8A16, the ``chosen`` ones' activations int8."""
        chosen = set(chosen)
        unknown = sorted(chosen - set(self.layers))
        if unknown:
            raise EvalError(f"{unknown[0]!r} is not a conv/linear layer of the UNet")
        flat = dict(self._flat)
        for n in self.layers:
            flat[n + ".weight"] = ActQuantProbe(self._w16[n], jnp.float32(self.scales[n]),
                                                jnp.float32(1.0 if n in chosen else 0.0))
        return nn.unflatten(flat)

    def measure(self, chosen):
        """PSNR (dB) of the guided output with every weight int8 and the ``chosen`` layers' activations int8
        (each set measured once)."""
        key = frozenset(chosen)
        if key not in self._measured:
            self._measured[key] = float(metrics.latent_psnr_db(self.reference, self._guided(self.unet_with(key))))
        return self._measured[key]

    @property
    def base_psnr(self):
        return self.data["base_psnr"]

    def single(self):
        """{layer: PSNR with only that layer's activations int8}, measured once (resumable)."""
        done = self.data["single"]
        todo = [n for n in self.layers if n not in done]
        for k, n in enumerate(tqdm(todo, desc="activation sensitivity", unit="layer", disable=not self.progress,
                                   leave=False)):
            done[n] = self.measure([n])
            if k % 20 == 19:
                self._save()
        if todo:
            self._save()
        return {n: done[n] for n in self.layers}

    def mac_fraction(self, unet_params):
        """The fraction of the UNet's conv/linear MACs whose layer is W8A8 in ``unet_params``."""
        flat = nn.flatten(unet_params)
        chosen = [n for n in self.layers if nn.method_of(flat[n + ".weight"]) == "int8-w8a8"]
        return act_alloc.mac_fraction(chosen, self.macs) if chosen else 0.0

    def block(self):
        """The report's "act_sensitivity" entry."""
        single = self.single()
        return {"layers": self.layers, "macs": [self.macs[n] for n in self.layers],
                "kind": [self.data["kind"][n] for n in self.layers],
                "psnr_db": [single[n] for n in self.layers], "base_psnr_db": self.base_psnr,
                "measure_prompts": len(self.measure_prompts), "samples": int(len(self.x2) // 2),
                "scale_prompts": len(self.meta["scale_prompts"]),
                "total_macs": int(sum(self.macs.values()))}



class W8A8Run:
    """What ``sdjax eval``'s W8A8 recipes need: the activation statistics (every ``int8-w8a8`` recipe) and,
    for the W8A8 families, the sensitivity analysis (``A``), its recipes ``[(name, recipe, role)]`` and their
    calibration readings (``info``)."""

    def __init__(self, stats=None, A=None, recipes=(), info=()):
        self.stats, self.A, self.recipes, self.info = stats, A, list(recipes), list(info)

    def calibration(self, recipe):
        """``apply_recipe``'s ``calibration=`` for a recipe (None when it has no W8A8 rule)."""
        from quant import recipes as qr
        return {"unet": self.stats} if self.stats is not None and qr.parse(recipe).needs_calibration else None

    def mac_fraction(self, unet_params):
        """The share of the UNet's conv/linear MACs on the int8 path, when the analysis ran (else None)."""
        return None if self.A is None else self.A.mac_fraction(unet_params)

    def block(self):
        """The report's "act_sensitivity" entry (None without the analysis)."""
        return None if self.A is None else dict(self.A.block(), recipes=self.info)


def prepare(pipe, calibration, settings, state, want, recipes, progress=True):
    """The ``W8A8Run`` of an evaluation: ``want``, the generated families asked for (the W8A8 ones are
    built here), ``recipes``, the other recipes (dicts or ``quant.recipes.Recipe``; any with a W8A8 rule
    needs the statistics). Calibration prompts are required for either, never evaluation prompts."""
    from quant import recipes as qr
    from quant.apply import plan as qr_plan
    families = [f for f in W8A8_FAMILIES if f in want]
    needs = [r for r in recipes if qr.parse(r).needs_calibration]
    if not families and not needs:
        return W8A8Run()
    if not calibration:
        what = ", ".join(families) or f"recipe {qr.parse(needs[0]).name!r}"
        raise EvalError(f"{what}: W8A8 (int8-w8a8) needs activation scales, calibrated on calibration prompts "
                        "(calibration=, `sdjax eval --calibration-prompts`), never on evaluation prompts")
    overlap = sorted(set(calibration) & set(settings.prompts))
    if overlap:
        raise EvalError(f"W8A8 calibration prompts must not be evaluation prompts; both have {overlap[0]!r}")
    for r in needs:   # unknown layers (an Apple layer list of another model) stop here, before any calibration
        try:
            qr_plan(pipe.params, r)
        except qr.RecipeError as e:
            raise EvalError(f"recipe {qr.parse(r).name!r}: {e}") from None
    if not families:
        return W8A8Run(activation_stats(pipe, calibration, settings, state, progress))
    A = ActSensitivity(pipe, calibration, settings, state, progress)
    out, info = w8a8_recipes(A, families)
    return W8A8Run(A.stats, A, out, info)


__all__ = ["ActQuantProbe", "ActSensitivity", "W8A8Run", "prepare", "MEASURE_PROMPTS", "MEASURE_TIMESTEPS", "SCALE_PROMPTS",
           "W8A8_FAMILIES", "activation_stats", "split_prompts", "unet_macs"]
