"""Does Stable Diffusion have LLM.int8()-style outlier features? Activation outliers per layer and timestep.

LLM.int8() (Dettmers et al. 2022) found that past ~6.7B parameters a transformer's activations carry a
few *feature columns* (input dimensions of a matrix product) with |x| >= 6 in most tokens and layers, and
that int8 products break unless those columns are done in floating point. This script asks the same
question of a diffusion model, during a real guided generation:

- for every conv/linear layer of the UNet and every denoising step: how many input feature columns hold
  at least one |x| >= threshold (default 6.0) anywhere in that call (both halves of the guided batch
  and all prompts, which run as one batch), and the largest |x| of the call;
- the same for every CLIP text-encoder layer, once per prompt (the negative prompt "" included);
- per layer, the largest weight magnitudes (absmax and the top few |w|), since a weight beyond the
  threshold would matter too.

For a convolution the "feature columns" counted are its input channels (the last axis of its NHWC input);
an im2col patch feature (dy, dx, c) is an outlier at some position exactly when channel c is, so the
patch-feature count is at most kernel-area times this one.

Activations are seen through ``quant.calibrate.Probe`` (a weight type that sees each layer's input via
the weight protocol of ``sdjax.nn``), with one persistent host-side recorder so the guided step compiles
once and the recorder is drained after every step.

    python experiments/outliers.py                           # embedded reference model, 4 prompts x 25 steps
    python experiments/outliers.py --model PATH --prompt "a photo of a cat" --steps 20 --out runs/outliers

Outputs (each written atomically): ``OUT/outliers.json`` (per layer: kind, shape, weight absmax and top
|w|, per-timestep outlier column counts and max|x|, which columns were outliers and in how many steps),
``OUT/outliers.png`` (outlier columns vs timestep for the top layers; max|x| vs timestep; histogram of
weight absmax), and a summary table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from sdjax.files import atomic_write  # noqa: E402

# captions the embedded reference model was trained on (sdjax.shapes)
DEFAULT_PROMPTS = [
    "a small red circle at the top left on a white background",
    "a large blue square in the center on a black background",
    "a small yellow triangle at the bottom right on a gray background",
    "a large purple circle at the top right on a white background",
]
SPARSE = 0.05        # outlier columns per call <= this share of a layer's input features: "sparse"
TOP_WEIGHTS = 5       # largest |w| recorded per layer
MAX_COLUMNS = 256     # outlier column indices recorded per layer


class Recorder:
    """Host-side sink for ``quant.calibrate.Probe``: keeps, per layer, the max |x| of every input
    channel since the last ``drain`` (the probe's histogram is not needed here and is dropped)."""

    def __init__(self):
        self._stats = {}
        self._lock = threading.Lock()

    def add(self, name, numel, channel_max, hist):
        c = np.asarray(channel_max, np.float32)
        with self._lock:
            prev = self._stats.get(name)
            self._stats[name] = c.copy() if prev is None else np.maximum(prev, c)

    def drain(self):
        import jax
        jax.effects_barrier()
        with self._lock:
            out, self._stats = self._stats, {}
        return out


def probed(params, recorder):
    """``params`` with every conv/linear weight wrapped in a Probe writing to ``recorder``."""
    from quant import calibrate
    from sdjax import nn
    flat = nn.flatten(params)
    for name in calibrate.layer_names(params):
        flat[name + ".weight"] = calibrate.Probe(flat[name + ".weight"], name, recorder)
    return nn.unflatten(flat)


def weight_stats(params, threshold):
    """{layer: dict(kind, shape, in_features, weight_absmax, weight_top, weights_over_threshold)}."""
    from quant import calibrate
    from sdjax import nn
    flat = nn.flatten(params)
    out = {}
    for name in calibrate.layer_names(params):
        w = flat[name + ".weight"]
        a = np.abs(np.asarray(w.dequantize(np.float32) if hasattr(w, "dequantize") else w, np.float32)).ravel()
        k = min(TOP_WEIGHTS, a.size)
        top = np.sort(np.partition(a, a.size - k)[a.size - k:])[::-1]
        out[name] = dict(kind="conv" if len(w.shape) == 4 else "linear", shape=[int(d) for d in w.shape],
                         in_features=int(w.shape[-2]), weight_absmax=float(top[0]),
                         weight_top=[float(v) for v in top],
                         weights_over_threshold=int((a >= threshold).sum()))
    return out


def summarize_calls(channel_maxes, threshold):
    """channel_maxes: one {layer: (in,) channel max} per call -> per-layer lists over the calls:
    outlier column counts, max|x|, and {column: number of calls it was an outlier in}."""
    layers = {}
    n = len(channel_maxes)
    for i, call in enumerate(channel_maxes):
        for name, c in call.items():
            d = layers.setdefault(name, dict(outlier_cols=[None] * n, max_abs=[None] * n, _cols={}))
            hit = np.flatnonzero(c >= threshold)
            d["outlier_cols"][i] = int(hit.size)
            d["max_abs"][i] = float(c.max()) if c.size else 0.0
            for col in hit:
                d["_cols"][int(col)] = d["_cols"].get(int(col), 0) + 1
    for d in layers.values():
        cols = d.pop("_cols")
        d["outlier_cols_any"] = len(cols)
        ranked = sorted(cols.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_COLUMNS]
        d["columns"] = {str(k): v for k, v in ranked}  # column -> calls it was an outlier in
    return layers


def run(pipe, prompts, steps=25, sampler="dpmpp_2m", guidance_scale=7.5, seed=0, latent_size=None,
        threshold=6.0, negative_prompt="", progress=True):
    """The per-layer report of one guided generation (see the module docstring) as a dict."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    import samplers
    from sdjax import clip, unet

    ucfg, ccfg = pipe.configs["unet"], pipe.configs["text_encoder"]
    if ucfg.in_channels != getattr(ucfg, "out_channels", ucfg.in_channels):
        raise SystemExit(f"{pipe.source}: a {ucfg.in_channels}-channel (inpainting) UNet is not supported here")
    if pipe.tokenizer is None:
        raise SystemExit(f"{pipe.source}: no tokenizer, cannot encode prompts")
    rec = Recorder()

    # CLIP, once per prompt (and once for the negative prompt)
    tparams = probed(pipe.params["text_encoder"], rec)
    encode = jax.jit(lambda p, ids: clip.apply(p, ccfg, ids)[0])
    texts = [negative_prompt] + list(prompts)
    hidden, clip_calls = [], []
    for text in tqdm(texts, desc="clip", disable=not progress):
        hidden.append(encode(tparams, jnp.asarray(pipe.tokenizer([text]))))
        clip_calls.append(rec.drain())
    context = jnp.concatenate([hidden[0]] * len(prompts) + hidden[1:])  # (negatives, positives)

    # the UNet over the denoising loop, one guided batch of all prompts per step
    s = samplers.get(sampler)
    plan = s.plan(samplers.Schedule.from_config(pipe.scheduler_config), steps, 1.0)
    size = latent_size or (ucfg.sample_size if isinstance(ucfg.sample_size, int) else 64)
    shape = (len(prompts), size, size, ucfg.in_channels)
    key = jax.random.PRNGKey(seed)
    state = s.init(plan, jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32))
    uparams = probed(pipe.params["unet"], rec)

    @jax.jit
    def step(p, plan, state, context, g):
        x_in, t = s.model_input(plan, state)
        x_in = x_in.astype(jnp.float32)
        out = unet.apply(p, ucfg, jnp.concatenate([x_in, x_in]), t, context)
        uncond, cond = jnp.split(out.astype(jnp.float32), 2)
        guided = uncond + g * (cond - uncond)
        noise = (jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), state.index), guided.shape)
                 if s.stochastic else None)
        return s.step(plan, state, guided, noise)

    g = jnp.asarray(guidance_scale, jnp.float32)
    unet_calls, timesteps, seconds = [], [], []
    for k in tqdm(range(plan.num_calls), desc=f"unet {sampler}", unit="step", disable=not progress):
        t0 = time.perf_counter()
        state = step(uparams, plan, state, context, g)
        jax.block_until_ready(state.x)
        unet_calls.append(rec.drain())
        seconds.append(time.perf_counter() - t0)
        timesteps.append(float(np.asarray(plan.timesteps)[k]))
    latents = np.asarray(s.result(plan, state))

    report = dict(
        model=pipe.source, threshold=threshold, prompts=list(prompts), negative_prompt=negative_prompt,
        steps=steps, sampler=sampler, guidance_scale=guidance_scale, seed=seed, latent_shape=list(shape),
        dtype=str(np.dtype(pipe.dtype)), timesteps=timesteps, step_seconds=seconds,
        latents_finite=bool(np.isfinite(latents).all()),
        note=("outlier_cols[i]: input feature columns (conv: input channels) with any |x| >= threshold "
              "in call i; UNet calls are denoising steps (guided batch of all prompts), CLIP calls are "
              "texts ([negative_prompt] + prompts)"),
        unet={}, text_encoder={}, clip_texts=texts)
    for comp, calls in (("unet", unet_calls), ("text_encoder", clip_calls)):
        acts = summarize_calls(calls, threshold)
        for name, w in weight_stats(pipe.params[comp], threshold).items():
            report[comp][name] = dict(w, **acts.get(name, dict(outlier_cols=[], max_abs=[], outlier_cols_any=0,
                                                                    columns={})))
    report["summary"] = summary(report)
    return report


def _dist(values):
    v = np.asarray(values, np.float64)
    if not v.size:
        return {}
    return dict(n=int(v.size), min=float(v.min()), median=float(np.median(v)),
                p90=float(np.percentile(v, 90)), max=float(v.max()))


def summary(report):
    thr = report["threshold"]
    out = {}
    for comp in ("unet", "text_encoder"):
        layers = report[comp]
        seen = {n: d for n, d in layers.items() if d["outlier_cols"]}
        with_any = [n for n, d in seen.items() if d["outlier_cols_any"] > 0]
        calls = max((len(d["outlier_cols"]) for d in seen.values()), default=0)
        per_call = [sum(1 for d in seen.values() if d["outlier_cols"][i] > 0) / max(1, len(seen))
                    for i in range(calls)]
        frac = {n: max(seen[n]["outlier_cols"]) / seen[n]["in_features"] for n in with_any}
        out[comp] = dict(
            layers=len(layers), layers_seen=len(seen), layers_with_outliers=len(with_any),
            # LLM.int8()'s outliers are sparse: a handful of the feature columns. Dense ones (a large
            # share of the columns over the threshold) mean a large input scale instead.
            layers_sparse_outliers=sum(f <= SPARSE for f in frac.values()),
            max_outlier_col_fraction=_dist(list(frac.values())),
            fraction_with_outliers=len(with_any) / max(1, len(seen)),
            fraction_with_outliers_per_call=per_call,
            max_outlier_cols=max((max(d["outlier_cols"]) for d in seen.values()), default=0),
            max_abs_activation=max((max(d["max_abs"]) for d in seen.values()), default=0.0),
            weight_absmax={k: _dist([d["weight_absmax"] for d in layers.values() if d["kind"] == k])
                           for k in ("conv", "linear")},
            layers_with_weights_over_threshold=sum(d["weights_over_threshold"] > 0 for d in layers.values()),
            threshold=thr)
    return out


def top_layers(layers, n):
    """Layer names ranked by their largest per-call outlier column count, then by max|x|."""
    seen = [k for k, d in layers.items() if d["outlier_cols"]]
    return sorted(seen, key=lambda k: (-max(layers[k]["outlier_cols"]), -max(layers[k]["max_abs"])))[:n]


def print_summary(report, top=15, file=None):
    p = lambda *a: print(*a, file=file or sys.stdout)
    thr = report["threshold"]
    p(f"\n{report['model']}: {len(report['prompts'])} prompts x {report['steps']} steps ({report['sampler']}, "
      f"guidance {report['guidance_scale']}), latents {tuple(report['latent_shape'])}, threshold |x| >= {thr}")
    for comp, calls in (("unet", "steps"), ("text_encoder", "texts")):
        layers, s = report[comp], report["summary"][comp]
        p(f"\n{comp}: {s['layers_with_outliers']}/{s['layers_seen']} layers "
          f"({100 * s['fraction_with_outliers']:.1f}%) have an outlier column in some call; "
          f"max {s['max_outlier_cols']} outlier columns in one call; largest |x| {s['max_abs_activation']:.2f}")
        per = s["fraction_with_outliers_per_call"]
        if per:
            p(f"  fraction of layers with outliers per call ({calls}): first {100 * per[0]:.1f}%, "
              f"median {100 * float(np.median(per)):.1f}%, last {100 * per[-1]:.1f}%")
        fr = s["max_outlier_col_fraction"]
        if fr:
            p(f"  of those, {s['layers_sparse_outliers']} have sparse outliers (<= {100 * SPARSE:.0f}% of the input "
              f"columns in every call, LLM.int8()-like); per-layer max share of outlier columns: median "
              f"{100 * fr['median']:.1f}%, max {100 * fr['max']:.1f}%")
        p(f"  {'layer':<58} {'kind':>6} {'in':>5} {'max cols':>8} {'%':>5} {'@call':>5} {'cols any':>8} "
          f"{'calls>0':>7} {'max|x|':>8} {'w absmax':>8}")
        for name in top_layers(layers, top):
            d = layers[name]
            c = d["outlier_cols"]
            p(f"  {name:<58} {d['kind']:>6} {d['in_features']:>5} {max(c):>8} {100 * max(c) / d['in_features']:5.1f} "
              f"{int(np.argmax(c)):>5} "
              f"{d['outlier_cols_any']:>8} {sum(x > 0 for x in c):>4}/{len(c):<2} {max(d['max_abs']):8.2f} "
              f" {d['weight_absmax']:8.3f}")
        for kind, dist in s["weight_absmax"].items():
            if dist:
                p(f"  weight absmax, {kind:6s} ({dist['n']} layers): min {dist['min']:.3f}  median {dist['median']:.3f}"
                  f"  p90 {dist['p90']:.3f}  max {dist['max']:.3f}")
        p(f"  layers with any |w| >= {thr}: {s['layers_with_weights_over_threshold']}")


def plot(report, path, top=8):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = report["threshold"]
    ts = report["timesteps"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    layers = report["unet"]
    for name in top_layers(layers, top):
        d = layers[name]
        axes[0].plot(ts, d["outlier_cols"], marker=".", label=name)
        axes[1].plot(ts, d["max_abs"], marker=".", label=name)
    for ax, title, ylabel in ((axes[0], f"UNet: input columns with |x| >= {thr}", "outlier columns"),
                              (axes[1], "UNet: max |x| of the layer input", "max |x|")):
        ax.set_xlabel("timestep")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.invert_xaxis()  # generation runs from high to low t
        ax.grid(alpha=0.3)
    axes[1].axhline(thr, color="k", ls="--", lw=1)
    if layers:
        axes[0].legend(fontsize=6, loc="best")
    groups = [(f"UNet {k}", [d["weight_absmax"] for d in layers.values() if d["kind"] == k]) for k in ("conv", "linear")]
    groups.append(("CLIP linear", [d["weight_absmax"] for d in report["text_encoder"].values()]))
    allv = [v for _, vs in groups for v in vs]
    if allv:
        bins = np.linspace(0, max(max(allv), thr) * 1.05, 40)
        for label, vs in groups:
            if vs:
                axes[2].hist(vs, bins=bins, alpha=0.6, label=f"{label} ({len(vs)})")
        axes[2].axvline(thr, color="k", ls="--", lw=1, label=f"threshold {thr}")
        axes[2].legend(fontsize=8)
    axes[2].set_xlabel("weight absmax of the layer")
    axes[2].set_ylabel("layers")
    axes[2].set_title("weight absmax per layer")
    fig.suptitle(f"{str(report['model'])[-60:]}: {len(report['prompts'])} prompts x "
                 f"{report['steps']} steps, {report['sampler']}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder or single file (default: the embedded reference model)")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: 4 reference-model captions")
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latent-size", type=int, default=None, help="latent height = width (default: the UNet's sample_size)")
    ap.add_argument("--threshold", type=float, default=6.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "outliers"), help="output folder")
    ap.add_argument("--top", type=int, default=15, help="layers listed in the table")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import sdjax
    pipe = sdjax.load(args.model, dtype=args.dtype, progress=not args.no_progress)
    prompts = args.prompt or DEFAULT_PROMPTS
    report = run(pipe, prompts, args.steps, args.sampler, args.guidance_scale, args.seed, args.latent_size,
                 args.threshold, args.negative_prompt, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "outliers.json")
    atomic_write(jpath, lambda f: f.write(json.dumps(report, indent=1)), mode="w")
    print_summary(report, args.top)
    print(f"\nwrote {jpath}")
    if not args.no_plot:
        ppath = os.path.join(args.out, "outliers.png")
        plot(report, ppath)
        print(f"wrote {ppath}")
    return report


if __name__ == "__main__":
    main()
