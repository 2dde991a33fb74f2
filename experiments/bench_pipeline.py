"""A guided text-to-image generation at full SD 1.5 size (random weights), end to end: sdjax vs diffusers/PyTorch
vs OpenVINO, the same weights, token ids and x_T for all.

The random pipeline (``sdjax.pipeline.random("sd15")``: text encoder, UNet, VAE) is written once as a diffusers
folder that every contender loads. One generation: the text encoder on fixed token ids (the random model has no
tokenizer: the negative prompt is BOS+EOS, the prompt 12 fixed ids), --steps guided dpmpp_2m calls (the same
scheduler config on both sides, diffusers' DPMSolverMultistepScheduler for the peers), the VAE decode.

    sdjax-fp32, sdjax-bf16        sdjax's own loop (host-driven, one compiled step), jitted text encoder and decode
    pytorch-fp32, pytorch-bf16    transformers CLIPTextModel, diffusers UNet2DConditionModel and AutoencoderKL
                                  (the loop of StableDiffusionPipeline.__call__)
    openvino-bf16                 the UNet and the VAE decoder converted by hand with openvino.convert_model and
                                  compiled with INFERENCE_PRECISION_HINT bf16; the text encoder and the scheduler
                                  stay PyTorch float32 (optimum-intel is not used)

Per row: the warm end-to-end time (text encoder + steps x median step + VAE decode, each measured warm), the cold
first generation (compilation included), s/step, VAE decode, peak RSS, and the decoded image's relative L2 error
against pytorch-fp32's. sdjax rows also compare the host-driven loop with the loop as one program (3 steps) and
check that a new guidance scale and seed reuse the compiled step. Skips, memory estimate, --runs and --json as
bench_unet.py.

    python experiments/bench_pipeline.py --steps 20
    python experiments/bench_pipeline.py --contenders sdjax-fp32,pytorch-fp32 --height 256 --width 256 --steps 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

HERE = os.path.abspath(__file__)
CONTENDERS = {n: bc.CONTENDERS[n] for n in ("pytorch-fp32", "pytorch-bf16", "openvino-bf16", "sdjax-fp32",
                                            "sdjax-bf16")}
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
GUIDANCE = 7.5
TEXT_VAE_PARAMS = 123_060_480 + 83_653_863  # CLIP ViT-L/14 text, the whole SD VAE


def token_ids(batch):
    """(2*batch, 77) int32: negative rows (BOS, EOS, EOS padding) first, then the prompts."""
    import numpy as np
    neg = np.full(77, 49407, np.int32)
    neg[0] = 49406
    pos = neg.copy()
    pos[1:13] = np.arange(320, 332) + 7 * np.arange(12)
    return np.stack([neg] * batch + [pos] * batch)


def estimate_bytes(name, h, w, batch):
    """bench_common's UNet estimate + the text encoder and VAE weights (x the contender's bytes per parameter)
    + the VAE decoder's full-resolution feature maps (8 float32 copies of 128 channels per image)."""
    return int(bc.estimate_bytes(name, h, w, 2 * batch) + TEXT_VAE_PARAMS * bc.WEIGHT_BYTES_PER_PARAM[name]
               + batch * h * w * 128 * 4 * 8)


