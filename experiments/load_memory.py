"""Peak RSS of loading a full-size SD 1.5 checkpoint, against the bytes of the params loaded.

Writes random full-size SD 1.5 weights once (diffusers folder, float32 safetensors, ~4.3 GB;
with --single-file also the same weights as one CompVis/LDM .safetensors), then loads them in
a fresh process and reports peak RSS (VmHWM) / params bytes. Target: <= 1.25.

    python experiments/load_memory.py --workdir /tmp/sd15 [--dtype float16] [--single-file]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time



def make(workdir):
    from sdjax.pipeline import random
    folder = os.path.join(workdir, "sd15")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        random("sd15").save(folder)
    return folder


def make_single(folder, workdir, suffix=".safetensors"):
    from safetensors.numpy import load_file
    from sdjax import convert_ldm, safetensors_io
    path = os.path.join(workdir, "sd15-single" + suffix)
    if not os.path.exists(path):
        sd = {}
        for comp, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                           ("text_encoder", "model")):
            sd[comp] = load_file(os.path.join(folder, comp, f"{stem}.safetensors"))
        ldm = convert_ldm.diffusers_to_ldm(sd, "sd1")
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
    ap.add_argument("--workdir", default="/tmp/sdjax-sd15")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--single-file", action="store_true", help="load the CompVis single-file form instead")
    ap.add_argument("--ckpt", action="store_true", help="with --single-file: the pickled .ckpt form")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.dtype)
    os.makedirs(args.workdir, exist_ok=True)
    path = make(args.workdir)
    if args.single_file:
        path = make_single(path, args.workdir, ".ckpt" if args.ckpt else ".safetensors")
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
