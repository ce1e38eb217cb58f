"""policy="fmoe" in the live runtime, against policy="lru", side by side in one run (CPU).

    python tools/bench_fmoe_live.py                  # the demo checkpoint, one torch thread

Three measurements:

1. Policy cost per token: the policy and the slot table (what `expert_stats()["policy_seconds"]`
   covers), driven with the events of a DeepSeek-V2-Lite shaped model (26 MoE layers x 64
   experts, top-6) and skewed random routing, with every expert resident (no evictions) and at
   a 25% cache (a victim at nearly every layer). CPU microseconds per token of the driving
   thread after a warm-up; every policy runs once per round, rounds rotate, and the figure is
   the minimum over rounds (the run least disturbed by the rest of the machine), with its ratio
   to LRU's (`--parts cost` for this part alone, `--cost-rounds N`; `--cost-trace FILE` drives
   it with a recorded trace's routing instead). `--parts floor` splits the default's cost: the
   driving loop alone, the slot table with a policy that decides nothing, LRU, and the part
   inside the default's compiled kernels.
2. Forward time per token with every expert resident (expert_cache=1.0): two instances per
   policy, run in rotating rounds, so drift in the machine's load and the luck of where an
   instance's buffers land hit both alike; the ratio is the median over rounds.
3. Stall per token with expert_cache=0.25 behind an emulated host->device link: the same prompts
   through lru and fmoe (the fmoe policy learns online, starting empty), on two tiny random
   models: the demo checkpoint (Mixtral-shaped, 4 layers x 8 experts, top-2) and a
   DeepSeek-V2-shaped one (7 MoE layers x 32 experts, top-6, 2 shared experts). Tokens are
   checked equal to the resident model's.
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

import fmoe
from fmoe.runtime.policies import make_policy
from fmoe.runtime.policies.base import Policy
from fmoe.runtime.slots import SlotTable
from fmoe.serve.demo import cache_dir, demo_checkpoint

TINY_DEEPSEEK = dict(model_type="deepseek_v2", vocab_size=2048, hidden_size=256, intermediate_size=512,
                     moe_intermediate_size=128, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=8, n_shared_experts=2, n_routed_experts=32,
                     num_experts_per_tok=6, routed_scaling_factor=1.0, kv_lora_rank=64,
                     q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32,
                     topk_method="greedy", n_group=1, topk_group=1, first_k_dense_replace=1,
                     norm_topk_prob=False, scoring_func="softmax", max_position_embeddings=4096,
                     rope_theta=10000, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def tiny_deepseek() -> Path:
    """A tiny random DeepSeek-V2-shaped checkpoint, built once (a temp dir, then renamed)."""
    import shutil
    import tempfile

    from fmoe.models.synthetic import write_random_checkpoint

    target = cache_dir() / "bench-tiny-deepseek-v2"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_random_checkpoint(tmp, TINY_DEEPSEEK, dtype=torch.float32, seed=0)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def skewed_routes(L: int, E: int, K: int, n: int) -> tuple[list, list]:
    """n tokens of skewed random top-K routing: ([token][layer] -> int64 expert ids,
    [token][layer] -> float32 [E] router probabilities). A Dirichlet popularity per layer, as
    real routers have; it is also every token's router output, for the policies that read one."""
    rng = np.random.default_rng(0)
    pop = rng.dirichlet(np.full(E, 0.3), size=L)
    routes = [[rng.choice(E, K, replace=False, p=pop[l]) for l in range(L)] for _ in range(n)]
    return routes, [list(pop.astype(np.float32))] * n


def trace_routes(path: Path, n: int) -> tuple[list, list | None, int, int, int]:
    """The first n tokens of a routing trace (format v1): ([token][layer] -> int64 expert ids,
    [token][layer] -> float32 [E] router probabilities or None when the trace has no
    ``gate_probs``, L, E, K)."""
    from fmoe.sim.trace import load_trace

    tr = load_trace(path)
    ids = tr.expert_ids
    if len(ids) < n:
        raise SystemExit(f"{path}: {len(ids)} tokens, the cost runs need {n}")
    L, K = ids.shape[1], ids.shape[2]
    routes = [[row[row >= 0].astype(np.int64) for row in ids[t]] for t in range(n)]
    probs = (None if tr.gate_probs is None
             else [list(tr.gate_probs[t].astype(np.float32)) for t in range(n)])
    return routes, probs, L, tr.num_experts, K


