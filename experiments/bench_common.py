"""Helpers shared by the CPU benchmarks (bench_unet.py, bench_pipeline.py): the machine's description,
which backends can run, a memory estimate checked before a contender starts, child processes, the
result table and its ratios, and atomic JSON output.

Nothing here imports torch, OpenVINO or NNCF: a backend is looked up with ``importlib.util.find_spec``
so a missing one is named, never imported, by the parent.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

# contender -> (modules it needs, precision class, CPU flags that make that precision fast: any one)
CONTENDERS = {
    "pytorch-fp32": (("torch", "diffusers"), "fp32", ()),
    "pytorch-bf16": (("torch", "diffusers"), "bf16", ("amx_bf16", "avx512_bf16")),
    "openvino-bf16": (("torch", "diffusers", "openvino"), "bf16", ("amx_bf16", "avx512_bf16")),
    "openvino-nncf-w8a8": (("torch", "diffusers", "openvino", "nncf"), "int8", ("amx_int8", "avx512_vnni")),
    "sdjax-fp32": ((), "fp32", ()),
    "sdjax-bf16": ((), "bf16", ("amx_bf16", "avx512_bf16")),
    "sdjax-w8a8": ((), "int8", ("amx_int8", "avx512_vnni")),
    # sdjax's own function (its params, its W8A8 weights and scales) run by OpenVINO's CPU plugin
    # through its JAX frontend (sdjax.openvino)
    "sdjax-openvino-fp32": (("openvino",), "fp32", ()),
    "sdjax-openvino-bf16": (("openvino",), "bf16", ("amx_bf16", "avx512_bf16")),
    "sdjax-openvino-w8a8": (("openvino",), "int8", ("amx_int8", "avx512_vnni")),
}
REFERENCE = "pytorch-fp32"
FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni")
VERSION_MODULES = ("jax", "jaxlib", "torch", "openvino", "nncf", "diffusers")
# weight bytes per parameter while the contender runs, counting the copies it holds at its peak
# (PyTorch bf16: the float32 load, then the cast; OpenVINO: the float32 torch module it converts from
# plus the converted and compiled model; NNCF: those plus the quantized copy; sdjax W8A8: the float32
# params it observes plus the int8 ones). Set from peaks seen on the full-size UNet: OpenVINO bf16 5.7 GB
# at 64x64 pixels (where activations are negligible), NNCF >= 11.5 GB during nncf.quantize at 512 px,
# PyTorch bf16 5.25 GiB at 512 px.
WEIGHT_BYTES_PER_PARAM = {
    "pytorch-fp32": 4.0, "pytorch-bf16": 6.0, "openvino-bf16": 7.0, "openvino-nncf-w8a8": 13.0,
    "sdjax-fp32": 4.0, "sdjax-bf16": 4.0, "sdjax-w8a8": 5.0,
    # sdjax.openvino: float32 10.5 GiB, W8A8 6.0 GiB peak at 512 px (experiments/openvino_backend.py)
    "sdjax-openvino-fp32": 12.0, "sdjax-openvino-bf16": 12.0, "sdjax-openvino-w8a8": 7.0,
}
SD15_UNET_PARAMS = 859_520_964
FEATURE_MAPS_ALIVE = 32   # float32 copies of the largest feature map alive at once (skips, norms, residuals)
ATTN_HEADS = 8


class BenchError(ValueError):
    """A bad argument to a benchmark: the message names the argument and what was expected."""


# --- the machine ------------------------------------------------------------------------------

def cpu_info(path="/proc/cpuinfo"):
    """{"model", "flags": {flag: bool for FLAGS}, "cores"} of this CPU (model "unknown" off Linux)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open(path) as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and model in ("unknown", platform.processor()):
                    model = val.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "flags": {f: f in flags for f in FLAGS}, "cores": cores}


def versions(modules=VERSION_MODULES):
    """{module: version or "not installed"}, read from package metadata (nothing is imported)."""
    from importlib import metadata
    out = {}
    for m in modules:
        try:
            out[m] = metadata.version(m)
        except metadata.PackageNotFoundError:
            out[m] = "not installed"
    return out