def prepare(workdir, h, w, batch):
    import numpy as np
    from sdjax import checkpoint, pipeline
    folder = os.path.join(workdir, "model")
    if not os.path.isdir(folder):
        pipe = pipeline.random("sd15", seed=0)
        checkpoint.save(checkpoint.Checkpoint(dict(pipe.params), dict(pipe.configs)), folder, progress=False)
    p = os.path.join(workdir, f"xT-{h}x{w}-b{batch}.npy")
    if not os.path.exists(p):
        np.save(p + ".tmp.npy", np.random.default_rng(0).standard_normal((batch, 4, h // 8, w // 8), np.float32))
        os.replace(p + ".tmp.npy", p)
    return {}


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def run_sdjax(name, folder, x_t, ids, steps, loop_check):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import samplers
    from sdjax import checkpoint, clip
    from sdjax import generate as gen
    dtype = "bfloat16" if name == "sdjax-bf16" else "float32"
    p, c = {}, {}
    for comp in ("text_encoder", "unet", "vae"):
        p[comp], c[comp] = checkpoint.load_component(os.path.join(folder, comp), comp, dtype=dtype, progress=False)
    encode = jax.jit(lambda prm, i: clip.apply(prm, c["text_encoder"], i)[0])
    decode = jax.jit(gen.decode_images, static_argnums=1)
    s = samplers.get("dpmpp_2m")
    plan = s.plan(samplers.Schedule.from_config(SCHEDULER), steps)
    g, seed = jnp.float32(GUIDANCE), jnp.uint32(0)
    x0 = jnp.asarray(np.transpose(x_t, (0, 2, 3, 1)))
    ids = jnp.asarray(ids)
    res, t_all = {}, time.perf_counter()
    ctx, res["text_first_s"] = _timed(lambda: encode(p["text_encoder"], ids).block_until_ready())
    state, times = s.init(plan, x0), []
    for _ in range(plan.num_calls):
        t0 = time.perf_counter()
        state = gen.denoise_step(p["unet"], c["unet"], s, plan, state, ctx, g, seed, {})
        state.x.block_until_ready()
        times.append(time.perf_counter() - t0)
    img, res["vae_first_s"] = _timed(lambda: decode(p["vae"], c["vae"], state.x).block_until_ready())
    res["first_gen_s"] = time.perf_counter() - t_all
    _, res["text_s"] = _timed(lambda: encode(p["text_encoder"], ids).block_until_ready())
    _, res["vae_s"] = _timed(lambda: decode(p["vae"], c["vae"], state.x).block_until_ready())
    if loop_check:
        cache = gen.denoise_step._cache_size()
        gen.denoise_step(p["unet"], c["unet"], s, plan, s.init(plan, x0), ctx, jnp.float32(3.0), jnp.uint32(123),
                         {}).x.block_until_ready()
        res["recompiled"] = gen.denoise_step._cache_size() != cache
        plan3 = s.plan(samplers.Schedule.from_config(SCHEDULER), 3)
        run3 = lambda: gen.denoise_loop(p["unet"], c["unet"], s, plan3, s.init(plan3, x0), ctx, g, seed,  # noqa: E731
                                        {}).x.block_until_ready()
        _, res["scan_first_s"] = _timed(run3)
        _, t3 = _timed(run3)
        res["scan_step_s"] = t3 / plan3.num_calls
    res.update(first_step_s=times[0], step_times=times[1:], note=f"jax {jax.__version__}")
    return np.transpose(np.asarray(img, np.float32) * 2 - 1, (0, 3, 1, 2)), res


def _torch_parts(folder, name):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    f32 = torch.float32
    te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), torch_dtype=f32).eval()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=f32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=f32).eval()
    if name == "pytorch-bf16":
        te, unet, vae = (m.to(torch.bfloat16) for m in (te, unet, vae))
    return te, unet, vae


def _openvino_parts(unet, vae, x, ctx):
    """The UNet and the VAE decoder as compiled OpenVINO models (bf16 hint) -> (unet_fn, decode_fn, note)."""
    import openvino as ov
    import torch

    class D(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latents):
            return self.m.decode(latents, return_dict=False)[0]

    core, cfg = ov.Core(), {"INFERENCE_PRECISION_HINT": "bf16"}
    with torch.no_grad():
        xu = torch.cat([x, x])
        cu = core.compile_model(ov.convert_model(bc.tensor_output_unet(unet), example_input=(xu, torch.full((len(xu),), 999.0), ctx)),
                                "CPU", cfg)
        cd = core.compile_model(ov.convert_model(D(vae), example_input=(x,)), "CPU", cfg)
    precision = str(cu.get_property("INFERENCE_PRECISION_HINT"))
    ru, rd = cu.create_infer_request(), cd.create_infer_request()

    def unet_fn(sample, t, c):
        ru.infer([sample.numpy(), t.numpy(), c.numpy()])
        return torch.from_numpy(ru.get_output_tensor(0).data.copy())

    def decode_fn(latents):
        rd.infer([latents.numpy()])
        return torch.from_numpy(rd.get_output_tensor(0).data.copy())

    return unet_fn, decode_fn, f"plugin precision {precision}; text encoder PyTorch fp32"


