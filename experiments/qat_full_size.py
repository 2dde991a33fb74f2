"""Full-size QAT: a few steps of ``sdjax.evaluation.qat.finetune`` on a full-size SD 1.5 UNet
(random weights) palettized uniform 4-bit per tensor: peak RSS and seconds per step.

    python experiments/qat_full_size.py --method ste                 # 1 compile step + 3 timed steps
    python experiments/qat_full_size.py --method lut
    python experiments/qat_full_size.py --method ste --remat false --compile-only   # XLA's memory analysis
    python experiments/qat_full_size.py --config small --resolution 16             # a quick check

What runs: ``unet.init_params(configs.preset("sd15")["unet"], seed=0)`` (float32, 859.5M params; no
download), ``quant.apply_recipe({"unet": params}, "palette-4bit")`` (one 4-bit LUT per conv/linear
weight; small layers stay float), then the product's ``qat.finetune(standin, q, prompts,
samples=..., method=..., steps=1 + --steps, batch=--batch, remat=--remat, w_init="float")`` with its
own jitted step (donation included); this script only wraps that step to compile it ahead of time
(timed, with ``memory_analysis()``) and to time each call. ``standin`` has only ``.params`` and
``.configs``: given ``samples``, ``finetune`` reads nothing else of a pipeline (the float params are
the teacher and, for "ste", the float weights' start). The teacher stays alive and is read after
training (the donated steps must not have taken its buffers). The samples are synthetic: ``--batch``
rows laid out as ``training_samples`` lays them out ([negative rows; the same latents' prompt rows]),
random 64x64x4 latents, timesteps and 77x768 contexts, random targets (``--targets teacher``: the float
UNet's predictions, one more compile); the targets' values do not change the cost of a step. A
watchdog thread ends the process (exit 3) when MemAvailable drops below ``--min-available`` GiB or
the RSS passes ``--max-rss``, so a run that does not fit says so instead of taking the machine down.

Measured with the product (jax 0.10.2, XLA:CPU; 2 CPU cores (AMD EPYC), 23 GiB RAM, nothing else
running; batch 2 = one guided [negative; prompt] pair at 512 px; setup: ``init_params`` 11 s to
3.40 GiB, "palette-4bit" 21-24 s, 3.85 GiB after setup; "temp" = the compiled step's
``temp_size_in_bytes``, "args" its arguments (train params, optimizer state, frozen indices), all
donated but the indices; peak RSS = ``ru_maxrss``, equal to ``/usr/bin/time -v``'s):

    method  remat         args GiB  temp GiB  compile s  step 1 s  s/step (3 steps)      peak RSS GiB
    ste     auto (on)         9.60      2.17      126.9      60.3  59.0 (58.3 60.4 58.4)  18.02
    lut     auto (on)         0.40      2.05       53.0      49.8  47.2 (45.5 46.3 49.8)   7.18
    ste     false             9.60     13.18       53.8  compile only: ~14.5 GiB of state + 13.2 of
                                                         temporaries, does not fit 23 GiB

So a full-size SD 1.5 UNet fine-tunes in this machine's memory with the defaults: "ste" (float
weights + Adam's two float32 moments: 3 x 3.2 GiB, beside the 3.4 GiB teacher) at 18.0 GiB, "lut"
at 7.2 GiB; about 1 minute a step on 2 cores at batch 2. The peak of "ste" is the compile's
(15.4 GiB once compiled, 17.8 while stepping). A 1000-step run (the 4-bit default) would take about
16 hours on these 2 cores. No GPU was lent to this task, so there is no GPU cost estimate.

How it got there (emulations measured by earlier versions of this script, now in the product):

- Without any of it, "lut" needed 23.3 GiB of temporaries (the watchdog stopped step 1 at 19.8 GiB
  RSS with 1.4 GiB left on the machine). ``jax.checkpoint`` around the UNet blocks changed nothing
  on XLA:CPU (23.4 GiB): its optimization barrier is removed and the recomputation merged back into
  the forward pass.
- ``sdjax.nn.attention``: each chunk under ``jax.checkpoint``. The loop otherwise stacks every
  chunk's float32 scores and exponentials for the backward pass (2 x 1 GiB per 64x64 self-attention
  at batch 2, in buffers XLA:CPU allocates at the program start): 23.3 -> 12.2 GiB ("lut").
- ``sdjax.nn.remat`` / ``unet.apply(..., remat=True)``: each ResnetBlock2D and Transformer2DModel
  recomputed in the backward pass from its inputs plus a zero taken from the incoming cotangent (a
  data dependence XLA cannot merge away): 12.2 -> 7.6 GiB.
- ``quant.finetune.TrainingWeight`` (``weights_tree(..., lazy=True)``): each trainable weight
  expanded where its layer runs, instead of the whole UNet's dense float32 weights (3.2 GiB) before
  the forward pass and kept for the backward: 7.6 -> 1.6 GiB.
- ``quant.finetune._nearest``: ``searchsorted(method="compare_all")`` up to 16 entries. The binary
  search starts from two weight-sized uint32 arrays per layer that XLA:CPU allocates at the program
  start: 11.9 of 13.0 GiB of a "ste" step's temporaries.
- ``qat``'s step donates the train params and optimizer state: otherwise the new float weights and
  Adam moments (9.6 GiB) sit beside the old ones. ``finetune`` copies the train params first, so
  the caller's arrays (the teacher's float weights "ste" starts from) are never taken; the copy is
  3.2 GiB of the "ste" peak (14.8 GiB measured when the teacher's buffers were consumed).
- Measured but not needed: a bfloat16 first moment or Adafactor for "ste"'s float weights; JAX's
  persistent compilation cache (loading the step raised the RSS about as much as compiling).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import quant  # noqa: E402
from sdjax import configs, unet  # noqa: E402
from sdjax.evaluation import qat  # noqa: E402
from sdjax.memory import release_freed_memory, rss_bytes  # noqa: E402

GIB = 2 ** 30
CONFIGS = {"sd15": {}, "small": dict(block_out_channels=[128, 256, 512, 512], attention_head_dim=8)}


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def rss_gib():
    return rss_bytes() / GIB


def available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("inf")


def report(what, **values):
    parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()]
    print(f"[{time.strftime('%H:%M:%S')}] {what}: " + " ".join(parts), flush=True)


def watchdog(min_available, max_rss, interval=0.25):
    """End the process before it takes the machine's memory (exit 3)."""
    def run():
        while True:
            avail, rss = available_gib(), rss_gib()
            if avail < min_available or rss > max_rss:
                report("watchdog: stopping, does not fit", rss_gib=rss, available_gib=avail,
                       peak_rss_gib=peak_rss_gib())
                os._exit(3)
            time.sleep(interval)
    threading.Thread(target=run, daemon=True).start()


