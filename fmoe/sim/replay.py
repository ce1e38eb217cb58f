"""Trace replay: drive the runtime's policy objects through `SlotTable`, under a timing model.

Semantics (the same as the live runtime's, see `fmoe.runtime.policies`):

* Sequences in trace order; each token is one iteration (batch one); MoE layers in order.
* One global pool of ``capacity`` slots shared by all MoE layers (``floor(F * L * E)``).
* Per token, per MoE layer l: ``on_layer_start(l)`` (prefetch orders), attention, then
  ``SlotTable.acquire`` of every routed expert of the layer in the trace's column order (pinning
  them), ``on_routed(l, experts, probs)``, the layer's compute, ``SlotTable.unpin`` of the
  layer's keys. ``on_token_end`` after the last layer; ``on_request_start/end`` around each
  sequence.
* A use is a hit only when the expert is resident *and its copy has finished* when the routing
  is known; a prefetch still in flight is a miss (``late``) and the wait is stall.
* One copy engine (`timing.copy` seconds per expert): demand loads first, in acquire order;
  then prefetch orders by priority. The orders returned by the latest ``on_layer_start``
  replace the unstarted ones. A prefetch takes its slot (``SlotTable.prefetch``, which may evict
  and asks ``admit_prefetch``) when its copy starts; a copy never stops once started (an
  expert evicted while its copy is in flight wastes the copy).

Three engines give identical counts (tests hold them to it): ``events`` (the discrete-event loop
above, any policy), ``demand`` (policies that never prefetch: the copy engine is idle whenever a
layer routes, so stall per layer is ``max(0, misses * copy - shared)``, computed vectorised after
the table loop) and ``lru`` (a plain-LRU kernel, the same counts as `LRUPolicy` in a `SlotTable`
whenever the pool holds at least one layer's experts).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from ..errors import FmoeError
from ..runtime.policies import MissCost, Policy, check_execution, check_option_types, option_names, place
from ..runtime.policies import policy_class as runtime_policy_class
from ..runtime.policies import policy_names as runtime_policy_names
from ..runtime.slots import SlotTable
from . import diskcache
from .oracle import BeladyPolicy, HorizonPolicy, OraclePolicy
from .timing import TimingModel
from .trace import Trace

SIM_ONLY = {"belady": BeladyPolicy, "oracle": OraclePolicy, "horizon": HorizonPolicy}


class SimError(FmoeError, ValueError):
    """A simulation request that cannot run (bad capacity, unknown policy, mismatched history)."""


def policy_names() -> list[str]:
    """Every policy `simulate` knows: the runtime's registry plus the sim-only bounds."""
    return sorted(set(runtime_policy_names()) | set(SIM_ONLY))


def sweep_policy_names() -> list[str]:
    """The policies a sweep runs by default: all but "horizon" (a study tool with an option)."""
    return [p for p in policy_names() if p != "horizon"]


def policy_class(name: str) -> type[Policy]:
    if name in SIM_ONLY:
        return SIM_ONLY[name]
    cls = runtime_policy_class(name)
    if cls is None:
        raise SimError(f"unknown policy {name!r}; choose one of {', '.join(policy_names())}")
    return cls


# -- derived arrays -----------------------------------------------------------------------

def flat_keys(trace: Trace) -> np.ndarray:
    """int32 [T, L, K] keys ``layer * E + expert`` (-1 where not recorded)."""
    ids = trace.expert_ids
    L, E = trace.num_layers, trace.num_experts
    keys = ids.astype(np.int32) + (np.arange(L, dtype=np.int32) * E)[None, :, None]
    np.putmask(keys, ids < 0, -1)
    return keys


