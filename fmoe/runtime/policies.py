"""Eviction and prefetch policies: plain objects driven by events.

A policy holds no tensors and knows no devices. The live runtime (`fmoe.runtime.offload`) and the
trace simulator (`fmoe.sim`) drive the very same objects, so a simulator figure is a statement
about the shipped code.

Keys are flat ints, ``key = layer * num_experts + expert``, where ``layer`` counts MoE layers only
(0 .. L-1). Event order for one iteration (token step) of one batch:

    on_request_start(seq, prompt, token_ids)      # once per request
    for each MoE layer l:
        on_layer_start(l) -> prefetch orders      # before the router of layer l runs
        SlotTable.acquire(keys of layer l)        # -> on_hit / on_insert / victim / on_evict
        on_routed(l, experts, probs)              # what layer l routed, with the full softmax
    on_token_end()
    on_request_end(seq)

`victim` picks among the resident keys the table offers (pinned keys excluded).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np


class Policy:
    """Base policy: demand paging, no prefetch. Subclasses override `victim` and the hooks."""

    name = "base"
    prefetches = False

    def __init__(self, num_layers: int, num_experts: int, capacity: int):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.capacity = capacity

    # -- workload events -------------------------------------------------------------------
    def on_request_start(self, seq_id: int, prompt: str | None = None,
                         token_ids: Sequence[int] | None = None) -> None:
        pass

    def on_layer_start(self, layer: int) -> list[tuple[int, float]]:
        """Layer `layer` is about to run. Returns prefetch orders ``[(key, priority), ...]``,
        highest priority first; the caller may drop any of them."""
        return []

    def on_routed(self, layer: int, experts: np.ndarray, probs: np.ndarray | None = None) -> None:
        """Layer `layer` routed to `experts` (int array [n], unique) with router softmax `probs`
        ([E] for one token or [B, E] for a batch) when known."""
        pass

    def on_token_end(self) -> None:
        pass

    def on_request_end(self, seq_id: int) -> None:
        pass

    # -- cache events (driven by SlotTable) ------------------------------------------------
    def on_hit(self, key: int) -> None:
        pass

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        """`key` became resident; `prefetch` when loaded ahead of need (not yet used)."""
        pass

    def on_evict(self, key: int) -> None:
        pass

    def victim(self, resident: Iterable[int], pinned: set[int]) -> int:
        raise NotImplementedError


class LRUPolicy(Policy):
    """Least recently used. A use is a hit or a demand insert; a prefetch insert counts as a use
    at load time (the key is placed most recent)."""

    name = "lru"

    def __init__(self, num_layers: int, num_experts: int, capacity: int):
        super().__init__(num_layers, num_experts, capacity)
        self._order: OrderedDict[int, None] = OrderedDict()

    def on_hit(self, key: int) -> None:
        self._order.move_to_end(key)

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_evict(self, key: int) -> None:
        self._order.pop(key, None)

    def victim(self, resident: Iterable[int], pinned: set[int]) -> int:
        for key in self._order:
            if key not in pinned:
                return key
        raise RuntimeError("every resident expert is pinned; cannot evict")


class LFUPolicy(Policy):
    """Least frequently used. Frequency counts every use (hit or demand load) since the policy
    was created, kept for experts that were evicted too, so an expert that returns keeps its
    history. Ties go to the least recently used. Prefetch inserts do not add to the count."""

    name = "lfu"

    def __init__(self, num_layers: int, num_experts: int, capacity: int):
        super().__init__(num_layers, num_experts, capacity)
        self.freq = np.zeros(num_layers * num_experts, dtype=np.int64)
        self._clock = 0
        self._last = {}  # key -> time of last use, resident keys only
        self._heap: list[tuple[int, int, int]] = []  # (freq, last_use, key); lazy deletion

    def _touch(self, key: int) -> None:
        self._clock += 1
        self.freq[key] += 1
        self._last[key] = self._clock
        heapq.heappush(self._heap, (int(self.freq[key]), self._clock, key))

    def on_hit(self, key: int) -> None:
        self._touch(key)

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        if prefetch:
            self._clock += 1
            self._last[key] = self._clock
            heapq.heappush(self._heap, (int(self.freq[key]), self._clock, key))
        else:
            self._touch(key)

    def on_evict(self, key: int) -> None:
        self._last.pop(key, None)

    def victim(self, resident: Iterable[int], pinned: set[int]) -> int:
        skipped = []
        try:
            while self._heap:
                f, t, key = self._heap[0]
                if self._last.get(key) != t or self.freq[key] != f:
                    heapq.heappop(self._heap)  # stale entry
                    continue
                if key in pinned:
                    skipped.append(heapq.heappop(self._heap))
                    continue
                return key
        finally:
            for item in skipped:
                heapq.heappush(self._heap, item)
        raise RuntimeError("every resident expert is pinned; cannot evict")


POLICIES: dict[str, type[Policy]] = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(name: str, num_layers: int, num_experts: int, capacity: int, **kwargs) -> Policy:
    """Build a policy by name (``POLICIES`` holds the registered ones)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(num_layers, num_experts, capacity, **kwargs)
