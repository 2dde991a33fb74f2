"""One guided SD 1.5 UNet evaluation on the CPU: sdjax against PyTorch and OpenVINO (+NNCF), same weights.

Random weights with the full SD 1.5 shapes (sdjax's ``unet.init_params(preset("sd15")["unet"], seed=0)``),
written once as a diffusers folder that every contender loads, so all run the same weights on the same
inputs: latents (2 * batch, 4, h/8, w/8), t = 999, context (2 * batch, 77, 768). ``--batch N`` is N
prompts with classifier-free guidance, so N=1 (the default) is the "batch 2" UNet call. Contenders,
each in its own process (its peak RSS is its own):

    pytorch-fp32, pytorch-bf16          diffusers UNet2DConditionModel (``.to(torch.bfloat16)``)
    openvino-bf16                       openvino.convert_model of that module, compiled for "CPU" with
                                        INFERENCE_PRECISION_HINT bf16 (the precision the plugin then
                                        reports is printed in the note column)
    openvino-nncf-w8a8                  nncf.quantize(model_type=TRANSFORMER) on the calibration inputs
    sdjax-fp32, sdjax-bf16              jitted sdjax.unet.apply
    sdjax-w8a8                          every conv and linear int8-w8a8 (quant.apply_recipe), activation
                                        scales from quant.calibrate.observe on the same calibration inputs
    sdjax-openvino-fp32, -bf16, -w8a8   the same sdjax function and weights (W8A8: the same int8 weights
                                        and scales) run by OpenVINO's CPU plugin: sdjax.openvino.compile_unet

Calibration inputs, the same for both int8 routes: --calib-prompts random context pairs (standing for
prompts: a random text encoder gives random embeddings too) x --calib-steps timesteps from 999 down, the
latents noised to each under SD 1.5's schedule from unit-normal x0 (``record_calibration``). With random
weights there is no real denoising to record: this UNet's own dpmpp_2m loop diverges (input std 0.6 to
119 in four steps) and calibrating on it made both int8 routes return noise.

Per row: seconds per evaluation (median of --reps), first call (compile or first inference), peak RSS,
relative L2 of the output against pytorch-fp32's, and ratios against pytorch-fp32 and against the fastest
peer (non-sdjax contender) at the same precision, each ratio the median over --runs runs of the ratio
taken within a run. A contender whose backend is missing, whose precision has no fast path on this CPU, or
whose estimated peak memory exceeds MemAvailable is named in one line and skipped before it starts.

    python experiments/bench_unet.py --reps 2 --runs 1
    python experiments/bench_unet.py --contenders pytorch-fp32,sdjax-fp32 --height 256 --width 256
    python experiments/bench_unet.py --scaling --sizes 256,512 --batches 1,2 --scaling-out /tmp/scaling
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
T = 999.0


# --- files shared by the children -------------------------------------------------------------

def point_tag(h, w, batch):
    return f"{h}x{w}-b{batch}"


def inputs_path(workdir, h, w, batch):
    return os.path.join(workdir, f"inputs-{point_tag(h, w, batch)}.npz")


def calib_path(workdir, h, w):
    return os.path.join(workdir, f"calib-{h}x{w}.npz")


def output_path(workdir, name, h, w, batch):
    return os.path.join(workdir, f"out-{name}-{point_tag(h, w, batch)}.npy")


def _save_npz(path, **arrays):
    import numpy as np
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def prepare(workdir, h, w, batch, calib_prompts, calib_steps):
    """Child: the weights folder (once), this point's inputs, and (calib_prompts > 0) the calibration
    inputs at this size, each written under a temporary name and renamed."""
    import numpy as np
    from sdjax import checkpoint, configs, unet
    t0 = time.perf_counter()
    folder = os.path.join(workdir, "model")
    cfg = configs.preset("sd15")["unet"]
    params = None
    if not os.path.isdir(folder):
        params = unet.init_params(cfg, seed=0)
        checkpoint.save(checkpoint.Checkpoint({"unet": params}, {"unet": cfg}), folder, progress=False)
    rng = np.random.default_rng(1234)
    rows, lh, lw = 2 * batch, h // 8, w // 8
    p = inputs_path(workdir, h, w, batch)
    if not os.path.exists(p):
        _save_npz(p, x=rng.standard_normal((rows, 4, lh, lw), np.float32),
                  t=np.full((rows,), T, np.float32), ctx=rng.standard_normal((rows, 77, 768), np.float32))
    c = calib_path(workdir, h, w)
    if calib_prompts and not os.path.exists(c):
        if params is None:
            params, _ = checkpoint.load_component(os.path.join(folder, "unet"), "unet", progress=False)
        _save_npz(c, **record_calibration(params, cfg, lh, lw, calib_prompts, calib_steps))
    return {"prepare_s": time.perf_counter() - t0}


def record_calibration(params, cfg, lh, lw, n_prompts, steps):
    """UNet inputs (x NCHW, t, ctx; 2 guided rows each) at ``steps`` timesteps (999 down, evenly) for each of
    ``n_prompts`` random context pairs: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise under SD 1.5's schedule
    (scaled_linear 0.00085-0.012), x0 drawn unit-normal (SD latents are scaled to about unit variance).

    Not the random UNet's own denoising: with random weights that diverges (input std 0.6, 9.8, 46, 119
    over four dpmpp_2m steps at guidance 7.5), and scales calibrated there are ~100x the evaluation
    input's, so both int8 routes then return noise (relative L2 above 1). ``params``/``cfg`` are unused
    and kept for the call's shape."""
    import numpy as np
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    timesteps = np.round(np.linspace(999, 0, steps, endpoint=False)).astype(int)
    xs, ts, cs = [], [], []
    for k in range(n_prompts):
        rng = np.random.default_rng(100 + k)
        ctx = rng.standard_normal((2, 77, 768), np.float32)     # (negative, positive) embeddings
        for t in timesteps:
            x0, noise = rng.standard_normal((2, 2, 4, lh, lw))
            x = (np.sqrt(abar[t]) * x0 + np.sqrt(1.0 - abar[t]) * noise).astype(np.float32)
            xs.append(x)
            ts.append(np.full((2,), t, np.float32))
            cs.append(ctx)
    return {"x": np.stack(xs), "t": np.stack(ts), "ctx": np.stack(cs)}