def policy_cost(name: str, L: int, E: int, K: int, capacity: int, tokens: int, routes=None,
                probs=None, **opts) -> float:
    """Microseconds per token spent in the policy and the slot table (what the runtime's
    `policy_seconds` covers) for `routes` ([token][layer] -> expert ids, 2 x `tokens` of them)
    with the router probabilities `probs` (likewise, or None); default: skewed random top-K
    (`skewed_routes`): one run on a fresh policy, timed after a warm-up of `tokens` tokens. CPU
    time of this thread, so that other jobs on the machine inflate it less than wall time."""
    if routes is None:
        routes, probs = skewed_routes(L, E, K, 2 * tokens)
    pol = make_policy(name, L, E, capacity, **opts)
    took = drive(pol, SlotTable(capacity, pol), routes, L, E, tokens, probs=probs)
    pol.close()
    return took


def drive(pol, table, routes, L: int, E: int, tokens: int, probs=None, at_warm=None) -> float:
    """`policy_cost`'s run of `pol` and `table` (CPU us per token after `tokens` of warm-up;
    `at_warm()` is called when the warm-up ends). The router probabilities `probs` go with
    each routed layer to a policy that reads them (`wants_probs`), as the runtime sends them."""
    keys = [[[l * E + int(e) for e in routes[t][l]] for l in range(L)] for t in range(2 * tokens)]
    if probs is None or not getattr(pol, "wants_probs", False):
        probs = [[None] * L] * (2 * tokens)
    pol.on_request_start(0)
    t0 = 0
    for t in range(2 * tokens):
        if t == tokens:                          # warm-up done: the cache is full
            if at_warm is not None:
                at_warm()
            t0 = time.thread_time_ns()
        for l in range(L):
            pol.on_layer_start(l)
            table.acquire_many(keys[t][l])
            pol.on_routed(l, routes[t][l], probs[t][l])
            table.pinned.clear()
        pol.on_token_end()
    return (time.thread_time_ns() - t0) / tokens / 1e3


class NullPolicy(Policy):
    """Decides nothing (the first unpinned resident key goes): what the slot table's per-use
    path costs by itself."""

    name = "null"

    def victim(self, resident, pinned: set[int]) -> int:
        for key in resident:
            if key not in pinned:
                return key
        raise RuntimeError("every resident expert is pinned; cannot evict")


class NoEvents:
    """A policy and a slot table whose events do nothing: the driving loop's own cost."""

    def __init__(self):
        self.pinned: set = set()

    def on_request_start(self, seq_id) -> None:
        pass

    def on_layer_start(self, layer):
        return []

    def acquire_many(self, keys) -> int:
        return 0

    def on_routed(self, layer, experts, probs) -> None:
        pass

    def on_token_end(self) -> None:
        pass


class CompiledTime:
    """Within the block, the wall time spent in calls to the reuse rule's compiled kernels
    (`fmoe.runtime.reuse_kernels`, numba's dispatch included), in ns (``self.ns``); a perf
    counter around each call, which adds its own ~0.3 us a call here."""

    NAMES = ("take", "pass_vectors", "score_after", "touch_keys", "sync")

    def __enter__(self):
        from fmoe.runtime import reuse_kernels
        from fmoe.runtime.policies import eviction

        self.ns = 0
        self._mod, self._ev, self._saved = reuse_kernels, eviction, {}
        clock = time.perf_counter_ns

        def timed(fn):
            def call(*a):
                t0 = clock()
                try:
                    return fn(*a)
                finally:
                    self.ns += clock() - t0
            return call

        for name in self.NAMES:
            self._saved[name] = getattr(reuse_kernels, name)
            setattr(reuse_kernels, name, timed(self._saved[name]))
        self._take = eviction._take
        eviction._take = None                # the rule fetches the timed `take` anew
        return self

    def reset(self) -> None:
        self.ns = 0

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(self._mod, name, fn)
        self._ev._take = self._take


