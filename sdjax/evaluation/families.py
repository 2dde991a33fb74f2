"""The generated recipe families, their names and roles: Apple's mixed-bit palettization as Apple runs it
(``apple-mbp``), Apple's threshold rule on sdjax's readings (``apple-rule``), our allocator over k-means
and GPTQ layers (``mixed-sdjax``, ``mixed-gptq``) at the sizes of Apple's recipes and at uniform 6-bit's quality,
and ``qat-mixed-gptq``: mixed-gptq's recipe at uniform 6-bit's one-step quality, fine-tuned. The fine-tuned
uniform recipes are the ``qat-Nbit`` presets (``quant.recipes``)."""
from __future__ import annotations


import numpy as np

from quant import allocation, mixed_bit
from quant.recipes import QAT_DEFAULTS

from .apple_sweep import recipe_rules

W8A8_FAMILIES = ("w8a8-apple", "w8a8-sdjax")   # act_sensitivity's; not in the default set (minutes of analysis)
GENERATED = ("apple-mbp", "apple-rule", "mixed-sdjax", "mixed-gptq", "qat-mixed-gptq") + W8A8_FAMILIES
FINETUNED = ("qat-4bit-gptq", "qat-2bit-gptq", "qat-mixed-gptq")   # sdjax eval's fine-tuned recipes (default set)
FINETUNED_FAMILIES = {"uniform": "fine-tuned palettize", "mixed": "fine-tuned mixed (sdjax, GPTQ)",
                      "custom": "fine-tuned (custom)"}
RENAMED = {"mixed-apple": "apple-rule (Apple's threshold rule on sdjax's readings; apple-mbp is Apple's whole "
                          "pre-analysis as Apple runs it)"}

GPTQ_MAX_BITS = 10.0      # mixed-gptq at Apple's sizes up to this many bits (above, every family is near lossless)


def family(name, recipe=None):
    """The report's family of recipe ``name`` (its plot line and legend entry); ``recipe``: its dict."""
    if name.startswith("qat-mixed"):
        return FINETUNED_FAMILIES["mixed"]
    if name.startswith("qat-"):
        return FINETUNED_FAMILIES["uniform"]
    if isinstance(recipe, dict) and "rules" in recipe and recipe.get("finetune") is not None:
        return FINETUNED_FAMILIES["custom"]
    if name.startswith("w8a8-apple"):
        return "W8A8 (Apple's thresholds)"
    if name.startswith("w8a8-sdjax"):
        return "W8A8 (sdjax allocator)"
    if name.startswith("apple-mbp"):
        return "mixed (Apple, as Apple runs it)"
    if name.startswith("apple-rule"):
        return "mixed (Apple's rule, sdjax readings)"
    if name.startswith("mixed-sdjax"):
        return "mixed (sdjax)"
    if name.startswith("mixed-gptq"):
        return "mixed (sdjax, GPTQ)"
    if name.startswith("palette-") and "-int8lut" in name:  # issue 23: int8 LUT entries (and int8 activations)
        return "uniform palettize (int8 LUT" + (", int8 activations)" if name.endswith("-a8") else ")")
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

# what a generated recipe was chosen for, and its name's tag: apple-mbp-7.02 (Apple's threshold on its reading,
# named by Apple's bits), mixed-sdjax-7.02 (that recipe's size), mixed-gptq-u6-4.33 (uniform 6-bit's one-step
# PSNR), mixed-gptq-u6img-4.61 (... its final images too)
ROLES = {"apple": "Apple's threshold on Apple's reading", "apple-rule": "Apple's threshold on sdjax's one-step reading",
         "size": "the size of an Apple recipe", "one-step": "uniform 6-bit's one-step PSNR",
         "final": "uniform 6-bit's final images",
         "qat": "uniform 6-bit's one-step PSNR before fine-tuning (mixed-gptq-u6), then fine-tuned",
         "w8a8-apple": "Apple's activation thresholds (a percentile of the layers' readings) and its two overrides",
         "w8a8-macs": "the int8 MAC share of the Apple W8A8 recipe of its tag, least predicted noise",
         "w8a8-floor": "the calibration reading of an Apple W8A8 recipe, most int8 MACs"}

_TAGS = {"size": "", "one-step": "u6-", "final": "u6img-"}