class StandIn:
    """What ``qat.finetune`` reads of a pipeline when it is given ``samples``."""
    def __init__(self, params, config):
        self.params = {"unet": params}
        self.configs = {"unet": config}


def synthetic_samples(rows, res, seed=0, target_fn=None):
    """``rows`` (even) samples laid out as ``qat.training_samples``: [negative rows; prompt rows] of
    the same latents and timesteps; random contexts and (unless ``target_fn``) random targets."""
    rng = np.random.default_rng(seed)
    half = rows // 2
    x = rng.standard_normal((half, res, res, 4), dtype=np.float32)
    t = rng.uniform(0, 1000, half).astype(np.float32)
    context = rng.standard_normal((rows, 77, 768), dtype=np.float32)
    s = qat.Samples(x=np.concatenate([x, x]), t=np.concatenate([t, t]), cond={"context": context},
                    target=rng.standard_normal((rows, res, res, 4), dtype=np.float32))
    if target_fn is not None:
        s = qat.Samples(x=s.x, t=s.t, cond=s.cond, target=target_fn(s))
    return s


class CompileOnly(Exception):
    pass


class Timings:
    def __init__(self):
        self.compile_s = None
        self.calls = []


def patch_step(timings, compile_only=False):
    """Wrap ``qat._step_fn``'s step (the product's, donation included): the first call is lowered and
    compiled ahead of time (timed, with XLA's memory analysis), then every call is timed."""
    original = qat._step_fn

    def _step_fn(*args, **kwargs):
        opt, jitted = original(*args, **kwargs)
        compiled = None

        def step(*a):
            nonlocal compiled
            if compiled is None:
                report("compiling the training step", rss_gib=rss_gib(), peak_rss_gib=peak_rss_gib())
                t0 = time.perf_counter()
                lowered = jitted.lower(*a)
                compiled = lowered.compile()
                timings.compile_s = time.perf_counter() - t0
                m = compiled.memory_analysis()
                release_freed_memory()
                report("compiled", compile_s=timings.compile_s, peak_rss_gib=peak_rss_gib(), rss_gib=rss_gib(),
                       **({} if m is None else dict(
                           xla_args_gib=m.argument_size_in_bytes / GIB, xla_out_gib=m.output_size_in_bytes / GIB,
                           xla_temp_gib=m.temp_size_in_bytes / GIB, xla_alias_gib=m.alias_size_in_bytes / GIB)))
                if compile_only:
                    raise CompileOnly
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(*a))
            dt = time.perf_counter() - t0
            timings.calls.append(dt)
            report(f"step {len(timings.calls)}", seconds=dt, loss=float(out[2]), rss_gib=rss_gib(),
                   peak_rss_gib=peak_rss_gib())
            return out
        return opt, step
    qat._step_fn = _step_fn