def calibration_items(workdir, h, w, batch):
    """The calibration inputs as a list of (x, t, ctx), each tiled to the evaluation's 2*batch rows."""
    import numpy as np
    with np.load(calib_path(workdir, h, w)) as z:
        x, t, ctx = z["x"], z["t"], z["ctx"]
    tile = lambda a: np.concatenate([a] * batch)  # noqa: E731
    return [(tile(x[i]), tile(t[i]), tile(ctx[i])) for i in range(len(x))]


# --- the contenders (children) ----------------------------------------------------------------

def _torch_unet(folder):
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=torch.float32).eval()


def run_torch(name, folder, inp, reps, calib):
    import torch
    t0 = time.perf_counter()
    m = _torch_unet(folder)
    if name == "pytorch-bf16":
        m = m.to(torch.bfloat16)
    load_s = time.perf_counter() - t0
    x, t, ctx = (torch.from_numpy(inp[k]) for k in ("x", "t", "ctx"))
    x, ctx = x.to(m.dtype), ctx.to(m.dtype)
    with torch.inference_mode():
        out, first, times = bc.timed_calls(lambda: m(x, t, ctx, return_dict=False)[0], reps)
    return out.float().numpy(), dict(load_s=load_s, first_s=first, times=times,
                                     note=f"{torch.get_num_threads()} threads")


