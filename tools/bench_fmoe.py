"""fMoE ablations in the simulator, side by side against lru, lfu, moe-infinity and the oracle.

    python tools/split_trace.py ../shared/data/traces/deepseek-v2-lite-puffin-dev.npz \\
        --fraction 0.7 --out-dir /tmp/split
    python tools/bench_fmoe.py --history /tmp/split/deepseek-v2-lite-puffin-dev.history.npz \\
        --trace /tmp/split/deepseek-v2-lite-puffin-dev.replay.npz --max-sequences 20 \\
        --plot docs/img/fmoe-ablation.png

Three parts, on the same replay (the first `--max-sequences` sequences of the trace):

1. Prediction quality, no cache: for each encoder (token, prompt, both) and each search, the
   precision and recall of the experts `select` picks for the layer d ahead (semantic search for
   layers 0..d-1, trajectory search for the rest; the store is filled from the history and keeps
   learning online); and how well the *next* token's experts can be predicted from the current
   token's (popularity, the same experts, layer-wise transitions, nearest stored maps).
2. Variants replayed through the cache: the default (reuse eviction, no prefetch), every
   eviction rule, prefetch on, no semantic / no trajectory search, each encoder, prefetch
   distance d in {1, 2, 3, 4, 6}. Reported: hit rate, TPOT, TPOT / lru, TPOT / oracle, loads per
   token, prefetch precision and wasted prefetch MB per token.
3. A plot (`--plot`): hit rate and TPOT / oracle per variant.

Prefetching variants replay in the discrete-event engine (slow: tens of tokens/s); keep
`--max-sequences` small for them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

from fmoe.runtime.fmoe_policy import FmoePolicy
from fmoe.sim.hardware import get_hardware
from fmoe.sim.replay import simulate
from fmoe.sim.shapes import get_shape, guess_shape
from fmoe.sim.timing import TimingModel
from fmoe.sim.trace import Trace, load_trace

PREFETCH = {"max_orders": 1}      # one order per layer, at neighbour similarity >= 0.6
# name -> (constructor options, attributes set after learning)
VARIANTS = {
    "fmoe default (reuse eviction, no prefetch)": ({}, {}),
    "eviction distance": ({"eviction": "distance"}, {}),
    "eviction pfreq (paper)": ({"eviction": "pfreq"}, {}),
    "eviction lru-pred": ({"eviction": "lru-pred"}, {}),
    "eviction lru": ({"eviction": "lru"}, {}),
    "reuse + prefetch": (PREFETCH, {}),
    "reuse + prefetch, no semantic": (PREFETCH, {"use_semantic": False}),
    "reuse + prefetch, no trajectory": (PREFETCH, {"use_trajectory": False}),
    "reuse + prefetch, prompt encoder": (dict(PREFETCH, encoder="prompt"), {}),
    "reuse + prefetch, token + prompt": (dict(PREFETCH, encoder="both"), {}),
}
DISTANCES = (1, 2, 3, 4, 6)


def first_sequences(trace: Trace, n: int | None) -> Trace:
    if n is None or n >= trace.num_sequences:
        return trace
    return trace.head(int(trace.seq_offsets[n]))


def learned(hist: Trace, L: int, E: int, K: int, cap: int, **opts) -> FmoePolicy:
    p = FmoePolicy(L, E, cap, top_k=K, **opts)
    p.learn_history(expert_ids=hist.expert_ids, seq_offsets=hist.seq_offsets,
                    gate_probs=hist.gate_probs, texts=hist.texts, token_ids=hist.token_ids)
    return p


def prediction_quality(policy: FmoePolicy, rep: Trace) -> dict:
    """Precision / recall of the experts selected for the layer d ahead, split by the search
    that produced them (semantic: targets 0..d-1, trajectory: the rest)."""
    p = copy.deepcopy(policy)
    p.max_orders = p.predictor.max_orders = 10**9    # every selected expert becomes an order
    p.predictor.min_similarity = -1.0
    p.predictor.lead = False                         # this iteration's layers only
    L, E, d = rep.num_layers, rep.num_experts, p.d
    acc = {"semantic": [0, 0, 0], "trajectory": [0, 0, 0]}   # hits, predicted, truth
    ids = rep.expert_ids
    for n in range(rep.num_sequences):
        a, b = int(rep.seq_offsets[n]), int(rep.seq_offsets[n + 1])
        p.on_request_start(n, rep.texts[n] if rep.texts else None,
                           None if rep.token_ids is None else rep.token_ids[a:b])
        for t in range(a, b):
            for layer in range(L):
                orders = p.on_layer_start(layer)
                target = layer + d - 1 if layer > 0 else None
                targets = range(d) if layer == 0 else [target]
                for tl in targets:
                    if tl >= L:
                        continue
                    pred = {k % E for k, _ in orders if k // E == tl}
                    truth = {int(e) for e in ids[t, tl] if e >= 0}
                    kind = "semantic" if layer == 0 else "trajectory"
                    acc[kind][0] += len(pred & truth)
                    acc[kind][1] += len(pred)
                    acc[kind][2] += len(truth)
                row = ids[t, layer]
                p.on_routed(layer, row[row >= 0].astype(np.int64),
                            None if rep.gate_probs is None else rep.gate_probs[t, layer])
            p.on_token_end()
        p.on_request_end(n)
    return {k: {"precision": h / max(1, np_), "recall": h / max(1, nt)} for k, (h, np_, nt) in acc.items()}


def used_rows(trace: Trace) -> np.ndarray:
    """[T, L, E] bool: the experts each token routed to."""
    ids = trace.expert_ids.astype(np.int64)
    T, L, K = ids.shape
    u = np.zeros((T, L, trace.num_experts + 1), bool)
    t, l = np.meshgrid(np.arange(T), np.arange(L), indexing="ij")
    for k in range(K):
        u[t, l, np.where(ids[:, :, k] >= 0, ids[:, :, k], trace.num_experts)] = True
    return u[:, :, :-1]


def next_token_quality(hist: Trace, rep: Trace, samples: int = 2000, store: int = 20000,
                       neighbours: int = 32, seed: int = 0) -> dict:
    """How well the experts of the *next* token can be predicted from the current token's
    routing: precision of the top-k per layer, for (a) the current token's own experts,
    (b) layer-wise transition counts from the history, (c) the next maps of the nearest stored
    maps (cosine over whole maps; `store` history tokens, `neighbours` nearest)."""
    rng = np.random.default_rng(seed)
    uh, ur = used_rows(hist), used_rows(rep)
    K = rep.top_k

    def pairs(trace: Trace) -> np.ndarray:
        first = np.zeros(trace.num_tokens, bool)
        first[trace.seq_offsets[:-1]] = True
        return np.flatnonzero(~first)      # tokens with a predecessor in their sequence

    ih, ir = pairs(hist), pairs(rep)
    ir = ir[rng.choice(len(ir), min(samples, len(ir)), replace=False)]
    prev, truth = ur[ir - 1].astype(np.float32), ur[ir]

    def precision(score: np.ndarray) -> float:
        top = np.argsort(-score, axis=-1)[..., :K]
        return float(np.take_along_axis(truth, top, -1).sum(-1).mean() / K)

    a, b = uh[ih - 1].astype(np.float32), uh[ih].astype(np.float32)
    trans = np.einsum("tle,tlf->lef", a, b) / np.maximum(a.sum(0)[:, :, None], 1)
    pop = uh.mean(axis=0)
    sub = ih[rng.choice(len(ih), min(store, len(ih)), replace=False)]
    keys = uh[sub - 1].reshape(len(sub), -1).astype(np.float32)
    vals = uh[sub].reshape(len(sub), -1).astype(np.float32)
    sim = prev.reshape(len(ir), -1) @ keys.T
    top = np.argpartition(-sim, neighbours, axis=1)[:, :neighbours]
    w = np.take_along_axis(sim, top, 1)
    knn = np.einsum("nk,nkf->nf", w, vals[top]).reshape(truth.shape)
    return {"popularity": precision(np.broadcast_to(pop, truth.shape).copy()),
            "previous token": precision(prev + 1e-3 * pop),
            "transitions": precision(np.einsum("tle,lef->tlf", prev, trans)),
            f"nearest {neighbours} of {len(sub)} maps": precision(knn)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=Path, required=True)
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--max-sequences", type=int, default=None, help="replay only the first N sequences")
    ap.add_argument("--cache-fraction", type=float, default=0.25)
    ap.add_argument("--hardware", default="rtx3090-pcie4")
    ap.add_argument("--variants", default=None, help="semicolon-separated subset of the variant names")
    ap.add_argument("--no-distances", action="store_true", help="skip the d sweep")
    ap.add_argument("--no-quality", action="store_true", help="skip the prediction-quality part")
    ap.add_argument("--no-variants", action="store_true", help="skip the replays (quality only)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)

    hist = load_trace(args.history)
    rep = first_sequences(load_trace(args.trace), args.max_sequences)
    shape = get_shape(guess_shape(rep.model) or "deepseek-v2-lite")
    tm = TimingModel.from_shape(shape, get_hardware(args.hardware))
    L, E, K = rep.num_layers, rep.num_experts, rep.top_k
    cap = int(args.cache_fraction * L * E)
    print(f"replay {rep.num_tokens} tokens in {rep.num_sequences} sequences; history "
          f"{hist.num_tokens} tokens; {cap} slots; {tm.name}", flush=True)
    out: dict = {"quality": {}, "rows": []}

    if not args.no_quality:
        print("\n| encoder | semantic precision | semantic recall | trajectory precision | trajectory recall |")
        print("|---|---|---|---|---|")
        for enc in ("token", "prompt", "both"):
            q = prediction_quality(learned(hist, L, E, K, cap, encoder=enc, max_orders=1), rep)
            out["quality"][enc] = q
            print(f"| {enc} | {q['semantic']['precision']:.3f} | {q['semantic']['recall']:.3f} | "
                  f"{q['trajectory']['precision']:.3f} | {q['trajectory']['recall']:.3f} |", flush=True)
        nt = next_token_quality(hist, rep)
        out["next_token"] = nt
        print("\n| next token's experts predicted from | precision |\n|---|---|")
        for k, v in nt.items():
            print(f"| {k} | {v:.3f} |", flush=True)
    if args.no_variants:
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return 0

    rows = out["rows"]

    def run(name, policy, **kw):
        t0 = time.perf_counter()
        r = simulate(rep, policy, tm, capacity=cap, **kw)
        wasted = (r.prefetched - r.prefetch_used) * shape.expert_bytes / 1e6 / max(1, r.tokens)
        rows.append({"variant": name, "hit_rate": r.hit_rate, "tpot_ms": r.tpot_ms,
                     "loads_per_token": r.loads_per_token, "prefetch_precision": r.prefetch_precision,
                     "wasted_mb_per_token": wasted, "wall_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)

    for name in ("lru", "lfu", "moe-infinity", "oracle"):
        run(name, name, history=hist if name == "moe-infinity" else None)
    wanted = None if args.variants is None else set(args.variants.split(";"))
    bases: dict[tuple, FmoePolicy] = {}
    for name, (opts, attrs) in VARIANTS.items():
        if wanted is not None and name not in wanted:
            continue
        # constructor options decide what the history fills (the map store only when a decision
        # reads maps), so each distinct set learns its own base; attributes are set afterwards
        key = tuple(sorted(opts.items()))
        if key not in bases:
            bases[key] = learned(hist, L, E, K, cap, **opts)
        p = copy.deepcopy(bases[key])
        for k, v in attrs.items():      # search switches live on the map predictor
            setattr(p.predictor if hasattr(p.predictor, k) else p, k, v)
        run(name, p)
    if not args.no_distances:
        for d in DISTANCES:
            run(f"reuse + prefetch, d = {d}", learned(hist, L, E, K, cap, prefetch_distance=d, **PREFETCH))
    run("fmoe online (empty at start)", FmoePolicy(L, E, cap, top_k=K))

    oracle = next(r["tpot_ms"] for r in rows if r["variant"] == "oracle")
    lru = next(r for r in rows if r["variant"] == "lru")
    print("\n| variant | hit rate | vs lru | TPOT ms | TPOT / lru | TPOT / oracle | loads/token | "
          "prefetch precision | wasted prefetch MB/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        prec = "-" if r["prefetch_precision"] is None else f"{r['prefetch_precision']:.3f}"
        print(f"| {r['variant']} | {r['hit_rate']:.4f} | {r['hit_rate'] - lru['hit_rate']:+.4f} | "
              f"{r['tpot_ms']:.2f} | {r['tpot_ms'] / lru['tpot_ms']:.3f} | {r['tpot_ms'] / oracle:.2f} | "
              f"{r['loads_per_token']:.1f} | {prec} | {r['wasted_mb_per_token']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if args.plot:
        plot(rows, oracle, args.plot, f"{rep.num_tokens} replay tokens, {cap} slots, {tm.name}")
    return 0


def plot(rows: list[dict], oracle: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    y = np.arange(len(rows))[::-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.38 * len(rows) + 1.5), sharey=True)
    colors = ["#999999" if n in ("lru", "lfu", "moe-infinity", "oracle") else "#3f6fb5" for n in names]
    a.barh(y, [r["hit_rate"] for r in rows], color=colors)
    a.set_xlabel("hit rate")
    a.axvline(rows[0]["hit_rate"], color="k", lw=0.8, ls="--")
    b.barh(y, [r["tpot_ms"] / oracle for r in rows], color=colors)
    b.set_xlabel("TPOT / oracle TPOT (lower is better)")
    b.axvline(rows[0]["tpot_ms"] / oracle, color="k", lw=0.8, ls="--")
    a.set_yticks(y, names, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