def run_torch(name, folder, x_t, ids, steps, loop_check):
    import torch
    from diffusers import DPMSolverMultistepScheduler
    torch.manual_seed(0)
    te, unet, vae = _torch_parts(folder, "pytorch-bf16" if name == "pytorch-bf16" else "pytorch-fp32")
    dt = unet.dtype
    sched = DPMSolverMultistepScheduler(**SCHEDULER)
    ids, x = torch.from_numpy(ids.astype("int64")), torch.from_numpy(x_t).to(dt)
    res, note = {}, f"{torch.get_num_threads()} threads"
    sf = vae.config.scaling_factor
    with torch.inference_mode():
        unet_fn = lambda s, t, c: unet(s, t, c, return_dict=False)[0]  # noqa: E731
        decode_fn = lambda z: vae.decode(z, return_dict=False)[0]  # noqa: E731
        if name == "openvino-bf16":
            t0 = time.perf_counter()
            ctx0 = te(ids)[0]
            unet_fn, decode_fn, note = _openvino_parts(unet, vae, x, ctx0)
            res["convert_compile_s"] = time.perf_counter() - t0
            del unet, vae
        t_all = time.perf_counter()
        ctx, res["text_first_s"] = _timed(lambda: te(ids)[0])
        sched.set_timesteps(steps)
        times = []
        for t in sched.timesteps:  # the loop of StableDiffusionPipeline.__call__
            t0 = time.perf_counter()
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            tt = torch.full((len(inp),), float(t))
            u, c = unet_fn(inp, tt, ctx).float().chunk(2)
            x = sched.step(u + GUIDANCE * (c - u), t, x.float()).prev_sample.to(dt)
            times.append(time.perf_counter() - t0)
        img, res["vae_first_s"] = _timed(lambda: decode_fn(x / sf))
        res["first_gen_s"] = time.perf_counter() - t_all + res.get("convert_compile_s", 0.0)
        _, res["text_s"] = _timed(lambda: te(ids)[0])
        _, res["vae_s"] = _timed(lambda: decode_fn(x / sf))
    res.update(first_step_s=times[0], step_times=times[1:], note=note)
    return img.float().clamp(-1, 1).numpy(), res


