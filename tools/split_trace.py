"""Split a routing trace (format v1) by sequences: the first FRACTION of the sequences become a
history trace (for `fmoe simulate --history`), the rest the replay trace.

    python tools/split_trace.py ../shared/data/traces/deepseek-v2-lite-puffin-dev.npz \\
        --fraction 0.7 --out-dir /tmp/split
    # -> /tmp/split/<stem>.history.npz and /tmp/split/<stem>.replay.npz (+ .texts.jsonl sidecars)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fmoe.sim.trace import load_trace, write_trace


def split(trace, a: int, b: int, path: Path) -> None:
    o = trace.seq_offsets
    lo, hi = int(o[a]), int(o[b])
    def cut(x):
        return None if x is None else x[lo:hi]
    write_trace(path, expert_ids=trace.expert_ids[lo:hi], seq_offsets=(o[a:b + 1] - lo).astype(np.int64),
                num_experts=trace.num_experts, model=trace.model, moe_layers=trace.moe_layers,
                weights=cut(trace.weights), gate_probs=cut(trace.gate_probs), phase=cut(trace.phase),
                token_ids=cut(trace.token_ids), texts=None if trace.texts is None else trace.texts[a:b])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--fraction", type=float, default=0.7)
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    if not 0 < args.fraction < 1:
        print("split_trace: --fraction must be in (0, 1)", file=sys.stderr)
        return 2
    trace = load_trace(args.trace)
    n = trace.num_sequences
    k = int(n * args.fraction)
    stem = args.trace.name[:-4] if args.trace.name.endswith(".npz") else args.trace.name
    args.out_dir.mkdir(parents=True, exist_ok=True)
    split(trace, 0, k, args.out_dir / f"{stem}.history.npz")
    split(trace, k, n, args.out_dir / f"{stem}.replay.npz")
    print(f"{k} history sequences ({int(trace.seq_offsets[k])} tokens), {n - k} replay sequences "
          f"({trace.num_tokens - int(trace.seq_offsets[k])} tokens) in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