def mem_available_bytes(path="/proc/meminfo"):
    """MemAvailable of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_header(cpu, vers):
    fl = ", ".join(f"{f} {'present' if cpu['flags'][f] else 'absent'}" for f in FLAGS)
    vs = ", ".join(f"{k} {v}" for k, v in vers.items())
    return f"CPU: {cpu['model']}, {cpu['cores']} cores; {fl}\nversions: {vs}"


def timed_calls(call, reps):
    """``(last output, first call's seconds, [seconds of each of ``reps`` further calls])``."""
    t0 = time.perf_counter()
    out = call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return out, first, times


def tensor_output_unet(unet):
    """diffusers' UNet as a torch module ``(sample, timestep, encoder_hidden_states) -> tensor``, the form
    ``openvino.convert_model`` traces (torch imported here: a benchmark-only dependency)."""
    import torch

    class TensorOutputUNet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.m(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    return TensorOutputUNet(unet)


# --- which contenders can run -------------------------------------------------------------------

def parse_contenders(text, known=CONTENDERS):
    """``--contenders a,b,c`` -> list (order kept, duplicates dropped); BenchError names unknown ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise BenchError(f"--contenders: unknown {', '.join(bad) or '(empty)'}; expected a comma-separated "
                         f"list of {', '.join(known)}")
    return list(dict.fromkeys(names))


def backend_problem(name, cpu_flags, find_spec=None, table=CONTENDERS):
    """Why contender ``name`` cannot run here (one line), or None: a module it needs is not installed,
    or its precision has no fast path on this CPU (none of the flags that give it one)."""
    find_spec = find_spec or importlib.util.find_spec
    modules, precision, needs = table[name]
    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        extra = " (pip install -e \".[bench]\")" if set(missing) & {"openvino", "nncf", "torch"} else ""
        return f"skipped {name}: {', '.join(missing)} not installed{extra}"
    if needs and not any(cpu_flags.get(f) for f in needs):
        return (f"skipped {name}: this CPU has no {' and no '.join(needs)}, so {precision} has no fast path here "
                "and its time would not be the fast one")
    return None


def estimate_bytes(name, height, width, rows, params=SD15_UNET_PARAMS):
    """Estimated peak bytes of one UNet contender at ``height`` x ``width`` pixels and ``rows`` UNet rows
    (2 per prompt with guidance): weights x WEIGHT_BYTES_PER_PARAM[name] + activations, where the
    activations are the full attention score matrix of the first (largest) self-attention, float32,
    ``rows * ATTN_HEADS * L**2 * 4`` bytes with L = (height/8)*(width/8) latent positions (PyTorch's and
    OpenVINO's CPU attention materialises it; sdjax's query chunks need less, so this is an upper bound
    for sdjax), plus FEATURE_MAPS_ALIVE float32 feature maps of 320 channels at latent size."""
    L = (height // 8) * (width // 8)
    weights = params * WEIGHT_BYTES_PER_PARAM[name]
    attn = rows * ATTN_HEADS * L * L * 4
    feats = rows * L * 320 * 4 * FEATURE_MAPS_ALIVE
    return int(weights + attn + feats)


def memory_problem(name, height, width, rows, available, estimate=estimate_bytes):
    """One line refusing ``name`` if its estimated peak exceeds ``available`` bytes, else None."""
    need = estimate(name, height, width, rows)
    if available is not None and need > available:
        return (f"skipped {name} at {height}x{width}, {rows} UNet rows: estimated peak {need / 2**30:.1f} GiB "
                f"> {available / 2**30:.1f} GiB available (MemAvailable)")
    return None


# --- child processes --------------------------------------------------------------------------

def run_child(argv, timeout=None):
    """Run ``argv`` (a python child printing one ``RESULT {json}`` line) -> (result dict or None, error
    text: the tail of its stderr, or the reason it gave no result)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        return None, f"timed out after {timeout} s\n" + (tail.decode(errors="replace") if isinstance(tail, bytes) else tail)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        return None, f"exit status {out.returncode}\n" + out.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):]), ""


def child_result(res):
    """The line a child prints for ``run_child``."""
    print("RESULT " + json.dumps(res), flush=True)


def python_argv(script, *args):
    return [sys.executable, os.fspath(script), *map(str, args)]


# --- results ----------------------------------------------------------------------------------

def conv3x3_same_f64(x, k):
    """The 3x3 stride-1 'same' convolution (NHWC x HWIO) in float64 NumPy: the reference of the conv kernels."""
    import numpy as np
    x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros(x.shape[:3] + (k.shape[-1],))
    for i in range(3):
        for j in range(3):
            out += xp[:, i:i + x.shape[1], j:j + x.shape[2]] @ k[i, j]
    return out


