"""The ``sdjax`` command line: the parser here, one module per subcommand (``register`` adds its
arguments, ``run`` carries it out by calling the library). ``sdjax --help`` lists the subcommands."""
from __future__ import annotations

import argparse
import sys

from . import convert, eval as eval_cmd, export_coreml, generate, inspect, quantize, report, verify_coreml
from .common import UsageError

COMMANDS = (generate, inspect, quantize, eval_cmd, report, export_coreml, verify_coreml, convert)


def build_parser():
    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion as pure JAX functions: "
                                     "load, quantize, evaluate and export.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..configs import ConfigError
    from ..params import CheckpointError
    from ..safetensors_io import SafetensorsError
    try:
        status = args.func(args)  # a command may return an exit status (verify-coreml: 1 below --min-psnr)
    except UsageError as e:
        print(f"sdjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ConfigError, SafetensorsError, FileNotFoundError) as e:
        print(f"sdjax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


__all__ = ["UsageError", "build_parser", "main"]
