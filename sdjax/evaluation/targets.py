"""The report's target section: our allocator against Apple's at equal bits, and uniform 6-bit quality
at <= 4.5 bits, read from the results of a run."""
from __future__ import annotations


import numpy as np


def targets(results):
    """The report's targets, where the recipes present allow checking them: our allocator vs Apple's at
    the same bits (>= +1 dB end-to-end one-step latent PSNR, Apple's "end-to-end signal strength"),
    and the uniform 6-bit quality reached at <= 4.5 average bits: on that one-step metric, and on
    every metric of the final images as well (two lines)."""
    by = {r["name"]: r for r in results["recipes"]}
    key = "latent_psnr_1step_db"
    out = []
    apple = sorted((r for r in results["recipes"] if r["name"].startswith("mixed-apple-")), key=lambda r: r["avg_bits"])
    diffs = []
    for a in apple:
        o = by.get("mixed-sdjax-" + a["name"][len("mixed-apple-"):])
        if o is None:
            continue
        pa, po = a["metrics"].get(key), o["metrics"].get(key)
        if pa is None or po is None or not np.isfinite(po) or not (np.isfinite(pa) or pa == float("inf")):
            continue
        diffs.append((a["avg_bits"], po - pa))
    if diffs:
        worst = min(d for _, d in diffs)
        out.append({"name": "sdjax allocator vs Apple's at the same bits",
                    "want": "+1.0 dB or more at every Apple recipe size",
                    "got": ", ".join(f"{b:.2f} bits: {d:+.2f} dB" for b, d in diffs), "pass": bool(worst >= 1.0)})
    u6 = by.get("palette-6bit")
    ours = [r for r in results["recipes"] if r["name"].startswith(("mixed-sdjax-", "mixed-gptq-")) and r["finite"]]
    bits = lambda r: r.get("avg_bits_candidates", r["avg_bits"])
    # Apple's one-step metric (the analysis' own), then every metric of the final images as well
    for keys, label in (((key,), "one-step PSNR"),
                        ((key, "final_latent_psnr_db", "image_psnr_db", "ssim"),
                         "one-step, final-latent and image PSNR and SSIM")):
        if not (u6 and ours and all(u6["metrics"].get(k) is not None for k in keys)):
            continue
        q = {k: u6["metrics"][k] for k in keys}
        ok = [r for r in ours if all(r["metrics"].get(k) is not None and r["metrics"][k] >= q[k] for k in keys)]
        best = min(ok, key=bits) if ok else None
        got = "no mixed-sdjax or mixed-gptq recipe reaches it"
        if best is not None:
            got = (f"{best['name']}: " + ", ".join(f"{best['metrics'][k]:.{3 if k == 'ssim' else 2}f}" for k in keys)
                   + f" at {bits(best):.2f} bits ({best['avg_bits']:.2f} over every conv/linear weight, small float "
                   "layers at 16)")
        out.append({"name": "uniform 6-bit quality at <= 4.5 average bits" + ("" if len(keys) == 1 else ", final images too"),
                    "want": f"a mixed-sdjax or mixed-gptq recipe with {label} >= palette-6bit's ("
                            + ", ".join(f"{q[k]:.{3 if k == 'ssim' else 2}f}" for k in keys) + ") at <= 4.5 bits per "
                            "weight of the mixed-bit candidate layers (LUTs included; Apple's recipes name their bits "
                            "over their candidates), measured on the evaluation pairs (recipes are chosen on others)",
                    "got": got, "pass": bool(best is not None and bits(best) <= 4.5)})
    return out or None
