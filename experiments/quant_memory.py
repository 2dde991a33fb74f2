"""Peak memory of one guided UNet evaluation with compressed weights: do they stay compressed?

Full-size SD 1.5 UNet with random weights (``unet.init_params(preset("sd15")["unet"], 0)``, rounded to
float16), batch 2 (classifier-free guidance), 64x64 latents, 77x768 context. Variants, each measured in
its own fresh subprocess (peak RSS = VmHWM, ``sdjax.memory.peak_rss_bytes``):

- ``float16``: the baseline, every parameter a float16 array;
- ``palettized6``: conv/linear weights with >= --min-size elements as 6-bit k-means palettes
  (``quant.palettize.kmeans``), everything else float16; targets peak <= 50% of float16's;
- ``int8``: the same weights as W8A16 per-output-channel int8 (``quant.int8.quantize``); target <= 65%.

The weights are drawn one tensor at a time (exactly ``sdjax.params.make_params``' draws), quantized
tensor by tensor by the parent process (not measured) and saved as .npy files of the packed arrays; a
measuring process loads only its own variant's arrays, so it never holds a float copy of a quantized model.

Measuring order (``--order``):
- ``load-first``: load the weights, compile, evaluate (what a script naively does; the compiler's peak
  sits on top of the weights);
- ``compile-first``: compile from abstract shapes (``jax.ShapeDtypeStruct``s), return the compiler's
  freed heap (``malloc_trim``), then load the weights and evaluate; the peak is then the larger of
  (runtime + compiler) and (runtime + weights + the forward's buffers);
- ``cached``: a warm-up process compiles (from abstract shapes) into JAX's persistent compilation cache
  (WORKDIR/jax-cache); the measured process then gets the executable from the cache, as a shipped app
  with an ahead-of-time compiled model would, and never runs the compiler.

``--stage`` (comma list; each combination is its own run) decides how every conv/linear weight reaches
its layer: ``none`` is the weight as it is (sdjax/nn.py today). XLA is then free to schedule each
weight's expansion (dequantization, and even the float16 -> float32 conversion XLA:CPU inserts for every
float16 matmul/convolution) anywhere before its use, and it hoists them to the program start: the
compiled program keeps every expanded float32 weight alive at once. ``barrier`` and ``dep`` wrap the
weights in ``Staged`` (defined here, not in quant/ or sdjax/): ``barrier`` passes the layer input and the
weight through ``lax.optimization_barrier`` (XLA:CPU drops it without keeping the order: no effect),
``dep`` adds ``0 * x[first element]`` to the weight's float leaves, a data dependence on the layer input
that XLA cannot fold away, so each expansion happens just before its layer. ``temp MiB`` in the table
is the compiled program's temporary buffer size (``compiled.memory_analysis()``), the direct read-out of
whether expansions pile up. Ratios are taken against the float16 run of the same order and stage.

The output of each variant is compared with the float16 one (max |diff|) as a sanity check.

Measured at full size (jax 0.10.2, XLA:CPU, 2 shared cores; peak RSS MiB, ratio to the float16 run of the
same order and stage; weights 1639 / 615 / 821 MiB for float16 / palettized6 / int8):

    order          stage  float16  palettized6      int8           temp MiB
    load-first     none      5566  4558 (0.82)  4740 (0.85)        3332
    compile-first  none      5733  4536 (0.79)  4755 (0.83)        3332
    cached         none      5558  4505 (0.81)  4645 (0.84)        3332
    load-first     dep       2590  1628 (0.63)  1834 (0.71)         335
    compile-first  dep       2654  1607 (0.61)  1788 (0.67)         335
    cached         dep       2515  1556 (0.62)  1713 (0.68)         335

With the weights as they are, XLA:CPU hoists every expansion (for float16 too: the float32 copy it makes
for each float16 matmul/convolution) and keeps all of them alive: 3.3 GB of temporaries. Tied to their
layer input ("dep") the temporaries are 0.33 GB and the quantized weights stay compressed. sdjax/nn.py
now does this itself (``nn._after_input``), so stage ``none`` is the tied form and ``dep`` ties twice.

``floor MiB`` is the process's RSS just before the weights are loaded (imports, the executable, the
compiler's leftovers; after ``malloc_trim``), and ``above floor`` the ratio of (peak - floor) to the same
difference of the float16 run: what the model itself adds. Measured again with today's nn.py (the machine
shared with a training run; RSS does not depend on that):

    python experiments/quant_memory.py --config sd15 --order cached --stage none --reps 1

    variant      order   weights MiB  temp MiB  floor MiB  peak RSS MiB  / float16  above floor
    float16      cached       1639.4       335        331          2559      1.000        1.000
    palettized6  cached        615.4       335        397          1497      0.585        0.494
    int8         cached        821.4       335        347          1704      0.666        0.609

The targets (peak <= 0.50 / 0.65 of float16's) are missed on the whole-process peak and met above the
floor. On XLA:CPU the whole-process 0.50 cannot be met by any weight format, because of what every run
needs besides its weights. If both runs need C MiB besides weights W, the palettized peak is at most
0.50 of float16's only when C <= (0.50 * 1639 - 615) / 0.50 = 409 MiB (int8: (0.65 * 1639 - 821) / 0.35 =
698 MiB); the script prints these budgets under its table. Measured, C is 881-919 MiB, and 331-397 of it
is there before the first weight is loaded: 183 MiB for Python, jax and the initialised CPU backend, the
rest the loaded executable, which XLA:CPU keeps at about 100 KiB per compiled kernel
(``--kernel-cost``: 1200 fusion kernels kept 111 MiB; the UNet has about 2150). That leaves 12-78 MiB of
the 409 for the forward pass itself, whose activations, one layer's expansion and attention block
alone take 335 MiB. What the method controls is the part above the floor (the weights, their expansion,
the forward's buffers): 0.494 and 0.609 of float16's. Chunking the GEGLU feed-forward over tokens
(diffusers' forward chunking) cut float16's temporaries to 288 MiB with a cap on im2col sizes, but raised
the quantized runs' to 412-429 MiB (both feed-forward weights expanded inside the loop body at once);
computing convolutions as one matmul per kernel tap instead of over im2col patches left them at
333-360 MiB (XLA still expands the whole weight) and added 60 MiB of executable. Neither was kept.

On an accelerator the child processes also read the device's memory (``device_memory``: the
allocator's peak since the process started, autotuning scratch included, with
XLA_PYTHON_CLIENT_PREALLOCATE=false so the allocator takes only what is used), and the script prints
those ratios under the table. That memory is what a GPU user runs out of; the host RSS there is
the CUDA runtime's (1.7-1.9 GiB before any weight), not the model's. Measured on one NVIDIA H100
(jax 0.11.2, 16 CPU cores; ``--order compile-first --stage none --reps 2``):

    variant      device peak MiB  / float16  weights MiB  temp MiB  s/eval
    float16                 1821      1.000       1639.4       129    0.02
    palettized6              821      0.451        615.4       178    0.03
    int8                    1025      0.563        821.4       130    0.02

Both targets hold on the GPU's memory. The first run there gave palettized6 1668 MiB (0.916): with
only the LUT tied to the layer input, XLA:GPU ran each weight's index unpacking (which reads only the
packed bytes) at the program start and kept all of them, 898 MiB of temporaries; ``nn._after_input``
now ties the integer leaves too (the CPU run above is unchanged by it: 335 MiB of temporaries).

    python experiments/quant_memory.py                               # full size, all orders x stages none, dep (~30 min)
    python experiments/quant_memory.py --config small --reps 1       # a quick check
    python experiments/quant_memory.py --variants float16,int8 --order cached --stage dep
    python experiments/quant_memory.py --kernel-cost                 # RSS kept per compiled kernel (~10 s)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from sdjax.files import atomic_write_json  # noqa: E402
from sdjax.memory import rss_bytes as current_rss_bytes  # noqa: E402  (coreml_export reads it here too)

GIB = 2 ** 30
MIB = 2 ** 20
VARIANTS = ("float16", "palettized6", "int8")
ORDERS = ("load-first", "compile-first", "cached")
STAGES = ("none", "barrier", "dep")
TARGETS = {"palettized6": 0.50, "int8": 0.65}  # peak RSS / float16 peak RSS
# size overrides of the sd15 UNet config; latent side; context length
CONFIGS = {
    "sd15": (dict(), 64, 77),
    "small": (dict(block_out_channels=(128, 256, 512, 512), attention_head_dim=8), 32, 77),
    "tiny": (dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
                  cross_attention_dim=32, attention_head_dim=2, sample_size=16), 16, 8),
    "micro": (dict(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                   up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, norm_num_groups=8,
                   cross_attention_dim=32, attention_head_dim=2, sample_size=8), 8, 8),  # for tests
    # SDXL base (2.57 B parameters), 1024x1024 images; and a tiny SDXL-shaped one for checks
    "sdxl": (dict(), 128, 77),
    "sdxl-micro": (dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
                        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=32,
                        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
                        sample_size=16), 16, 8),
}
BASES = {"sdxl": "sdxl", "sdxl-micro": "sdxl"}   # the preset a config overrides (sd15 otherwise)
SDXL_TIME_IDS = 6                                # SDXL base's micro-conditioning values per sample


def unet_config(name):
    from sdjax import configs
    overrides, _, _ = CONFIGS[name]
    return dataclasses.replace(configs.preset(BASES.get(name, "sd15"))["unet"], **overrides)


def inputs(name, cfg):
    """(sample NHWC, timesteps, context, added_cond) of one guided evaluation: batch 2, fixed seed.
    ``added_cond`` (SDXL: pooled text embeddings and the six micro-conditioning values) is None for SD."""
    import jax.numpy as jnp
    _, side, ctx_len = CONFIGS[name]
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((2, side, side, cfg.in_channels), np.float32)
    ctx = rng.standard_normal((2, ctx_len, cfg.cross_attention_dim), np.float32)
    added = None
    if cfg.is_sdxl:
        pooled = cfg.projection_class_embeddings_input_dim - SDXL_TIME_IDS * cfg.addition_time_embed_dim
        side_px = side * 8
        added = {"text_embeds": jnp.asarray(rng.standard_normal((2, pooled), np.float32)),
                 "time_ids": jnp.asarray([[side_px, side_px, 0, 0, side_px, side_px]] * 2, jnp.float32)}
    return jnp.asarray(x), jnp.asarray([500.0, 500.0], jnp.float32), jnp.asarray(ctx), added


# --- prepare: draw, quantize and save tensor by tensor ------------------------------------------

def draw(name, shape, index, seed):
    """The float32 tensor ``sdjax.params.make_params`` draws for parameter number ``index``."""
    from sdjax.params import _is_embedding
    rng = np.random.default_rng([seed, index])
    if name.endswith("bias"):
        return np.zeros(shape, np.float32)
    if len(shape) == 1:
        return np.ones(shape, np.float32)
    if _is_embedding(name):
        return rng.standard_normal(shape, dtype=np.float32) * 0.02
    fan_in = int(np.prod(shape[:-1]))
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(fan_in))


def quantizable(name, shape, min_size):
    return name.endswith(".weight") and len(shape) in (2, 4) and int(np.prod(shape)) >= min_size


def prepare(config, workdir, nbits, min_size, seed=0, progress=True, variants=VARIANTS):
    """Write workdir/<variant>/manifest.json + one .npy per array, for every one of ``variants`` (skipped
    when a manifest with the same settings exists). ``nbits``: the palettized variant's bits, one for
    every quantizable weight or ``{parameter name: bits}`` (a name it lacks, or 16, stays float16)."""
    import jax
    from tqdm.auto import tqdm

    from quant import int8, palettize
    from sdjax import unet

    settings = dict(config=config, nbits=nbits, min_size=min_size, seed=seed)
    variants = [v for v in VARIANTS if v in variants]
    done = all(_read_manifest(workdir, v).get("settings") == settings for v in variants)
    if done:
        return
    shapes = unet.param_shapes(unet_config(config))
    manifests = {v: dict(settings=settings, entries=[]) for v in variants}
    for v in variants:
        os.makedirs(os.path.join(workdir, v), exist_ok=True)

    def save(variant, i, key, a):
        fn = f"{i:04d}.{key}.npy"
        np.save(os.path.join(workdir, variant, fn), np.asarray(a))
        return fn

    def dense(variant, i, name, shape, w16):
        manifests[variant]["entries"].append(dict(name=name, kind="dense", shape=list(shape),
                                                  files={"value": save(variant, i, "value", w16)}))

    t0 = time.perf_counter()
    for i, (name, shape) in enumerate(tqdm(list(shapes.items()), desc="prepare", disable=not progress)):
        w = draw(name, shape, i, seed)
        w16 = w.astype(np.float16)
        if "float16" in manifests:
            dense("float16", i, name, shape, w16)
        quantized = [v for v in manifests if v != "float16"]
        if not quantizable(name, shape, min_size):
            for v in quantized:
                dense(v, i, name, shape, w16)
            continue
        if "palettized6" in manifests:
            bits = nbits if isinstance(nbits, int) else nbits.get(name, 16)
            if bits == 16:
                dense("palettized6", i, name, shape, w16)
            else:
                pw = palettize.kmeans(w16, bits)
                manifests["palettized6"]["entries"].append(dict(
                    name=name, kind="palettized", shape=list(shape), nbits=bits,
                    files={"packed": save("palettized6", i, "packed", pw.packed),
                           "lut": save("palettized6", i, "lut", pw.lut)}))
                del pw
        if "int8" in manifests:
            qw = int8.quantize(w16)
            jax.block_until_ready(qw.data)
            manifests["int8"]["entries"].append(dict(
                name=name, kind="int8", shape=list(shape),
                files={"data": save("int8", i, "data", qw.data), "scale": save("int8", i, "scale", qw.scale)}))
            del qw
        del w, w16
    for v, m in manifests.items():
        m["prepare_seconds"] = time.perf_counter() - t0
        path = os.path.join(workdir, v, "manifest.json")
        atomic_write_json(path, m, indent=None)


def _read_manifest(workdir, variant):
    try:
        with open(os.path.join(workdir, variant, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# --- the measured process --------------------------------------------------------------------

def _staged_type():
    import flax.struct
    import jax
    import jax.numpy as jnp

    from sdjax import nn

    @flax.struct.dataclass
    class Staged:
        """A weight (float array or compressed) whose expansion is tied to its layer's input, so XLA
        cannot expand it before that input exists: expansions then happen layer by layer instead of
        all at the program start. ``how``:

        - "barrier": ``lax.optimization_barrier((x, w))`` before expanding. XLA:CPU's
          OptimizationBarrierExpander removes the barrier without keeping the order, so this does
          nothing there (measured; kept to show it);
        - "dep": a data dependence XLA cannot fold away: ``0 * x[first element]`` (not 0 for inf/nan
          x, so never simplified) is added to the weight's float leaves (a palette's LUT, int8
          scales, or, for a float array, the array itself, fused into the conversion XLA inserts).

        The change this stands for belongs in ``sdjax/nn.py`` (``linear``/``conv2d``, before
        ``_dense(w, x.dtype)``)."""
        inner: object
        how: str = flax.struct.field(pytree_node=False, default="dep")

        @property
        def shape(self):
            return self.inner.shape

        @property
        def ndim(self):
            return len(self.inner.shape)

        def dequantize(self, dtype):
            w = self.inner
            return w.dequantize(dtype) if hasattr(w, "dequantize") else w.astype(dtype)

        def _tied(self, x):
            if self.how == "barrier":
                return jax.lax.optimization_barrier((x, self.inner))
            dep = x.reshape(-1)[0].astype(jnp.float32) * 0
            tie = lambda a: a + dep.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
            return x, jax.tree.map(tie, self.inner)

        def linear(self, x):
            x, inner = self._tied(x)
            return nn.linear(x, {"weight": Staged(inner, self.how).dequantize(x.dtype)})

        def conv2d(self, x, stride, padding):
            x, inner = self._tied(x)
            return nn.conv2d(x, {"weight": Staged(inner, self.how).dequantize(x.dtype)}, stride, padding)

    return Staged


def build_params(workdir, variant, abstract=False, stage="none"):
    """The variant's UNet params from its manifest: arrays loaded one file at a time, or (abstract)
    ``jax.ShapeDtypeStruct``s with the same tree, for compiling before anything is loaded."""
    import jax
    import jax.numpy as jnp

    from quant.int8 import Int8Weight
    from quant.palettize import PalettizedWeight
    from sdjax import nn

    m = _read_manifest(workdir, variant)
    if not m:
        raise SystemExit(f"{workdir}/{variant}: no manifest; run prepare first")
    Staged = _staged_type()

    def get(fn):
        path = os.path.join(workdir, variant, fn)
        if abstract:
            a = np.load(path, mmap_mode="r")  # header only: nothing is read
            return jax.ShapeDtypeStruct(a.shape, a.dtype)
        a = np.load(path)
        out = jnp.asarray(a)
        del a
        return out

    flat = {}
    for e in m["entries"]:
        f = e["files"]
        if e["kind"] == "dense":
            leaf = get(f["value"])
        elif e["kind"] == "palettized":
            leaf = PalettizedWeight(packed=get(f["packed"]), lut=get(f["lut"]), shape=tuple(e["shape"]),
                                    nbits=e["nbits"])
        else:
            leaf = Int8Weight(data=get(f["data"]), scale=get(f["scale"]))
        if stage != "none" and quantizable(e["name"], e["shape"], 0):  # every conv/linear weight
            leaf = Staged(leaf, stage)
        flat[e["name"]] = leaf
    return nn.unflatten(flat)


def tree_nbytes(tree):
    import jax
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def child(config, workdir, variant, order, stage, reps, out_path, warm_only=False):
    import jax

    from sdjax import unet
    from sdjax.memory import peak_rss_bytes, release_freed_memory

    if order == "cached":  # the executable comes from the persistent cache a warm-up process filled
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax-cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    cfg = unet_config(config)
    x, t, ctx, added = inputs(config, cfg)
    r = dict(variant=variant, order=order, stage=stage, rss_after_imports=peak_rss_bytes())
    f = jax.jit(unet.apply, static_argnums=1)

    def compile_(params):
        t0 = time.perf_counter()
        compiled = f.lower(params, cfg, x, t, ctx, added_cond=added).compile()
        r["compile_s"] = time.perf_counter() - t0
        try:
            ma = compiled.memory_analysis()
            r["temp_bytes"] = int(ma.temp_size_in_bytes)
            r["generated_code_bytes"] = int(ma.generated_code_size_in_bytes)
        except Exception:  # not every backend reports it
            r["temp_bytes"] = None
        release_freed_memory()
        r["peak_after_compile"] = peak_rss_bytes()
        return compiled

    if order in ("compile-first", "cached"):
        compiled = compile_(build_params(workdir, variant, abstract=True, stage=stage))
        if warm_only:
            print("RESULT " + json.dumps(r), flush=True)
            return
    release_freed_memory()
    r["rss_before_weights"] = current_rss_bytes()  # the runtime's floor: imports (+ executable)
    t0 = time.perf_counter()
    params = build_params(workdir, variant, stage=stage)
    jax.block_until_ready(params)
    r["load_s"] = time.perf_counter() - t0
    r["weights_bytes"] = tree_nbytes(params)
    r["rss_after_load"] = current_rss_bytes()
    if order == "load-first":
        compiled = compile_(params)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = compiled(params, x, t, ctx, added_cond=added)
        out.block_until_ready()
        times.append(time.perf_counter() - t0)
    r["eval_s"] = min(times)
    r["times"] = times
    r["peak_rss"] = peak_rss_bytes()
    r["rss_end"] = current_rss_bytes()
    r.update(device_memory(params, compiled))
    np.save(out_path, np.asarray(out, np.float32))
    print("RESULT " + json.dumps(r), flush=True)


def child_torch(config, workdir, reps, out_path):
    """The same evaluation in diffusers/PyTorch (float32 compute, what a CPU user runs) on the float16
    variant's weights: the alternative a user would pick, on the same weights and inputs."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdjax import configs
    from sdjax.memory import peak_rss_bytes
    from sdjax.params import sdjax_to_torch

    cfg = unet_config(config)
    x, t, ctx, added = inputs(config, cfg)
    r = dict(variant="diffusers", order="load-first", stage="none", rss_after_imports=peak_rss_bytes(),
             temp_bytes=None, peak_after_compile=0, threads=torch.get_num_threads())
    with torch.device("meta"):
        m = UNet2DConditionModel.from_config(configs.to_dict(cfg))
    r["rss_before_weights"] = current_rss_bytes()
    t0 = time.perf_counter()
    state = {}
    for e in _read_manifest(workdir, "float16")["entries"]:
        a = np.load(os.path.join(workdir, "float16", e["files"]["value"]))
        state[e["name"]] = torch.from_numpy(np.ascontiguousarray(sdjax_to_torch(e["name"], a), np.float32))
        del a
    m.load_state_dict(state, assign=True, strict=True)
    del state
    m.eval()
    r["load_s"] = time.perf_counter() - t0
    r["weights_bytes"] = sum(p.numel() * p.element_size() for p in m.parameters())
    tt = lambda a: torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    args = (tt(np.asarray(x).transpose(0, 3, 1, 2)), tt(t), tt(ctx))
    kw = {} if added is None else {"added_cond_kwargs": {k: tt(v) for k, v in added.items()}}
    times = []
    with torch.inference_mode():
        for i in range(reps + 1):
            t0 = time.perf_counter()
            out = m(*args, **kw).sample
            times.append(time.perf_counter() - t0)
    r["compile_s"], r["times"] = times[0], times[1:]   # the first call stands for compilation
    r["eval_s"] = min(times[1:])
    r["peak_rss"] = peak_rss_bytes()
    np.save(out_path, out.numpy().transpose(0, 2, 3, 1))
    print("RESULT " + json.dumps(r), flush=True)


