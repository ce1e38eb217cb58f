"""Synthetic traces for the simulator tests (never the shared data)."""

from __future__ import annotations

import numpy as np


def synthetic_ids(T: int, L: int, E: int, K: int, seed: int = 0, skew: float = 1.1,
                  missing: float = 0.0) -> np.ndarray:
    """int16 [T, L, K] routed experts with Zipf-like popularity per layer, some temporal
    locality (a token often repeats part of the previous token's experts) and, optionally,
    -1 entries (not recorded)."""
    rng = np.random.default_rng(seed)
    ids = np.empty((T, L, K), dtype=np.int16)
    pops = []
    for _ in range(L):
        w = 1.0 / np.arange(1, E + 1) ** skew
        pops.append(rng.permutation(w / w.sum()))
    for t in range(T):
        for l in range(L):
            if t > 0 and rng.random() < 0.3:
                keep = rng.choice(K, size=K // 2, replace=False)
                chosen = list(ids[t - 1, l, keep])
            else:
                chosen = []
            rest = [e for e in rng.choice(E, size=E, replace=False, p=pops[l]) if e not in chosen]
            ids[t, l] = (chosen + rest)[:K]
    if missing:
        mask = rng.random((T, L, K)) < missing
        ids[mask] = -1
    return ids


def make_trace(T=200, L=3, E=8, K=2, nseq=5, seed=0, missing=0.0, model="test/tiny-moe",
               **extra):
    from fmoe.sim.trace import Trace

    ids = synthetic_ids(T, L, E, K, seed=seed, missing=missing)
    rng = np.random.default_rng(seed + 1)
    cuts = np.sort(rng.choice(np.arange(1, T), size=nseq - 1, replace=False)) if nseq > 1 else []
    offs = np.concatenate([[0], cuts, [T]]).astype(np.int64)
    return Trace(expert_ids=ids, seq_offsets=offs, num_experts=E, model=model, **extra)


def trace_from_lists(tokens_per_seq, E, model="test/hand"):
    """A trace from nested lists: [[token [layer [experts]]]] per sequence."""
    from fmoe.sim.trace import Trace

    flat = [tok for seq in tokens_per_seq for tok in seq]
    ids = np.array(flat, dtype=np.int16)
    if ids.ndim == 2:  # one layer, written as [experts] per token
        ids = ids[:, None, :]
    offs = np.cumsum([0] + [len(s) for s in tokens_per_seq]).astype(np.int64)
    return Trace(expert_ids=ids, seq_offsets=offs, num_experts=E, model=model)
