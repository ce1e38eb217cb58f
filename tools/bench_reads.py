"""How this machine's disk serves an offloaded run's expert reads: where they land and how many
run at once. Cold reads of random experts (never the same expert twice) through the store's read
path (O_DIRECT as the runtime decides it under --memory-limit), in alternated rounds:

- ``staging``: two readers side by side into ordinary buffers (4 KiB pages);
- ``slots``: the same into buffers made like the CPU cache's slots (huge pages where allowed), as
  the runtime and `fmoe calibrate` read;
- ``alone``: one reader into a slot, one read at a time.

An O_DIRECT read into 4 KiB pages reaches the disk as many more requests than one into huge
pages; a throttled virtual disk that counts requests serves it slower. A read alone that takes as
long as the side-by-side reads take per expert means the disk splits one rate between readers
(the simulator's one lane).

    python tools/bench_reads.py /work/ckpt/dsv2lite-27-store --memory-limit 12GiB --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fmoe.bench.calibrate import cold_store, slot_buffers
from fmoe.runtime.offload import parse_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="checkpoint or expert store directory")
    ap.add_argument("--memory-limit", default=None, help="decide O_DIRECT as a run under this limit would")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reads", type=int, default=40, help="experts per pattern and round")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        room = parse_bytes(args.memory_limit) if args.memory_limit else None
    except ValueError as e:
        raise SystemExit(f"bench_reads: --memory-limit: {e}") from None

    store, reader, files, n_all = cold_store(args.model, None, room)
    need = args.rounds * args.reads * 3
    if need > n_all:
        reader.close()
        raise SystemExit(f"--rounds x --reads x 3 = {need} reads, but the model has {n_all} experts "
                         f"(every read is a different, cold expert)")
    keys = random.Random(args.seed).sample(range(n_all), need)

    staging = [store.new_staging() for _ in range(2)]
    slots = slot_buffers(store, 2)
    pool = ThreadPoolExecutor(2)
    taken = [0]

    def next_keys():
        a = taken[0]
        taken[0] += args.reads
        return keys[a:a + args.reads]

    def side_by_side(bufs) -> float:
        ks = next_keys()
        t0 = time.perf_counter()

        def one(i):
            for k in ks[i::2]:
                store.read_into(k, *bufs[i])
        list(pool.map(one, range(2)))
        return (time.perf_counter() - t0) / len(ks)

    def alone() -> float:
        times = []
        for k in next_keys():
            t0 = time.perf_counter()
            store.read_into(k, *slots[0])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rows = {"staging": [], "slots": [], "alone": []}
    for r in range(args.rounds):
        # alternate the order, so that a drift of the disk's rate does not favour one pattern
        order = ["staging", "slots", "alone"] if r % 2 == 0 else ["alone", "slots", "staging"]
        for name in order:
            rows[name].append(side_by_side(staging) if name == "staging"
                              else side_by_side(slots) if name == "slots" else alone())
        print(f"round {r + 1}: " + " | ".join(f"{n} {rows[n][-1] * 1e3:.1f} ms" for n in rows), flush=True)
    direct = any(reader.is_direct(f) for f in files)
    reader.close()
    summary = {n: statistics.median(v) * 1e3 for n, v in rows.items()}
    print(json.dumps({"model": str(args.model), "o_direct": direct, "expert_bytes": store.expert_bytes,
                      "ms_per_expert_median": summary,
                      "alone_over_slots": summary["alone"] / summary["slots"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