def device_memory(params, compiled):
    """On an accelerator, the device's own memory (what the RSS is on CPU): its allocator's peak
    since the process started (compilation's autotuning scratch included), the bytes the weights
    hold there, and the program's temporaries -> ``device_*`` fields; nothing on CPU."""
    import jax
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return {}
    stats = dev.memory_stats() or {}
    out = dict(device=dev.device_kind, device_peak=stats.get("peak_bytes_in_use"),
               device_in_use_end=stats.get("bytes_in_use"), device_weights=tree_nbytes(params))
    try:
        out["device_temp"] = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:
        out["device_temp"] = None
    return out


def run_child(args, variant, order, stage, warm_only=False):
    out_path = os.path.join(args.workdir, f"out-{variant}-{order}-{stage}.npy")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--config", args.config,
           "--workdir", args.workdir, "--order", order, "--reps", str(args.reps), "--out-npy", out_path]
    cmd += ["--stage", stage]
    if warm_only:
        cmd.append("--warm-only")
    t0 = time.perf_counter()
    # an accelerator's allocator then takes what is used, not 75% of the device up front
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not line:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"variant {variant} ({order}) failed with exit code {p.returncode}")
    r = json.loads(line[-1][7:])
    r["wall_s"] = time.perf_counter() - t0
    if warm_only:
        return r
    r["out_npy"] = out_path
    return r


