"""What quantization does to a model's outputs: the float model's outputs on a fixed prompt x seed set,
and the same outputs of any other params, compared metric by metric (``quant.metrics``).

    ev = Evaluator(pipe, prompts, seeds)                # runs the float model once
    out = ev.outputs(qparams)                           # the same runs with quantized params
    ev.metrics(out)                                     # {"latent_psnr_1step_db": ..., "ssim": ..., ...}
    ev.one_step_psnr(qparams["unet"])                   # sdjax's one-step reading alone (sensitivity sweeps)
    ev.apple.psnr(qparams)                              # Apple's reading (sdjax.evaluation.apple)

What is run, for every (prompt, seed) pair:

- ``final``: the full generation, ``steps`` steps of ``sampler`` with classifier-free guidance from
  x_T = ``initial_noise(seed)`` (what ``Pipeline.generate`` does), decoded to an image;
- ``one_step``: sdjax's one-step reading: the latents of a 1-step plan of the same sampler (for
  DPM++ 2M, one x0 prediction from t = 501), same x_T and guidance, for the first ``n_one_step`` pairs.
  It is cheap and tracks the final images better than Apple's reading; it is *not* Apple's;
- ``apple``: Apple's reading (``apple.AppleReading``: the pipeline's own scheduler for one step, one
  x_T per prompt from one generator, empty negative prompts, Apple's PSNR and rounding) on the
  evaluation prompts (8 of them, repeated if fewer), giving ``apple_latent_psnr_db``;
- ``eps``: the UNet's noise prediction, conditioned on the prompt, on x_t made from the float model's
  own final latents of that pair at one timestep per pair (stratified over the training range) and
  noise drawn from ``noise_seed``: the quantity the UNet is trained to get right.

All three go through the pipeline's own jitted functions (``sdjax.generate.denoise``), so
what is measured is what ``sdjax generate`` would draw. The text encoder and VAE of the params
given are used, so recipes quantizing them are measured too.

Scale out: every batch of pairs is sharded over ``devices`` (default all of ``jax.devices()``,
which under ``jax.distributed.initialize()`` spans every host) along the batch axis with
``jax.sharding.NamedSharding``; params are replicated. Each process builds the same host batch
(everything is a function of the prompts and seeds) and hands each device its slice
(``jax.make_array_from_callback``); results are gathered back to every process. The numbers do not
depend on the device count beyond float summation order (tests: 4 forced host devices vs 1).
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

import samplers
from quant import metrics
from sdjax import conditioning
from sdjax.generate import check_float, decode_images, denoise, initial_noise, on_device, unet_output, vae_params

from .apple import AppleReading, cycled

DEFAULT_ONE_STEP = 8     # pairs of the one-step reading (as many as Apple's 8 prompts)
NOISE_SEED = 4242        # timesteps and noise of the noise-prediction samples


@dataclasses.dataclass(frozen=True)
class Settings:
    prompts: tuple
    seeds: tuple = (0,)
    steps: int = 25
    sampler: str = "dpmpp_2m"
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    n_one_step: int = DEFAULT_ONE_STEP
    batch: int = 8                    # pairs per batch (padded to a multiple of the device count)

    def __post_init__(self):
        if isinstance(self.prompts, str) or not self.prompts:
            raise ValueError("prompts: a non-empty list of prompts")
        if not self.seeds:
            raise ValueError("seeds: a non-empty list of integers")
        if self.sampler not in samplers.NAMES:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {', '.join(samplers.NAMES)}")
        for name in ("steps", "batch", "n_one_step"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r}: must be an integer >= 1")
        object.__setattr__(self, "guidance_scale", check_float("guidance_scale", self.guidance_scale, error=ValueError))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    @property
    def pairs(self):
        """[(prompt, seed)]: every prompt with every seed, prompt-major."""
        return [(p, s) for p in self.prompts for s in self.seeds]

    def to_json(self):
        return dataclasses.asdict(self) | {"prompts": list(self.prompts), "seeds": list(self.seeds)}


def _gather(x):
    """A (possibly multi-host) global array -> host NumPy array with every row."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Evaluator:
    """The float model's outputs on ``settings.pairs`` and the means to compare other params with
    them. ``pipe``: a float ``sdjax`` Pipeline (its params are the reference)."""

    def __init__(self, pipe, settings: Settings, devices=None, progress=True, reference=None):
        self.pipe, self.s, self.progress = pipe, settings, progress
        self.ucfg, self.vcfg = pipe.configs["unet"], pipe.configs["vae"]
        devices = list(devices) if devices is not None else jax.devices()
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self.n_dev = len(devices)
        self.batch = -(-settings.batch // self.n_dev) * self.n_dev
        self._rows = NamedSharding(self.mesh, P("data"))
        self._replicated = NamedSharding(self.mesh, P())
        f = pipe.vae_scale_factor
        size = self.ucfg.sample_size if isinstance(self.ucfg.sample_size, int) else 64
        self.latent_shape = (size, size, self.vcfg.latent_channels)
        self.image_size = size * f
        pairs = settings.pairs
        self.n = len(pairs)
        self.prompts = [p for p, _ in pairs]
        self.xT = np.concatenate([np.asarray(initial_noise(s, (1, *self.latent_shape))) for _, s in pairs])
        s = samplers.get(settings.sampler)
        sched = samplers.Schedule.from_config(pipe.scheduler_config)
        self.sampler = s
        self.plan = s.plan(sched, settings.steps)
        self.plan1 = s.plan(sched, 1)
        self.n1 = min(settings.n_one_step, self.n)
        t0 = time.perf_counter()
        # ``reference``: the float outputs from an earlier run (``self.reference``), not recomputed
        # Apple's reading runs the checkpoint's own scheduler: one no sampler mirrors (or a setting one does
        # not implement) leaves it out (``apple_unavailable`` says why) instead of stopping the evaluation
        self.apple, self.apple_unavailable = None, None
        try:
            self.apple = AppleReading(pipe, cycled(settings.prompts), batch=self.batch,
                                      reference=None if reference is None else reference.get("apple_latents"))
        except ValueError as e:
            self.apple_unavailable = f"Apple's reading needs the checkpoint's own scheduler: {e}"
        self.reference = dict(reference) if reference is not None else self.outputs(pipe.params, desc="float model")
        if self.apple is not None:
            self.reference["apple_latents"] = self.apple.reference
        # noise-prediction samples: the float model's own final latents, one stratified t per pair
        from .calibration import noise_schedule
        abar, _ = noise_schedule(pipe.scheduler_config)
        rng = np.random.default_rng([NOISE_SEED, 1])
        t = np.floor((np.arange(self.n) + rng.random(self.n)) * len(abar) / self.n).astype(np.int32)
        rng.shuffle(t)
        noise = rng.standard_normal(self.xT.shape).astype(np.float32)
        a = abar[t][:, None, None, None]
        self.noise_inputs = ((np.sqrt(a) * self.reference["final_latents"] + np.sqrt(1 - a) * noise).astype(np.float32), t)
        if "eps" not in self.reference:
            self.reference["eps"] = self._eps(pipe.params)
        self.reference_seconds = time.perf_counter() - t0

    # --- running ---------------------------------------------------------------------------

    def _put(self, x):
        """Host array (batch first, batch a multiple of the device count) -> sharded over devices."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, self._rows, lambda idx: x[idx])

    def replicate(self, params):
        """``params`` on every device. On one device only the NumPy leaves are placed (a sweep's one
        replaced layer): a ``device_put`` of every leaf took 13 s of an ``sdjax eval``'s thousands of sweep
        measurements, and a NumPy leaf at a new place in the tree sends the jitted call down JAX's slow
        Python path (8 ms a call, 21 s of the same run)."""
        if self.n_dev == 1 and self.mesh.devices.flat[0] == jax.devices()[0]:
            return on_device(params)
        return jax.device_put(params, self._replicated)

    def _batches(self, n):
        """(start, indices padded to a full batch by repeating row 0, count). Fewer pairs than a
        batch take the smallest batch that holds them (a multiple of the device count): a sweep's 8
        one-step pairs are not computed as 16."""
        batch = min(self.batch, -(-n // self.n_dev) * self.n_dev)
        for s in range(0, n, batch):
            idx = np.arange(s, s + batch)
            yield s, np.where(idx < n, idx, 0), min(batch, n - s)

    def _contexts(self, params):
        """(negative, positives): the UNet conditioning (``sdjax.conditioning.prompt_conditions``:
        {"context"} and, for SDXL, {"text_embeds", "time_ids"}) from the params' own text encoders;
        one negative row, one row per pair."""
        pipe = dataclasses.replace(self.pipe, params=params)
        uniq = list(dict.fromkeys(self.prompts))
        neg, enc = conditioning.prompt_conditions(pipe, uniq, self.s.negative_prompt, self.image_size,
                                                  self.image_size)
        return neg, conditioning.rows(enc, [uniq.index(p) for p in self.prompts])

    def _denoise(self, up, plan, neg, pos, n):
        out = np.zeros((n, *self.latent_shape), np.float32)
        for s, idx, k in self._batches(n):
            # guided batches are [negatives; positives]: shard each half so every device gets its rows' pair
            context, added = conditioning.guided(neg, conditioning.rows(pos, idx), self._put)
            state = self.sampler.init(plan, self._put(self.xT[idx]))
            state = denoise(up, self.ucfg, self.sampler, plan, state, context, self.s.guidance_scale, added_cond=added)
            out[s:s + k] = _gather(self.sampler.result(plan, state))[:k]
        return out

    def _decoder(self, params):
        """The VAE params to decode with, replicated (SDXL's float16 VAE is upcast, as generate does)."""
        return self.replicate(vae_params(dataclasses.replace(self.pipe, params=params), "decode"))

    def _images(self, vp, latents):
        out = np.zeros((len(latents), self.image_size, self.image_size, 3), np.float32)
        for s, idx, k in self._batches(len(latents)):
            out[s:s + k] = _gather(decode_images(vp, self.vcfg, self._put(latents[idx])))[:k]
        return out

    def _eps(self, params, pos=None):
        up = self.replicate(params["unet"])
        if pos is None:
            pos = self._contexts(params)[1]
        x, t = self.noise_inputs
        out = np.zeros(x.shape, np.float32)
        for s, idx, k in self._batches(self.n):
            context, added = conditioning.unet_inputs({c: self._put(v) for c, v in conditioning.rows(pos, idx).items()})
            out[s:s + k] = _gather(unet_output(up, self.ucfg, self._put(x[idx]), self._put(t[idx]), context, added))[:k]
        return out

    def outputs(self, params, desc=None):
        """{"one_step_latents", "final_latents", "images", "eps", "apple_latents"} of ``params`` (a
        pipeline's {"text_encoder", "unet", "vae"} params) on every pair (``eps`` not for the
        reference's first pass; ``apple_latents``: Apple's reading, on its 8 prompts)."""
        neg, pos = self._contexts(params)
        up = self.replicate(params["unet"])
        out = {}
        steps = tqdm(total=3, desc=desc or "evaluating", unit="stage", disable=not self.progress, leave=False)
        out["one_step_latents"] = self._denoise(up, self.plan1, neg, conditioning.rows(pos, slice(self.n1)), self.n1)
        steps.update()
        out["final_latents"] = self._denoise(up, self.plan, neg, pos, self.n)
        steps.update()
        out["images"] = self._images(self._decoder(params), out["final_latents"])
        steps.update()
        steps.close()
        if self.apple is not None:
            out["apple_latents"] = self.apple.reference if params is self.pipe.params else self.apple.latents(params)
        if hasattr(self, "noise_inputs"):
            out["eps"] = self._eps(params, pos)
        return out

    def _one_step_pairs(self, pairs):
        n = self.n1 if pairs is None else pairs
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.n1:
            raise ValueError(f"pairs={pairs!r}: an integer from 1 to the {self.n1} pairs with one-step references "
                             "(n_one_step)")
        return int(n)

    def one_step_latents(self, unet_params, contexts=None, pairs=None):
        """The one-step latents of ``unet_params`` (float contexts unless given) on the first
        ``pairs`` pairs (default ``n_one_step``): the cheap run behind per-layer sensitivity sweeps."""
        n = self._one_step_pairs(pairs)
        neg, pos = contexts if contexts is not None else self.float_contexts
        return self._denoise(self.replicate(unet_params), self.plan1, neg, conditioning.rows(pos, slice(n)), n)

    @functools.cached_property
    def float_contexts(self):
        return self._contexts(self.pipe.params)

    def one_step_psnr(self, unet_params, pairs=None):
        """sdjax's one-step reading for UNet params: mean per-pair PSNR (peak max|reference|) of the
        one-step latents, over the first ``pairs`` pairs (default ``n_one_step``)."""
        n = self._one_step_pairs(pairs)
        return metrics.latent_psnr_db(self.reference["one_step_latents"][:n], self.one_step_latents(unet_params, pairs=n))

    def unet_metrics(self, unet_params, images=False):
        """The final-latent PSNR (as ``one_step_psnr``) of UNet params over every pair, the full
        generation with the float text encoder's contexts; with ``images`` also the image PSNR and
        SSIM of the float VAE's decode. Keys as ``metrics``."""
        neg, pos = self.float_contexts
        latents = self._denoise(self.replicate(unet_params), self.plan, neg, pos, self.n)
        return self._final_metrics(latents, self._images(self._decoder(self.pipe.params), latents)
                                   if images else None)

    def _final_metrics(self, final_latents, images=None):
        """The final latents' PSNR, and with ``images`` the image PSNR and SSIM (NaN for non-finite images)."""
        ref = self.reference
        m = {"final_latent_psnr_db": metrics.latent_psnr_db(ref["final_latents"], final_latents)}
        if images is not None:
            m["image_psnr_db"] = metrics.image_psnr_db(ref["images"], images)
            m["ssim"] = float(np.mean(metrics.ssim(ref["images"], images))) if np.isfinite(images).all() else float("nan")
        return m

    # --- comparing ---------------------------------------------------------------------------

    def metrics(self, out, adherence=None, plugins=()):
        """Every metric of ``out`` (from ``outputs``) against the float model's.

        ``adherence``: a function (images, prompts) -> dict (the reference model's detector,
        ``sdjax.shapes.score``) or None. ``plugins``: ``quant.metrics`` plug-ins; each gets
        (images, prompts, float images) and its per-image values are averaged.
        A non-finite output (NaN/Inf) makes its metrics NaN and is reported in ``nonfinite``."""
        ref = self.reference
        bad = []
        for key in ("one_step_latents", "apple_latents", "final_latents", "images", "eps"):
            if key not in out:   # apple_latents without Apple's reading
                continue
            r = metrics.finite_report(out[key])
            if not r["finite"]:
                bad.append(f"{key}: {r['nan']} NaN, {r['inf']} Inf")
        m = {
            "noise_psnr_db": metrics.noise_psnr_db(ref["eps"], out["eps"]),
            "latent_psnr_1step_db": metrics.latent_psnr_db(ref["one_step_latents"], out["one_step_latents"]),
        }
        if "apple_latents" in out:
            m["apple_latent_psnr_db"] = metrics.apple_psnr_db(ref["apple_latents"], out["apple_latents"])
        m |= self._final_metrics(out["final_latents"], out["images"])
        images_ok = bool(np.isfinite(out["images"]).all())
        if adherence is not None:
            m["adherence"] = adherence(out["images"], self.prompts) if images_ok else None
        for plugin in plugins:
            # run_plugin checks the plug-in's output: one value per image (ValueError naming it otherwise)
            m[plugin.name] = (float(np.mean(metrics.run_plugin(plugin, out["images"], self.prompts, ref["images"])))
                              if images_ok else float("nan"))
        return m, (None if not bad else "; ".join(bad))
