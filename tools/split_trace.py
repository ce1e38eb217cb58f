"""Split a routing trace (format v1) by sequences: the first FRACTION of the sequences become a
history trace (for `fmoe simulate --history`), the rest the replay trace.

    python tools/split_trace.py ../shared/data/traces/deepseek-v2-lite-puffin-dev.npz \\
        --fraction 0.7 --out-dir /tmp/split
    # -> /tmp/split/<stem>.history.npz and /tmp/split/<stem>.replay.npz (+ .texts.jsonl sidecars)

Every optional key of the format is kept: the per-token ones (weights, gate_probs, phase,
token_ids) and the prompts are sliced, the others (moe_layers, model_config) copied, so a split
of a recorded run simulates as the whole does. Both outputs are written to temporary paths and
renamed into place only when both are complete. Bad input prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from fmoe.errors import FmoeError
from fmoe.sim.trace import load_trace, texts_path, write_trace

PROG = "split_trace"


def split(trace, a: int, b: int, path: Path) -> None:
    """Write sequences a..b-1 of `trace` to `path` (and its prompts to the sidecar)."""
    o = trace.seq_offsets
    lo, hi = int(o[a]), int(o[b])

    def cut(x):          # per-token arrays [T, ...]
        return None if x is None else x[lo:hi]
    write_trace(path, expert_ids=trace.expert_ids[lo:hi], seq_offsets=(o[a:b + 1] - lo).astype(np.int64),
                num_experts=trace.num_experts, model=trace.model, moe_layers=trace.moe_layers,
                weights=cut(trace.weights), gate_probs=cut(trace.gate_probs), phase=cut(trace.phase),
                token_ids=cut(trace.token_ids), model_config=trace.model_config,
                texts=None if trace.texts is None else trace.texts[a:b])


def _fraction(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < f < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return f


def _write_both(trace, k: int, out_dir: Path, names: tuple[str, str]) -> None:
    """Write the history (sequences 0..k-1) and the replay (k..n-1) into a temporary directory
    inside `out_dir` (same file system), then rename each file into place: a failure on either
    leaves neither output."""
    n = trace.num_sequences
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".split-"))
    try:
        split(trace, 0, k, tmp / names[0])
        split(trace, k, n, tmp / names[1])
        for name in names:
            side = texts_path(out_dir / name)
            if trace.texts is None and side.exists():
                # an earlier split's prompts would be paired with the new trace
                side.unlink()
            for src in (tmp / name, texts_path(tmp / name)):
                if src.exists():
                    os.replace(src, out_dir / src.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--fraction", type=_fraction, default=0.7,
                    help="share of the sequences that go to the history trace, in (0, 1)")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        trace = load_trace(args.trace)
        n = trace.num_sequences
        k = int(n * args.fraction)
        if k < 1 or k >= n:
            # checked before anything is created: an empty side is not a trace
            raise ValueError(f"{args.trace} has {n} sequence(s): --fraction {args.fraction} gives "
                             f"{k} history and {n - k} replay sequences; each side needs at least "
                             "one sequence")
        stem = args.trace.name[:-4] if args.trace.name.endswith(".npz") else args.trace.name
        made = [d for d in (args.out_dir, *args.out_dir.parents) if not d.exists()]
        args.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            _write_both(trace, k, args.out_dir, (f"{stem}.history.npz", f"{stem}.replay.npz"))
        except BaseException:
            for d in made:          # the directories this run made, innermost first, if empty
                try:
                    os.rmdir(d)
                except OSError:
                    break
            raise
    except (FmoeError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    print(f"{k} history sequences ({int(trace.seq_offsets[k])} tokens), {n - k} replay sequences "
          f"({trace.num_tokens - int(trace.seq_offsets[k])} tokens) in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