def table(results, file=None):
    p = lambda *a: print(*a, file=file or sys.stdout)
    p(f"{'variant':<12} {'order':<13} {'stage':>7} {'weights MiB':>11} {'temp MiB':>9} {'compile peak':>12} "
      f"{'floor MiB':>9} {'peak RSS MiB':>12} {'/ float16':>9} {'above floor':>11} {'/ f16 none':>10} {'target':>7} {'pass':>5} {'compile s':>9} {'s/eval':>7} {'max|diff|':>10}")
    for r in results:
        target = TARGETS.get(r["variant"])
        ratio = r.get("ratio")
        ok = "" if target is None or ratio is None else ("PASS" if ratio <= target else "FAIL")
        temp = "n/a" if r.get("temp_bytes") is None else f"{r['temp_bytes'] / MIB:9.0f}"
        f16n = "" if r.get("ratio_f16_none") is None else f"{r['ratio_f16_none']:.3f}"
        diff = "" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.3g}"
        p(f"{r['variant']:<12} {r['order']:<13} {r['stage']:>7} {r['weights_bytes'] / MIB:11.1f} "
          f"{temp:>9} {r['peak_after_compile'] / MIB:12.0f} {r['rss_before_weights'] / MIB:9.0f} {r['peak_rss'] / MIB:12.0f} "
          f"{'' if ratio is None else f'{ratio:.3f}':>9} {r.get('ratio_above_floor') or 0:11.3f} {f16n:>10} {'' if target is None else f'<={target:.2f}':>7} {ok:>5} "
          f"{r['compile_s']:9.1f} {r['eval_s']:7.2f} {diff:>10}")


