"""`python -m fmoe.sim [simulate] --trace T.npz ...`: the `fmoe simulate` sub-command alone."""

from __future__ import annotations

import argparse
import sys

from .cli import _fail, register


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fmoe", description="fmoe trace simulator")
    parser.error = _fail  # one line, exit code 2 (as the sub-command's own errors)
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    if not argv or argv[0] not in ("simulate", "-h", "--help"):
        argv = ["simulate"] + argv
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
