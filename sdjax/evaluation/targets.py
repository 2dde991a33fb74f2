"""The report's target section: our allocator against Apple's at equal bytes on every reading, and uniform
6-bit quality at <= 4.5 bits, read from the results of a run."""
from __future__ import annotations


import numpy as np

from .families import quality_margin

# the readings the allocator-vs-Apple target is checked on: (metric, label); SSIM as a dB margin
# (``quality_margin``: 10 log10 of the dissimilarity ratio)
VS_APPLE_READINGS = (("apple_latent_psnr_db", "Apple's reading"), ("latent_psnr_1step_db", "sdjax's one-step reading"),
                     ("final_latent_psnr_db", "final latents"), ("image_psnr_db", "images"), ("ssim", "SSIM"))


def vs_apple(results):
    """Our allocator (``mixed-sdjax-B``) against Apple's recipe of the same tag B, at each of Apple's
    sizes: ``(apple family prefix, [(apple bits, {metric: margin in dB})])``. Against Apple's own
    pre-analysis (``apple-mbp``) when it was run, else against Apple's rule on sdjax's readings."""
    by = {r["name"]: r for r in results["recipes"]}
    for prefix in ("apple-mbp-", "apple-rule-"):
        apple = sorted((r for r in results["recipes"] if r["name"].startswith(prefix)), key=lambda r: r["avg_bits"])
        rows = []
        for a in apple:
            o = by.get("mixed-sdjax-" + a["name"][len(prefix):])
            if o is None or not (a["finite"] and o["finite"]):
                continue
            m = {}
            for k, _ in VS_APPLE_READINGS:
                pa, po = a["metrics"].get(k), o["metrics"].get(k)
                if pa is not None and po is not None and np.isfinite(pa) and np.isfinite(po):
                    m[k] = quality_margin({k: po}, {k: pa})
            rows.append((a["name"][len(prefix):], m))
        if rows:
            return prefix[:-1], rows
    return None, []


def targets(results):
    """The report's targets, where the recipes present allow checking them: our allocator vs Apple's at
    the same bytes, >= +1 dB at every Apple recipe size on each reading (Apple's, sdjax's one-step,
    final latents, images, SSIM as a dB margin; one line each), against Apple's own pre-analysis
    (apple-mbp) when it ran; and the uniform 6-bit quality reached at <= 4.5 average bits: on sdjax's
    one-step reading, and on every metric of the final images as well (two lines)."""
    by = {r["name"]: r for r in results["recipes"]}
    key = "latent_psnr_1step_db"
    out = []
    which, rows = vs_apple(results)
    who = "Apple's pre-analysis as Apple runs it (apple-mbp)" if which == "apple-mbp" else \
        "Apple's threshold rule on sdjax's readings (apple-rule)"
    for k, label in VS_APPLE_READINGS:
        diffs = [(tag, m[k]) for tag, m in rows if k in m]
        if not diffs:
            continue
        out.append({"name": f"sdjax allocator vs {who} at the same bytes: {label}",
                    "want": "+1.0 dB or more at every Apple recipe size" + (" (SSIM: 10 log10 of the ratio of 1 - SSIM)"
                                                                            if k == "ssim" else ""),
                    "got": ", ".join(f"{tag} bits: {d:+.2f} dB" for tag, d in diffs),
                    "pass": bool(min(d for _, d in diffs) >= 1.0)})
    u6 = by.get("palette-6bit")
    ours = [r for r in results["recipes"] if r["name"].startswith(("mixed-sdjax-", "mixed-gptq-")) and r["finite"]]
    bits = lambda r: r.get("avg_bits_candidates", r["avg_bits"])
    # sdjax's one-step reading (the allocator's own), then every metric of the final images as well
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
