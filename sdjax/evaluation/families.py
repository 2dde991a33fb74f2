"""The generated recipe families: Apple's mixed-bit recipes and ours (k-means and GPTQ), their names and roles."""
from __future__ import annotations


import numpy as np

from quant import allocation, mixed_bit


GENERATED = ("mixed-apple", "mixed-sdjax", "mixed-gptq")

GPTQ_MAX_BITS = 10.0      # mixed-gptq at Apple's sizes up to this many bits (above, every family is near lossless)


def family(name, recipe=None):
    if name.startswith("mixed-apple"):
        return "mixed (Apple)"
    if name.startswith("mixed-sdjax"):
        return "mixed (sdjax)"
    if name.startswith("mixed-gptq"):
        return "mixed (sdjax, GPTQ)"
    if name.startswith("palette-") and name.endswith("-gptq"):
        return "uniform palettize (GPTQ)"
    if name.startswith("palette-"):
        return "uniform palettize" + (" (grouped)" if "-g" in name else "")
    if name == "llm-int8":
        return "llm-int8"
    if "int8" in name:
        return "int8"
    return "custom"

def gptq_recipe(name, assignment):
    """An sdjax recipe dict palettizing each named layer with GPTQ at its width (16: stays float)."""
    return {"name": name, "components": ["unet"], "source": "sdjax eval (mixed-gptq)",
            "rules": [{"pattern": n, "method": "palettize", "nbits": int(b), "gptq": True}
                      for n, b in sorted(assignment.items()) if int(b) < mixed_bit.FLOAT_BITS]}

def quality_margin(got, reference):
    """The smallest margin of ``got`` over ``reference`` ({metric: value}, ``quality``'s keys), in dB:
    PSNR differences, and SSIM as 10 log10 of the dissimilarity ratio (1 - ssim_ref) / (1 - ssim)."""
    out = []
    for k, ref in reference.items():
        if k == "ssim":
            out.append(10 * np.log10(max(1 - ref, 1e-12) / max(1 - got[k], 1e-12)))
        else:
            out.append(got[k] - ref)
    return float("nan") if any(np.isnan(out)) else float(min(out))  # NaN output: no margin at all

# what a generated recipe was chosen for, and its name's tag: mixed-sdjax-7.17 (Apple's size),
# mixed-gptq-u6-4.33 (uniform 6-bit's one-step PSNR), mixed-gptq-u6img-4.61 (... its final images too)
ROLES = {"size": "Apple's recipe size", "one-step": "uniform 6-bit's one-step PSNR",
         "final": "uniform 6-bit's final images"}

_TAGS = {"size": "", "one-step": "u6-", "final": "u6img-"}

def mixed_recipes(S, names, want_apple, want_ours, G=None):
    """[(name, recipe dict, role)] of the generated families (``G``: the GPTQ sweep, for mixed-gptq);
    role: a key of ``ROLES``."""
    base = S.baselines()
    single = S.single()
    cumul = S.cumulative(single)
    single_g = G.single() if G is not None else None
    apple = mixed_bit.apple_recipes(cumul, base["original"], base["linear8"], num=7)
    # our families: (prefix, sweep, its single-layer PSNRs, recipe maker, largest Apple size served)
    ours = ([("mixed-sdjax", S, single, lambda name, a: a, np.inf)] if want_ours else []) + \
           ([("mixed-gptq", G, single_g, gptq_recipe, GPTQ_MAX_BITS)] if G is not None else [])
    out = []
    for a in apple:
        a = {k: int(v) for k, v in a.items()}
        bits = mixed_bit.average_bits(a, S.numel, S.cost_bits)
        if want_apple:
            out.append((f"mixed-apple-{bits:.2f}", a, "size"))
        for prefix, sweep_, sens, make, max_bits in ours:
            if bits <= max_bits:
                pick = allocation.allocate(sens, sweep_.numel, bits, cost_bits=sweep_.cost_bits, nbits=sweep_.nbits)
                out.append((f"{prefix}-{bits:.2f}", make(f"{prefix}-{bits:.2f}", {k: int(v) for k, v in pick.items()}),
                            "size"))
    # the smallest of each family's recipes that keeps uniform 6-bit palettization's quality on the
    # selection pairs: its one-step PSNR (Apple's metric); for GPTQ also the smallest keeping every
    # metric of the final images (GPTQ recipes searched on the one-step PSNR alone came out 1-4 dB
    # below uniform 6-bit on final latents and images; k-means ones did not)
    if ours:
        u6 = S.quality({n: 6 for n in S.layers}, final=True)
        key = "latent_psnr_1step_db"
    for prefix, sweep_, sens, make, _ in ours:
        searches = [("one-step", lambda a, sw=sweep_: sw.quality(a)[key])]
        if sweep_.hessians is not None:  # on the one-step scale: u6's one-step PSNR + the smallest margin
            searches.append(("final", lambda a, sw=sweep_: u6[key] + quality_margin(sw.quality(a, final=True), u6)))
        for role, measure in searches:
            pick, measured, bits, _ = allocation.allocate_for_quality(measure, sens, sweep_.numel, u6[key],
                                                                     cost_bits=sweep_.cost_bits, progress=sweep_.progress)
            bits = mixed_bit.average_bits(pick, sweep_.numel, sweep_.cost_bits)
            name = f"{prefix}-{_TAGS[role]}{bits:.2f}"
            out.append((name, make(name, {k: int(v) for k, v in pick.items()}), role))
    seen, uniq = set(), []
    for x in out:  # Apple's thresholds can repeat a recipe
        if x[0] not in seen:
            seen.add(x[0])
            uniq.append(x)
    return uniq