def run_openvino(name, folder, inp, reps, calib):
    import numpy as np
    import openvino as ov
    import torch

    t0 = time.perf_counter()
    module = bc.tensor_output_unet(_torch_unet(folder))
    example = tuple(torch.from_numpy(inp[k]) for k in ("x", "t", "ctx"))
    with torch.no_grad():
        model = ov.convert_model(module, example_input=example)
    del module
    convert_s = time.perf_counter() - t0
    info = dict(convert_s=convert_s)
    config = {"INFERENCE_PRECISION_HINT": "bf16"} if name == "openvino-bf16" else {}
    if name == "openvino-nncf-w8a8":
        import nncf
        t0 = time.perf_counter()
        items = [list(c) for c in calib]
        model = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(items))
        info["quantize_s"] = time.perf_counter() - t0
    core = ov.Core()
    t0 = time.perf_counter()
    compiled = core.compile_model(model, "CPU", config)
    compile_s = time.perf_counter() - t0
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    req = compiled.create_infer_request()
    args = [inp["x"], inp["t"], inp["ctx"]]

    def call():
        req.infer(args)
        return req.get_output_tensor(0).data

    out, first, times = bc.timed_calls(call, reps)
    info.update(load_s=convert_s + info.get("quantize_s", 0.0), first_s=compile_s + first, times=times,
                effective_precision=precision,
                note=f"plugin precision {precision}" + (f"; nncf.quantize {info['quantize_s']:.0f} s"
                                                        if "quantize_s" in info else ""))
    return np.array(out, np.float32), info


def run_sdjax(name, folder, inp, reps, calib):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sdjax import checkpoint, unet
    from sdjax.memory import release_freed_memory
    t0 = time.perf_counter()
    dtype = "bfloat16" if name == "sdjax-bf16" else "float32"
    on_openvino = name.startswith("sdjax-openvino-")
    params, cfg = checkpoint.load_component(os.path.join(folder, "unet"), "unet", dtype=dtype, progress=False)
    f = jax.jit(unet.apply, static_argnums=1)
    info = {}
    if name.endswith("-w8a8"):
        import quant
        from quant import calibrate
        nhwc = [(jnp.asarray(np.transpose(x, (0, 2, 3, 1))), jnp.asarray(t), jnp.asarray(c)) for x, t, c in calib]

        def run(p):
            return [f(p, cfg, x, t, c) for x, t, c in nhwc]

        t1 = time.perf_counter()
        stats = calibrate.observe(params, run)
        recipe = {"name": "w8a8-all", "components": ["unet"], "rules": [{"pattern": "*", "method": "int8-w8a8"}]}
        params = quant.apply_recipe(params, recipe, calibration=stats, component="unet")
        info["quantize_s"] = time.perf_counter() - t1
        del stats, nhwc
    load_s = time.perf_counter() - t0
    x = jnp.asarray(np.transpose(inp["x"], (0, 2, 3, 1)))
    t, ctx = jnp.asarray(inp["t"]), jnp.asarray(inp["ctx"])
    if on_openvino:
        from sdjax.openvino import compile_unet
        box = [params]
        del params
        t0 = time.perf_counter()
        ov_unet = compile_unet(lambda: box.pop(), cfg, {"sample": x.shape, "encoder_hidden_states": ctx.shape},
                               precision=name.rsplit("-", 1)[1].replace("fp32", "f32"))
        compile_s = time.perf_counter() - t0
        out, first, times = bc.timed_calls(lambda: ov_unet(x, t, ctx), reps)
        note = f"OpenVINO plugin precision {ov_unet.inference_precision}"
        if "quantize_s" in info:
            note += f"; calibrate+quantize {info['quantize_s']:.0f} s, {len(ov_unet.marks)} FakeQuantize layers"
        info.update(load_s=load_s, first_s=compile_s + first, times=times, note=note,
                    effective_precision=ov_unet.inference_precision)
        return np.transpose(np.asarray(out, np.float32), (0, 3, 1, 2)), info
    t0 = time.perf_counter()
    compiled = f.lower(params, cfg, x, t, ctx).compile()
    compile_s = time.perf_counter() - t0
    release_freed_memory()
    out, first, times = bc.timed_calls(lambda: compiled(params, x, t, ctx).block_until_ready(), reps)
    note = f"jax {jax.__version__}"
    if "quantize_s" in info:
        note += f"; calibrate+quantize {info['quantize_s']:.0f} s, int8 integer path"
    info.update(load_s=load_s, first_s=compile_s + first, times=times, note=note)
    return np.transpose(np.asarray(out, np.float32), (0, 3, 1, 2)), info


