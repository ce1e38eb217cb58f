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
* One copy engine (`timing.copy` seconds per expert; with ``timing.lanes`` = n, n reads at once
  of n * copy seconds each, as a CPU's reader threads): demand loads first, in acquire order;
  then prefetch orders by priority. The orders returned by the latest ``on_layer_start``
  replace the unstarted ones. A prefetch takes its slot (``SlotTable.prefetch``, which may evict
  and asks ``admit_prefetch``) when its copy starts; a copy never stops once started (an
  expert evicted while its copy is in flight wastes the copy).

Three engines give identical counts (tests hold them to it): ``events`` (the discrete-event loop
above, any policy), ``demand`` (policies that never prefetch: the copy engine is idle whenever a
layer routes, so stall per layer is ``max(0, ceil(misses / n) * n * copy - shared)``, computed
vectorised after the table loop) and ``lru`` (a plain-LRU kernel, the same counts as `LRUPolicy` in a `SlotTable`
whenever the pool holds at least one layer's experts).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..errors import FmoeError
from ..runtime.policies import Policy, check_execution, check_option_types, option_names
from ..runtime.policies import policy_class as runtime_policy_class
from ..runtime.policies import policy_names as runtime_policy_names
from ..runtime.slots import SlotTable, fraction_slots
from . import diskcache
from .engines import _overrides, _router_rows, demand_misses, demand_stall, events, flat_keys, lru_misses, warm_hot_set  # noqa: F401
from .oracle import BeladyPolicy, HorizonPolicy, OraclePolicy
from .results import Counts, SimResult, compute_per_token, make_result, oracle_bound  # noqa: F401
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
    return max(1, fraction_slots(fraction, trace.num_layers * trace.num_experts))


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
    profile (`copy_seconds`, `layer_seconds`, `lanes`) are filled in for policies that take them."""
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
        if "lanes" in accepted:
            kw.setdefault("lanes", int(getattr(timing, "lanes", 1)))
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
    if execution != "load" and any(tm.host <= 0 for tm in timings):
        raise SimError(f"execution {execution!r} needs a host compute time (the timing model "
                       f"has none: give --host-gbps or a profile with one)")
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
                misses = lru_misses(trace, capacity)
                if progress is not None:
                    progress(trace.num_tokens)
            else:
                misses = demand_misses(trace, SlotTable(capacity, pol), progress)
            if cacheable and use_cache:
                diskcache.save(misses, *ckey)
        elif progress is not None:
            progress(trace.num_tokens)
        n_miss = int(misses.sum(dtype=np.int64))
        replay_s = time.perf_counter() - t0
        for tm in timings:
            t1 = time.perf_counter()
            stall = demand_stall(trace, misses, tm)
            c = Counts(hits=used - n_miss, misses=n_miss, late=0, demand_loads=n_miss,
                        prefetch_loads=0, prefetched=0, prefetch_used=0, stall=stall)
            results.append(make_result(trace, name, capacity, tm, c, engine,
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
            stall, demand_loads, pref_loads, host_tok = events(trace, table, tm, progress,
                                                                execution)
            st = table.stats
            assert demand_loads == st.misses - st.late, (demand_loads, st.misses, st.late)
            assert pref_loads == st.prefetched, (pref_loads, st.prefetched)
            assert int(host_tok.sum()) == st.host, (int(host_tok.sum()), st.host)
            c = Counts(hits=st.hits, misses=st.misses, late=st.late, demand_loads=demand_loads,
                        prefetch_loads=pref_loads, prefetched=st.prefetched,
                        prefetch_used=st.prefetch_used, stall=stall,
                        host_tok=host_tok if execution != "load" else None, execution=execution)
            results.append(make_result(trace, name, capacity, tm, c, engine,
                                   time.perf_counter() - (t0 if i == 0 else t1), cache_fraction))
    if name == "oracle" and not isinstance(policy, Policy) and execution == "load":
        # a bound: knowing the future, the oracle also knows when its prefetches would hold up
        # demand loads on the link more than they save; per timing model it takes the lower
        # TPOT of its prefetch schedule and Belady demand paging (it is never worse than belady)
        demand = simulate(trace, "belady", timings, capacity=capacity, use_cache=use_cache,
                          progress=progress)
        results = [oracle_bound(o, b) for o, b in zip(results, demand)]
    return results[0] if isinstance(timing, TimingModel) else results