def remat_arg(text):
    return {"true": True, "false": False, "auto": "auto"}[text.lower()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="lut", choices=("lut", "ste"))
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first (compile) step")
    ap.add_argument("--batch", type=int, default=2, help="rows per step (guided loss: even, pairs)")
    ap.add_argument("--resolution", type=int, default=64, help="latent side (64 = 512 px)")
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS),
                    help="sd15: full size; small: channels 128-512 instead of 320-1280, for quick checks")
    ap.add_argument("--targets", default="random", choices=("random", "teacher"))
    ap.add_argument("--remat", default="auto", type=remat_arg, choices=(True, False, "auto"),
                    help="qat.finetune's remat: true, false or auto (the default: on for UNets over 200M params)")
    ap.add_argument("--compile-only", action="store_true", help="stop after the compile: XLA's memory analysis")
    ap.add_argument("--min-available", type=float, default=1.5, help="GiB of MemAvailable to keep free")
    ap.add_argument("--max-rss", type=float, default=22.0, help="GiB; stop above this")
    args = ap.parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        ap.error("--batch must be even and >= 2 (the guided loss takes [negative; prompt] pairs)")

    watchdog(args.min_available, args.max_rss)
    options = dict(method=args.method, batch=args.batch, resolution=args.resolution, remat=args.remat)
    report("start", config=args.config, steps=args.steps, targets=args.targets, **options,
           devices=str(jax.devices()), rss_gib=rss_gib())
    timings = Timings()

    cfg = configs.unet_config(dict(configs.PRESETS["sd15"]["unet"], **CONFIGS[args.config]), source=args.config)
    t0 = time.perf_counter()
    params = unet.init_params(cfg, seed=0)
    jax.block_until_ready(params)
    n = sum(a.size for a in jax.tree.leaves(params))
    report("float UNet", params=n, seconds=time.perf_counter() - t0, rss_gib=rss_gib(), peak_rss_gib=peak_rss_gib())

    t0 = time.perf_counter()
    q = quant.apply_recipe({"unet": params}, "palette-4bit")["unet"]
    jax.block_until_ready(q)
    report("palette-4bit", seconds=time.perf_counter() - t0, size_gib=quant.size_bytes(q) / GIB,
           rss_gib=rss_gib(), peak_rss_gib=peak_rss_gib())

    def teacher_targets(s):
        t0 = time.perf_counter()
        out = qat._eval_rows(params, cfg, s, args.batch)
        report("teacher targets", seconds=time.perf_counter() - t0, peak_rss_gib=peak_rss_gib())
        return out
    samples = synthetic_samples(args.batch, args.resolution,
                                target_fn=teacher_targets if args.targets == "teacher" else None)
    release_freed_memory()
    report("after setup", rss_gib=rss_gib(), peak_rss_gib=peak_rss_gib())

    patch_step(timings, args.compile_only)
    t0 = time.perf_counter()
    try:
        tuned = qat.finetune(StandIn(params, cfg), q, ["a synthetic prompt"], samples=samples, method=args.method,
                             steps=1 + args.steps, batch=args.batch, progress=False, remat=args.remat,
                             w_init="float")
    except CompileOnly:
        report("result (compile only)", **options, compile_s=timings.compile_s, peak_rss_gib=peak_rss_gib())
        return
    jax.block_until_ready(tuned)
    total = time.perf_counter() - t0
    # the teacher survives the donated steps: its weights are still readable
    float(jnp.sum(jax.tree.leaves(params)[0]))
    report("after training", rss_gib=rss_gib(), peak_rss_gib=peak_rss_gib(), finetune_s=total)
    timed = timings.calls[1:]
    report("result", **options, compile_s=timings.compile_s, step1_s=timings.calls[0],
           s_per_step=float(np.mean(timed)) if timed else float("nan"), peak_rss_gib=peak_rss_gib())


if __name__ == "__main__":
    main()