def child(name, workdir, h, w, batch, reps):
    import numpy as np
    from sdjax.memory import peak_rss_bytes
    with np.load(inputs_path(workdir, h, w, batch)) as z:
        inp = {k: z[k] for k in z.files}
    calib = calibration_items(workdir, h, w, batch) if bc.CONTENDERS[name][1] == "int8" else None
    runner = run_sdjax if name.startswith("sdjax") else run_openvino if name.startswith("openvino") else run_torch
    out, info = runner(name, os.path.join(workdir, "model"), inp, reps, calib)
    np.save(output_path(workdir, name, h, w, batch) + ".tmp.npy", out)
    os.replace(output_path(workdir, name, h, w, batch) + ".tmp.npy", output_path(workdir, name, h, w, batch))
    info.update(s=statistics.median(info["times"]), rss_gib=peak_rss_bytes() / 2**30)
    bc.child_result(info)


# --- the parent -------------------------------------------------------------------------------

def plan_point(names, h, w, batch, cpu, available, find_spec=None):
    """(runnable names, {name: skip line}) at one point; nothing is launched."""
    kw = {} if find_spec is None else {"find_spec": find_spec}
    skipped = {}
    for n in names:
        why = bc.backend_problem(n, cpu["flags"], **kw) or bc.memory_problem(n, h, w, 2 * batch, available)
        if why:
            skipped[n] = why
    return [n for n in names if n not in skipped], skipped