def floor_table(tokens: int, rounds: int) -> dict:
    """Where the policy cost of the default goes, at DeepSeek-V2-Lite shape and skewed random
    routing, resident and at a 25% cache: the driving loop alone (`NoEvents`), the slot table
    with a policy that decides nothing (`NullPolicy`), LRU, the fmoe default, and of the
    default's time the part inside its compiled kernels (`CompiledTime`). Minimum over
    `rounds` rounds in rotating order, CPU us per token."""
    from fmoe.runtime import reuse_scoring

    L, E, K = 26, 64, 6
    reuse_scoring.kernels()                 # numba loaded before any timing
    routes, probs = skewed_routes(L, E, K, 2 * tokens)
    rows = ["events alone", "null policy", "lru", "fmoe", "fmoe: compiled kernels"]
    got: dict = {}
    for r in range(rounds):
        for cap in (L * E, L * E // 4):
            for j in range(4):
                name = rows[(j + r) % 4]
                if name == "events alone":
                    got.setdefault((name, cap), []).append(
                        drive(NoEvents(), NoEvents(), routes, L, E, tokens))
                elif name == "null policy":
                    pol = NullPolicy(L, E, cap)
                    got.setdefault((name, cap), []).append(
                        drive(pol, SlotTable(cap, pol), routes, L, E, tokens))
                elif name == "lru":
                    got.setdefault((name, cap), []).append(
                        policy_cost("lru", L, E, K, cap, tokens, routes=routes, probs=probs))
                else:
                    pol = make_policy("fmoe", L, E, cap, top_k=K)
                    with CompiledTime() as ct:
                        total = drive(pol, SlotTable(cap, pol), routes, L, E, tokens,
                                      probs=probs, at_warm=ct.reset)
                    pol.close()
                    got.setdefault(("fmoe", cap), []).append(total)
                    got.setdefault(("fmoe: compiled kernels", cap), []).append(
                        ct.ns / tokens / 1e3)
    print("## where the policy cost goes (DeepSeek-V2-Lite shape: 26 x 64, top-6; random "
          f"routing; minimum over {rounds} rounds, CPU us/token)")
    print("| part | all resident | 25% cache |")
    print("|---|---|---|")
    out = {}
    for name in rows:
        full, quarter = min(got[(name, L * E)]), min(got[(name, L * E // 4)])
        out[name] = [full, quarter]
        print(f"| {name} | {full:.0f} | {quarter:.0f} |", flush=True)
    return out


def cost_table(tokens: int, rounds: int, trace: Path | None = None) -> dict:
    """`policy_cost` of each policy, resident and at a 25% cache: `rounds` rounds in rotating
    order; the minimum per row, and its ratio to LRU's minimum. With `trace`, its first
    2 x `tokens` tokens' routing drives every run (its own shape), instead of skewed random
    routing at DeepSeek-V2-Lite shape."""
    L, E, K = 26, 64, 6
    routes = probs = None
    if trace is not None:
        routes, probs, L, E, K = trace_routes(trace, 2 * tokens)
    rows = [("lru", {}), ("fmoe", {"top_k": K}), ("fmoe", {"top_k": K, "eviction": "distance"}),
            ("fmoe", {"top_k": K, "max_orders": 1})]
    runs = [(i, cap) for i in range(len(rows)) for cap in (L * E, L * E // 4)]
    got: dict = {run: [] for run in runs}
    for r in range(rounds):
        for j in range(len(runs)):
            i, cap = runs[(j + r) % len(runs)]
            name, opts = rows[i]
            got[(i, cap)].append(policy_cost(name, L, E, K, cap, tokens, routes=routes,
                                             probs=probs, **opts))
    out = {}
    what = (f"routing of {trace.name}'s first {2 * tokens} tokens ({L} x {E}, top-{K})"
            if trace is not None else "DeepSeek-V2-Lite shape: 26 x 64, top-6; random routing")
    print(f"## policy cost per token ({what}; minimum over {rounds} rounds, CPU us/token)")
    print("| policy | all resident | / lru | 25% cache | / lru |")
    print("|---|---|---|---|---|")
    for i, (name, opts) in enumerate(rows):
        label = name + "".join(f" {k}={v}" for k, v in opts.items() if k != "top_k")
        full, quarter = min(got[(i, L * E)]), min(got[(i, L * E // 4)])
        lru_full, lru_quarter = min(got[(0, L * E)]), min(got[(0, L * E // 4)])
        out[label] = [full, quarter]
        print(f"| {label} | {full:.0f} | {full / lru_full:.2f} | {quarter:.0f} | "
              f"{quarter / lru_quarter:.2f} |", flush=True)
    return out


def decode_ms(model, ids, n: int) -> float:
    t0 = time.perf_counter()
    model.generate(ids, n, eos_token_id=[])
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the demo's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=7, help="rounds of the resident measurement")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--link", default="25GB/s")
    ap.add_argument("--prompts", type=int, default=12, help="prompts for the stall measurement")
    ap.add_argument("--cost-tokens", type=int, default=200, help="tokens per policy-cost run")
    ap.add_argument("--cost-rounds", type=int, default=5, help="rounds of the policy-cost runs")
    ap.add_argument("--cost-trace", type=Path, default=None,
                    help="drive the policy-cost runs with this routing trace's first tokens "
                         "(default: skewed random routing at DeepSeek-V2-Lite shape)")
    ap.add_argument("--parts", default="cost,resident,stall",
                    help="comma-separated subset of cost, resident, stall, floor (where the "
                         "policy cost goes; not in the default set)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    out: dict = {}

    out["policy_cost_us"] = (cost_table(args.cost_tokens, args.cost_rounds, args.cost_trace)
                             if "cost" in parts else {})
    if "floor" in parts:
        out["policy_cost_parts_us"] = floor_table(args.cost_tokens, args.cost_rounds)

    path = args.model or demo_checkpoint()
    if "resident" in parts:
        resident_overhead(path, args, out)
    if "stall" in parts:
        stall_rows(path, args, out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def resident_overhead(path: Path, args, out: dict) -> None:
    """Two instances per policy, loaded A B B A: where an instance's buffers land in memory
    changes its speed by a few percent, so each policy gets two draws. Every round runs each
    instance once, in a rotating order; the ratio is the median over rounds of the fmoe
    instances' mean time over the lru instances'."""
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(0))
    names = ["lru", "fmoe", "fmoe", "lru"]
    models = [fmoe.models.from_pretrained(path, expert_cache=1.0, policy=p) for p in names]
    for m in models:
        decode_ms(m, ids, 8)                      # warm-up
        m.reset_expert_stats()
    ratios, ms = [], {"lru": [], "fmoe": []}
    for r in range(args.pairs):
        got = {"lru": [], "fmoe": []}
        for i in range(len(models)):
            j = (i + r) % len(models)
            got[names[j]].append(decode_ms(models[j], ids, args.tokens))
        for p in got:
            ms[p] += got[p]
        ratios.append(statistics.mean(got["fmoe"]) / statistics.mean(got["lru"]))
    # time the forward thread spent inside the policy (the runtime's own accounting)
    pol = {p: 1e3 * statistics.mean(m.expert_stats()["policy_seconds"] for m, q in zip(models, names) if q == p)
           / (args.pairs * args.tokens) for p in ("lru", "fmoe")}
    for m in models:
        m.close()
    med = statistics.median(ratios)
    out["resident"] = {"lru_ms": statistics.median(ms["lru"]), "fmoe_ms": statistics.median(ms["fmoe"]),
                       "fmoe_over_lru": med, "policy_ms_per_token": pol}
    print(f"\n## every expert resident ({path.name}, {args.threads} thread(s), {args.pairs} rounds of "
          f"{args.tokens} tokens on 2 instances per policy)")
    print(f"median: lru {out['resident']['lru_ms']:.3f} ms/token, fmoe {out['resident']['fmoe_ms']:.3f} "
          f"ms/token; fmoe / lru (median over rounds) = {med:.3f}")
    print(f"in the policy: lru {pol['lru']:.3f} ms/token, fmoe {pol['fmoe']:.3f} ms/token", flush=True)


def stall_rows(path: Path, args, out: dict) -> None:
    out["offloaded"] = {}
    for label, mpath in [("demo (Mixtral-shaped, 4 x 8, top-2)", path),
                         ("tiny DeepSeek-V2-shaped (7 x 32, top-6)", tiny_deepseek())]:
        print(f"\n## {label}: expert_cache=0.25, emulated {args.link} link, {args.prompts} prompts "
              f"of {args.tokens} new tokens")
        print("| policy | hit rate | stall ms/token | MiB loaded/token | tokens equal resident |")
        print("|---|---|---|---|---|")
        resident = fmoe.models.from_pretrained(mpath)
        vocab = resident.config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, vocab, (1, int(n)), generator=g)
                   for n in torch.randint(4, 24, (args.prompts,), generator=g)]
        refs = [resident.generate(p, args.tokens, eos_token_id=[]) for p in prompts]
        resident.close()
        out["offloaded"][label] = {}
        for p in ("lru", "fmoe"):
            m = fmoe.models.from_pretrained(mpath, expert_cache=0.25, policy=p, link_bandwidth=args.link)
            equal = all(torch.equal(m.generate(x, args.tokens, eos_token_id=[]), r)
                        for x, r in zip(prompts, refs))
            s = m.expert_stats()
            m.close()
            n = args.prompts * args.tokens
            row = {"hit_rate": s["hits"] / max(1, s["hits"] + s["misses"]),
                   "stall_ms_per_token": 1e3 * s["stall_seconds"] / n,
                   "mib_per_token": s["bytes_loaded"] / n / 2**20, "equal": equal}
            out["offloaded"][label][p] = row
            print(f"| {p} | {row['hit_rate']:.3f} | {row['stall_ms_per_token']:.2f} | "
                  f"{row['mib_per_token']:.2f} | {'yes' if equal else 'NO'} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
