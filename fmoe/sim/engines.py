"""The replay engines: the loops that drive a policy through a `SlotTable` over a trace.

``events`` (`events`: the discrete-event loop, any policy and any execution), ``demand``
(`demand_misses` + `demand_stall`: policies that never prefetch) and ``lru`` (`lru_misses`: a
plain-LRU kernel). `fmoe.sim.replay.simulate` picks one; all give the same counts.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..runtime.policies import MissCost, Policy, place
from ..runtime.slots import SlotTable
from .timing import TimingModel
from .trace import Trace


def flat_keys(trace: Trace) -> np.ndarray:
    """int32 [T, L, K] keys ``layer * E + expert`` (-1 where not recorded)."""
    ids = trace.expert_ids
    L, E = trace.num_layers, trace.num_experts
    keys = ids.astype(np.int32) + (np.arange(L, dtype=np.int32) * E)[None, :, None]
    np.putmask(keys, ids < 0, -1)
    return keys



def _overrides(policy: Policy, method: str) -> bool:
    return getattr(type(policy), method) is not getattr(Policy, method)


def _router_rows(trace: Trace, policy: Policy):
    """(token, layer) -> the router row a policy's `on_routed` gets: the trace's full softmax
    (`gate_probs`); else, for a policy that wants rows, the gate weights (`weights`) placed at the
    routed experts; else None (the policy falls back to the ids)."""
    if trace.gate_probs is not None:
        gp = trace.gate_probs
        return lambda t, l: gp[t, l]
    if trace.weights is not None and getattr(policy, "wants_probs", False):
        ids, w, E = trace.expert_ids, trace.weights, trace.num_experts

        def row(t: int, l: int) -> np.ndarray:
            r = np.zeros(E, np.float32)
            ok = ids[t, l] >= 0
            r[ids[t, l][ok]] = w[t, l][ok]
            return r
        return row
    return lambda t, l: None


def lru_misses(trace: Trace, capacity: int) -> np.ndarray:
    """Plain LRU over the access sequence: misses per (token, layer), uint16 [T, L]."""
    T, L, K = trace.expert_ids.shape
    keys = flat_keys(trace).reshape(-1)
    valid = keys >= 0
    seq = keys[valid].tolist()
    od: OrderedDict[int, None] = OrderedDict()
    move = od.move_to_end
    pop = od.popitem
    miss_idx = []
    append = miss_idx.append
    size = 0
    for i, k in enumerate(seq):
        if k in od:
            move(k)
        else:
            append(i)
            od[k] = None
            if size < capacity:
                size += 1
            else:
                pop(last=False)
    idx = np.asarray(miss_idx, dtype=np.int64)
    if valid.all():
        rows = idx // K
    else:
        rows = np.flatnonzero(valid)[idx] // K
    return np.bincount(rows, minlength=T * L).reshape(T, L).astype(np.uint16)


# tokens between two progress reports of a replay loop
_TICK = 256


def demand_misses(trace: Trace, table: SlotTable, progress=None) -> np.ndarray:
    """Table loop for a policy that never prefetches: misses per (token, layer). `progress`
    (when given) is called with the number of tokens replayed since its last call."""
    policy = table.policy
    ids = trace.expert_ids
    T, L, K = ids.shape
    E = trace.num_experts
    rows_of = _router_rows(trace, policy)
    misses = np.zeros((T, L), dtype=np.uint16)
    acquire_many = table.acquire_many
    pinned = table.pinned
    ls = _overrides(policy, "on_layer_start")
    routed = _overrides(policy, "on_routed")
    tok_end = _overrides(policy, "on_token_end")
    req = _overrides(policy, "on_request_start") or _overrides(policy, "on_request_end")
    bases = [l * E for l in range(L)]
    all_valid = bool((ids >= 0).all())
    for n in range(trace.num_sequences):
        a, b = int(trace.seq_offsets[n]), int(trace.seq_offsets[n + 1])
        if req:
            policy.on_request_start(n, trace.texts[n] if trace.texts else None,
                                    None if trace.token_ids is None else trace.token_ids[a:b])
        for t in range(a, b):
            rows = ids[t].tolist()
            mrow = misses[t]
            for l in range(L):
                if ls:
                    policy.on_layer_start(l)
                base = bases[l]
                row = rows[l]
                keys = [base + e for e in row] if all_valid else [base + e for e in row if e >= 0]
                m = acquire_many(keys)
                if m:
                    mrow[l] = m
                if routed:
                    policy.on_routed(l, np.array([e for e in row if e >= 0], dtype=np.int64),
                                     rows_of(t, l))
                pinned.clear()
            if tok_end:
                policy.on_token_end()
            if progress is not None and (t + 1) % _TICK == 0:
                progress(_TICK)
        if req:
            policy.on_request_end(n)
    if progress is not None and T % _TICK:
        progress(T % _TICK)
    return misses


def demand_stall(trace: Trace, misses: np.ndarray, tm: TimingModel) -> np.ndarray:
    _, _, shared = tm.per_layer(trace.num_layers)
    lanes = max(1, int(tm.lanes))
    # a layer's misses are read `lanes` at a time, each read taking lanes * copy
    rounds = (misses.astype(np.int64) + lanes - 1) // lanes
    per_layer = np.maximum(rounds * (lanes * tm.copy) - shared[None, :], 0.0)
    return per_layer.sum(axis=1)


def events(trace: Trace, table: SlotTable, tm: TimingModel,
            progress=None, execution: str = "load") -> tuple[np.ndarray, int, int, np.ndarray]:
    """The discrete-event replay (any policy). Returns (stall per token, demand loads,
    prefetch loads, host-computed uses per token). `progress` as in `_demand_misses`.

    With `execution` "host" or "hybrid" a layer first takes its resident experts, then decides
    each miss (`fmoe.runtime.policies.placement.place`) from the link's and the host's queues:
    a host-computed expert occupies the host queue for ``tm.host`` and not the device."""
    split = execution != "load"
    host_s, host_lat = float(tm.host), float(tm.host_latency)
    host_tok = np.zeros(trace.num_tokens, dtype=np.int64)
    hfree = 0.0                         # the host queue is free from this time on
    policy = table.policy
    ids = trace.expert_ids
    T, L, K = ids.shape
    E = trace.num_experts
    rows_of = _router_rows(trace, policy)
    attn, attn_ctx, shared = (a.tolist() for a in tm.per_layer(L))
    nl = max(1, int(tm.lanes))
    copy = float(tm.copy) * nl          # one read on one lane (lanes share the link's rate)
    expert = float(tm.expert)
    pre, pre_ctx, post = float(tm.token_pre), float(tm.token_pre_ctx), float(tm.token_post)
    slot_of = table.slot_of
    acquire, prefetch = table.acquire, table.prefetch
    pinned = table.pinned
    routed = _overrides(policy, "on_routed")
    on_layer_start = policy.on_layer_start
    stall_tok = np.zeros(T, dtype=np.float64)
    ready_at: dict[int, float] = {}     # resident keys whose copy may still be in flight
    counters = [0]                      # prefetch loads
    orders: list[int] = []
    oi = 0
    no = 0
    busy = 0.0                          # the earliest lane is free from this time on
    lanes = [0.0] * nl                  # when each lane of the copy engine is free
    demand = 0
    t = 0.0

    def take_lane(start: float) -> float:
        # a read on the earliest free lane, from `start` on; returns when it lands
        i = lanes.index(min(lanes)) if nl > 1 else 0
        lanes[i] = (lanes[i] if lanes[i] > start else start) + copy
        return lanes[i]

    def advance(now: float, busy: float, orders: list[int], oi: int) -> tuple[float, int]:
        # start queued prefetches whose start time (a lane free) is before `now`
        n = len(orders)
        while oi < n and busy < now:
            key = orders[oi]
            oi += 1
            if key in slot_of:
                continue
            acq = prefetch(key)
            if acq is None:
                continue
            ev = acq.evicted
            if ev is not None:
                ready_at.pop(ev, None)
            ready_at[key] = take_lane(busy)
            busy = min(lanes)
            counters[0] += 1
        return busy, oi

    for n in range(trace.num_sequences):
        a, b = int(trace.seq_offsets[n]), int(trace.seq_offsets[n + 1])
        policy.on_request_start(n, trace.texts[n] if trace.texts else None,
                                None if trace.token_ids is None else trace.token_ids[a:b])
        for tok in range(a, b):
            ctx = tok - a + 1
            rows = ids[tok].tolist()
            t += pre + pre_ctx * ctx
            stall = 0.0
            for l in range(L):
                if oi < no and busy < t:
                    busy, oi = advance(t, busy, orders, oi)
                new = on_layer_start(l)
                if new:
                    orders = [k for k, _ in new]   # highest priority first (Policy contract)
                    if busy < t:
                        lanes[:] = [x if x > t else t for x in lanes]
                        busy = min(lanes)
                else:
                    orders = []
                oi = 0
                no = len(orders)
                t += attn[l] + attn_ctx[l] * ctx
                if no and busy < t:
                    busy, oi = advance(t, busy, orders, oi)
                base = l * E
                wait = t
                keys = [base + e for e in rows[l] if e >= 0]
                hdone = -1.0
                ndev = 0
                # host/hybrid: the resident experts first (pinned), then each miss is placed
                for key in sorted(keys, key=lambda k: k not in slot_of) if split else keys:
                    if key in slot_of:
                        r = ready_at.get(key)
                        if r is None or r <= t:
                            acquire(key)
                            if r is not None:
                                del ready_at[key]
                        else:
                            acquire(key, True, False)
                            if r > wait:
                                wait = r
                        ndev += 1
                        continue
                    tl = (busy if busy > t else t) + copy     # on the earliest lane
                    if split:
                        th = (hfree if hfree > t else t) + host_s
                        if not place(execution, table, key,
                                     MissCost(tl - t + expert, th - t + host_lat)):
                            table.host(key)
                            hfree = hdone = th
                            host_tok[tok] += 1
                            continue
                    acq = acquire(key)
                    ev = acq.evicted
                    if ev is not None:
                        ready_at.pop(ev, None)
                    ready_at[key] = wait = take_lane(t)
                    busy = min(lanes)
                    demand += 1
                    ndev += 1
                ready = t + shared[l]
                if wait > ready:
                    stall += wait - ready
                    t = wait
                else:
                    t = ready
                t += expert * ndev
                if hdone >= 0 and hdone + host_lat > t:
                    stall += hdone + host_lat - t
                    t = hdone + host_lat
                if routed:
                    policy.on_routed(l, np.array(keys, dtype=np.int64) - base,
                                     rows_of(tok, l))
                if oi < no and busy < t:
                    busy, oi = advance(t, busy, orders, oi)
                pinned.difference_update(keys)
            t += post
            policy.on_token_end()
            stall_tok[tok] = stall
            if progress is not None and (tok + 1) % _TICK == 0:
                progress(_TICK)
        policy.on_request_end(n)
    if progress is not None and T % _TICK:
        progress(T % _TICK)
    return stall_tok, demand, counters[0], host_tok


def warm_hot_set(table: SlotTable, history: Trace) -> None:
    """Fill `table` with the experts `history` used most (a static hot set, as llama.cpp's
    hot-expert overrides are chosen from a profiling run); its counts restart at zero."""
    keys = flat_keys(history).reshape(-1)
    counts = np.bincount(keys[keys >= 0], minlength=history.num_layers * history.num_experts)
    hot = np.argsort(-counts, kind="stable")[:table.capacity]
    for key in hot.tolist():
        table.acquire(int(key))
    table.unpin()
    peak = table.stats.resident_peak
    table.stats = type(table.stats)(resident_peak=peak)
