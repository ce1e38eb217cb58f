"""The `fmoe convert` command line: its arguments and entry points, kept apart from the converter
(`fmoe.models.convert`) so that registering the sub-command does not import torch."""

from __future__ import annotations

import argparse
import sys

from ..errors import FmoeError

# `fmoe.models.convert.DTYPE_CHOICES`'s names (a test keeps them in step)
DTYPE_NAMES = ("bf16", "bfloat16", "float", "float16", "float32", "fp16", "fp32", "half")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="HF checkpoint: local directory or hub repo id")
    p.add_argument("dst", help="output directory (fmoe store)")
    p.add_argument("--dtype", default=None, choices=list(DTYPE_NAMES) + ["auto"],
                   metavar="{bfloat16,float16,float32}",
                   help="convert experts and weights to this dtype (default: keep the checkpoint's; FP8 "
                        "stays FP8 with its scales)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--verify", action="store_true", help="recompute the written store's checksums")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def cmd_convert(args) -> int:
    from .convert import convert

    out = convert(args.src, args.dst, dtype=args.dtype, force=args.force, verify=args.verify,
                  progress=not args.no_progress)
    gib = 2 ** 30
    print(f"{out['path']}: {out['experts']} experts ({out['expert_bytes'] / gib:.2f} GiB) + non-expert "
          f"weights ({out['weight_bytes'] / gib:.2f} GiB), {out['dtype']}"
          f"{', checksums verified' if out['verified'] else ''}, {out['seconds']:.1f} s")
    return 0


def register(subparsers) -> None:
    """The `fmoe convert` sub-command."""
    p = subparsers.add_parser("convert", help="convert an HF checkpoint into fmoe's expert-major store",
                              description="Convert an HF checkpoint (local directory or hub id) into "
                                          "fmoe's store: one contiguous, 4 KiB-aligned read per expert.")
    add_arguments(p)
    p.set_defaults(func=cmd_convert)


def main(argv=None) -> int:
    """``python tools/convert.py SRC DST [--dtype D] [--force] [--verify]``."""
    p = argparse.ArgumentParser(prog="convert.py", description="Convert an HF checkpoint into fmoe's "
                                "expert-major store (see docs/store-format.md).")
    add_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        return cmd_convert(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug:
            raise
        kind = "" if isinstance(e, (FmoeError, ValueError)) else f"{type(e).__name__}: "
        print(f"convert: error: {kind}{e}", file=sys.stderr)
        return 1


