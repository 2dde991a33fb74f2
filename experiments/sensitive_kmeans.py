"""Sensitive (Fisher-weighted) vs plain k-means palettization of the reference model's UNet.

Every recipe-eligible conv/linear UNet weight (more than 2048 elements) is palettized at each
``--nbits`` with one LUT per tensor and, with ``--group-size G``, one per G output channels; once
plainly (what coremltools' ``palettize_weights(mode="kmeans")`` gives) and once with importances
``sdjax.evaluation.fisher.fisher`` computed on ``--calibration`` dataset captions that are disjoint from
the evaluation captions (the 540 captions are shuffled once; the first ones calibrate, the next
``--n`` evaluate). Calibration x0 latents are the float model's own 25-step generations
(self-generated, the default of ``fisher`` and of ``sdjax quantize --sensitivity-prompts``).

Per setting it measures, against the float model:

(a) noise-prediction SQNR (dB, pooled): the UNet's output on ``--n-sqnr`` held-out (x_t, t, caption)
    triples, x0 the VAE latents of dataset renderings of the evaluation captions;
(b) latent PSNR (dB): the final latents after ``--steps`` dpmpp_2m steps (guidance 7.5) from the same
    x_T, ``20 log10(max|ref| / rmse)`` per image (Apple's latent-PSNR style), averaged;
(c) prompt adherence: ``shapes.score`` of the decoded images on ``--n`` caption/seed pairs
    ("color", "shape", "all"), for plain, sensitive and the float model,

prints a table with sensitive - plain, and writes ``--json`` and a plot (``--plot``).

    python experiments/sensitive_kmeans.py --json runs/sensitive_kmeans.json --plot runs/sensitive_kmeans.png
    python experiments/sensitive_kmeans.py --quick --json /tmp/q.json       # smoke run (tests)

Measured (embedded reference model with today's decoder, 64 calibration captions x 8 timesteps = 512
samples, x0 self-generated; 120 other captions for evaluation, 256 SQNR triples, 25 steps dpmpp_2m, guidance
7.5; 2-core CPU, 7 min 52 s and max RSS 2.17 GiB by ``/usr/bin/time -v``). adherence p/s: plain/sensitive:

    nbits  group bits/w | SQNR dB plain   sens   diff | latPSNR plain   sens   diff |   color p/s   shape p/s     all p/s  d all
        2 tensor   2.00 |         10.43  11.15  +0.72 |         13.15  14.51  +1.36 | 0.700/0.683 0.733/0.708 0.150/0.225 +0.075
        3 tensor   3.01 |         16.76  16.93  +0.17 |         23.30  21.08  -2.23 | 0.992/0.992 0.925/0.967 0.833/0.758 -0.075
        4 tensor   4.02 |         22.42  23.34  +0.92 |         26.46  27.09  +0.62 | 1.000/0.992 0.942/0.942 0.875/0.892 +0.017
        2     16   2.02 |         10.42  11.54  +1.12 |         12.59  14.06  +1.47 | 0.533/0.783 0.592/0.758 0.150/0.325 +0.175
        3     16   3.05 |         17.32  18.28  +0.96 |         22.89  23.76  +0.87 | 0.983/1.000 0.958/0.925 0.858/0.817 -0.042
        4     16   4.09 |         23.41  24.18  +0.76 |         29.57  28.45  -1.13 | 1.000/1.000 0.942/0.925 0.900/0.900 +0.000
    float model adherence: color 1.000, shape 0.942, all 0.908

The plain columns are those of the run before the decoder fine-tune (the UNet is the same); the sensitive
ones moved (SQNR -0.1..+0.8 then, +0.2..+1.1 dB now) because the Fisher's x0 come from the float model's
generations through the VAE.

One LUT per output channel (SqueezeLLM's granularity; ``--group-size 1``), measured on the previous
reference model (the one that ignored position, so its "all" was capped near 0.2) and not rerun: 634 s on a
shared CPU; the LUTs cost extra bits on these small layers:

        2      1   2.37 |         11.86 12.55 +0.69 |         16.96 15.54 -1.41 | 1.000/0.967 0.808/0.708 0.167/0.158 -0.008
        3      1   3.74 |         17.77 18.73 +0.95 |         23.87 22.92 -0.95 | 0.992/1.000 0.850/0.900 0.167/0.208 +0.042
        4      1   5.49 |         26.59 27.95 +1.35 |         31.88 32.99 +1.11 | 1.000/1.000 0.875/0.892 0.192/0.175 -0.017

Reading: the weighting lowers what it optimises, the Fisher-weighted weight error, by only 3-10%
(ratios measured on the previous run: 0.97, 0.97, 0.94 per tensor and 0.96, 0.94, 0.91 at g16 for 2, 3, 4
bits), because in one dimension it only reshapes the value histogram, and a weight's sensitivity here hardly
depends on its value. The noise-prediction SQNR gains +0.2..+1.1 dB; latent PSNR moves by -2.2..+1.5 dB. At
2 bits, where plain k-means breaks the images (all five attributes right on 0.15 of the pairs), the
sensitive weighting raises that to 0.225 per tensor and 0.325 at g16 (standard error about 0.035 at 120
pairs) and gains about 1.4 dB of latent PSNR; at 3 and 4 bits adherence moves by -0.075..+0.017, about
within two standard errors. So on this model sensitive k-means is a small gain in the UNet's output error
that shows in the images only where the images are already broken.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import quant
import samplers
import sdjax
from quant.metrics import weighted_error
from sdjax.evaluation import calibration, fisher as sensitivity
from sdjax import shapes, unet as unet_model, vae as vae_model
from sdjax.generate import denoise_step, initial_noise
from sdjax.files import atomic_write, atomic_write_json

CAPTION_SEED = 2026            # the shuffle that splits calibration from evaluation captions
PAIR_SEED = 54321              # x_T of evaluation pair i: initial_noise(PAIR_SEED + i)
SQNR_SEED = 777


def split_captions(n_cal, n_eval, seed=CAPTION_SEED):
    """(calibration captions, evaluation captions): disjoint slices of one shuffle of all scenes."""
    scenes = shapes.all_scenes()
    if n_cal + n_eval > len(scenes):
        raise SystemExit(f"--calibration {n_cal} + --n {n_eval} exceeds the {len(scenes)} distinct captions")
    perm = np.random.default_rng([seed, 3]).permutation(len(scenes))
    caps = [scenes[i].caption for i in perm]
    return caps[:n_cal], caps[n_cal:n_cal + n_eval]


def recipe(nbits, group_size, sensitive):
    rule = {"pattern": "*", "method": "palettize", "nbits": nbits, "sensitive": sensitive}
    if group_size:
        rule.update(group_size=group_size, indivisible="per_tensor")
    return {"name": f"{'sensitive' if sensitive else 'plain'}-{nbits}bit" + (f"-g{group_size}" if group_size else ""),
            "rules": [rule]}


def _batches(n, batch):
    """(start, index array of length batch padded with 0, count) for fixed-shape batches."""
    for s in range(0, n, batch):
        idx = np.arange(s, s + batch)
        yield s, np.where(idx < n, idx, 0), min(batch, n - s)


class Evaluator:
    """Everything that is the same for every quantized UNet: captions, x_T, SQNR triples, float outputs."""

    def __init__(self, pipe, captions, n_sqnr, steps, guidance, batch):
        self.pipe, self.captions, self.steps, self.batch = pipe, captions, steps, batch
        ucfg, vcfg = pipe.configs["unet"], pipe.configs["vae"]
        self.ucfg, self.vcfg = ucfg, vcfg
        f = pipe.vae_scale_factor
        size = ucfg.sample_size
        self.res = size * f
        lat_shape = (size, size, vcfg.latent_channels)
        self.xT = np.concatenate([np.asarray(initial_noise(PAIR_SEED + i, (1, *lat_shape))) for i in range(len(captions))])
        self.ctx_pos = np.asarray(pipe.encode_prompt(captions), np.float32)
        self.ctx_neg = np.asarray(pipe.encode_prompt([""]), np.float32)
        self.guidance = jnp.asarray(guidance, jnp.float32)
        s = samplers.get("dpmpp_2m")
        self.sampler = s
        self.plan = s.plan(samplers.Schedule.from_config(pipe.scheduler_config), steps)
        self._decode = jax.jit(lambda p, z: jnp.clip(vae_model.decode(p, vcfg, z / vcfg.scaling_factor)
                                                     .astype(jnp.float32) / 2 + 0.5, 0, 1))
        self._unet = jax.jit(lambda p, x, t, c: unet_model.apply(p, ucfg, x, t, c).astype(jnp.float32))
        # SQNR triples: renderings of the evaluation captions (held-out x0), stratified t, noise
        rng = np.random.default_rng([SQNR_SEED, 1])
        which = rng.integers(0, len(captions), n_sqnr)
        images = np.stack([shapes.render(shapes.parse_caption(captions[i]), rng, self.res) for i in which])
        enc = jax.jit(lambda p, x: vae_model.encode(p, vcfg, x)[0].astype(jnp.float32) * vcfg.scaling_factor)
        x0 = np.concatenate([np.asarray(enc(pipe.params["vae"], jnp.asarray(images[i:i + batch] * 2 - 1)))
                             for i in range(0, n_sqnr, batch)])
        abar, _ = calibration.noise_schedule(pipe.scheduler_config)
        t = np.floor((np.arange(n_sqnr) + rng.random(n_sqnr)) * len(abar) / n_sqnr).astype(np.int32)
        noise = rng.standard_normal(x0.shape).astype(np.float32)
        a = abar[t][:, None, None, None]
        self.sqnr_inputs = ((np.sqrt(a) * x0 + np.sqrt(1 - a) * noise).astype(np.float32), t, self.ctx_pos[which])
        self.float_eps = self.eps(pipe.params["unet"])
        self.float_latents = self.latents(pipe.params["unet"])
        self.float_images = self.images(self.float_latents)

    def eps(self, up):
        x, t, c = self.sqnr_inputs
        out = np.zeros(x.shape, np.float32)
        for s, idx, k in _batches(len(t), self.batch):
            out[s:s + k] = np.asarray(self._unet(up, jnp.asarray(x[idx]), jnp.asarray(t[idx]), jnp.asarray(c[idx])))[:k]
        return out

    def latents(self, up):
        out = np.zeros(self.xT.shape, np.float32)
        b = self.batch
        neg = np.repeat(self.ctx_neg, b, 0)
        for s, idx, k in _batches(len(self.captions), b):
            context = jnp.asarray(np.concatenate([neg, self.ctx_pos[idx]]))
            state = self.sampler.init(self.plan, jnp.asarray(self.xT[idx]))
            seed = jnp.asarray(0, jnp.uint32)
            for _ in range(self.plan.num_calls):  # the compiled step Pipeline.generate runs
                state = denoise_step(up, self.ucfg, self.sampler, self.plan, state, context, self.guidance, seed, {})
            out[s:s + k] = np.asarray(self.sampler.result(self.plan, state))[:k]
        return out

    def images(self, lat):
        vp = self.pipe.params["vae"]
        out = [np.asarray(self._decode(vp, jnp.asarray(lat[s:s + self.batch]))) for s in range(0, len(lat), self.batch)]
        return np.concatenate(out)

    def measure(self, up):
        eps = self.eps(up)
        sqnr = 10 * np.log10(np.sum(self.float_eps.astype(np.float64) ** 2)
                             / max(np.sum((eps.astype(np.float64) - self.float_eps) ** 2), 1e-30))
        lat = self.latents(up)
        ref = self.float_latents.astype(np.float64)
        rmse = np.sqrt(np.mean((lat - ref) ** 2, axis=(1, 2, 3)))
        peak = np.abs(ref).max(axis=(1, 2, 3))
        psnr = 20 * np.log10(peak / np.maximum(rmse, 1e-12))
        score = shapes.score(self.images(lat), self.captions)
        return {"sqnr_db": float(sqnr), "latent_psnr_db": float(np.mean(psnr)), "adherence": score}


def _delta(a, b):
    out = {k: b[k] - a[k] for k in ("sqnr_db", "latent_psnr_db")}
    out["adherence"] = {k: b["adherence"][k] - a["adherence"][k] for k in ("color", "shape", "all")}
    return out


def print_table(report):
    print(f"\nsensitive vs plain k-means, UNet of {report['model']} ({report['n_eval']} eval pairs, "
          f"{report['n_sqnr']} SQNR triples, {report['steps']} steps):")
    head = (f"{'nbits':>5} {'group':>6} {'bits/w':>6} | {'SQNR dB plain':>13} {'sens':>6} {'diff':>6} | "
            f"{'latPSNR plain':>13} {'sens':>6} {'diff':>6} | {'color p/s':>11} {'shape p/s':>11} {'all p/s':>11} "
            f"{'d all':>6}")
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        p, s, d = r["plain"], r["sensitive"], r["delta"]
        pa, sa = p["adherence"], s["adherence"]
        print(f"{r['nbits']:>5} {str(r['group_size'] or 'tensor'):>6} {r['bits_per_weight']:6.2f} | "
              f"{p['sqnr_db']:13.2f} {s['sqnr_db']:6.2f} {d['sqnr_db']:+6.2f} | "
              f"{p['latent_psnr_db']:13.2f} {s['latent_psnr_db']:6.2f} {d['latent_psnr_db']:+6.2f} | "
              f"{pa['color']:.3f}/{sa['color']:.3f} {pa['shape']:.3f}/{sa['shape']:.3f} "
              f"{pa['all']:.3f}/{sa['all']:.3f} {d['adherence']['all']:+6.3f}")
    fa = report["float"]["adherence"]
    print(f"float model adherence: color {fa['color']:.3f}, shape {fa['shape']:.3f}, all {fa['all']:.3f}")
    print("(diff and d all: sensitive - plain)")


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    metrics = (("sqnr_db", "noise-prediction SQNR (dB)"), ("latent_psnr_db", "final-latent PSNR (dB)"),
               (("adherence", "shape"), "prompt adherence: shape"), (("adherence", "all"), "prompt adherence: all"))
    groups = sorted({r["group_size"] or 0 for r in report["results"]})
    for ax, (key, title) in zip(axes, metrics):
        for g in groups:
            rows = sorted((r for r in report["results"] if (r["group_size"] or 0) == g), key=lambda r: r["nbits"])
            x = [r["nbits"] for r in rows]
            style = "-" if g == 0 else "--"
            label = "per tensor" if g == 0 else f"g{g}"
            for variant, color in (("plain", "tab:blue"), ("sensitive", "tab:red")):
                y = [r[variant][key[0]][key[1]] if isinstance(key, tuple) else r[variant][key] for r in rows]
                ax.plot(x, y, style, color=color, marker="o", label=f"{variant}, {label}")
        if isinstance(key, tuple):
            ax.axhline(report["float"]["adherence"][key[1]], color="k", lw=0.8, ls=":", label="float")
        ax.set_xlabel("bits per weight index (nbits)")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(sorted({r["nbits"] for r in report["results"]}))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: the embedded reference model)")
    ap.add_argument("--nbits", default="2,3,4", help="comma-separated palette sizes")
    ap.add_argument("--group-size", type=int, default=16,
                    help="also run one LUT per this many output channels (0: per-tensor only)")
    ap.add_argument("--calibration", type=int, default=64, help="calibration captions (disjoint from --n)")
    ap.add_argument("--timesteps", type=int, default=8, help="noise levels per calibration caption")
    ap.add_argument("--calibration-steps", type=int, default=25, help="steps of the self-generated calibration x0")
    ap.add_argument("--n", type=int, default=120, help="evaluation caption/seed pairs (distinct captions)")
    ap.add_argument("--n-sqnr", type=int, default=256, help="held-out (x_t, t, caption) triples for the SQNR")
    ap.add_argument("--steps", type=int, default=25, help="dpmpp_2m steps for latent PSNR and adherence")
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 4 bits per tensor, 4 calibration captions x 2 timesteps, 4 pairs, 4 steps")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--plot", default=None, help="write a plot of the metrics vs nbits here (.png)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.nbits, args.group_size, args.calibration, args.timesteps = "4", 0, 4, 2
        args.calibration_steps, args.n, args.n_sqnr, args.steps, args.batch = 4, 4, 8, 4, 4
    try:
        nbits = [int(b) for b in args.nbits.split(",")]
    except ValueError:
        ap.error(f"--nbits {args.nbits!r}: expected comma-separated integers")
    for name in ("calibration", "timesteps", "calibration_steps", "n", "n_sqnr", "steps", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    progress = not args.no_progress
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    t0 = time.time()

    pipe = sdjax.load(args.model, progress=False)
    cal, evals = split_captions(args.calibration, args.n)
    log(f"fisher on {len(cal)} calibration captions x {args.timesteps} timesteps ...")
    imp = sensitivity.fisher(pipe, cal, n_timesteps=args.timesteps, steps=args.calibration_steps,
                             batch_size=8, progress=progress)
    t_fisher = time.time() - t0
    log(f"float model on {len(evals)} evaluation pairs ...")
    ev = Evaluator(pipe, evals, args.n_sqnr, args.steps, args.guidance_scale, args.batch)
    report = {"model": pipe.source, "calibration": len(cal), "timesteps": args.timesteps,
              "calibration_steps": args.calibration_steps, "n_eval": len(evals), "n_sqnr": args.n_sqnr,
              "steps": args.steps, "sampler": "dpmpp_2m", "guidance_scale": args.guidance_scale,
              "calibration_captions": cal, "eval_captions": evals, "fisher_seconds": t_fisher,
              "float": {"adherence": shapes.score(ev.float_images, evals)}, "results": []}
    groups = [None] + ([args.group_size] if args.group_size else [])
    up = pipe.params["unet"]
    for g in groups:
        for b in nbits:
            row = {"nbits": b, "group_size": g}
            for variant in ("plain", "sensitive"):
                log(f"{variant} {b} bit{'' if g is None else f' g{g}'} ...")
                q = quant.apply_recipe(up, recipe(b, g, variant == "sensitive"), importance={"unet": imp})
                row[variant] = ev.measure(q)
                werr = [weighted_error(quant.recipes.layers(up)[n], w, imp[n])
                        for n, w in quant.recipes.layers(q).items() if hasattr(w, "dequantize")]
                row[variant]["fisher_weighted_error"] = float(np.sum(werr))
                row["bits_per_weight"] = 8 * sum(w.nbytes for w in quant.recipes.layers(q).values()
                                                 if hasattr(w, "dequantize")) / sum(
                    int(np.prod(w.shape)) for w in quant.recipes.layers(q).values() if hasattr(w, "dequantize"))
            row["delta"] = _delta(row["plain"], row["sensitive"])
            report["results"].append(row)
    report["seconds"] = time.time() - t0
    print_table(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_json(args.json, report, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
