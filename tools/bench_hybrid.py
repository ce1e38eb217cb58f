"""Simulated hybrid execution: load vs host vs hybrid, and a sweep over the host's compute rate.

    python tools/bench_hybrid.py --trace R.npz --history H.npz --hardware rtx3090-pcie4 \\
        --cache-fraction 0.25 --host-gbps 10,20,40,80 --out rows.json --plot hybrid.png

Rows: the load-only references (lru, fmoe, belady, oracle), always-host with a static hot set
(the history's most used experts, as llama.cpp's ``-ot`` hot-expert overrides), hybrid with the
host rule driven by LRU's recency, and fmoe's hybrid; the host rows at every ``--host-gbps``.
Prints a Markdown table (TPOT against LRU's load-only TPOT and against the oracle's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from fmoe.sim.hardware import get_hardware
from fmoe.sim.replay import simulate
from fmoe.sim.shapes import get_shape, guess_shape
from fmoe.sim.timing import TimingModel
from fmoe.sim.trace import load_trace

LOAD_ROWS = [("lru", "load"), ("fmoe", "load"), ("belady", "load"), ("oracle", "load")]
HOST_ROWS = [("lru", "host"), ("lru", "hybrid"), ("fmoe", "hybrid")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace")
    p.add_argument("--part", choices=["load", "host", "both"], default="both",
                   help="run only the load-only rows, only the host rows, or both")
    p.add_argument("--report", nargs="+", metavar="ROWS.json",
                   help="no runs: merge rows written by --out and print the table (and --plot)")
    p.add_argument("--history")
    p.add_argument("--hardware", default="rtx3090-pcie4")
    p.add_argument("--model", help="built-in shape (default: from the trace)")
    p.add_argument("--cache-fraction", type=float, default=0.25)
    p.add_argument("--host-gbps", default="10,20,40,80")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--plot", help="write TPOT against host GB/s to this PNG")
    args = p.parse_args(argv)

    if args.report:
        rows, seen = [], set()
        for path in args.report:
            with open(path) as f:
                data = json.load(f)
            for r in data["rows"]:
                key = (r["policy"], r["execution"], r["host_gbps"])
                if key not in seen:           # a row repeated across files counts once
                    seen.add(key)
                    rows.append({**data["meta"], **r})
        return report(rows, args)
    if not args.trace:
        p.error("--trace is required (or --report)")
    trace = load_trace(args.trace, gate_probs=False)
    if args.max_tokens:
        trace = trace.head(args.max_tokens)
    history = load_trace(args.history, gate_probs=False) if args.history else None
    hw = get_hardware(args.hardware)
    shape = get_shape(args.model or guess_shape(trace.model) or "deepseek-v2-lite")
    base = TimingModel.from_shape(shape, hw)
    rows = []

    def run(policy, execution, tm, gbps=None):
        t0 = time.perf_counter()
        r = simulate(trace, policy, tm, cache_fraction=args.cache_fraction, history=history,
                     execution=execution)
        row = {"policy": policy, "execution": execution, "host_gbps": gbps,
               "hit_rate": r.hit_rate, "tpot_ms": r.tpot_ms, "loads_per_token": r.loads_per_token,
               "host_computed_per_token": r.host_computed_per_token, "tokens": r.tokens,
               "capacity": r.capacity, "copy_ms": r.copy_ms, "host_ms": tm.host * 1e3}
        rows.append(row)
        print(f"{policy:>7} {execution:>6} {gbps or '':>5}  hit {r.hit_rate:.4f}  "
              f"TPOT {r.tpot_ms:7.2f} ms  host/token {r.host_computed_per_token:6.1f}  "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    meta = {"model": trace.model, "tokens": trace.num_tokens, "hardware": hw.name,
            "cache_fraction": args.cache_fraction, "copy_ms": base.copy * 1e3}

    def save():
        if args.out:
            with open(args.out + ".tmp", "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
            os.replace(args.out + ".tmp", args.out)

    if args.part in ("load", "both"):
        for policy, execution in LOAD_ROWS:
            run(policy, execution, base)
            save()
    if args.part in ("host", "both"):
        for g in [float(x) for x in args.host_gbps.split(",")]:
            tm = dataclasses.replace(base, host=base.expert_bytes / (g * 1e9))
            for policy, execution in HOST_ROWS:
                run(policy, execution, tm, g)
                save()
    for r in rows:
        r.update(meta)
    save()
    return report(rows, args) if args.part == "both" else 0


def report(rows, args) -> int:
    lru = next(r["tpot_ms"] for r in rows if r["policy"] == "lru" and r["execution"] == "load")
    oracle = next(r["tpot_ms"] for r in rows if r["policy"] == "oracle")
    m = rows[0]
    print(f"{m['tokens']} tokens, {m['capacity']} slots ({100 * m['cache_fraction']:.0f}%), "
          f"{m['hardware']}: copy {m['copy_ms']:.3f} ms/expert\n")
    print("| policy | execution | host GB/s | host ms/expert | hit rate | host experts/token "
          "| loads/token | TPOT ms | TPOT / lru (load) | TPOT / oracle |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = f"{r['host_gbps']:g}" if r["host_gbps"] else "-"
        hm = f"{r['host_ms']:.3f}" if r["execution"] != "load" else "-"
        print(f"| {r['policy']} | {r['execution']} | {g} | {hm} | {r['hit_rate']:.4f} | "
              f"{r['host_computed_per_token']:.1f} | {r['loads_per_token']:.1f} | "
              f"{r['tpot_ms']:.2f} | {r['tpot_ms'] / lru:.3f} | {r['tpot_ms'] / oracle:.3f} |")
    if args.plot:
        _plot(rows, lru, oracle, args.plot, f"{m['model']}, {m['tokens']} tokens, "
              f"{100 * m['cache_fraction']:.0f}% cache, {m['hardware']} (simulated)")
    return 0


def _plot(rows, lru, oracle, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy, execution in HOST_ROWS:
        rs = [r for r in rows if r["policy"] == policy and r["execution"] == execution]
        label = "always host, static hot set" if execution == "host" else f"{policy} hybrid"
        ax.plot([r["host_gbps"] for r in rs], [r["tpot_ms"] for r in rs], marker="o", label=label)
    fm = next(r["tpot_ms"] for r in rows if r["policy"] == "fmoe" and r["execution"] == "load")
    for y, label, style in ((lru, "lru (load)", "--"), (fm, "fmoe (load)", "-."),
                            (oracle, "oracle (load)", ":")):
        ax.axhline(y, linestyle=style, color="gray", linewidth=1)
        ax.text(0.99, y, f" {label}", va="bottom", ha="right",
                transform=ax.get_yaxis_transform(), fontsize=8, color="dimgray")
    ax.set_xscale("log", base=2)
    rates = sorted({r["host_gbps"] for r in rows if r["host_gbps"]})
    ax.set_xticks(rates, [f"{g:g}" for g in rates])
    ax.minorticks_off()
    ax.set_xlabel("host compute rate of routed experts (GB/s of weights)")
    ax.set_ylabel("TPOT (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
