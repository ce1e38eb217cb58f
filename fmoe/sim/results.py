"""What a replay reports: `SimResult`, and how counts and a timing model become one."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .timing import TimingModel
from .trace import Trace


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
    copy_lanes: int = 1                  # reads in flight at once, each copy_lanes * copy_ms

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d


@dataclass
class Counts:
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


def oracle_bound(oracle: SimResult, belady: SimResult) -> SimResult:
    """The oracle's result: its prefetch schedule, or Belady demand paging where that is faster
    (``schedule`` says which)."""
    if belady.tpot_ms < oracle.tpot_ms:
        return replace(belady, policy=oracle.policy, cache_fraction=oracle.cache_fraction,
                       wall_s=oracle.wall_s + belady.wall_s,
                       extra={**belady.extra, "schedule": "demand"})
    return replace(oracle, wall_s=oracle.wall_s + belady.wall_s,
                   extra={**oracle.extra, "schedule": "prefetch"})


def make_result(trace: Trace, name: str, capacity: int, tm: TimingModel, c: "Counts", engine: str,
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
        execution=c.execution, host_computed=n_host, host_computed_per_token=n_host / T,
        copy_lanes=max(1, int(tm.lanes)))