def rel_l2(y, ref):
    """||y - ref|| / ||ref|| in float64."""
    import numpy as np
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if y.shape != ref.shape:
        raise BenchError(f"output shape {y.shape} differs from the reference's {ref.shape}")
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def ratios(run, table=CONTENDERS, reference=REFERENCE, key="s"):
    """Per contender of one run ``{name: {key: seconds, ...} or None}`` -> ``{name: (x reference, x best
    peer at the same precision)}``; a peer is a contender not named sdjax-*; None where not measured."""
    def t(n):
        r = run.get(n)
        return r.get(key) if r else None
    ref = t(reference)
    out = {}
    for n in run:
        if t(n) is None:
            continue
        peers = [t(p) for p in run if not p.startswith("sdjax") and table[p][1] == table[n][1] and t(p)]
        out[n] = (t(n) / ref if ref else None, t(n) / min(peers) if peers else None)
    return out


def median_ratios(runs, **kw):
    """The median over runs of each contender's per-run ratios (the machine drifts between runs)."""
    per = [ratios(r, **kw) for r in runs]
    names = dict.fromkeys(n for p in per for n in p)
    def med(vals):
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None
    return {n: tuple(med([p[n][i] for p in per if n in p]) for i in range(2)) for n in names}


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(rows, ratio, columns=None):
    """A markdown table: one row per contender. ``rows``: {name: summary dict with s, first_s, rss_gib,
    rel_l2, note; or {"failed": why} / {"skipped": why}}; ``ratio``: median_ratios' output."""
    columns = columns or [("s/eval", "s", ".3f"), ("first call s", "first_s", ".1f"),
                          ("peak RSS GiB", "rss_gib", ".2f"), ("rel. L2 vs " + REFERENCE, "rel_l2", ".2e")]
    head = ["contender"] + [c[0] for c in columns] + ["x " + REFERENCE, "x best peer same precision", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in rows.items():
        if "failed" in r or "skipped" in r:
            cells = [name] + ["-"] * (len(columns) + 2) + ["FAILED: " + r["failed"] if "failed" in r else r["skipped"]]
        else:
            x_ref, x_peer = ratio.get(name, (None, None))
            cells = [name] + [_fmt(r.get(k), s) for _, k, s in columns] + [
                _fmt(x_ref, ".2f"), _fmt(x_peer, ".2f"), r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def atomic_write_json(path, obj):
    """Write ``obj`` as JSON to ``path`` through a temporary name in the same folder."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


# --- scaling table and plot -------------------------------------------------------------------

def scaling_table(results):
    """Markdown: one row per (size, batch) point, s/eval and peak RSS GiB of every contender."""
    names = list(dict.fromkeys(n for p in results for n in p["rows"]))
    head = ["pixels", "batch"] + [f"{n} s / GiB" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for p in results:
        cells = [f"{p['height']}x{p['width']}", str(p["batch"])]
        for n in names:
            r = p["rows"].get(n, {})
            cells.append("skipped" if "skipped" in r else "failed" if "failed" in r or not r else
                         f"{r['s']:.2f} / {r['rss_gib']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_scaling(results, out, header):
    """``out``.md (the table, the skip lines) and ``out``.png (time and peak RSS against pixels, one
    line per contender and batch), each written under a temporary name and renamed."""
    lines = [f"# UNet evaluation time and peak RSS vs size\n\n{header}\n", scaling_table(results), ""]
    for p in results:
        for n, r in p["rows"].items():
            if "skipped" in r or "failed" in r:
                lines.append(f"- {p['height']}x{p['width']} batch {p['batch']}: {r.get('skipped') or 'FAILED ' + r['failed']}")
    tmp = f"{out}.md.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, out + ".md")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    names = list(dict.fromkeys(n for p in results for n in p["rows"]))
    for n in names:
        for b in sorted({p["batch"] for p in results}):
            pts = [(p["height"] * p["width"], p["rows"][n]) for p in results if p["batch"] == b
                   and "s" in p["rows"].get(n, {})]
            if pts:
                xs = [x for x, _ in pts]
                axes[0].plot(xs, [r["s"] for _, r in pts], "o-", label=f"{n} b{b}")
                axes[1].plot(xs, [r["rss_gib"] for _, r in pts], "o-", label=f"{n} b{b}")
    for ax, y in zip(axes, ("s / evaluation", "peak RSS GiB")):
        ax.set_xlabel("pixels (height x width)")
        ax.set_ylabel(y)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out + ".png.tmp.png")
    os.replace(out + ".png.tmp.png", out + ".png")
    plt.close(fig)