def run_point(args, names, h, w, batch, cpu, launch=bc.run_child, log=print):
    """Every contender at one (height, width, batch), --runs times -> (rows, median ratios, per-run results)."""
    available = bc.mem_available_bytes()
    runnable, skipped = plan_point(names, h, w, batch, cpu, available)
    for line in skipped.values():
        log(line)
    rows = {n: {"skipped": why} for n, why in skipped.items()}
    runs = []
    if runnable:
        need_calib = any(bc.CONTENDERS[n][1] == "int8" for n in runnable)
        res, err = launch(bc.python_argv(HERE, "--prepare-child", args.workdir, h, w, batch,
                                         args.calib_prompts if need_calib else 0, args.calib_steps),
                          timeout=args.timeout)
        if res is None:
            log(f"preparing the weights and inputs failed: {err}")
            return {n: {"failed": "preparation failed"} for n in runnable} | rows, {}, []
    for r in range(args.runs):
        run = {}
        for n in runnable:
            why = bc.memory_problem(n, h, w, 2 * batch, bc.mem_available_bytes())  # others may have grown
            if why:
                log(why)
                run[n] = None
                continue
            log(f"[{point_tag(h, w, batch)} run {r + 1}/{args.runs}] {n} ...")
            res, err = launch(bc.python_argv(HERE, "--child", n, args.workdir, h, w, batch, "--reps", args.reps),
                              timeout=args.timeout)
            if res is None:
                log(f"{n} failed: {err}")
            else:
                log(f"{n}: {res['s']:.3f} s/eval (median of {args.reps}), first call {res['first_s']:.1f} s, "
                    f"peak RSS {res['rss_gib']:.2f} GiB; {res.get('note', '')}")
            run[n] = res
        runs.append(run)
    ref_file = output_path(args.workdir, bc.REFERENCE, h, w, batch)
    for n in runnable:
        done = [run[n] for run in runs if run.get(n)]
        if not done:
            rows[n] = {"failed": "see the stderr tail or the skip line above"}
            continue
        row = {k: statistics.median([d[k] for d in done]) for k in ("s", "first_s", "load_s")}
        row.update(rss_gib=max(d["rss_gib"] for d in done), note=done[-1].get("note", ""),
                   times=[d["times"] for d in done], rel_l2=None)
        for k in ("effective_precision", "quantize_s", "convert_s"):
            if k in done[-1]:
                row[k] = done[-1][k]
        if os.path.exists(ref_file) and any(run.get(bc.REFERENCE) for run in runs):
            import numpy as np
            row["rel_l2"] = bc.rel_l2(np.load(output_path(args.workdir, n, h, w, batch)), np.load(ref_file))
        rows[n] = row
    ordered = {n: rows[n] for n in names}
    return ordered, bc.median_ratios(runs), runs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contenders", default=",".join(bc.CONTENDERS),
                    help="comma-separated, of: " + ", ".join(bc.CONTENDERS) + " (default all)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls after the first (median reported)")
    ap.add_argument("--runs", type=int, default=1, help="repeat the whole set; ratios are medians of per-run ratios")
    ap.add_argument("--height", type=int, default=512, help="pixels (latents are /8)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="prompts; the guided UNet call has 2*batch rows")
    ap.add_argument("--calib-prompts", type=int, default=2)
    ap.add_argument("--calib-steps", type=int, default=4)
    ap.add_argument("--scaling", action="store_true", help="the table over --sizes x --batches, + a PNG plot")
    ap.add_argument("--sizes", default="256,512,768,1024", help="--scaling: pixel sizes (square)")
    ap.add_argument("--batches", default="1,2,4", help="--scaling: batches")
    ap.add_argument("--scaling-out", default="bench_unet_scaling", help="--scaling: writes OUT.md and OUT.png")
    ap.add_argument("--workdir", help="weights, inputs, calibration and outputs (default: a new temp folder)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    ap.add_argument("--json", help="write everything here (atomically)")
    ap.add_argument("--child", nargs=5, metavar=("NAME", "WORKDIR", "H", "W", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare-child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k in ("reps", "runs", "height", "width", "batch", "calib_steps"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1; got {getattr(args, k)}")
    for k in ("height", "width"):
        if getattr(args, k) % 64:
            ap.error(f"--{k} must be a multiple of 64 pixels (the UNet's latent grid halves three times); "
                     f"got {getattr(args, k)}")
    if args.calib_prompts < 1:
        ap.error(f"--calib-prompts must be >= 1; got {args.calib_prompts}")
    try:
        args.names = bc.parse_contenders(args.contenders)
        args.size_list = _int_list("--sizes", args.sizes)
        args.batch_list = _int_list("--batches", args.batches)
    except bc.BenchError as e:
        ap.error(str(e))
    bad = [s for s in args.size_list if s % 64]
    if bad:
        ap.error(f"--sizes must be multiples of 64 pixels; got {bad}")
    return args


def _int_list(flag, text):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise bc.BenchError(f"{flag}: expected a comma-separated list of positive integers; got {text!r}")
    return vals


def report_point(rows, ratio, h, w, batch, header):
    print(f"\nSD 1.5 UNet (random weights), one guided evaluation: {2 * batch} rows, latents {h // 8}x{w // 8}, "
          f"t={T:.0f}, context {2 * batch}x77x768\n{header}")
    print(bc.format_table(rows, ratio))


def main(argv=None):
    args = parse_args(argv)
    if args.prepare_child:
        wd, h, w, b, cp, cs = args.prepare_child
        return bc.child_result(prepare(wd, int(h), int(w), int(b), int(cp), int(cs)))
    if args.child:
        name, wd, h, w, b = args.child
        return child(name, wd, int(h), int(w), int(b), args.reps)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear while children run
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_unet_")
    os.makedirs(args.workdir, exist_ok=True)
    cpu, vers = bc.cpu_info(), bc.versions()
    header = bc.machine_header(cpu, vers)
    print(header)
    points = [(s, s, b) for s in args.size_list for b in args.batch_list] if args.scaling else \
        [(args.height, args.width, args.batch)]
    results = []
    for h, w, b in points:
        rows, ratio, runs = run_point(args, args.names, h, w, b, cpu)
        report_point(rows, ratio, h, w, b, f"median of {args.reps} calls, ratios: median over {args.runs} run(s)")
        results.append({"height": h, "width": w, "batch": b, "rows": rows,
                        "ratios": {n: list(v) for n, v in ratio.items()}, "runs": runs})
        # after every point (each file written whole, then renamed): a long scaling run stopped part way
        # keeps the table and plot of the points it measured
        if args.scaling:
            bc.write_scaling(results, args.scaling_out, header)
        if args.json:
            bc.atomic_write_json(args.json, {"cpu": cpu, "versions": vers, "workdir": args.workdir, "reps": args.reps,
                                             "runs": args.runs, "calibration": {"prompts": args.calib_prompts,
                                                                                "steps": args.calib_steps},
                                             "points": results, "complete": len(results) == len(points)})
    return results


if __name__ == "__main__":
    main()
