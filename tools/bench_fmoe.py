"""fMoE ablations in the simulator: one history fills the expert-map store once per prefetch
distance, then each variant replays the same trace.

    python tools/split_trace.py ../shared/data/traces/deepseek-v2-lite-puffin-dev.npz \\
        --fraction 0.7 --out-dir /tmp/split
    python tools/bench_fmoe.py --history /tmp/split/deepseek-v2-lite-puffin-dev.history.npz \\
        --trace /tmp/split/deepseek-v2-lite-puffin-dev.replay.npz --max-sequences 60

Variants: the default policy; no prefetch; each eviction rule; no semantic search; no trajectory
search; prefetch distance d in {1, 2, 3, 4, 6}; plus lru, lfu and oracle for reference.
Prints a markdown table (hit rate, TPOT, prefetch precision, TPOT / oracle TPOT).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmoe.runtime.fmoe_policy import FmoePolicy  # noqa: E402
from fmoe.sim.hardware import get_hardware  # noqa: E402
from fmoe.sim.replay import simulate  # noqa: E402
from fmoe.sim.shapes import get_shape, guess_shape  # noqa: E402
from fmoe.sim.timing import TimingModel  # noqa: E402
from fmoe.sim.trace import Trace, load_trace  # noqa: E402

VARIANTS = {
    "fmoe (default: distance eviction, no prefetch)": {},
    "one prefetch order per layer at similarity >= 0.6": {"max_orders": 1},
    "prefetch 4 orders/layer, no similarity gate": {"max_orders": 4, "min_similarity": 0.0},
    "eviction lru-pred": {"eviction": "lru-pred"},
    "eviction pfreq": {"eviction": "pfreq"},
    "eviction lru": {"eviction": "lru"},
    "no semantic search": {"use_semantic": False},
    "no trajectory search": {"use_trajectory": False},
}


def first_sequences(trace: Trace, n: int | None) -> Trace:
    if n is None or n >= trace.num_sequences:
        return trace
    end = int(trace.seq_offsets[n])
    return trace.head(end)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=Path, required=True)
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--max-sequences", type=int, default=None, help="replay only the first N sequences")
    ap.add_argument("--cache-fraction", type=float, default=0.25)
    ap.add_argument("--hardware", default="rtx3090-pcie4")
    ap.add_argument("--distances", default="1,2,3,4,6")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variant names")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    hist = load_trace(args.history)
    rep = first_sequences(load_trace(args.trace), args.max_sequences)
    shape = get_shape(guess_shape(rep.model) or "deepseek-v2-lite")
    tm = TimingModel.from_shape(shape, get_hardware(args.hardware))
    L, E = rep.num_layers, rep.num_experts
    cap = int(args.cache_fraction * L * E)
    print(f"replay {rep.num_tokens} tokens in {rep.num_sequences} sequences; history "
          f"{hist.num_tokens} tokens; {cap} slots; {tm.name}", flush=True)

    rows = []

    def run(name, policy):
        t0 = time.perf_counter()
        r = simulate(rep, policy, tm, capacity=cap)
        rows.append({"variant": name, "hit_rate": r.hit_rate, "tpot_ms": r.tpot_ms,
                     "prefetch_precision": r.prefetch_precision, "prefetched": r.prefetched,
                     "loads_per_token": r.loads_per_token, "wall_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)

    for name in ("lru", "lfu", "oracle"):
        run(name, name)
    bases: dict[int, FmoePolicy] = {}

    def base(d: int) -> FmoePolicy:
        if d not in bases:
            p = FmoePolicy(L, E, cap, top_k=rep.top_k, prefetch_distance=d)
            p.learn_history(expert_ids=hist.expert_ids, seq_offsets=hist.seq_offsets,
                            gate_probs=hist.gate_probs, token_ids=hist.token_ids)
            bases[d] = p
        return copy.deepcopy(bases[d])

    wanted = None if args.variants is None else set(args.variants.split(","))
    for name, opts in VARIANTS.items():
        if wanted is not None and name not in wanted:
            continue
        p = base(3)
        for k, v in opts.items():
            setattr(p, k, v)
        run(name, p)
    for d in [int(x) for x in args.distances.split(",") if x]:
        if d == 3 and (wanted is None or any(n.startswith("fmoe (default") for n in wanted)):
            continue
        run(f"fmoe d={d}", base(d))

    oracle = next(r["tpot_ms"] for r in rows if r["variant"] == "oracle")
    lru = next(r for r in rows if r["variant"] == "lru")
    print("\n| variant | hit rate | vs lru | TPOT ms | TPOT / lru | TPOT / oracle | prefetch precision | loads/token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        prec = "-" if r["prefetch_precision"] is None else f"{r['prefetch_precision']:.3f}"
        print(f"| {r['variant']} | {r['hit_rate']:.4f} | {r['hit_rate'] - lru['hit_rate']:+.4f} | "
              f"{r['tpot_ms']:.2f} | {r['tpot_ms'] / lru['tpot_ms']:.3f} | {r['tpot_ms'] / oracle:.2f} | "
              f"{prec} | {r['loads_per_token']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
