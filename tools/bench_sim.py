#!/usr/bin/env python
"""Simulator benchmark: sweep cache sizes x policies x hardware on a routing trace, write the CSV,
the plot, and the table into a Markdown file between markers.

    python tools/bench_sim.py --trace ../shared/data/traces/deepseek-v2-lite-puffin-dev.npz \\
        --hardware rtx3090-pcie4,h100-pcie5 --fractions 0.1,0.25,0.5 --jobs 2 \\
        --csv /tmp/sim-sweep.csv --plot docs/img/sim-sweep-deepseek-v2-lite-dev.png \\
        --md docs/benchmarks-sim.md

The Markdown file keeps everything outside ``<!-- sim-sweep:start -->`` /
``<!-- sim-sweep:end -->``; between them it gets the command, the environment and the table.
Any user can point it at their own trace (and ``--model-config`` for an unknown model).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

START, END = "<!-- sim-sweep:start -->", "<!-- sim-sweep:end -->"


PROG = "bench_sim"


def _write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a temporary file in the same directory, then a
    rename, so an interrupted run never leaves a truncated page."""
    from fmoe.files import atomic_write

    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def main(argv=None) -> int:
    from fmoe.sim.cli import positive_int

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--history")
    ap.add_argument("--hardware", default="rtx3090-pcie4,h100-pcie5",
                    help="comma-separated built-in profiles or `fmoe calibrate` profile files")
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    ap.add_argument("--policies", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--model-config", default=None)
    ap.add_argument("--max-tokens", type=positive_int, default=None)
    ap.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--csv", default="sim-sweep.csv")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--md", default=None, help="Markdown file to update between the markers")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw --plot from an existing --csv (no simulation)")
    args = ap.parse_args(argv)
    from fmoe.errors import FmoeError

    try:
        return _run(args, argv)
    except (FmoeError, ValueError, OSError) as e:
        # bad input (a fraction, a policy, a profile, a file): one line, as `fmoe simulate`
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


def _run(args, argv) -> int:
    if args.replot:
        from fmoe.sim.sweep import plot, read_csv
        from fmoe.sim.trace import load_trace

        if not args.plot:
            raise ValueError("--replot needs --plot")
        t = load_trace(args.trace, gate_probs=False, validate=False)
        if args.max_tokens:
            t = t.head(args.max_tokens)
        plot(read_csv(args.csv), args.plot,
             title=f"{t.model}: {t.num_tokens} tokens, {t.num_sequences} sequences")
        return 0

    from fmoe.sim.cli import UsageError, _check_destination, _csv_list, _resolve_shape, sweep_grid, timing_models
    from fmoe.sim.hardware import get_hardware
    from fmoe.sim.replay import policy_class
    from fmoe.sim.sweep import format_table, plot, run_sweep, write_csv
    from fmoe.sim.trace import load_trace

    # cheap checks first, as `fmoe simulate --sweep` makes them
    hws = [get_hardware(h) for h in _csv_list(args.hardware)]
    if not hws:
        raise UsageError("--hardware is empty")
    policies, fractions = sweep_grid(args.policies, args.fractions)
    for p in policies:
        policy_class(p)
    _check_destination(args.csv, "--csv")
    if args.md:
        _check_destination(args.md, "--md")

    trace = load_trace(args.trace)
    if args.max_tokens:
        trace = trace.head(args.max_tokens)
    history = load_trace(args.history) if args.history else None
    # the shape and timing `fmoe simulate` takes: a calibrated profile's own model and timing
    shape = _resolve_shape(argparse.Namespace(model=args.model, model_config=args.model_config,
                                              dtype=None, trace=args.trace), trace, hws)
    if shape.num_moe_layers < trace.num_layers:
        trace = trace.first_layers(shape.num_moe_layers)
        if history is not None:
            history = history.first_layers(shape.num_moe_layers)
    timings = timing_models(hws, shape)
    t0 = time.perf_counter()

    def progress(rs):
        for h, d in rs:
            print(f"{h:>14} {d['policy']:>13} {100 * d['cache_fraction']:5.1f}%  hit "
                  f"{d['hit_rate']:.4f}  TPOT {d['tpot_ms']:8.2f} ms  ({d['wall_s']:.0f} s)",
                  flush=True)

    rows = run_sweep(trace, policies, fractions, timings, jobs=args.jobs, history=history,
                     progress=progress)
    wall = time.perf_counter() - t0
    write_csv(rows, args.csv)
    if args.plot:
        plot(rows, args.plot, title=f"{trace.model}: {trace.num_tokens} tokens, "
                                    f"{trace.num_sequences} sequences")
    table = format_table(rows)
    print(table)
    print(f"{len(rows)} runs in {wall:.0f} s")
    if args.md:
        cmd = "python tools/bench_sim.py " + " ".join(argv or sys.argv[1:])
        # from the timing model itself: a calibrated profile's has no roofline details
        L, K = shape.num_moe_layers, shape.top_k
        env = "\n".join(
            f"- `{h}`: expert {tm.expert_bytes / 1e6:.1f} MB, copy {tm.copy * 1e3:.3f} ms, "
            f"layer compute {tm.layer_seconds(L, K) * 1e3:.3f} ms, all-resident TPOT "
            f"{(tm.token_pre + tm.token_post + L * tm.layer_seconds(L, K)) * 1e3:.2f} ms"
            for h, tm in timings.items())
        block = (f"{START}\n\nGenerated by:\n\n```bash\n{cmd}\n```\n\n"
                 f"Trace: `{Path(args.trace).name}` ({trace.num_tokens} tokens, "
                 f"{trace.num_sequences} sequences, {trace.num_layers} MoE layers x "
                 f"{trace.num_experts} experts, top-{trace.top_k}); model shape "
                 f"`{shape.name}`.\n\n{env}\n\n{table}\n\n"
                 f"({len(rows)} runs, {wall / 60:.0f} min with {args.jobs} worker(s) on "
                 f"{platform.machine()} / Python {platform.python_version()}.)\n\n{END}")
        md = Path(args.md)
        text = md.read_text() if md.exists() else f"# Simulator benchmarks\n\n{START}\n{END}\n"
        if START in text and END in text:
            a, b = text.index(START), text.index(END) + len(END)
            text = text[:a] + block + text[b:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        _write_text(md, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
