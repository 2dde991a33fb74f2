"""What every subcommand shares: the usage error, argument types, the model and LoRA flags, prompt files."""
from __future__ import annotations

import argparse
import math


class UsageError(Exception):
    """A bad argument: exit status 2."""


def finite_float(text):
    """argparse type: a finite number (``nan`` and ``inf`` are refused, naming the flag)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def int_pair(what, minimum):
    """argparse type: two comma-separated integers >= ``minimum`` ("1024,1024"), as a tuple."""
    def parse(text):
        parts = [x.strip() for x in text.split(",")]
        try:
            values = tuple(int(x) for x in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}, two integers separated by a comma") from None
        if len(values) != 2:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}, two integers (got {len(values)})")
        if min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: both values must be >= {minimum}")
        return values
    parse.__name__ = what  # argparse names the type in "invalid <type> value" messages
    return parse


def model_arg(p):
    p.add_argument("--model", "-m", default=None,
                   help="diffusers folder or single .safetensors/.ckpt file (default: the embedded reference model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter and compute dtype (default float32)")


def lora_spec(text):
    """argparse type: FILE or FILE:SCALE -> (path, scale); the scale after the last ':' must be a
    finite number."""
    from sdjax.lora import parse_spec  # only when --lora is given: it imports jax
    try:
        return parse_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def lora_arg(p, target="the model"):
    p.add_argument("--lora", action="append", type=lora_spec, default=None, metavar="FILE[:SCALE]",
                   help=f"a LoRA .safetensors file (diffusers/PEFT or kohya format, LoCon included) merged into "
                   f"the float weights of {target} at load, times SCALE (default 1.0); repeatable, e.g. "
                   "--lora style.safetensors:0.8 --lora detail.safetensors:-0.3")


def lora_label(loras):
    """"file:scale, ..." of the merged LoRAs (for reports and PNG metadata)."""
    return ", ".join(f"{path}:{scale:g}" for path, scale in loras or ())


def read_prompts(flag, path):
    """The non-empty lines of a prompts file, or a UsageError naming the flag and file."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: cannot read the prompts file ({e})") from None
    if not prompts:
        raise UsageError(f"{flag} {path}: the file has no prompts (one per line)")
    return prompts


def int_list(name, text):
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name} {text!r}: a comma-separated list of integers") from None
    if not out:
        raise UsageError(f"{name}: empty")
    return out