def kernel_cost(blocks=(200, 600)):
    """RSS an XLA:CPU executable keeps per compiled kernel: compile programs of ``blocks`` small
    matmul + elementwise blocks (each two fusions), return the freed compiler heap, and report
    the RSS each executable kept, per fusion."""
    import jax
    import jax.numpy as jnp

    from sdjax.memory import release_freed_memory

    x = jnp.ones((64, 64), jnp.float32)
    (x + 1).block_until_ready()
    rows, keep = [], []
    for n in blocks:
        def prog(a, n=n):
            for i in range(n):
                a = jnp.tanh(a @ a * (i + 1.5)) + jnp.sin(a) * i
            return a
        release_freed_memory()
        before = current_rss_bytes()
        compiled = jax.jit(prog).lower(x).compile()
        release_freed_memory()
        kept = current_rss_bytes() - before
        keep.append(compiled)  # alive while the next one is measured
        fusions = compiled.as_text().count("fusion(")
        rows.append(dict(blocks=n, fusions=fusions, kept_bytes=kept, per_fusion_bytes=kept / max(fusions, 1)))
    return rows


def budget(weights_q, weights_f16, target):
    """The most memory, besides its weights, a quantized run may use for its peak to be ``target``
    times the float16 run's, when both runs need the same memory besides their weights (runtime,
    executable, activations): ``W_q + C <= target * (W_f16 + C)``."""
    return (target * weights_f16 - weights_q) / (1 - target)