def _stored_total(assignment, sweep_, numel_all):
    """Stored bits of ``{layer: nbits}`` over every conv/linear layer (``numel_all``): a palettized layer
    of the sweep costs what the sweep stores, every other layer 16 bits a weight."""
    return sum(sweep_.cost_bits(n, int(assignment[n])) if int(assignment.get(n, 16)) < 16 and n in sweep_.numel
               else 16 * k for n, k in numel_all.items())


def finetuned_mixed(mixed, want):
    """``mixed`` (``mixed_recipes``' list) as ``want`` asks: with ``qat-mixed-gptq-u6-B``, mixed-gptq's
    recipe at uniform 6-bit's one-step PSNR with ``"finetune": QAT_DEFAULTS``, when "qat-mixed-gptq" is
    wanted, and without the mixed-gptq recipes when "mixed-gptq" itself is not."""
    out = [x for x in mixed if "mixed-gptq" in want or not x[0].startswith("mixed-gptq-")]
    if "qat-mixed-gptq" in want:
        base = next(x for x in mixed if x[0].startswith("mixed-gptq-") and x[2] == "one-step")
        name = "qat-" + base[0]
        out.append((name, dict(base[1], name=name, source="sdjax eval (qat-mixed-gptq)", finetune=dict(QAT_DEFAULTS)),
                    "qat"))
    return out


def mixed_recipes(S, want, G=None, A=None, numel_all=None):
    """[(name, recipe, role)] of the generated families in ``want`` (``S``: sdjax's k-means sweep, ``G``:
    the GPTQ sweep for mixed-gptq, ``A``: Apple's own for apple-mbp; ``numel_all``: every UNet
    conv/linear layer's weight count); role: a key of ``ROLES``.

    Our allocator's size-matched recipes take the sizes of Apple's own recipes (apple-mbp) when they are
    wanted, else of Apple's rule on sdjax's sweep (apple-rule's, computed even when apple-rule itself is not
    wanted): the same stored bytes over the whole UNet's conv/linear weights, under the Apple recipe's tag."""
    numel_all = dict(numel_all or S.numel)
    out, sizes = [], []          # sizes: (tag, stored bits over every conv/linear layer)
    if A is not None:
        for name, a, _bits in A.recipes():
            out.append((name, recipe_rules(name, a), "apple"))
            sizes.append((name[len("apple-mbp-"):], _stored_total(a, A, numel_all)))
    sized = {"mixed-sdjax", "mixed-gptq"} & set(want)   # families with size-matched recipes (qat-mixed-gptq: none)
    if "apple-rule" in want or (A is None and sized):   # without apple-mbp, ours take apple-rule's sizes
        base = S.baselines()
        for a in mixed_bit.apple_recipes(S.cumulative(S.single()), base["original"], base["linear8"], num=7):
            a = {k: int(v) for k, v in a.items()}
            tag = f"{mixed_bit.average_bits(a, S.numel):.2f}"   # Apple's bits over the candidates
            if "apple-rule" in want:
                out.append((f"apple-rule-{tag}", a, "apple-rule"))
            if A is None:
                sizes.append((tag, _stored_total(a, S, numel_all)))
    # our families: (prefix, sweep, its single-layer PSNRs, recipe maker, largest Apple size served)
    ours = ([("mixed-sdjax", S, S.single(), lambda name, a: a, np.inf)] if "mixed-sdjax" in want else []) + \
           ([("mixed-gptq", G, G.single(), gptq_recipe, GPTQ_MAX_BITS)] if G is not None else [])
    float_rest = sum(16 * k for n, k in numel_all.items() if n not in S.numel)  # ours keep them float
    for tag, total in sizes:
        bits = (total - float_rest) / sum(S.numel.values())   # stored bits a weight over our candidates
        if bits >= mixed_bit.FLOAT_BITS:   # an Apple recipe keeping every layer float: nothing to allocate
            continue
        for prefix, sweep_, sens, make, max_bits in ours:
            if prefix in sized and float(tag) <= max_bits:   # the Apple recipe's own bits
                pick = allocation.allocate(sens, sweep_.numel, bits, cost_bits=sweep_.cost_bits, nbits=sweep_.nbits)
                out.append((f"{prefix}-{tag}", make(f"{prefix}-{tag}", {k: int(v) for k, v in pick.items()}), "size"))
    # the smallest of each family's recipes that keeps uniform 6-bit palettization's quality on the
    # selection pairs: its one-step PSNR (sdjax's reading); for GPTQ also the smallest keeping every
    # metric of the final images (GPTQ recipes searched on the one-step PSNR alone came out 1-4 dB
    # below uniform 6-bit on final latents and images; k-means ones did not)
    if ours:
        u6 = S.quality({n: 6 for n in S.layers}, final=True)
        key = "latent_psnr_1step_db"
    for prefix, sweep_, sens, make, _ in ours:
        searches = [("one-step", lambda a, sw=sweep_: sw.quality(a)[key])]
        # (qat-mixed-gptq alone needs only the one-step recipe)
        if sweep_.hessians is not None and "mixed-gptq" in want:  # on the one-step scale: u6's one-step PSNR + the smallest margin
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


