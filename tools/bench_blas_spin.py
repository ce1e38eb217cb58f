"""The CPU a multi-threaded BLAS burns after a product, against fmoe's `matvec`.

After a matrix-vector product large enough to split across its threads, OpenBLAS (numpy's BLAS
in most installs) keeps those threads spinning for a while before they sleep. On a CPU box that
runs the model's compute on every core, the spin takes a core from that compute at every token.
The default policy's searches over the expert-map store (`ExpertMapStore.semantic`,
`redundancy`) are such products ([maps, 2048] @ [2048] in float32 at DeepSeek-V2-Lite shape, the
store growing to 1,024 maps). This measures, for numpy's ``@`` and for
`fmoe.runtime.expert_maps.matvec` (numpy's own loops), the time of one product and the process's
CPU time during a sleep right after it (median over repetitions)::

    python tools/bench_blas_spin.py --rows 30,415,1024 --dim 2048 --sleep-ms 200 --reps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from fmoe.runtime.expert_maps import matvec


def after_product(f, sleep_s: float) -> tuple[float, float]:
    """(seconds for f(), process CPU seconds during a `sleep_s` sleep right after it)."""
    t0 = time.perf_counter()
    f()
    took = time.perf_counter() - t0
    c0 = time.process_time()
    time.sleep(sleep_s)
    return took, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="30,415,1024", help="comma-separated row counts (stored maps)")
    ap.add_argument("--dim", type=int, default=2048, help="columns (embedding size)")
    ap.add_argument("--sleep-ms", type=float, default=200.0, help="sleep after each product")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per row count and form")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    try:
        rows = [int(x) for x in args.rows.split(",") if x]
    except ValueError:
        ap.error(f"--rows must be comma-separated integers, got {args.rows!r}")
    if not rows or min(rows) < 1 or args.dim < 1 or args.reps < 1 or args.sleep_ms <= 0:
        ap.error("--rows, --dim and --reps must be positive, --sleep-ms above 0")
    rng = np.random.default_rng(0)
    v = rng.random(args.dim, dtype=np.float32)
    out = []
    for n in rows:
        a = rng.random((n, args.dim), dtype=np.float32)
        forms = {"numpy @": lambda a=a: a @ v, "fmoe matvec": lambda a=a: matvec(a, v)}
        got = {name: [] for name in forms}
        for _ in range(args.reps):              # the two forms alternate
            for name, f in forms.items():
                got[name].append(after_product(f, args.sleep_ms / 1e3))
        for name, runs in got.items():
            out.append({"rows": n, "dim": args.dim, "form": name,
                        "product_us": 1e6 * statistics.median(t for t, _ in runs),
                        "spin_cpu_ms": 1e3 * statistics.median(c for _, c in runs),
                        "sleep_ms": args.sleep_ms})
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"| rows x {args.dim} | form | one product, us | process CPU in the {args.sleep_ms:g} ms after it, ms |")
    print("|---|---|---|---|")
    for r in out:
        print(f"| {r['rows']} | {r['form']} | {r['product_us']:.0f} | {r['spin_cpu_ms']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
