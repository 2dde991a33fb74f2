"""One guided UNet evaluation at full SD 1.5 size: sdjax vs diffusers/PyTorch, side by side.

Random weights (full SD 1.5 shapes), batch 2 (classifier-free guidance), 64x64 latents,
77x768 context. Each (framework, dtype) runs in its own subprocess so its peak RSS is its
own. Prints compile/first-call time, seconds per evaluation (median of --reps), peak RSS,
and the sdjax/PyTorch ratios.

    python experiments/bench_unet.py                     # float32 and bfloat16
    python experiments/bench_unet.py --dtypes float32 --reps 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time



def peak_rss_gib():
    from sdjax.memory import peak_rss_bytes
    return peak_rss_bytes() / 2**30


def run_sdjax(dtype, reps):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sdjax import configs, unet

    cfg = configs.preset("sd15")["unet"]
    t0 = time.perf_counter()
    from sdjax.memory import release_freed_memory
    params = unet.init_params(cfg, seed=0, dtype=dtype)
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 64, 64, 4), np.float32))
    ctx = jnp.asarray(rng.standard_normal((2, 77, 768), np.float32))
    t = jnp.asarray([500.0, 500.0])
    f = jax.jit(unet.apply, static_argnums=1)
    t0 = time.perf_counter()
    compiled = f.lower(params, cfg, x, t, ctx).compile()
    compile_s = time.perf_counter() - t0
    release_freed_memory()  # the compiler's freed heap, as sdjax's pipeline does after compiling
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        compiled(params, x, t, ctx).block_until_ready()
        times.append(time.perf_counter() - t0)
    return dict(init_s=init_s, compile_s=compile_s, step_s=statistics.median(times), times=times)


def run_torch(dtype, reps):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    from sdjax.configs import PRESETS
    m = UNet2DConditionModel(**PRESETS["sd15"]["unet"]).eval().to(getattr(torch, dtype))
    init_s = time.perf_counter() - t0
    x = torch.randn(2, 4, 64, 64, dtype=m.dtype)
    ctx = torch.randn(2, 77, 768, dtype=m.dtype)
    t = torch.tensor([500.0, 500.0])
    times = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        m(x, t, ctx)
        first_s = time.perf_counter() - t0
        for _ in range(reps):
            t0 = time.perf_counter()
            m(x, t, ctx)
            times.append(time.perf_counter() - t0)
    return dict(init_s=init_s, compile_s=first_s, step_s=statistics.median(times), times=times,
                threads=torch.get_num_threads())


def child(framework, dtype, reps):
    res = (run_sdjax if framework == "sdjax" else run_torch)(dtype, reps)
    res["peak_rss_gib"] = peak_rss_gib()
    print("RESULT " + json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--frameworks", default="sdjax,pytorch")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.reps)

    results = {}
    for dtype in args.dtypes.split(","):
        for fw in args.frameworks.split(","):
            print(f"running {fw} {dtype} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--child", fw, dtype, "--reps", str(args.reps)],
                                 capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{fw} {dtype} failed")
            results[(fw, dtype)] = json.loads(line[0][7:])

    print(f"\nfull-size SD 1.5 UNet, batch 2, 64x64 latents, 77x768 context, {os.cpu_count()} CPU cores")
    print(f"{'framework':10s} {'dtype':9s} {'compile/first s':>15s} {'s / eval':>9s} {'peak RSS GiB':>13s}")
    for (fw, dtype), r in results.items():
        print(f"{fw:10s} {dtype:9s} {r['compile_s']:15.1f} {r['step_s']:9.2f} {r['peak_rss_gib']:13.2f}")
    for dtype in args.dtypes.split(","):
        a, b = results.get(("sdjax", dtype)), results.get(("pytorch", dtype))
        if a and b:
            print(f"ratio sdjax/PyTorch {dtype:9s}: time {a['step_s'] / b['step_s']:.2f}x, "
                  f"peak RSS {a['peak_rss_gib'] / b['peak_rss_gib']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]}-{k[1]}": v for k, v in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
