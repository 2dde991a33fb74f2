"""Apple's mixed-bit pre-analysis on an sdjax model, as Apple runs it (see ``apple``): its candidates,
clustering, sweeps on Apple's reading, baselines and recipes, and the recipe files it gives."""
from __future__ import annotations

import math

import numpy as np

import quant
from quant import mixed_bit
from sdjax import nn

from .apple import APPLE_RECIPES, apple_min_size, module_order
from .layer_sweep import LayerSweep
from .state import EvalError


class AppleSweep(LayerSweep):
    """Apple's pre-analysis on the selection pairs' prompts (``ev``: the selection Evaluator, whose
    ``apple`` reading it measures with): candidates, clustering, sweeps, baselines as Apple's
    (module docstring). Kept in OUT/state/sensitivity-apple.json; recipes from ``recipes()``."""

    file_name = "sensitivity-apple.json"

    def __init__(self, ev, state, progress=True, min_size=None, nbits=mixed_bit.NBITS, cache=None):
        if ev.apple is None:
            raise EvalError(f"apple-mbp: {ev.apple_unavailable}")
        unet = ev.pipe.params["unet"]
        self.min_size = apple_min_size(unet) if min_size is None else float(min_size)
        # Apple's candidates: "numel() > min_size"; LayerSweep takes layers with more than an int
        super().__init__(ev, state, progress, candidate_min=int(math.floor(self.min_size)), nbits=nbits, cache=cache,
                         file=self.file_name)
        self.layers = module_order(self.layers)
        self.tie_order = self.layers
        self.reading = ev.apple

    def palettized(self, layer, nbits):
        # (the key of plain k-means for the larger tensors, where the two cluster alike: sdjax's sweep reuses them)
        ck = quant.apply.cache_key("unet", layer, "palettize", {"nbits": nbits, "clustering": "coremltools"},
                                   numel=int(np.prod(self.flat[layer + ".weight"].shape)))
        pw = self.cache.get(ck)
        if pw is None:
            pw = self.cache[ck] = quant.palettize.coremltools_kmeans(np.asarray(self.flat[layer + ".weight"]), nbits)
        return pw

    def measure_params(self, unet_params):
        """Apple's reading of UNet params (``apple.AppleReading.psnr``)."""
        return self.reading.psnr(unet_params, unet_only=True)

    def linear8_unet(self):
        """Apple's "linear_8bit" baseline: every UNet weight, norms included, through ``apple_linear8``."""
        return nn.unflatten({k: (mixed_bit.apple_linear8(v).astype(np.float32) if k.endswith(".weight") else v)
                             for k, v in self.flat.items()})

    def recipes(self, num=APPLE_RECIPES):
        """[(name, {layer: nbits}, Apple's bits)]: Apple's recipes at its thresholds, largest first,
        each named ``apple-mbp-B`` by Apple's bits (repeats dropped)."""
        base = self.baselines()
        cumul = self.cumulative(self.single())
        out, seen = [], set()
        for r in mixed_bit.apple_recipes(cumul, base["original"], base["linear8"], num=num):
            r = {k: int(v) for k, v in r.items()}
            bits = mixed_bit.average_bits(r, self.numel)
            name = f"apple-mbp-{bits:.2f}"
            if name not in seen:
                seen.add(name)
                out.append((name, r, bits))
        return out


def recipe_rules(name, assignment):
    """An sdjax recipe dict of Apple's ``{layer: nbits}`` palettized as Apple's pre-analysis does
    (per tensor, coremltools' clustering); 16 stays float (a recipe keeping every layer float, Apple's
    first at the threshold ``original - 1`` when no layer passes it, is one "float" rule)."""
    rules = [{"pattern": n, "method": "palettize", "nbits": int(b), "clustering": "coremltools"}
             for n, b in ((n, assignment[n]) for n in module_order(assignment)) if int(b) < mixed_bit.FLOAT_BITS]
    return {"name": name, "components": ["unet"], "source": "sdjax eval (apple-mbp)",
            "rules": rules or [{"pattern": "*", "method": "float"}]}
