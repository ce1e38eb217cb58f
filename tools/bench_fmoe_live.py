"""policy="fmoe" in the live runtime, against policy="lru", side by side in one run (CPU).

    python tools/bench_fmoe_live.py                  # the demo checkpoint, one torch thread

Three measurements:

1. Policy cost per token: the policy object alone, driven with the events of a DeepSeek-V2-Lite
   shaped model (26 MoE layers x 64 experts, top-6) and random routing, with every expert
   resident (no evictions) and at a 25% cache (evictions scored). Microseconds per token.
2. Forward time per token with every expert resident (expert_cache=1.0): fmoe and lru alternate
   in pairs, so drift in the machine's load hits both alike; the ratio is the median of pairs.
3. Stall per token with expert_cache=0.25 behind an emulated host->device link: the same prompts
   through lru and fmoe (the fmoe policy learns online, starting empty). Tokens are checked equal
   to the resident model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fmoe  # noqa: E402
from fmoe.runtime.policies import make_policy  # noqa: E402
from fmoe.runtime.slots import SlotTable  # noqa: E402
from fmoe.serve.demo import demo_checkpoint  # noqa: E402


def policy_cost(name: str, L: int, E: int, K: int, capacity: int, tokens: int, **opts) -> float:
    """Microseconds per token spent in the policy and slot table for random top-K routing."""
    rng = np.random.default_rng(0)
    pol = make_policy(name, L, E, capacity, **opts)
    table = SlotTable(capacity, pol)
    # a skewed popularity, as real routers have
    pop = rng.dirichlet(np.full(E, 0.3), size=L)
    routes = [[rng.choice(E, K, replace=False, p=pop[l]) for l in range(L)] for _ in range(tokens)]
    probs = [None] * L
    if pol.wants_probs:
        probs = [pop[l].astype(np.float32) for l in range(L)]
    pol.on_request_start(0)
    t0 = time.perf_counter()
    for t in range(tokens):
        for l in range(L):
            pol.on_layer_start(l)
            keys = [l * E + int(e) for e in routes[t][l]]
            table.acquire_many(keys)
            pol.on_routed(l, routes[t][l], probs[l])
            table.pinned.clear()
        pol.on_token_end()
    return (time.perf_counter() - t0) / tokens * 1e6


def decode_ms(model, ids, n: int) -> float:
    t0 = time.perf_counter()
    model.generate(ids, n, eos_token_id=[])
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the demo's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--link", default="25GB/s")
    ap.add_argument("--prompts", type=int, default=12, help="prompts for the stall measurement")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict = {}

    print("## policy cost per token (DeepSeek-V2-Lite shape: 26 x 64, top-6; random routing)")
    print("| policy | all resident, us/token | 25% cache, us/token |")
    print("|---|---|---|")
    L, E, K = 26, 64, 6
    out["policy_cost_us"] = {}
    for name, opts in [("lru", {}), ("fmoe", {"top_k": K}),
                       ("fmoe", {"top_k": K, "eviction": "distance"}),
                       ("fmoe", {"top_k": K, "max_orders": 1})]:
        label = name + "".join(f" {k}={v}" for k, v in opts.items() if k != "top_k")
        full = policy_cost(name, L, E, K, L * E, 200, **opts)
        quarter = policy_cost(name, L, E, K, L * E // 4, 200, **opts)
        out["policy_cost_us"][label] = [full, quarter]
        print(f"| {label} | {full:.0f} | {quarter:.0f} |", flush=True)

    path = args.model or demo_checkpoint()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (1, 8), generator=gen)
    models = {p: fmoe.models.from_pretrained(path, expert_cache=1.0, policy=p) for p in ("lru", "fmoe")}
    for m in models.values():
        decode_ms(m, ids, 8)                      # warm-up
    ratios, ms = [], {"lru": [], "fmoe": []}
    for _ in range(args.pairs):
        a = decode_ms(models["lru"], ids, args.tokens)
        b = decode_ms(models["fmoe"], ids, args.tokens)
        ms["lru"].append(a)
        ms["fmoe"].append(b)
        ratios.append(b / a)
    for m in models.values():
        m.close()
    med = statistics.median(ratios)
    out["resident"] = {"lru_ms": statistics.median(ms["lru"]), "fmoe_ms": statistics.median(ms["fmoe"]),
                       "fmoe_over_lru": med}
    print(f"\n## every expert resident ({path.name}, {args.threads} thread(s), {args.pairs} pairs of "
          f"{args.tokens} tokens)")
    print(f"lru {out['resident']['lru_ms']:.3f} ms/token, fmoe {out['resident']['fmoe_ms']:.3f} ms/token; "
          f"fmoe / lru (median of pairs) = {med:.3f}", flush=True)

    print(f"\n## expert_cache=0.25, emulated {args.link} link, {args.prompts} prompts of "
          f"{args.tokens} new tokens")
    print("| policy | hit rate | stall ms/token | MiB loaded/token | tokens equal resident |")
    print("|---|---|---|---|---|")
    prompts = [torch.randint(3, 500, (1, int(n)), generator=gen)
               for n in torch.randint(4, 24, (args.prompts,), generator=gen)]
    resident = fmoe.models.from_pretrained(path)
    refs = [resident.generate(p, args.tokens, eos_token_id=[]) for p in prompts]
    resident.close()
    out["offloaded"] = {}
    for p in ("lru", "fmoe"):
        m = fmoe.models.from_pretrained(path, expert_cache=0.25, policy=p, link_bandwidth=args.link)
        equal = all(torch.equal(m.generate(x, args.tokens, eos_token_id=[]), r) for x, r in zip(prompts, refs))
        s = m.expert_stats()
        m.close()
        n = args.prompts * args.tokens
        row = {"hit_rate": s["hits"] / max(1, s["hits"] + s["misses"]),
               "stall_ms_per_token": 1e3 * s["stall_seconds"] / n,
               "mib_per_token": s["bytes_loaded"] / n / 2**20, "equal": equal}
        out["offloaded"][p] = row
        print(f"| {p} | {row['hit_rate']:.3f} | {row['stall_ms_per_token']:.2f} | "
              f"{row['mib_per_token']:.2f} | {'yes' if equal else 'NO'} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
