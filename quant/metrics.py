"""Quality metrics of the "quality vs bits" evaluation: how far a quantized model's outputs are from
the float model's on the same inputs (same prompts, seeds and starting latents).

    from quant import metrics
    metrics.noise_psnr_db(eps_float, eps_quant)        # UNet noise predictions, pooled
    metrics.latent_psnr_db(lat_float, lat_quant)       # per sample (peak max|ref|), then averaged
    metrics.apple_psnr_db(lat_float, lat_quant)        # Apple's compute_psnr, rounded per sample, averaged
    metrics.image_psnr_db(img_float, img_quant)        # NHWC in [0, 1]
    metrics.ssim(img_float, img_quant)                 # per image; metrics.mean_ssim for the average
    metrics.finite_report(img_quant)                   # {"finite": bool, "nan": n, "inf": n}

Every metric but adherence compares against a reference (the float model's output); all are unitless
or in decibels, and higher is better. They are computed in float64 (PSNR and SQNR on the host, SSIM with JAX in
float64), so the metric adds no rounding of its own to the error it measures.

PSNR, ``20 log10(peak / rmse)`` dB with ``rmse = sqrt(mean((ref - x)**2))``. The peak defaults to
``max |ref|`` over the same values the rmse is taken over (close to Apple's ml-stable-diffusion
``compute_psnr``, whose peak is the *test* output's ``max |x|``: see ``apple_psnr_db``), so PSNR
reads as "how many dB the error sits below the largest reference value" for any tensor, whatever its
scale. +6.02 dB per halving of the error. Identical inputs give ``inf``; an input holding NaN or Inf
gives ``nan`` rather than an exception, so one broken recipe does not stop a sweep (``finite_report``
says how broken).

- ``noise_psnr_db``: the UNet's noise predictions against the float model's for the same
  ``(x_t, t, c)``, *pooled*: one rmse and one peak (``max |ref|``) over all samples together. An epsilon
  model's predictions have about unit scale at every timestep, so pooling weighs every sample alike
  and gives the direct cost of quantizing the UNet.
- ``latent_psnr_1step_db``: ``latent_psnr_db`` of the latents after a 1-step plan of the evaluation's
  own sampler (for the default DPM++ 2M with SD 1.x's schedule: one x0 prediction from x_T at
  t = 501), guided, each pair from its own seed's ``x_T``: sdjax's cheap sensitivity reading. It is
  *not* Apple's (next item).
- ``apple_latent_psnr_db``: Apple's reading (``mixed_bit_compression_pre_analysis.py``): the latents of
  the pipeline's *own* scheduler run for ``num_inference_steps=1`` (for SD 1.x's PNDM that is one step
  at t = 1, so values sit at 90-110 dB, the scale of Apple's published SDXL figures: 82.2 dB noise
  floor, 66.0 dB linear 8-bit), one ``x_T`` per prompt drawn in order from one generator, empty
  negative prompts, scored with ``apple_psnr_db``. The evaluation layer runs it
  (``sdjax.evaluation.apple``).
- ``latent_psnr_db``: per-sample PSNR, each sample's peak its own ``max |ref|``, averaged over samples
  with ``mean_db`` (Apple averages per-prompt PSNR).
- ``image_psnr_db``: per-image PSNR of decoded images in ``[0, 1]`` with peak 1.0 (the images' data
  range, the usual image PSNR), averaged with ``mean_db``.
- ``ssim``: structural similarity of the decoded images (Wang et al. 2004), per image, from 1.0
  (identical) down; unitless. Computed by dm-pix (see ``ssim``).
- ``adherence``: how well the images follow their prompts, not how close they are to the float
  model's: the fraction of images whose attributes, as the embedded reference model's detector
  (``sdjax.shapes.detect``) reads them back, match their caption (per attribute and all together);
  measured only for that model, whose captions it can check. For other models, plug-in metrics
  (``clip_score``, or your own: see ``load_plugin``) play that part, under their own names.

Averaging dB values (``mean_db``): the plain mean of the per-sample values, because that is what the
published numbers are. A sample identical to its reference has infinite PSNR and is left out of the
mean (so one exact match does not make the average infinite); all identical gives ``inf``; any NaN
gives NaN (a broken sample is not averaged away).

SQNR, ``10 log10(sum(ref**2) / sum((ref - x)**2))`` dB (``sqnr_db``), is the per-tensor measure for
weights and single activations: it relates the error to the signal's energy instead of its peak.

Plug-in metrics are callables ``metric(images, prompts, ref_images) -> per-image float array`` with a
``name``; ``load_plugin("module.path:callable")`` imports one. Nothing here ever downloads: a plug-in
that needs weights (``clip_score``) reads them from a local folder.
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
from typing import Any, Protocol, Sequence

import numpy as np

BUILTIN = ("noise_psnr_db", "latent_psnr_1step_db", "apple_latent_psnr_db", "image_psnr_db", "ssim", "adherence")

# SSIM's constants as Wang et al. 2004 state them (and tf.image.ssim and dm-pix use them)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_SSIM_CHUNK = 8   # images per dm-pix call: bounds its temporaries (~15 float64 copies of each image)


class PluginError(ValueError):
    """A plug-in metric spec that cannot be loaded; the message names the spec."""


class Plugin(Protocol):
    """A plug-in metric: per-image scores (higher is better) of ``images`` (NHWC float in [0, 1])
    for their ``prompts``; ``ref_images`` (the float model's images, or None) for metrics that
    compare."""
    name: str

    def __call__(self, images: Any, prompts: Sequence[str], ref_images: Any = None) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------------
# helpers


def _float64(x):
    return np.asarray(x).astype(np.float64, copy=False)


def _pair(ref, x, what="inputs"):
    """Both as float64 NumPy arrays of one shape; ValueError naming both shapes otherwise."""
    r, a = np.asarray(ref), np.asarray(x)
    if r.shape != a.shape:
        raise ValueError(f"{what}: shapes differ: reference {r.shape} vs {a.shape}")
    if r.size == 0:
        raise ValueError(f"{what}: empty arrays (shape {r.shape})")
    return _float64(r), _float64(a)


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for ax in axes:
        if not -ndim <= int(ax) < ndim:
            raise ValueError(f"axis {ax} is out of range for an array of {ndim} dimensions")
        out.append(int(ax) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} repeats an axis")
    return tuple(out)


def _scalar_or_array(v):
    v = np.asarray(v, np.float64)
    return float(v) if v.ndim == 0 else v


def finite_report(x) -> dict:
    """``{"finite": bool, "nan": int, "inf": int}``: whether every value of ``x`` is finite, and how
    many are NaN and +-Inf, so a caller can report a broken output instead of crashing on it.
    Integer and boolean arrays are always finite."""
    a = np.asarray(x)
    if a.dtype.kind in "biu":
        return {"finite": True, "nan": 0, "inf": 0}
    n_nan, n_inf = int(np.count_nonzero(np.isnan(a))), int(np.count_nonzero(np.isinf(a)))
    return {"finite": n_nan == 0 and n_inf == 0, "nan": n_nan, "inf": n_inf}


# ---------------------------------------------------------------------------------------------------
# SQNR and PSNR


def sqnr_db(ref, x) -> float:
    """Signal-to-quantization-noise ratio of ``x`` against ``ref`` over the whole tensor, in dB:
    ``10 log10(sum(ref**2) / sum((ref - x)**2))``. Higher is better; ``inf`` when identical,
    ``-inf`` when ``ref`` is all zero and ``x`` is not, ``nan`` when either holds NaN or Inf."""
    r, a = _pair(ref, x, "sqnr_db")
    if not (np.isfinite(r).all() and np.isfinite(a).all()):
        return math.nan
    return ratio_db(*signal_noise(r, a))


def signal_noise(ref, x):
    """``(sum(ref**2), sum((ref - x)**2))`` in float64: the two sums of an SQNR, to pool over tensors."""
    r, a = _pair(ref, x, "signal_noise")
    return float(np.sum(r * r)), float(np.sum((r - a) ** 2))


def ratio_db(signal, noise) -> float:
    """``10 log10(signal / noise)``: ``inf`` when the noise is 0, ``-inf`` when the signal is."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * (math.log10(signal) - math.log10(noise))


def weight_stats(w):
    """(absmax, std, fraction of |w| > 6 std) of a weight's values (float64)."""
    a = _float64(w)
    std = float(a.std())
    return float(np.abs(a).max()), std, float(np.mean(np.abs(a) > 6 * std)) if std > 0 else 0.0


def psnr_db(ref, x, peak=None, axis=None):
    """Peak signal-to-noise ratio of ``x`` against ``ref`` in dB, ``20 log10(peak / rmse)``, the
    rmse (and the default peak) taken over ``axis`` (an int or a tuple; None: all of it).

    ``peak=None`` is ``max |ref|`` over the same values (Apple's convention); otherwise a positive
    number, or an array that broadcasts to the result. Returns a float when ``axis`` is None, else
    an array of the remaining axes. Each result is ``inf`` where the values are identical, ``-inf``
    where the peak is 0 but the values differ, ``nan`` where ``ref`` or ``x`` holds NaN or Inf.
    """
    r, a = _pair(ref, x, "psnr_db")
    ax = _axes(axis, r.ndim)
    if any(r.shape[i] == 0 for i in ax):
        raise ValueError(f"psnr_db: axis {axis!r} of shape {r.shape} reduces over no values")
    bad = ~(np.isfinite(r).all(axis=ax) & np.isfinite(a).all(axis=ax))
    with np.errstate(all="ignore"):
        mse = np.mean((r - a) ** 2, axis=ax)
        if peak is None:
            pk = np.max(np.abs(r), axis=ax)
        else:
            pk = np.asarray(peak, np.float64)
            if not (np.isfinite(pk).all() and (pk > 0).all()):
                raise ValueError(f"psnr_db: peak must be positive and finite; got {peak!r}")
            try:
                pk = np.broadcast_to(pk, np.shape(mse))
            except ValueError:
                raise ValueError(f"psnr_db: peak of shape {pk.shape} does not broadcast to the "
                                 f"result's shape {np.shape(mse)}") from None
        db = 20.0 * np.log10(pk) - 10.0 * np.log10(mse)
        db = np.where(mse == 0, np.inf, np.where(pk == 0, -np.inf, db))
    return _scalar_or_array(np.where(bad, np.nan, db))


def per_sample_psnr_db(ref, x, peak=None) -> np.ndarray:
    """PSNR of each sample (index of axis 0) over all its other axes, the peak (by default) each
    sample's own ``max |ref|``: an array of shape ``(N,)``."""
    r = np.asarray(ref)
    if r.ndim < 1:
        raise ValueError(f"per_sample_psnr_db: needs a leading sample axis; got shape {r.shape}")
    return np.atleast_1d(np.asarray(psnr_db(ref, x, peak=peak, axis=tuple(range(1, r.ndim))), np.float64))


def mean_db(values) -> float:
    """The average of per-sample dB values as a report shows it: the plain mean of the finite
    values. ``+inf`` values (samples identical to their reference) are left out; ``inf`` when all are
    ``+inf``; ``nan`` when any is NaN (a broken sample must not vanish into the average); a ``-inf``
    (a zero reference with a nonzero error) makes the mean ``-inf``."""
    v = _float64(values).reshape(-1)
    if v.size == 0:
        raise ValueError("mean_db: no values")
    if np.isnan(v).any():
        return math.nan
    keep = v[v != np.inf]
    if keep.size == 0:
        return math.inf
    return float(np.mean(keep))


def noise_psnr_db(ref_eps, eps) -> float:
    """PSNR of the UNet's noise predictions ``eps`` against the float model's ``ref_eps`` (same
    inputs), pooled over all samples: one rmse and one peak, ``max |ref_eps|`` over everything."""
    return psnr_db(ref_eps, eps)


def latent_psnr_db(ref_latents, latents) -> float:
    """PSNR of each sample's latents against the reference's, with peak ``max |ref|`` of that sample,
    averaged over samples with ``mean_db``. Any layout, samples on axis 0."""
    return mean_db(per_sample_psnr_db(ref_latents, latents))


APPLE_EPS, APPLE_EPS2 = 1e-5, 1e-10   # compute_psnr's guards on the peak and the rmse


def apple_psnr_per_sample(ref, x) -> list:
    """Apple's ``compute_psnr(ref_i, x_i)`` (ml-stable-diffusion ``torch2coreml.py``) of each sample
    (axis 0), rounded as its pre-analysis rounds it, ``float(f"{psnr:.1f}")``:

        20 log10((max |x_i| + 1e-5) / (sqrt(mean((ref_i - x_i)**2)) + 1e-10))

    The peak is the *test* sample's ``max |x_i|`` (not the reference's), and the guards make identical
    samples finite (about 20 log10(peak / 1e-10) dB). Computed in float64."""
    r, a = _pair(ref, x, "apple_psnr_per_sample")
    if r.ndim < 1 or r.shape[0] == 0:
        raise ValueError(f"apple_psnr_per_sample: needs a leading sample axis with samples; got shape {r.shape}")
    out = []
    for ri, ai in zip(r, a):
        if not (np.isfinite(ri).all() and np.isfinite(ai).all()):
            out.append(math.nan)
            continue
        rmse = math.sqrt(float(np.sum((ri - ai) * (ri - ai))) / ri.size)
        out.append(float(f"{20 * math.log10((float(np.abs(ai).max()) + APPLE_EPS) / (rmse + APPLE_EPS2)):.1f}"))
    return out


def apple_psnr_db(ref, x) -> float:
    """Apple's per-prompt PSNRs (``apple_psnr_per_sample``, rounded to 0.1 dB) averaged as its
    pre-analysis averages them: ``sum(values) / len(values)``. NaN when any sample holds NaN or Inf."""
    v = apple_psnr_per_sample(ref, x)
    return math.nan if any(math.isnan(p) for p in v) else sum(v) / len(v)


def _check_images(ref_images, images, what):
    r, a = np.asarray(ref_images), np.asarray(images)
    if r.shape != a.shape:
        raise ValueError(f"{what}: shapes differ: reference {r.shape} vs {a.shape}")
    if r.ndim != 4:
        raise ValueError(f"{what}: images must be NHWC (4 dimensions); got shape {r.shape}")
    if r.size == 0:
        raise ValueError(f"{what}: no images (shape {r.shape})")
    return r, a


def image_psnr_db(ref_images, images) -> float:
    """PSNR of images (NHWC float in [0, 1]) against the reference images, peak 1.0, per image and
    then averaged with ``mean_db``. ``per_sample_psnr_db(ref, x, peak=1.0)`` gives the per-image
    values."""
    r, a = _check_images(ref_images, images, "image_psnr_db")
    return mean_db(per_sample_psnr_db(r, a, peak=1.0))


# ---------------------------------------------------------------------------------------------------
# SSIM


_ssim_fn = None


def _dm_pix_ssim():
    global _ssim_fn
    if _ssim_fn is None:
        import functools

        import dm_pix
        import jax
        _ssim_fn = jax.jit(functools.partial(dm_pix.ssim, max_val=1.0, filter_size=SSIM_WINDOW,
                                             filter_sigma=SSIM_SIGMA, k1=SSIM_K1, k2=SSIM_K2))
    return _ssim_fn


def ssim(ref_images, images) -> np.ndarray:
    """SSIM of each image (NHWC float in [0, 1]) against its reference: float64 array ``(N,)``,
    1.0 for identical images, lower the less alike. ``mean_ssim`` averages it.

    Wang et al. 2004 with their constants: an 11x11 Gaussian window of sigma 1.5, K1 = 0.01,
    K2 = 0.03, data range 1, applied to each channel, and the SSIM map averaged over pixels and
    channels. Computed by ``dm_pix.ssim``, which filters with "valid" borders: the local means and
    (co)variances exist only where the whole window fits, so the map is ``(H-10) x (W-10)`` and no
    padding enters it (as in tf.image.ssim, which dm-pix follows). It clamps the
    variances at ``float32 eps**2`` (1.4e-14) and the covariance's magnitude at ``sqrt(var_a var_b)``.
    Run in float64 (``jax.enable_x64`` around the call, on the default device), because its local
    variances ``E[x**2] - E[x]**2`` lose a few 1e-6 of SSIM to cancellation in float32.
    Images must be at least 11x11 (ValueError otherwise); an image holding NaN or Inf gets NaN.
    """
    r, a = _check_images(ref_images, images, "ssim")
    if r.shape[1] < SSIM_WINDOW or r.shape[2] < SSIM_WINDOW:
        raise ValueError(f"ssim: images of shape {r.shape} (NHWC) are smaller than the "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} SSIM window")
    import jax.numpy as jnp
    try:
        from jax import enable_x64 as _enable_x64
    except ImportError:                                    # jax before the public context manager
        from jax.experimental import enable_x64 as _enable_x64
    fn = _dm_pix_ssim()
    r64, a64 = _float64(r), _float64(a)
    with _enable_x64(True):
        out = np.concatenate([np.asarray(fn(jnp.asarray(r64[i:i + _SSIM_CHUNK]),
                                            jnp.asarray(a64[i:i + _SSIM_CHUNK])), np.float64)
                              for i in range(0, len(r64), _SSIM_CHUNK)])
    bad = ~(np.isfinite(r64).all(axis=(1, 2, 3)) & np.isfinite(a64).all(axis=(1, 2, 3)))
    return np.where(bad, np.nan, out)


def mean_ssim(ref_images, images) -> float:
    """The mean of ``ssim``'s per-image values (NaN if any image's is NaN)."""
    return float(np.mean(ssim(ref_images, images)))


# ---------------------------------------------------------------------------------------------------
# plug-in metrics


def load_plugin(spec: str, **kwargs) -> Plugin:
    """The plug-in metric named by ``spec``, ``"module.path:callable"`` (the callable may be an
    attribute path, ``"module:obj.attr"``).

    The callable is the metric itself when it has a ``name`` attribute; otherwise (or when it is a
    class, or ``kwargs`` are given) it is a factory, called with ``kwargs`` (often none), that returns
    the metric: ``load_plugin("quant.metrics:clip_score", model_dir="clip")``. Raises
    ``PluginError`` (a ValueError) naming the spec when the module is missing, the attribute is
    missing, it is not callable, or the factory gives no usable metric.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise PluginError(f"plugin spec {spec!r}: expected 'module.path:callable'")
    mod_name, attr = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise PluginError(f"plugin {spec!r}: module {mod_name!r} not found") from e
        raise PluginError(f"plugin {spec!r}: importing module {mod_name!r} failed: {e}") from e
    except Exception as e:
        raise PluginError(f"plugin {spec!r}: importing module {mod_name!r} failed: {e!r}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"plugin {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"plugin {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    if kwargs or inspect.isclass(obj) or not hasattr(obj, "name"):
        try:
            metric = obj(**kwargs)
        except TypeError as e:
            args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"
            why = "" if hasattr(obj, "name") else " it has no `name` attribute, so it must be a factory;"
            raise PluginError(f"plugin {spec!r}:{why} calling {attr!r} with {args} failed: {e}") from e
        if not callable(metric):
            raise PluginError(f"plugin {spec!r}: the factory {attr!r} returned a "
                              f"{type(metric).__name__}, not a callable metric")
    else:
        metric = obj
    name = getattr(metric, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin {spec!r}: the metric has no `name` attribute (a non-empty str)")
    return metric


def run_plugin(metric: Plugin, images, prompts, ref_images=None) -> np.ndarray:
    """``metric(images, prompts, ref_images)`` checked: a float64 array of one score per image."""
    n = len(np.asarray(images))
    out = np.asarray(metric(images, prompts, ref_images))
    name = getattr(metric, "name", repr(metric))
    if out.shape != (n,):
        raise ValueError(f"plug-in metric {name!r} returned shape {out.shape} for {n} images; "
                         f"expected ({n},)")
    return _float64(out)


def _prompt_list(prompts, n):
    p = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(p) != n or not all(isinstance(s, str) for s in p):
        raise ValueError(f"clip_score: needs one prompt (a str) per image: {n} images, "
                         f"prompts {prompts!r}")
    return p


class _ClipScore:
    name = "clip_score"

    def __init__(self, model, processor, torch, batch_size, device):
        self.model, self.processor, self.torch = model, processor, torch
        self.batch_size, self.device = batch_size, device

    def _features(self, out):
        # transformers 4.x returns the projected embeddings; 5.x a ModelOutput holding them
        t = out if isinstance(out, self.torch.Tensor) else out.pooler_output
        return t.detach().to("cpu", self.torch.float64).numpy()

    def __call__(self, images, prompts, ref_images=None):
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"clip_score: images must be NHWC with 1 or 3 channels; got shape {x.shape}")
        p = _prompt_list(prompts, len(x))
        # the images a user would save: 8-bit, as CLIP score is measured on image files
        u8 = np.round(np.clip(_float64(x), 0.0, 1.0) * 255.0).astype(np.uint8)
        if u8.shape[-1] == 1:
            u8 = np.repeat(u8, 3, axis=-1)
        scores = []
        for i in range(0, len(u8), self.batch_size):
            inputs = self.processor(text=p[i:i + self.batch_size], images=list(u8[i:i + self.batch_size]),
                                    return_tensors="pt", padding=True, truncation=True)
            with self.torch.no_grad():
                img = self._features(self.model.get_image_features(
                    pixel_values=inputs["pixel_values"].to(self.device)))
                txt = self._features(self.model.get_text_features(
                    input_ids=inputs["input_ids"].to(self.device),
                    attention_mask=inputs["attention_mask"].to(self.device)))
            img /= np.linalg.norm(img, axis=-1, keepdims=True)
            txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
            scores.append(100.0 * np.maximum(np.sum(img * txt, axis=-1), 0.0))
        return np.concatenate(scores)


def clip_score(model_dir, batch_size=16, device="cpu") -> Plugin:
    """A plug-in metric named "clip_score": per image, ``100 * max(cos(E_image, E_text), 0)`` between
    the CLIP embeddings of the image and of its prompt (Hessel et al. 2021 with weight 100, as
    torchmetrics defines it; torchmetrics clamps the batch mean, this clamps each image). Higher is
    better, at most 100. The images are scored as 8-bit files would be (rounded to 0..255), prompts
    truncated to CLIP's context.

    ``model_dir``: a local folder with a ``transformers.CLIPModel`` and its ``CLIPProcessor``
    (tokenizer and image processor files), e.g. a downloaded openai/clip-vit-large-patch14; read with
    ``local_files_only=True``, never downloaded. Needs PyTorch, imported only here.
    """
    folder = os.fspath(model_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"clip_score: model folder {folder!r} does not exist")
    try:
        import torch
    except ImportError as e:
        raise ImportError("clip_score needs PyTorch (torch) to run the CLIP model; install torch") from e
    from transformers import CLIPModel, CLIPProcessor
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise FileNotFoundError(f"clip_score: cannot load a CLIP model and processor from {folder!r} "
                                f"(it needs config.json, the weights, the tokenizer files and "
                                f"preprocessor_config.json): {e}") from e
    model.eval().to(device)
    return _ClipScore(model, processor, torch, int(batch_size), device)


def weighted_error(w, wq, importance):
    """``sum(importance * (w - wq)**2)`` in float64 (``w``, ``wq`` float arrays or quantized weights):
    the loss change a weight error costs to second order under a diagonal Fisher ``importance``."""
    d = _float64(_float_value(w)) - _float64(_float_value(wq))
    return float(np.sum(_float64(importance) * d * d))


def _float_value(w):
    from sdjax.nn import is_quantized
    return w.dequantize(np.float32) if is_quantized(w) else w
