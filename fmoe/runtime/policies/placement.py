"""Where a missed expert runs: loaded into the device cache, or computed where it lives (the host).

One rule, shared by the live runtime (`fmoe.runtime.offload`) and the simulator (`fmoe.sim`), so
a simulated figure is a statement about the shipped decision.

* ``"load"``: every miss is copied into the cache and computed there (exact; the default).
* ``"host"``: a miss is computed on the host from host memory (or the page cache) and nothing is
  evicted for it. The cache holds a static hot set: its free slots fill on first use (or, in the
  simulator, from a history's most used experts) and then never change. This is llama.cpp's
  ``--cpu-moe`` / ``-ot exps=CPU`` with a hot device cache.
* ``"hybrid"``: per miss, the path that delivers the expert's output first, from the link's and
  the host's queues as they stand (`MissCost`). When the two tie, or the costs are unknown (no
  calibrated profile), the policy decides: a free slot is filled; otherwise the policy is asked
  whether the missed expert is worth more in the cache than the victim it would evict
  (`Policy.keep`: fmoe's reuse model, or recency for LRU), and computes it on the host if not.

  A preference for loading what the policy keeps (a margin of half a copy or more in its favour)
  was measured and made every rule slower (`docs/benchmarks.md`, hybrid execution): the queues
  decide, the policy breaks ties.

Costs are seconds from now until the expert's output would be ready by each path (the link's
queue plus one copy; the host's queue plus one expert); `None` when unknown (only the policy's
ranking then decides).
"""

from __future__ import annotations

from dataclasses import dataclass

EXECUTIONS = ("load", "host", "hybrid")


def check_execution(execution: str) -> str:
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(map(repr, EXECUTIONS))}, "
                         f"got {execution!r}")
    return execution


@dataclass(frozen=True)
class MissCost:
    """Seconds from now until a missed expert's output is ready: by loading it (`load_s`: the
    link's queue + its copy + its compute) or on the host (`host_s`: the host's queue + its
    compute + the activations' round trip)."""

    load_s: float
    host_s: float


def place(execution: str, table, key: int, cost: MissCost | None = None) -> bool:
    """The decision for a miss of `key` (not resident in `table`, a `SlotTable` whose running
    layer's keys are pinned): True to load it, False to compute it on the host."""
    if execution == "load":
        return True
    if execution == "host":
        return bool(table.free)             # the hot set fills once, then nothing is evicted
    if not table.free and len(table.pinned) >= len(table.slot_of):
        return False                        # nothing can be evicted in this layer
    if cost is not None and cost.load_s != cost.host_s:
        return cost.load_s < cost.host_s
    if table.free:
        return True
    policy = table.policy
    return policy.keep(key, policy.victim(table.slot_of.keys(), table.pinned))
