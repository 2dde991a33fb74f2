"""Which route reaches this CPU's matrix units from JAX? The UNet's three kernels, route by route.

Issue 27, point 2: XLA:CPU runs sdjax's matmuls and convolutions on AVX-512 float32 code whatever
the dtype; the CPU's bfloat16 (avx512_bf16, AMX-BF16) and int8 (VNNI, AMX-INT8) units stay idle.
This script measures, each route in its own process (XLA reads its flags once):

- ``xla``: jaxlib as installed; ``xla-xnn``, ``xla-ynn``, ``xla-onednn``, ``xla-use-onednn``: the
  same with each XLA:CPU flag of jaxlib 0.10.2 that hands dots to a vendor library
  (``--xla_cpu_experimental_{xnn,ynn,onednn}_fusion_type=dot``, ``--xla_cpu_use_onednn=true``);
- ``iree``: the function ``jax.export`` produces, compiled by IREE for the host CPU with its
  mmt4d microkernels and data tiling (``iree-base-compiler``/``iree-base-runtime``);
- ``openvino``: the same jaxpr through OpenVINO's JAX frontend (``openvino.convert_model``),
  float32 and with ``INFERENCE_PRECISION_HINT=bf16``;
- ``torch``: PyTorch's oneDNN kernels, the reference a user would pick.

Kernels, at the shapes of SD 1.5's UNet at 512x512 with guidance: a 2048^3 matmul, a 3x3
convolution of 2x64x64x320 -> 320, and one attention of 2x8 heads over 4096 queries and keys of
width 40. Each is checked against float64 NumPy (relative L2; attention on its first two heads) and
timed (best of --reps).

    python experiments/bench_kernels.py                    # every route that is installed
    python experiments/bench_kernels.py --routes xla,torch
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

XLA_FLAGS = {
    "xla": "",
    "xla-xnn": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "xla-ynn": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "xla-onednn": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "xla-use-onednn": "--xla_cpu_use_onednn=true",
}
ROUTES = list(XLA_FLAGS) + ["iree", "openvino", "torch"]
N = 2048
CONV = (2, 64, 64, 320, 320)
ATT = (16, 4096, 40)        # (batch x heads, tokens, head width)


def inputs():
    rng = np.random.default_rng(0)
    b, h, w, ci, co = CONV
    bh, L, d = ATT
    return dict(
        a=rng.standard_normal((N, N), np.float32), b=rng.standard_normal((N, N), np.float32),
        ai=rng.integers(-127, 128, (N, N), dtype=np.int8), bi=rng.integers(-127, 128, (N, N), dtype=np.int8),
        x=rng.standard_normal((b, h, w, ci), np.float32), k=(rng.standard_normal((3, 3, ci, co)) / 30).astype(np.float32),
        q=rng.standard_normal((bh, L, d), np.float32), kk=rng.standard_normal((bh, L, d), np.float32),
        v=rng.standard_normal((bh, L, d), np.float32))


def flops():
    b, h, w, ci, co = CONV
    bh, L, d = ATT
    return dict(matmul=2 * N ** 3, conv=2 * b * h * w * ci * co * 9, attention=4 * bh * L * L * d)


def jax_kernels(dtype):
    """{name: (function, argument names)} in JAX; dtype is "float32", "bfloat16" or "int8"."""
    import jax
    import jax.numpy as jnp

    def mm(a, b):
        return jnp.matmul(a, b, preferred_element_type=jnp.int32 if dtype == "int8" else jnp.float32)

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            preferred_element_type=jnp.float32)

    def att(q, kk, v):
        s = jnp.einsum("bqd,bkd->bqk", q, kk, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
        p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
        return jnp.einsum("bqk,bkd->bqd", p, v, preferred_element_type=jnp.float32)

    if dtype == "int8":
        return dict(matmul=(mm, ("ai", "bi")))
    return dict(matmul=(mm, ("a", "b")), conv=(conv, ("x", "k")), attention=(att, ("q", "kk", "v")))


def reference(name, arrays):
    f64 = {k: v.astype(np.float64) for k, v in arrays.items()}
    if name == "matmul":
        return f64["a"] @ f64["b"]
    if name == "matmul-int8":
        return f64["ai"] @ f64["bi"]
    if name == "conv":
        return bc.conv3x3_same_f64(f64["x"], f64["k"])
    s = np.einsum("bqd,bkd->bqk", f64["q"][:2], f64["kk"][:2]) / np.sqrt(f64["q"].shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bqk,bkd->bqd", p / p.sum(-1, keepdims=True), f64["v"][:2])


def cast(arrays, names, dtype):
    import ml_dtypes
    return [arrays[n] if dtype != "bfloat16" else arrays[n].astype(ml_dtypes.bfloat16) for n in names]


def timed(call, reps):
    out = call()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = call()
        best = min(best, time.perf_counter() - t0)
    return best, np.asarray(out, np.float64)


def run_jax_like(route, reps, arrays):
    """xla*, iree and openvino: the same JAX functions, executed by each."""
    import jax
    rows = []
    for dtype in ("float32", "bfloat16", "int8"):
        for name, (fn, names) in jax_kernels(dtype).items():
            args = cast(arrays, names, dtype)
            if route.startswith("xla"):
                jf = jax.jit(fn)
                dev = [jax.device_put(a) for a in args]
                call = lambda: jax.block_until_ready(jf(*dev))  # noqa: E731
            elif route == "iree":
                call = iree_callable(fn, args)
            else:
                call = openvino_callable(fn, args, dtype)
                if call is None:
                    continue
            t, out = timed(call, reps)
            rows.append(row(route, name, dtype, t, out, arrays))
    return rows


def iree_callable(fn, args):
    import iree.compiler as ic
    import iree.runtime as ir
    import jax
    from jax import export
    exp = export.export(jax.jit(fn))(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args])
    vmfb = ic.compile_str(exp.mlir_module(), target_backends=["llvm-cpu"], input_type="stablehlo",
                          extra_args=["--iree-llvmcpu-target-cpu=host", "--iree-opt-data-tiling",
                                      "--iree-llvmcpu-enable-ukernels=all"])
    ctx = ir.SystemContext(config=ir.Config("local-task"))
    vm = ir.VmModule.copy_buffer(ctx.instance, vmfb)
    ctx.add_vm_module(vm)
    f = getattr(ctx.modules, vm.name)["main"]
    return lambda: f(*args).to_host()


def openvino_callable(fn, args, dtype):
    """OpenVINO's JAX frontend takes float32 in and runs bf16 by its precision hint (bf16 rows);
    it has no int8 matmul from a jaxpr (int8 needs FakeQuantize: see sdjax.openvino)."""
    import jax
    import openvino as ov
    if dtype == "int8":
        return None
    f32 = [np.asarray(a, np.float32) for a in args]
    model = ov.convert_model(jax.make_jaxpr(fn)(*f32))
    hint = "bf16" if dtype == "bfloat16" else "f32"
    compiled = ov.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()
    return lambda: request.infer(f32)[0]


def run_torch(reps, arrays):
    import torch
    torch.set_num_threads(os.cpu_count())
    rows = []
    for dtype in ("float32", "bfloat16", "int8"):
        td = dict(float32=torch.float32, bfloat16=torch.bfloat16, int8=torch.int8)[dtype]
        with torch.inference_mode():
            if dtype == "int8":
                a, b = torch.from_numpy(arrays["ai"]), torch.from_numpy(arrays["bi"])
                calls = dict(matmul=lambda: torch._int_mm(a, b))
            else:
                a, b = (torch.from_numpy(arrays[n]).to(td) for n in ("a", "b"))
                x = torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2).contiguous().to(td)
                k = torch.from_numpy(arrays["k"]).permute(3, 2, 0, 1).contiguous().to(td)
                q, kk, v = (torch.from_numpy(arrays[n]).to(td)[:, None] for n in ("q", "kk", "v"))
                sdpa = torch.nn.functional.scaled_dot_product_attention
                calls = dict(matmul=lambda: a @ b,
                             conv=lambda: torch.nn.functional.conv2d(x, k, padding=1).permute(0, 2, 3, 1),
                             attention=lambda: sdpa(q, kk, v)[:, 0])
            for name, call in calls.items():
                t, out = timed(lambda: call().float().numpy(), reps)
                rows.append(row("torch", name, dtype, t, out, arrays))
    return rows


def row(route, name, dtype, t, out, arrays):
    ref = reference(name + ("-int8" if dtype == "int8" else ""), arrays)
    out = out[:len(ref)]                    # attention: checked on its first two heads (float64 scores of all 16: 2 GiB)
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    return dict(route=route, kernel=name, dtype=dtype, seconds=t, gflops=flops()[name] / t / 1e9, rel_l2=rel)


def child(route, reps):
    arrays = inputs()
    rows = run_torch(reps, arrays) if route == "torch" else run_jax_like(route, reps, arrays)
    print("RESULT " + json.dumps(rows))


def available(route):
    mod = {"iree": "iree.runtime", "openvino": "openvino", "torch": "torch"}.get(route)
    if mod is None:
        return None
    import importlib.util
    try:
        found = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{mod} is not installed (pip install -e \".[bench]\")"


def cpu_line():
    cpu = bc.cpu_info()
    have = ", ".join(f"{f} {'yes' if ok else 'no'}" for f, ok in cpu["flags"].items())
    return f"{cpu['model']}, {cpu['cores']} cores: {have}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated, from {ROUTES}")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.reps)
    routes = [r for r in args.routes.split(",") if r]
    unknown = [r for r in routes if r not in ROUTES]
    if unknown:
        ap.error(f"--routes: unknown {unknown}; known: {ROUTES}")
    print(cpu_line())
    rows = []
    for route in routes:
        why = available(route)
        if why:
            print(f"{route}: skipped, {why}")
            continue
        env = dict(os.environ, XLA_FLAGS=XLA_FLAGS.get(route, ""))
        print(f"running {route} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", route, "--reps", str(args.reps)],
                             capture_output=True, text=True, env=env)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{route}: failed\n{out.stderr[-2000:]}")
            continue
        rows += json.loads(line[0][7:])
    print(f"\n{'route':15s} {'kernel':10s} {'dtype':9s} {'ms':>9s} {'GFLOP/s':>8s} {'rel L2 vs f64':>14s}")
    for r in rows:
        print(f"{r['route']:15s} {r['kernel']:10s} {r['dtype']:9s} {r['seconds'] * 1e3:9.1f} "
              f"{r['gflops']:8.0f} {r['rel_l2']:14.1e}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(cpu=cpu_line(), rows=rows), f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
