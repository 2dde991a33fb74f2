"""A guided 512x512 generation at full SD 1.5 size (random weights): sdjax vs diffusers/PyTorch.

Each side runs in its own subprocess (its own peak RSS). The prompt encoder is left out on both
sides (random 77x768 contexts), so the table compares the denoising loop and the VAE decode.
Also: sdjax's host-driven loop (one compiled step) vs the whole loop as one program, and a
check that a new guidance scale and seed reuse the compiled step.

    python experiments/bench_pipeline.py --steps 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def run_sdjax(steps, dtype):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import samplers
    from sdjax import generate as gen
    from sdjax.memory import peak_rss_bytes
    from sdjax.pipeline import random

    pipe = random("sd15", dtype=dtype)
    ucfg, vcfg = pipe.configs["unet"], pipe.configs["vae"]
    s = samplers.get("dpmpp_2m")
    plan = s.plan(samplers.Schedule.from_config({}), steps)
    ctx = jnp.asarray(np.random.default_rng(0).standard_normal((2, 77, 768)), pipe.dtype)
    x_t = gen.initial_noise(0, (1, 64, 64, 4))
    g, seed = jnp.float32(7.5), jnp.uint32(0)
    times = []
    t_all = time.perf_counter()
    state = s.init(plan, x_t)
    for i in range(plan.num_calls):
        t0 = time.perf_counter()
        state = gen.denoise_step(pipe.params["unet"], ucfg, s, plan, state, ctx, g, seed, {})
        state.x.block_until_ready()
        times.append(time.perf_counter() - t0)
    cache = gen.denoise_step._cache_size()
    gen.denoise_step(pipe.params["unet"], ucfg, s, plan, s.init(plan, x_t), ctx, jnp.float32(3.0),
                     jnp.uint32(123), {}).x.block_until_ready()
    recompiled = gen.denoise_step._cache_size() != cache
    t0 = time.perf_counter()
    gen._decode_images(pipe.params["vae"], vcfg, state.x).block_until_ready()
    vae_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen._decode_images(pipe.params["vae"], vcfg, state.x).block_until_ready()
    vae_s = time.perf_counter() - t0
    end_to_end = time.perf_counter() - t_all - vae_s  # one loop + one (compiling) decode
    # the alternative loop: all calls in one program, at 3 steps to keep it cheap
    plan3 = s.plan(samplers.Schedule.from_config({}), 3)
    t0 = time.perf_counter()
    gen.denoise_loop(pipe.params["unet"], ucfg, s, plan3, s.init(plan3, x_t), ctx, g, seed, {}).x.block_until_ready()
    scan_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen.denoise_loop(pipe.params["unet"], ucfg, s, plan3, s.init(plan3, x_t), ctx, g, seed, {}).x.block_until_ready()
    scan_step = (time.perf_counter() - t0) / plan3.num_calls
    return dict(compile_s=times[0], step_s=statistics.median(times[1:]), vae_first_s=vae_first, vae_s=vae_s,
                end_to_end_s=end_to_end, peak_rss_gib=peak_rss_bytes() / 2**30, recompiled=recompiled,
                scan_first_s=scan_first, scan_step_s=scan_step)


def run_torch(steps, dtype):
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from sdjax.configs import PRESETS
    from sdjax.memory import peak_rss_bytes

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    unet = UNet2DConditionModel(**PRESETS["sd15"]["unet"]).eval().to(dt)
    vae = AutoencoderKL(**PRESETS["sd15"]["vae"]).eval().to(dt)
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(steps)
    ctx = torch.randn(2, 77, 768, dtype=dt)
    x = torch.randn(1, 4, 64, 64, dtype=dt)
    times = []
    t_all = time.perf_counter()
    with torch.inference_mode():
        for t in sched.timesteps:  # the loop of StableDiffusionPipeline.__call__
            t0 = time.perf_counter()
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            u, c = unet(inp, t, ctx).sample.chunk(2)
            x = sched.step(u + 7.5 * (c - u), t, x).prev_sample
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        vae.decode(x / vae.config.scaling_factor).sample
        vae_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        vae.decode(x / vae.config.scaling_factor).sample
        vae_s = time.perf_counter() - t0
    end_to_end = time.perf_counter() - t_all - vae_s
    return dict(compile_s=times[0], step_s=statistics.median(times[1:]), vae_first_s=vae_first, vae_s=vae_s,
                end_to_end_s=end_to_end, peak_rss_gib=peak_rss_bytes() / 2**30)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--frameworks", default="sdjax,pytorch")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        fw, dtype = args.child
        print("RESULT " + json.dumps((run_sdjax if fw == "sdjax" else run_torch)(args.steps, dtype)))
        return
    res = {}
    for dtype in args.dtypes.split(","):
        for fw in args.frameworks.split(","):
            print(f"running {fw} {dtype} ({args.steps} steps) ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--child", fw, dtype, "--steps", str(args.steps)],
                                 capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{fw} {dtype} failed:\n{out.stderr[-3000:]}")
            res[(fw, dtype)] = json.loads(line[0][7:])
    print(f"\nSD 1.5 (random weights), 512x512, {args.steps} guided dpmpp_2m steps, batch 1 (UNet batch 2)")
    print(f"{'framework':10s} {'dtype':9s} {'1st step s':>10s} {'s/step':>7s} {'VAE 1st s':>9s} {'VAE s':>6s} "
          f"{'end-to-end s':>12s} {'peak RSS GiB':>12s}")
    for (fw, dtype), r in res.items():
        print(f"{fw:10s} {dtype:9s} {r['compile_s']:10.1f} {r['step_s']:7.2f} {r['vae_first_s']:9.1f} "
              f"{r['vae_s']:6.1f} {r['end_to_end_s']:12.1f} {r['peak_rss_gib']:12.2f}")
    for dtype in args.dtypes.split(","):
        a, b = res.get(("sdjax", dtype)), res.get(("pytorch", dtype))
        if a:
            print(f"sdjax {dtype}: loop as one program (3 steps): {a['scan_step_s']:.2f} s/step after a "
                  f"{a['scan_first_s']:.1f} s first run, vs host-driven step {a['step_s']:.2f} s/step; "
                  f"new guidance scale and seed recompiled: {a['recompiled']}")
        if a and b:
            print(f"ratio sdjax/PyTorch {dtype}: s/step {a['step_s'] / b['step_s']:.2f}x, VAE decode "
                  f"{a['vae_s'] / b['vae_s']:.2f}x, end-to-end {a['end_to_end_s'] / b['end_to_end_s']:.2f}x, "
                  f"peak RSS {a['peak_rss_gib'] / b['peak_rss_gib']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]}-{k[1]}": v for k, v in res.items()}, f, indent=2)


if __name__ == "__main__":
    main()