def access_sequence(trace: Trace, use_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(keys int32 [n], next_use [n]) over the valid uses in replay order (next_use: index of
    the key's next use, n when none; int32 unless n needs more); cached on disk."""
    fp = trace.fingerprint()
    if use_cache:
        k = diskcache.load("access", fp, "keys")
        nu = diskcache.load("nextuse", fp, "next")
        if k is not None and nu is not None and len(k) == len(nu):
            return k, nu
    keys = flat_keys(trace).reshape(-1)
    keys = keys[keys >= 0]
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    nxt = np.full(n, n, dtype=np.int32 if n < 2**31 - 1 else np.int64)
    same = keys[order[1:]] == keys[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    if use_cache:
        diskcache.save(keys, "access", fp, "keys")
        diskcache.save(nxt, "nextuse", fp, "next")
    return keys, nxt


# -- policies -----------------------------------------------------------------------------

def capacity_for(trace: Trace, fraction: float) -> int:
    if not (0 < fraction <= 1):
        raise SimError(f"cache fraction must be in (0, 1], got {fraction}")
    return int(np.floor(fraction * trace.num_layers * trace.num_experts + 1e-9))


def check_capacity(trace: Trace, capacity: int) -> None:
    need = int((trace.expert_ids >= 0).sum(axis=2).max()) if trace.num_tokens else 1
    total = trace.num_layers * trace.num_experts
    if capacity < max(need, 1):
        raise SimError(f"a cache of {capacity} slots cannot hold one layer's {need} routed "
                       f"experts (the layer's experts are pinned while it runs); use a larger "
                       f"cache fraction (>= {need / total:.4f})")
    if capacity > total:
        raise SimError(f"capacity {capacity} exceeds the {total} routed experts")


def build_policy(name: str, trace: Trace, capacity: int, *, use_cache: bool = True,
                 timing: TimingModel | None = None, **options) -> Policy:
    """A policy by name. Sim-only policies ("belady", "oracle", "horizon") get the trace's
    future. `options` go to the policy when its options dataclass has them (others are
    ignored: a sweep passes one set to every policy); `top_k` and, from `timing`, the hardware
    profile (`copy_seconds`, `layer_seconds`) are filled in for policies that take them."""
    L, E = trace.num_layers, trace.num_experts
    cls = policy_class(name)
    accepted = option_names(cls)
    kw = {k: v for k, v in options.items() if v is not None and k in accepted}
    check_option_types(cls, kw)      # one check for the runtime, the simulator and the CLIs
    if "top_k" in accepted:
        kw.setdefault("top_k", trace.top_k)
    if timing is not None and "copy_seconds" in accepted:
        kw.setdefault("copy_seconds", float(timing.copy))
        kw.setdefault("layer_seconds", timing.layer_seconds(L, trace.top_k))
    data = {}
    if name in SIM_ONLY:
        keys, nxt = access_sequence(trace, use_cache)
        data.update(keys=keys, next_use=nxt)
        if getattr(cls, "needs_token_starts", False):
            valid = (trace.expert_ids >= 0).reshape(trace.num_tokens, -1).sum(axis=1)
            data["token_starts"] = np.concatenate([[0], np.cumsum(valid)])
    return cls(L, E, capacity, **data, **kw)


def takes_profile(name: str) -> bool:
    """Whether the policy's options take the hardware profile (its decisions may then differ
    between profiles)."""
    return "copy_seconds" in option_names(policy_class(name))


def prefetching_by_timing(name: str, trace: Trace, capacity: int,
                          timings: Sequence[TimingModel], *, use_cache: bool = True,
                          **options) -> list[bool]:
    """Per timing model, whether the policy built for it prefetches (read from the instance)."""
    if takes_profile(name):
        out = []
        for tm in timings:
            pol = build_policy(name, trace, capacity, use_cache=use_cache, timing=tm, **options)
            out.append(bool(pol.prefetches))
            pol.close()
        return out
    pol = build_policy(name, trace, capacity, use_cache=use_cache, **options)
    return [bool(pol.prefetches)] * len(timings)


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


def feed_history(policy: Policy, history: Trace) -> None:
    """Let a policy learn from a routing history before the measured replay (not measured, no
    cache events). Uses ``policy.learn_history(expert_ids=, seq_offsets=, gate_probs=, texts=,
    token_ids=)`` when the policy has it, else drives the workload events."""
    if hasattr(policy, "learn_history"):
        policy.learn_history(expert_ids=history.expert_ids, seq_offsets=history.seq_offsets,
                             gate_probs=history.gate_probs, texts=history.texts,
                             token_ids=history.token_ids, weights=history.weights)
        return
    want = [m for m in ("on_request_start", "on_layer_start", "on_routed", "on_token_end",
                        "on_request_end") if _overrides(policy, m)]
    if not want:
        return
    ids = history.expert_ids
    rows_of = _router_rows(history, policy)
    L = history.num_layers
    for n in range(history.num_sequences):
        a, b = int(history.seq_offsets[n]), int(history.seq_offsets[n + 1])
        policy.on_request_start(n, history.texts[n] if history.texts else None,
                                None if history.token_ids is None else history.token_ids[a:b])
        for t in range(a, b):
            for l in range(L):
                policy.on_layer_start(l)
                row = ids[t, l]
                policy.on_routed(l, row[row >= 0].astype(np.int64),
                                 rows_of(t, l))
            policy.on_token_end()
        policy.on_request_end(n)


# -- results ------------------------------------------------------------------------------

@dataclass
class SimResult:
    policy: str
    tokens: int
    capacity: int
    hit_rate: float
    tpot_ms: float
    stall_ms_per_token: float
    bytes_per_token: float
    prefetch_precision: float | None
    loads_per_token: float
    compute_ms_per_token: float
    hits: int
    misses: int
    late: int
    demand_loads: int
    prefetched: int
    prefetch_used: int
    wasted_prefetch_bytes: int
    wasted_prefetch_bytes_per_token: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    sequences: int
    num_layers: int
    num_experts: int
    cache_fraction: float        # as requested (capacity / (L * E) when given a capacity)
    expert_bytes: int
    copy_ms: float
    timing: str
    engine: str
    wall_s: float
    extra: dict = field(default_factory=dict)
    execution: str = "load"
    host_computed: int = 0               # routed-expert uses computed on the host
    host_computed_per_token: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d


@dataclass
class _Counts:
    hits: int
    misses: int
    late: int
    demand_loads: int
    prefetch_loads: int
    prefetched: int
    prefetch_used: int
    stall: np.ndarray          # [T] seconds
    host_tok: np.ndarray | None = None   # [T] uses computed on the host
    execution: str = "load"


def _ctx(trace: Trace) -> np.ndarray:
    """Context length (1-based position in its sequence) of every token."""
    T = trace.num_tokens
    offs = trace.seq_offsets
    starts = np.repeat(offs[:-1], np.diff(offs))
    return (np.arange(T, dtype=np.int64) - starts + 1).astype(np.float64)


def compute_per_token(trace: Trace, tm: TimingModel) -> np.ndarray:
    """Compute seconds of every token (without stall)."""
    L = trace.num_layers
    attn, attn_ctx, shared = tm.per_layer(L)
    ctx = _ctx(trace)
    used = (trace.expert_ids >= 0).sum(axis=(1, 2)).astype(np.float64)
    return (tm.token_pre + tm.token_post + attn.sum() + shared.sum()
            + ctx * (tm.token_pre_ctx + attn_ctx.sum()) + used * tm.expert)


# -- engines ------------------------------------------------------------------------------

def _lru_misses(trace: Trace, capacity: int) -> np.ndarray:
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


def _demand_misses(trace: Trace, table: SlotTable, progress=None) -> np.ndarray:
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


def _demand_stall(trace: Trace, misses: np.ndarray, tm: TimingModel) -> np.ndarray:
    _, _, shared = tm.per_layer(trace.num_layers)
    per_layer = np.maximum(misses.astype(np.float64) * tm.copy - shared[None, :], 0.0)
    return per_layer.sum(axis=1)


def _events(trace: Trace, table: SlotTable, tm: TimingModel,
            progress=None, execution: str = "load") -> tuple[np.ndarray, int, int, np.ndarray]:
    """The discrete-event replay (any policy). Returns (stall per token, demand loads,
    prefetch loads, host-computed uses per token). `progress` as in `_demand_misses`.

    With `execution` "host" or "hybrid" a layer first takes its resident experts, then decides
    each miss (`fmoe.runtime.policies.placement.place`) from the link's and the host's queues:
    a host-computed expert occupies the host queue for ``tm.host`` and not the device."""
    split = execution != "load"
    host_s, host_lat = float(tm.host), float(tm.host_latency)
    if split and host_s <= 0:
        raise SimError(f"execution {execution!r} needs a host compute time (the timing model "
                       f"has none: give --host-gbps or a profile with one)")
    host_tok = np.zeros(trace.num_tokens, dtype=np.int64)
    hfree = 0.0                         # the host queue is free from this time on
    policy = table.policy
    ids = trace.expert_ids
    T, L, K = ids.shape
    E = trace.num_experts
    rows_of = _router_rows(trace, policy)
    attn, attn_ctx, shared = (a.tolist() for a in tm.per_layer(L))
    copy = float(tm.copy)
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
    busy = 0.0                          # the copy engine is free from this time on
    demand = 0
    t = 0.0

    def advance(now: float, busy: float, orders: list[int], oi: int) -> tuple[float, int]:
        # start queued prefetches whose start time (engine free) is before `now`
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
            busy += copy
            ready_at[key] = busy
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
                        busy = t
                else:
                    orders = []
                oi = 0
                no = len(orders)
                t += attn[l] + attn_ctx[l] * ctx
                if no and busy < t:
                    busy, oi = advance(t, busy, orders, oi)
                base = l * E
                wait = t
                keys = []
                if split:
                    keys = [base + e for e in rows[l] if e >= 0]
                    hdone = -1.0
                    ndev = 0
                    for key in sorted(keys, key=lambda k: k not in slot_of):
                        if key in slot_of:
                            ndev += 1
                            r = ready_at.get(key)
                            if r is None or r <= t:
                                acquire(key)
                                if r is not None:
                                    del ready_at[key]
                            else:
                                acquire(key, True, False)
                                if r > wait:
                                    wait = r
                            continue
                        tl = (busy if busy > t else t) + copy
                        th = (hfree if hfree > t else t) + host_s
                        if place(execution, table, key,
                                 MissCost(tl - t + expert, th - t + host_lat)):
                            ndev += 1
                            acq = acquire(key)
                            ev = acq.evicted
                            if ev is not None:
                                ready_at.pop(ev, None)
                            busy = tl
                            ready_at[key] = busy
                            wait = busy
                            demand += 1
                        else:
                            table.host(key)
                            hfree = hdone = th
                            host_tok[tok] += 1
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
                    continue
                for e in rows[l]:
                    if e < 0:
                        continue
                    key = base + e
                    keys.append(key)
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
                    else:
                        acq = acquire(key)
                        ev = acq.evicted
                        if ev is not None:
                            ready_at.pop(ev, None)
                        busy = (busy if busy > t else t) + copy
                        ready_at[key] = busy
                        wait = busy
                        demand += 1
                ready = t + shared[l]
                if wait > ready:
                    stall += wait - ready
                    t = wait
                else:
                    t = ready
                t += expert * len(keys)
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


# -- entry point --------------------------------------------------------------------------

def simulate(trace: Trace, policy: str | Policy, timing: TimingModel | Sequence[TimingModel], *,
             capacity: int | None = None, cache_fraction: float | None = None,
             history: Trace | None = None, engine: str = "auto", use_cache: bool = True,
             policy_options: dict | None = None, progress=None,
             execution: str = "load") -> SimResult | list[SimResult]:
    """Replay `trace` through `policy` (a name, or a `Policy` built for this trace) on a pool of
    `capacity` slots (or ``floor(cache_fraction * L * E)``) under `timing`.

    `timing` may be a list: demand-paging policies then replay once and are timed under each
    model; prefetching policies (named) replay once per model. Returns one `SimResult` per
    timing model (a list when a list was given).
    `engine`: "auto" (fastest exact one), "events", "demand" or "lru" (see the module doc).
    `progress`: called with a count of tokens as each replay pass advances (a progress bar's
    ``update``); "oracle" replays twice (its schedule, then Belady demand paging).
    `execution`: "load" (every miss loaded), "host" (misses computed on the host beside a static
    hot set: with `history`, its most used experts; else filled on first use) or "hybrid" (per
    miss, `fmoe.runtime.policies.placement`); host and hybrid replay on the event engine."""
    check_execution(execution)
    timings = [timing] if isinstance(timing, TimingModel) else list(timing)
    if not timings:
        raise SimError("no timing model")
    L, E = trace.num_layers, trace.num_experts
    if capacity is None:
        if cache_fraction is None:
            raise SimError("give capacity or cache_fraction")
        capacity = capacity_for(trace, cache_fraction)
    capacity = int(capacity)
    check_capacity(trace, capacity)
    if history is not None and (history.num_layers != L or history.num_experts != E):
        raise SimError(f"history has {history.num_layers} layers x {history.num_experts} "
                       f"experts; the trace has {L} x {E}")

    def make(tm: TimingModel) -> Policy:
        if isinstance(policy, Policy):
            if policy.num_layers != L or policy.num_experts != E:
                raise SimError(f"policy built for {policy.num_layers} x {policy.num_experts}, "
                               f"trace is {L} x {E}")
            return policy
        return build_policy(policy, trace, capacity, use_cache=use_cache, timing=tm,
                            **(policy_options or {}))

    t0 = time.perf_counter()
    pol = make(timings[0])
    name = pol.name if isinstance(policy, Policy) else policy
    cacheable = not isinstance(policy, Policy) and history is None and not policy_options
    # capabilities are read from instances: a policy that takes the hardware profile may
    # prefetch under one profile and not under another
    prefetching = bool(pol.prefetches)
    if not isinstance(policy, Policy) and len(timings) > 1 and takes_profile(policy):
        for tm in timings[1:]:
            other = make(tm)
            prefetching = prefetching or bool(other.prefetches)
            other.close()
    if execution != "load":
        if engine not in ("auto", "events"):
            raise SimError(f"execution {execution!r} replays on the events engine, not {engine!r}")
        engine = "events"
    if engine == "auto":
        if prefetching:
            engine = "events"
        elif name == "lru" and type(pol).__name__ == "LRUPolicy":
            engine = "lru"
        else:
            engine = "demand"
    if engine not in ("events", "demand", "lru"):
        raise SimError(f"unknown engine {engine!r} (auto, events, demand, lru)")
    if engine == "demand" and prefetching:
        raise SimError(f"policy {name!r} prefetches: use engine 'events'")
    if engine == "lru" and not (name == "lru" and type(pol).__name__ == "LRUPolicy"):
        raise SimError("engine 'lru' replays the lru policy only")
    if engine == "events" and len(timings) > 1 and isinstance(policy, Policy):
        raise SimError("several timing models need a policy name (the policy is rebuilt)")

    used = int((trace.expert_ids >= 0).sum())
    comp_cache: dict[int, np.ndarray] = {}
    results = []
    if engine in ("lru", "demand"):
        if history is not None:
            feed_history(pol, history)
        misses = None
        ckey = ("misses", trace.fingerprint(), name, capacity, diskcache.code_version())
        if cacheable and use_cache:
            misses = diskcache.load(*ckey)
            if misses is not None and misses.shape != (trace.num_tokens, L):
                misses = None
        if misses is None:
            if engine == "lru":
                misses = _lru_misses(trace, capacity)
                if progress is not None:
                    progress(trace.num_tokens)
            else:
                misses = _demand_misses(trace, SlotTable(capacity, pol), progress)
            if cacheable and use_cache:
                diskcache.save(misses, *ckey)
        elif progress is not None:
            progress(trace.num_tokens)
        n_miss = int(misses.sum(dtype=np.int64))
        replay_s = time.perf_counter() - t0
        for tm in timings:
            t1 = time.perf_counter()
            stall = _demand_stall(trace, misses, tm)
            c = _Counts(hits=used - n_miss, misses=n_miss, late=0, demand_loads=n_miss,
                        prefetch_loads=0, prefetched=0, prefetch_used=0, stall=stall)
            results.append(_result(trace, name, capacity, tm, c, engine,
                                   replay_s + time.perf_counter() - t1, cache_fraction))
    else:
        for i, tm in enumerate(timings):
            t1 = time.perf_counter()
            if i > 0:
                pol.close()
                pol = make(tm)
            if history is not None:
                feed_history(pol, history)
            table = SlotTable(capacity, pol)
            if execution == "host" and history is not None:
                warm_hot_set(table, history)
            stall, demand_loads, pref_loads, host_tok = _events(trace, table, tm, progress,
                                                                execution)
            st = table.stats
            assert demand_loads == st.misses - st.late, (demand_loads, st.misses, st.late)
            assert pref_loads == st.prefetched, (pref_loads, st.prefetched)
            assert int(host_tok.sum()) == st.host, (int(host_tok.sum()), st.host)
            c = _Counts(hits=st.hits, misses=st.misses, late=st.late, demand_loads=demand_loads,
                        prefetch_loads=pref_loads, prefetched=st.prefetched,
                        prefetch_used=st.prefetch_used, stall=stall,
                        host_tok=host_tok if execution != "load" else None, execution=execution)
            results.append(_result(trace, name, capacity, tm, c, engine,
                                   time.perf_counter() - (t0 if i == 0 else t1), cache_fraction))
    if name == "oracle" and not isinstance(policy, Policy) and execution == "load":
        # a bound: knowing the future, the oracle also knows when its prefetches would hold up
        # demand loads on the link more than they save; per timing model it takes the lower
        # TPOT of its prefetch schedule and Belady demand paging (it is never worse than belady)
        demand = simulate(trace, "belady", timings, capacity=capacity, use_cache=use_cache,
                          progress=progress)
        results = [_oracle_bound(o, b) for o, b in zip(results, demand)]
    return results[0] if isinstance(timing, TimingModel) else results


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


def _oracle_bound(oracle: SimResult, belady: SimResult) -> SimResult:
    """The oracle's result: its prefetch schedule, or Belady demand paging where that is faster
    (``schedule`` says which)."""
    if belady.tpot_ms < oracle.tpot_ms:
        return replace(belady, policy=oracle.policy, cache_fraction=oracle.cache_fraction,
                       wall_s=oracle.wall_s + belady.wall_s,
                       extra={**belady.extra, "schedule": "demand"})
    return replace(oracle, wall_s=oracle.wall_s + belady.wall_s,
                   extra={**oracle.extra, "schedule": "prefetch"})


def _result(trace: Trace, name: str, capacity: int, tm: TimingModel, c: "_Counts", engine: str,
            wall: float, fraction: float | None = None) -> SimResult:
    L, E, T = trace.num_layers, trace.num_experts, trace.num_tokens
    comp = compute_per_token(trace, tm)
    n_host = 0
    if c.host_tok is not None:
        comp = comp - c.host_tok * tm.expert     # host-computed experts take no device time
        n_host = int(c.host_tok.sum())
    tpot = comp + c.stall
    loads = c.demand_loads + c.prefetch_loads
    wasted = (c.prefetched - c.prefetch_used) * tm.expert_bytes
    return SimResult(
        policy=name, tokens=T, capacity=capacity,
        hit_rate=c.hits / max(c.hits + c.misses, 1),
        tpot_ms=float(tpot.mean() * 1e3), stall_ms_per_token=float(c.stall.mean() * 1e3),
        bytes_per_token=loads * tm.expert_bytes / T,
        prefetch_precision=(c.prefetch_used / c.prefetched) if c.prefetched else None,
        loads_per_token=loads / T, compute_ms_per_token=float(comp.mean() * 1e3),
        hits=int(c.hits), misses=int(c.misses), late=int(c.late),
        demand_loads=int(c.demand_loads), prefetched=int(c.prefetched),
        prefetch_used=int(c.prefetch_used),
        wasted_prefetch_bytes=int(wasted), wasted_prefetch_bytes_per_token=wasted / T,
        tpot_p50_ms=float(np.percentile(tpot, 50) * 1e3),
        tpot_p99_ms=float(np.percentile(tpot, 99) * 1e3),
        sequences=trace.num_sequences, num_layers=L, num_experts=E,
        cache_fraction=float(fraction) if fraction is not None else capacity / (L * E),
        expert_bytes=int(tm.expert_bytes),
        copy_ms=float(tm.copy * 1e3), timing=tm.name, engine=engine, wall_s=wall,
        execution=c.execution, host_computed=n_host, host_computed_per_token=n_host / T)