def child(name, workdir, h, w, batch, steps, loop_check):
    import numpy as np
    from sdjax.memory import peak_rss_bytes
    x_t = np.load(os.path.join(workdir, f"xT-{h}x{w}-b{batch}.npy"))
    runner = run_sdjax if name.startswith("sdjax") else run_torch
    img, res = runner(name, os.path.join(workdir, "model"), x_t, token_ids(batch), steps, loop_check)
    out = os.path.join(workdir, f"img-{name}-{h}x{w}-b{batch}.npy")
    np.save(out + ".tmp.npy", img)
    os.replace(out + ".tmp.npy", out)
    step = statistics.median(res["step_times"]) if res["step_times"] else res["first_step_s"]
    res.update(step_s=step, s=res["text_s"] + steps * step + res["vae_s"], first_s=res["first_gen_s"],
               rss_gib=peak_rss_bytes() / 2**30)
    bc.child_result(res)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="of: " + ", ".join(CONTENDERS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="prompts; the guided UNet call has 2*batch rows")
    ap.add_argument("--runs", type=int, default=1, help="repeat the whole set; ratios are medians of per-run ratios")
    ap.add_argument("--no-loop-check", action="store_true", help="skip sdjax's one-program loop and recompile check")
    ap.add_argument("--workdir", help="weights, x_T and images (default: a new temp folder)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    ap.add_argument("--json", help="write everything here (atomically)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--prepare-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k in ("steps", "height", "width", "batch", "runs"):
        if getattr(args, k) < 1:
            ap.error(f"--{k} must be >= 1; got {getattr(args, k)}")
    for k in ("height", "width"):
        if getattr(args, k) % 64:
            ap.error(f"--{k} must be a multiple of 64 pixels; got {getattr(args, k)}")
    try:
        args.names = bc.parse_contenders(args.contenders, CONTENDERS)
    except bc.BenchError as e:
        ap.error(str(e))
    return args


def run_all(args, cpu, launch=bc.run_child, log=print):
    h, w, b = args.height, args.width, args.batch
    available = bc.mem_available_bytes()
    rows, runnable = {}, []
    for n in args.names:
        why = bc.backend_problem(n, cpu["flags"], table=CONTENDERS)
        need = estimate_bytes(n, h, w, b)
        if not why and available is not None and need > available:
            why = (f"skipped {n} at {h}x{w}, batch {b}: estimated peak {need / 2**30:.1f} GiB > "
                   f"{available / 2**30:.1f} GiB available (MemAvailable)")
        if why:
            log(why)
            rows[n] = {"skipped": why}
        else:
            runnable.append(n)
    runs = []
    if runnable:
        res, err = launch(bc.python_argv(HERE, "--prepare-child", args.workdir, h, w, b), timeout=args.timeout)
        if res is None:
            log(f"preparing the model folder failed: {err}")
            return {n: rows.get(n, {"failed": "preparation failed"}) for n in args.names}, {}, []
    for r in range(args.runs):
        run = {}
        for n in runnable:
            log(f"[run {r + 1}/{args.runs}] {n} ({args.steps} steps) ...")
            argv = bc.python_argv(HERE, "--child", n, args.workdir, h, w, b, "--steps", args.steps)
            res, err = launch(argv + (["--no-loop-check"] if args.no_loop_check else []), timeout=args.timeout)
            if res is None:
                log(f"{n} failed: {err}")
            run[n] = res
        runs.append(run)
    import numpy as np
    img = lambda n: os.path.join(args.workdir, f"img-{n}-{h}x{w}-b{b}.npy")  # noqa: E731
    for n in runnable:
        done = [run[n] for run in runs if run.get(n)]
        if not done:
            rows[n] = {"failed": "see the stderr tail above"}
            continue
        row = {k: statistics.median([d[k] for d in done]) for k in ("s", "first_s", "step_s", "vae_s", "text_s")}
        row.update(rss_gib=max(d["rss_gib"] for d in done), note=done[-1].get("note", ""), rel_l2=None,
                   **{k: done[-1][k] for k in ("recompiled", "scan_step_s", "scan_first_s") if k in done[-1]})
        if any(run.get(bc.REFERENCE) for run in runs) and os.path.exists(img(n)):
            row["rel_l2"] = bc.rel_l2(np.load(img(n)), np.load(img(bc.REFERENCE)))
        rows[n] = row
    return {n: rows[n] for n in args.names}, bc.median_ratios(runs, table=CONTENDERS), runs


COLUMNS = [("end-to-end s (warm)", "s", ".1f"), ("first generation s", "first_s", ".1f"), ("s/step", "step_s", ".2f"),
           ("VAE decode s", "vae_s", ".2f"), ("text enc. s", "text_s", ".3f"), ("peak RSS GiB", "rss_gib", ".2f"),
           ("image rel. L2 vs pytorch-fp32", "rel_l2", ".2e")]


def main(argv=None):
    args = parse_args(argv)
    if args.prepare_child:
        wd, h, w, b = args.prepare_child
        return bc.child_result(prepare(wd, int(h), int(w), int(b)))
    if args.child:
        name, wd, h, w, b = args.child
        return child(name, wd, int(h), int(w), int(b), args.steps, not args.no_loop_check)
    sys.stdout.reconfigure(line_buffering=True)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_pipeline_")
    os.makedirs(args.workdir, exist_ok=True)
    cpu, vers = bc.cpu_info(), bc.versions(bc.VERSION_MODULES + ("transformers",))
    header = bc.machine_header(cpu, vers)
    print(header)
    rows, ratio, runs = run_all(args, cpu)
    print(f"\nSD 1.5 (random weights), {args.height}x{args.width}, batch {args.batch} (UNet rows {2 * args.batch}), "
          f"{args.steps} guided dpmpp_2m steps, text encoder + loop + VAE decode; ratios on the warm end-to-end "
          f"time, median over {args.runs} run(s)")
    print(bc.format_table(rows, ratio, COLUMNS))
    for n, r in rows.items():
        if "scan_step_s" in r:
            print(f"{n}: loop as one program (3 steps) {r['scan_step_s']:.2f} s/step after a {r['scan_first_s']:.1f} s "
                  f"first run, vs host-driven {r['step_s']:.2f} s/step; new guidance scale and seed recompiled: "
                  f"{r['recompiled']}")
    if args.json:
        bc.atomic_write_json(args.json, {"cpu": cpu, "versions": vers, "workdir": args.workdir, "steps": args.steps,
                                         "height": args.height, "width": args.width, "batch": args.batch,
                                         "rows": rows, "ratios": {n: list(v) for n, v in ratio.items()}, "runs": runs})
    return rows


if __name__ == "__main__":
    main()