def budget_lines(results):
    """What a whole-process target leaves for everything that is not a weight, beside what each
    run used: peak - weights, of which the floor (imports, runtime, executable) is there before a
    weight is loaded."""
    out = []
    for r in results:
        if r["variant"] not in TARGETS:
            continue
        base = [q for q in results if q["variant"] == "float16" and q["order"] == r["order"] and q["stage"] == r["stage"]]
        if not base:
            continue
        b = base[0]
        allowed = budget(r["weights_bytes"], b["weights_bytes"], TARGETS[r["variant"]])
        out.append(f"{r['variant']} ({r['order']}, {r['stage']}): peak <= {TARGETS[r['variant']]:.2f} x float16 leaves "
                   f"{allowed / MIB:.0f} MiB besides the weights; this run used {(r['peak_rss'] - r['weights_bytes']) / MIB:.0f} "
                   f"(floor {r['rss_before_weights'] / MIB:.0f}), float16 {(b['peak_rss'] - b['weights_bytes']) / MIB:.0f} "
                   f"(floor {b['rss_before_weights'] / MIB:.0f})")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma list of {', '.join(VARIANTS)}, diffusers (PyTorch float32 on the float16 weights)")
    ap.add_argument("--order", default="load-first,compile-first,cached",
                    help="comma list of load-first / compile-first / cached (see the docstring)")
    ap.add_argument("--stage", default="none,dep",
                    help="comma list of none / barrier / dep: how conv/linear weights are tied to their layer's "
                         "input (see the docstring)"),
    ap.add_argument("--nbits", type=int, default=6)
    ap.add_argument("--min-size", type=int, default=16384, help="quantize conv/linear weights with >= this many elements")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="prepared weights and outputs (default /tmp/sdjax-quant-memory-CONFIG)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--kernel-cost", action="store_true",
                    help="only measure the RSS an XLA:CPU executable keeps per compiled kernel, and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out-npy", help=argparse.SUPPRESS)
    ap.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workdir = args.workdir or f"/tmp/sdjax-quant-memory-{args.config}"
    if args.kernel_cost:
        rows = kernel_cost()
        for r in rows:
            print(f"{r['blocks']:4d} blocks: {r['fusions']:5d} fusion kernels, executable keeps "
                  f"{r['kept_bytes'] / MIB:6.1f} MiB ({r['per_fusion_bytes'] / 1024:.0f} KiB per kernel)")
        return rows
    if args.child == "diffusers":
        return child_torch(args.config, args.workdir, args.reps, args.out_npy)
    if args.child:
        return child(args.config, args.workdir, args.child, args.order, args.stage, args.reps, args.out_npy,
                     args.warm_only)

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS) - {"diffusers"}
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
    if "float16" not in variants:
        variants.insert(0, "float16")  # the reference of every ratio
    orders = [o for o in args.order.split(",") if o]
    if not orders or set(orders) - set(ORDERS):
        ap.error(f"--order: a comma list of {', '.join(ORDERS)}")
    stages = [t for t in args.stage.split(",") if t]
    if not stages or set(stages) - set(STAGES):
        ap.error(f"--stage: a comma list of {', '.join(STAGES)}")

    os.makedirs(args.workdir, exist_ok=True)
    print(f"preparing weights in {args.workdir} ...", file=sys.stderr, flush=True)
    # here, one tensor at a time: this process never holds more than one float tensor, and its
    # memory is not what is measured
    prepare(args.config, args.workdir, args.nbits, args.min_size, progress=not args.no_progress, variants=variants)

    results = []
    for order in orders:
        for stage in stages:
            base = None
            for variant in variants:
                if variant == "diffusers" and (order, stage) != (orders[0], stages[0]):
                    continue  # PyTorch has no compile order or staging: measured once
                print(f"running {variant} ({order}, stage {stage}) ...", file=sys.stderr, flush=True)
                if order == "cached" and variant != "diffusers":
                    warm = run_child(args, variant, order, stage, warm_only=True)
                r = run_child(args, variant, order, stage)
                if order == "cached" and variant != "diffusers":
                    r["warm_compile_s"] = warm["compile_s"]
                if variant == "float16":
                    base = r
                r["ratio"] = r["peak_rss"] / base["peak_rss"]
                # what the model adds on top of the process's floor (imports + executable), vs float16's
                r["ratio_above_floor"] = ((r["peak_rss"] - r["rss_before_weights"])
                                          / (base["peak_rss"] - base["rss_before_weights"]))
                ref, out = np.load(base["out_npy"]), np.load(r["out_npy"])
                r["max_abs_diff"] = float(np.max(np.abs(out - ref)))
                r["ref_absmax"] = float(np.max(np.abs(ref)))
                r["finite"] = bool(np.isfinite(out).all())
                if variant in TARGETS:
                    r["target"], r["pass"] = TARGETS[variant], r["ratio"] <= TARGETS[variant]
                if r.get("device_peak") and base.get("device_peak"):
                    r["device_ratio"] = r["device_peak"] / base["device_peak"]
                results.append(r)
    for r in results:  # also against the float16 run as sdjax/nn.py is today (same order, stage none)
        b = [q for q in results if q["variant"] == "float16" and q["order"] == r["order"] and q["stage"] == "none"]
        r["ratio_f16_none"] = r["peak_rss"] / b[0]["peak_rss"] if b else None

    _, side, ctx_len = CONFIGS[args.config]
    cfg = unet_config(args.config)
    print(f"\n{args.config} UNet (block_out_channels {cfg.block_out_channels}), batch 2, {side}x{side} latents, "
          f"{ctx_len}x{cfg.cross_attention_dim} context, {os.cpu_count()} CPU cores; palettized {args.nbits}-bit and "
          f"int8 W8A16 on conv/linear weights >= {args.min_size} elements, the rest float16")
    table(results)
    f16 = [r for r in results if r["variant"] == "float16"]
    if f16:
        print(f"(float16 reference output max|x| {f16[0]['ref_absmax']:.3g}; RSS after imports "
              f"{f16[0]['rss_after_imports'] / MIB:.0f} MiB)")
    for line in budget_lines(results):
        print(line)
    dev = [r for r in results if r.get("device_peak")]
    if dev:
        print(f"\ndevice memory ({dev[0]['device']}; allocator peak since process start, and the weights + "
              f"temporaries of the evaluation program):")
        for r in dev:
            target = TARGETS.get(r["variant"])
            ratio = r.get("device_ratio")
            verdict = "" if target is None or ratio is None else (" PASS" if ratio <= target else " FAIL")
            temp = "n/a" if r.get("device_temp") is None else f"{r['device_temp'] / MIB:.0f}"
            print(f"  {r['variant']:<12} {r['order']:<13} {r['stage']:>5}: peak {r['device_peak'] / MIB:7.0f} MiB"
                  f"{'' if ratio is None else f' ({ratio:.3f} of float16)'}{'' if target is None else f' target <={target:.2f}'}"
                  f"{verdict}; weights {r['device_weights'] / MIB:.0f} MiB + temporaries {temp} MiB")
    if args.json:
        atomic_write_json(args.json, dict(config=args.config, nbits=args.nbits, min_size=args.min_size, results=results))
    return results


if __name__ == "__main__":
    main()
