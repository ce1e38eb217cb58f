"""Where a missed expert runs: loaded into the device cache, or computed where it lives (the host).

One rule, shared by the live runtime (`fmoe.runtime.offload`) and the simulator (`fmoe.sim`), so
a simulated figure is a statement about the shipped decision.

* ``"load"``: every miss is copied into the cache and computed there (exact; the default).
* ``"host"``: a miss is computed on the host from host memory (or the page cache) and nothing is
  evicted for it. The cache holds a static hot set: its free slots fill on first use (or, in the
  simulator, from a history's most used experts) and then never change. This is llama.cpp's
  ``--cpu-moe`` / ``-ot exps=CPU`` with a hot device cache.
* ``"hybrid"``: per miss. A free slot is filled when the link would deliver the expert no later
  than the host would compute it. Otherwise the policy is asked whether the missed expert is worth
  more in the cache than the victim it would evict (`Policy.keep`: fmoe's reuse model, or recency
  for LRU); if not, the host computes it. If it is, it is loaded when the link's queue delivers
  it no later than the host's queue would finish it, else the host computes it.

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

    @property
    def link_first(self) -> bool:
        return self.load_s <= self.host_s


def place(execution: str, table, key: int, cost: MissCost | None = None) -> bool:
    """The decision for a miss of `key` (not resident in `table`, a `SlotTable` whose running
    layer's keys are pinned): True to load it, False to compute it on the host."""
    if execution == "load":
        return True
    if table.free:
        # no eviction: in host mode the hot set fills; in hybrid the faster path wins
        return execution == "host" or cost is None or cost.link_first
    if execution == "host":
        return False
    if len(table.pinned) >= len(table.slot_of):
        return False                        # nothing can be evicted in this layer
    policy = table.policy
    victim = policy.victim(table.slot_of.keys(), table.pinned)
    if not policy.keep(key, victim):
        return False
    return cost is None or cost.link_first
