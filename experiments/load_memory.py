"""Peak RSS of loading a full-size SD 1.5 or SDXL checkpoint, against the bytes of the params loaded.

Writes random full-size weights once (a diffusers folder: SD 1.5 as float32 safetensors, ~4.3 GB;
SDXL base, 3.5 B parameters, as float16, ~7 GB, the form SDXL is published in; with --single-file
also the same weights as one CompVis/LDM or SGM .safetensors), then loads them in a fresh process
and reports peak RSS (VmHWM) / params bytes. Target: <= 1.25.

    python experiments/load_memory.py --workdir /tmp/sd15 [--dtype float16] [--single-file]
    python experiments/load_memory.py --config sdxl --workdir /tmp/sdxl --dtype float16 [--single-file]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time



SAVE_DTYPE = {"sd15": "float32", "sdxl": "float16"}  # as each is published


def make(workdir, config="sd15"):
    from sdjax.pipeline import random
    folder = os.path.join(workdir, config)
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        random(config, dtype=SAVE_DTYPE[config]).save(folder)
    return folder


def make_single(folder, workdir, suffix=".safetensors", config="sd15"):
    from safetensors.numpy import load_file
    from sdjax import convert_ldm, convert_sdxl, safetensors_io
    path = os.path.join(workdir, f"{config}-single" + suffix)
    if not os.path.exists(path):
        sd = {}
        comps = (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"))
        if config == "sdxl":
            comps += (("text_encoder_2", "model"),)
        for comp, stem in comps:
            sd[comp] = load_file(os.path.join(folder, comp, f"{stem}.safetensors"))
        ldm = convert_sdxl.diffusers_to_sgm(sd) if config == "sdxl" else convert_ldm.diffusers_to_ldm(sd, "sd1")
        del sd
        if suffix == ".ckpt":
            import torch
            torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in ldm.items()}}, path)
        else:
            safetensors_io.write(path, ldm)
    return path


def child(path, dtype):
    import jax
    import sdjax
    from sdjax.nn import flatten
    from sdjax.memory import peak_rss_bytes
    base = peak_rss_bytes()
    t0 = time.perf_counter()
    pipe = sdjax.load(path, dtype=dtype, progress=False)
    jax.block_until_ready(pipe.params)
    secs = time.perf_counter() - t0
    nbytes = sum(v.nbytes for c in pipe.params.values() for v in flatten(c).values())
    peak = peak_rss_bytes()
    print("RESULT " + json.dumps(dict(params_bytes=nbytes, peak_rss=peak, rss_after_imports=base, seconds=secs)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="sd15", choices=sorted(SAVE_DTYPE),
                    help="full-size architecture: SD 1.5 (saved float32) or SDXL base (saved float16)")
    ap.add_argument("--workdir", default=None, help="where the weights are written (default /tmp/sdjax-CONFIG)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--single-file", action="store_true", help="load the CompVis single-file form instead")
    ap.add_argument("--ckpt", action="store_true", help="with --single-file: the pickled .ckpt form")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.dtype)
    workdir = args.workdir or f"/tmp/sdjax-{args.config}"
    os.makedirs(workdir, exist_ok=True)
    path = make(workdir, args.config)
    if args.single_file:
        path = make_single(path, workdir, ".ckpt" if args.ckpt else ".safetensors", args.config)
    out = subprocess.run([sys.executable, __file__, "--child", path, "--dtype", args.dtype],
                         capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(out.stderr[-3000:])
    r = json.loads(line[0][7:])
    gib = 2**30
    print(f"loaded {path} as {args.dtype} in {r['seconds']:.1f} s")
    print(f"params {r['params_bytes'] / gib:.2f} GiB, peak RSS {r['peak_rss'] / gib:.2f} GiB "
          f"(of which {r['rss_after_imports'] / gib:.2f} GiB after imports): "
          f"peak / params = {r['peak_rss'] / r['params_bytes']:.3f} (target <= 1.25)")


if __name__ == "__main__":
    main()