# --- W8A8: which layers run int8 activations -----------------------------------------------------

APPLE_PERCENTILES = (25, 50, 75)   # Apple's threshold at these percentiles of the layers' readings


def w8a8_recipe(name, w8a8, layers, description):
    """An sdjax recipe: ``int8-w8a8`` for the layers in ``w8a8``, ``int8`` (W8A16) for the rest of ``layers``
    (named exactly, so small layers are quantized too)."""
    fast = set(w8a8)
    return {"name": name, "components": ["unet"], "source": "sdjax eval (W8A8)", "description": description,
            "rules": [{"pattern": n, "method": "int8-w8a8" if n in fast else "int8"} for n in layers]}


def w8a8_recipes(A, want, percentiles=APPLE_PERCENTILES):
    """[(name, recipe, role)] and [info] of the W8A8 families in ``want`` from ``A`` (an
    ``act_sensitivity.ActSensitivity``): Apple's rule (``quant.apple_layers.select``: a conv threshold, the
    two overrides) at each of ``percentiles`` of the layers' readings, named ``w8a8-apple-F`` by its share F of
    the UNet's MACs on the int8 path; and sdjax's allocator (``quant.act_alloc``) at each of those shares
    (``w8a8-sdjax-F``, Apple's tag) and at each of their calibration readings, the most int8 MACs that keep
    it (``w8a8-sdjax-floor-F``, its own share). ``info``: per recipe its share, calibration reading and
    predicted one (the additive model), for the report. Apple's recipes are computed for sdjax's even when
    ``w8a8-apple`` itself is not wanted."""
    from quant import act_alloc, apple_layers
    single, macs, base = A.single(), A.macs, A.base_psnr
    listed = apple_layers.sensitivity_layers(single, "sdjax")
    out, info = [], []

    def add(name, chosen, role, text, **fields):
        if any(x[0] == name for x in out):    # thresholds can repeat a recipe
            return
        frac = act_alloc.mac_fraction(chosen, macs) if chosen else 0.0
        out.append((name, w8a8_recipe(name, chosen, A.layers, f"{ROLES[role]}; {text}"), role))
        info.append({"name": name, "role": role, "mac_fraction": frac, "calibration_psnr_db": A.measure(chosen),
                     "predicted_psnr_db": act_alloc.predicted_psnr(single, chosen, base),
                     "w8a8_layers": len(chosen), **fields})
    apple = []
    for p in percentiles:
        thr = round(float(np.percentile(list(single.values()), p)), 3)
        chosen, _, _ = apple_layers.select(listed, conv_psnr=thr, overrides=True)
        frac = act_alloc.mac_fraction(chosen, macs) if chosen else 0.0
        apple.append((f"{frac:.3f}", chosen, thr, frac))
    for tag, chosen, thr, _ in apple:
        if "w8a8-apple" in want:
            add(f"w8a8-apple-{tag}", chosen, "w8a8-apple", f"conv threshold {thr} dB", threshold_db=thr)
    if "w8a8-sdjax" in want:
        for tag, chosen, _, frac in apple:   # the exact share, not the tag's rounding
            pick = act_alloc.allocate_for_macs(single, macs, frac, base) if chosen else []
            add(f"w8a8-sdjax-{tag}", pick, "w8a8-macs", f"the share of w8a8-apple-{tag}")
        for tag, chosen, _, _ in apple:
            floor = A.measure(chosen)
            pick, _, frac, _ = act_alloc.allocate_for_quality(A.measure, single, macs, floor, base, progress=A.progress)
            add(f"w8a8-sdjax-floor-{frac:.3f}", pick, "w8a8-floor", f"the reading of w8a8-apple-{tag}, {floor:.2f} dB")
    return out, info
