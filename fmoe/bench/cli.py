"""`fmoe synth`, `fmoe bench` and `fmoe calibrate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..sim.cli import positive_int


def seed_int(text: str) -> int:
    """argparse type: an integer a torch generator takes as its seed."""
    import argparse

    from ..runtime.engine import SEED_RANGE

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not SEED_RANGE[0] <= v <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be in [-2**63, 2**64 - 1], got {text}")
    return v


def check_writable(path: str, flag: str) -> None:
    """`path` can be written (`fmoe.files.unwritable`), or ValueError naming `flag`: checked
    before the measurement, not after it."""
    from ..files import unwritable

    why = unwritable(path, makes_dirs=False)
    if why:
        raise ValueError(f"{flag} {path}: {why}")


def _check_profile_target(path: Path) -> None:
    """An existing `--out` is replaced only when it is a hardware profile: fmoe never overwrites
    a file it did not write (a checkpoint's config.json, say)."""
    if not path.exists() or path.is_dir():
        return
    try:
        data = json.loads(path.read_text())
        ok = isinstance(data, dict) and data.get("format") == "fmoe-hardware-profile"
    except (OSError, UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"--out {path}: the file exists but is not a hardware profile; fmoe would "
                         "overwrite it, so it refuses: move the file away or choose another path")


def cmd_synth(args) -> int:
    from ..models.synthetic import synthesize
    from ..runtime.lm import parse_dtype

    dtype = parse_dtype(args.dtype)
    path = synthesize(args.name, args.dst, layers=args.layers, dtype=dtype, seed=args.seed,
                      progress=not args.quiet)
    print(f"wrote {path}")
    return 0


def _model_after_options(args) -> None:
    """`--policy-option` takes every value up to the next flag, so a MODEL written after it
    lands among them: take it back (a value without '=' is no option)."""
    if args.model is None and args.policy_option and "=" not in args.policy_option[-1]:
        args.model = args.policy_option.pop()
    if args.model is None:
        print("fmoe bench: error: the following arguments are required: model", file=sys.stderr)
        raise SystemExit(2)


def cmd_bench(args) -> int:
    from .run import bench_from_args

    _model_after_options(args)
    result = bench_from_args(args)
    if args.json:
        print(json.dumps(result))
    return 0


def _memory_limit(text: str) -> int:
    """--memory-limit as bytes; SystemExit naming the flag when it does not parse or is not
    positive (a bare number such as '0' is read as one, to say so rather than 'cannot
    parse')."""
    from ..runtime.offload import parse_bytes

    try:
        limit = parse_bytes(text)
    except ValueError as e:
        try:
            bare = float(text)
        except ValueError:
            bare = None
        if bare is None or bare > 0 or bare != bare:
            raise SystemExit(f"fmoe calibrate: --memory-limit: {e}") from None
        limit = 0
    if limit <= 0:
        raise SystemExit(f"fmoe calibrate: --memory-limit must be a positive size (e.g. 12GiB), "
                         f"got {text!r}")
    return limit


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate, check_model_dir

    limit = None
    if args.memory_limit is not None:
        limit = _memory_limit(args.memory_limit)
    if args.miss_steps < 0:
        raise SystemExit(f"fmoe calibrate: --miss-steps must be >= 0, got {args.miss_steps}")
    if args.out:
        check_writable(args.out, "--out")      # before the measurement, not after it
        _check_profile_target(Path(args.out))
    check_model_dir(Path(args.model))          # before the first progress line
    # progress on stderr: without --out, stdout is the profile's JSON alone
    profile = calibrate(args.model, dtype=args.dtype, samples=args.samples,
                        out=lambda line: print(line, file=sys.stderr, flush=True),
                        memory_limit=limit, miss_steps=args.miss_steps)
    if args.out:
        from ..models.synthetic import _write_json

        _write_json(Path(args.out), profile)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(json.dumps(profile, indent=2))
    return 0


def register(sub) -> None:
    from ..models.published import PUBLISHED

    p = sub.add_parser("synth", help="write a random checkpoint of a published model's real shape")
    p.add_argument("name", choices=sorted(PUBLISHED), help="the published model to imitate")
    p.add_argument("dst", help="output directory (complete only when the command exits 0)")
    p.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: the published count)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("bench", help="batch-1 live generation benchmark (optionally on replayed routing)")
    p.add_argument("model", nargs="?", help="local checkpoint directory or hub repo id")
    p.add_argument("--routing-trace", default=None,
                   help="replay this trace's routing (format v1 .npz) on the model's weights")
    p.add_argument("--sequences", type=int, default=1, help="sequences to run (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="random prompt length without a trace")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per sequence without a trace")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="with a trace: replay at most this many tokens of each sequence")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--expert-cache", default=None,
                   help="fraction, count, byte size, 'auto' or 'mmap' (default: every expert resident)")
    p.add_argument("--policy", default=None,
                   help="cache policy: fmoe, lru, lfu, moe-infinity (default: fmoe; needs --expert-cache)")
    p.add_argument("--policy-option", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="policy options (several after one flag, or the flag repeated)")
    p.add_argument("--execution", default="load", choices=["load", "host", "hybrid"],
                   help="load (default): misses are read into the cache; host: misses computed where "
                        "they live; hybrid: the policy decides per miss")
    p.add_argument("--prefetch-distance", type=positive_int, default=None)
    p.add_argument("--hardware-profile", default=None, metavar="FILE.json",
                   help="a profile from `fmoe calibrate`: the fmoe policy decides prefetch from it")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("calibrate", help="measure this machine with this model: a hardware profile "
                                         "for `fmoe simulate --hardware FILE`")
    p.add_argument("model", help="local checkpoint directory")
    p.add_argument("--dtype", default=None)
    p.add_argument("--samples", type=positive_int, default=48, help="experts read cold (default 48)")
    p.add_argument("--miss-steps", type=int, default=8,
                   help="decode steps with a small cache, timing the runtime's own misses (CPU; "
                        "default 8; 0: the copy time from the cold reads)")
    p.add_argument("--out", default=None, help="write the profile JSON here (default: stdout)")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="the memory limit the runs will have (e.g. 12GiB): the reads go as they "
                        "will there, O_DIRECT once the experts exceed half of it (default: this "
                        "process's own limit)")
    p.set_defaults(func=cmd_calibrate)


if __name__ == "__main__":  # pragma: no cover
    from ..serve.cli import main

    sys.exit(main())
