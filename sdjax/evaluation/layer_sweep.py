"""Per-layer one-step PSNR sweeps of the UNet on the selection pairs (the mixed-bit families' input; Apple's
own pre-analysis is ``apple.AppleSweep``, a subclass)."""
from __future__ import annotations

import time

import jax
import numpy as np

import quant
from quant import calibrate, gptq, mixed_bit
from sdjax import nn

from .evaluator import Evaluator
from .state import EvalError, State

FISHER_TIMESTEPS = 4      # samples per prompt of the cheap (Fisher) sensitivity estimate

SWEEP_PAIRS = 8           # selection pairs per sweep measurement (Apple's pre-analysis: 8 prompts)

CANDIDATE_MIN = 2048      # layers with more weights take part in mixed-bit selection (recipes' threshold)


class LayerSweep:
    """Per-layer one-step PSNR sweeps with fake quantization: each layer's weight replaced by its
    palettized value (dequantized back to float), so every measurement reuses one compiled program
    (the real quantized weight types compute the same values: ``tests/quant/test_sweep.py``).
    ``ev``: the selection pairs' Evaluator (``selection``); each measurement takes its first
    ``pairs`` pairs.

    ``hessians`` (``{layer: H}``): palettize with GPTQ (``quant.gptq``) instead of plain k-means; the
    sweep is then kept in its own state file."""

    def __init__(self, ev: Evaluator, state: State, progress=True, candidate_min=CANDIDATE_MIN, nbits=mixed_bit.NBITS,
                 cache=None, hessians=None, pairs=SWEEP_PAIRS, file=None):
        self.ev, self.state, self.progress = ev, state, progress
        self.tie_order = None   # sensitivity ties by layer name (Apple's sweep: module order)
        self.pairs = min(pairs, ev.n1)
        self.hessians, self._factors, self._keys = hessians, {}, {}
        self.file = file or ("sensitivity.json" if hessians is None else "sensitivity-gptq.json")
        self.cache = {} if cache is None else cache
        self.nbits = tuple(nbits)
        self.unet = ev.pipe.params["unet"]
        self.flat = nn.flatten(self.unet)
        self.numel = {n: k for n, k in calibrate.layer_numel(self.unet).items() if k > candidate_min}
        self.layers = list(self.numel)
        if not self.layers:
            raise EvalError(f"no UNet conv/linear layer has more than {candidate_min} weights: nothing for "
                            "mixed-bit selection to choose")
        self._deq, self._width = {}, None  # see quantized
        self.data = state.read(self.file) or {}
        self.data.setdefault("single", {})
        self.data.setdefault("cumulative", {})
        self.data.setdefault("seconds", {})
        self._dirty = 0

    def palettized(self, layer, nbits):
        """The layer palettized per tensor, from (or into) the sweep's shared cache, so recipes reuse it
        (the keys are ``apply_recipe``'s)."""
        ck = self._keys.get((layer, nbits))
        if ck is None:  # (a GPTQ key hashes the layer's hessian: once per layer and width)
            h = None if self.hessians is None else self.hessians[layer]
            opts = {"nbits": nbits} if h is None else {"nbits": nbits, "gptq": True}
            ck = self._keys[(layer, nbits)] = quant.apply.cache_key("unet", layer, "palettize", opts, h)
        pw = self.cache.get(ck)
        if pw is None:
            w = np.asarray(self.flat[layer + ".weight"], np.float32)
            if self.hessians is None:
                pw = quant.palettize.kmeans(w, nbits)
            else:  # one factorization of the layer's hessian serves every width
                if layer not in self._factors:
                    self._factors[layer] = gptq.factorize(self.hessians[layer], name=f"hessian of {layer}")
                pw = gptq.palettize(w, self._factors[layer], nbits)
            self.cache[ck] = pw
        return pw

    def quantized(self, layer, nbits):
        """The palettized layer's float32 value. Kept for one width at a time: the sweeps measure one
        width after another, and every width of a full-size UNet would be five float32 copies of it."""
        if nbits != self._width:
            self._deq, self._width = {}, nbits
        if layer not in self._deq:
            self._deq[layer] = np.asarray(self.palettized(layer, nbits).dequantize(np.float32))
        return self._deq[layer]

    def cost_bits(self, layer, nbits):
        if nbits >= 16:
            return 16 * self.numel[layer]
        return 8 * int(self.palettized(layer, nbits).nbytes)

    def unet_with(self, assignment):
        """The UNet params with each layer of ``{layer: nbits}`` palettized (16: float)."""
        flat = dict(self.flat)
        for layer, nbits in assignment.items():
            if nbits < 16:
                flat[layer + ".weight"] = self.quantized(layer, nbits)
        return nn.unflatten(flat)

    def measure(self, assignment):
        """The sweep's reading of the UNet with ``assignment`` palettized (``measure_params``)."""
        return self.measure_params(self.unet_with(assignment))

    def measure_params(self, unet_params):
        """sdjax's one-step PSNR (``latent_psnr_1step_db``) of UNet params on the sweep's pairs."""
        return self.ev.one_step_psnr(unet_params, pairs=self.pairs)

    def linear8_unet(self):
        """The UNet of the "linear8" baseline: sdjax's ``w8-int8`` preset."""
        return quant.apply_recipe(self.unet, "w8-int8", component="unet")

    def quality(self, assignment, final=False):
        """{metric: value} on every selection pair: the one-step PSNR; with ``final`` also the final
        latents' and images' PSNR and SSIM."""
        unet = self.unet_with(assignment)
        out = {"latent_psnr_1step_db": self.ev.one_step_psnr(unet, pairs=self.ev.n1)}
        return out | self.ev.unet_metrics(unet, images=True) if final else out

    def _save(self, force=False):
        self._dirty += 1
        if force or self._dirty >= 20:
            self.state.write(self.data, self.file)
            self._dirty = 0

    def baselines(self):
        b = self.data.setdefault("baselines", {})
        if "original" not in b:
            f16 = jax.tree.map(lambda a: np.asarray(a, np.float16).astype(np.float32), self.unet)
            b["original"] = self.measure_params(f16)
        if "linear8" not in b:
            b["linear8"] = self.measure_params(self.linear8_unet())
        self._save(force=True)
        return b

    def single(self):
        done = {int(k): v for k, v in self.data["single"].items()}
        t0 = time.perf_counter()

        def keep(nbits, layer, value):
            self.data["single"].setdefault(str(nbits), {})[layer] = value
            self._save()

        todo = len(self.layers) * len(self.nbits) - sum(len(v) for v in done.values())
        res = mixed_bit.single_layer_sweep(self.measure, self.layers, nbits=self.nbits, done=done,
                                           on_result=keep, progress=self.progress)
        if todo > 0:  # the measured sweep's time, summed over the runs that measured
            self.data["seconds"]["measured"] = self.data["seconds"].get("measured", 0) + time.perf_counter() - t0
        self._save(force=True)
        return res

    def cumulative(self, single):
        out = {}
        for nbits in self.nbits:
            done = self.data["cumulative"].get(str(nbits))
            done = [tuple(x) for x in done] if done else None

            def keep(nb, layer, value, nbits=nbits):
                self.data["cumulative"].setdefault(str(nbits), []).append([layer, value])
                self._save()

            out[nbits] = mixed_bit.cumulative_sweep(self.measure, single[nbits], nbits, done=done,
                                                    on_result=keep, progress=self.progress, tie_order=self.tie_order)
            self.data["cumulative"][str(nbits)] = [list(x) for x in out[nbits]]
            self._save(force=True)
        return out

    def fisher(self, single, prompts):
        """The cheap estimate: Fisher-weighted weight error per layer and bits
        (``mixed_bit.fisher_estimate``), its Spearman rank agreement with the measured PSNRs per
        bits, and its time (the Fisher pass plus the estimate) against the measured sweep's."""
        if "fisher" in self.data:
            return self.data["fisher"]
        from . import fisher
        t0 = time.perf_counter()
        imp = fisher.fisher(self.ev.pipe, list(dict.fromkeys(prompts)), n_timesteps=FISHER_TIMESTEPS,
                                 progress=self.progress)
        est = {b: {} for b in self.nbits}
        for n in self.layers:
            one = mixed_bit.fisher_estimate({n: np.asarray(self.flat[n + ".weight"], np.float32)}, {n: imp[n]},
                                            nbits=self.nbits,
                                            quantize=lambda w, b, n=n: self.quantized(n, b))
            for b in self.nbits:
                est[b][n] = float(one[b][n])
        seconds = time.perf_counter() - t0
        rho = {str(b): float(mixed_bit.rank_agreement(single[b], est[b])) for b in self.nbits}
        self.data["fisher"] = {"estimate": {str(b): est[b] for b in est}, "spearman": rho, "seconds": seconds}
        self._save(force=True)
        return self.data["fisher"]

    def block(self):
        """The report's "sensitivity" entry."""
        d = self.data
        nb = list(self.nbits)
        f = d.get("fisher")
        return {"nbits": nb, "layers": self.layers, "numel": [self.numel[n] for n in self.layers],
                "psnr_db": [[d["single"][str(b)][n] for b in nb] for n in self.layers],
                "fisher_estimate": [[f["estimate"][str(b)][n] for b in nb] for n in self.layers] if f else None,
                "spearman": f["spearman"] if f else None,
                "baselines": d.get("baselines"),
                "selection": {"prompts": len(self.ev.s.prompts), "seeds": list(self.ev.s.seeds), "pairs": self.pairs},
                "seconds": {"measured": d["seconds"].get("measured"), "fisher": f["seconds"] if f else None}}
