"""The classic demand-paging policies: least recently used and least frequently used."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Iterable

import numpy as np

from .base import Policy, register


@register
class LRUPolicy(Policy):
    """Least recently used. A use is a hit or a demand insert; a prefetch insert counts as a use
    at load time (the key is placed most recent)."""

    name = "lru"

    def __init__(self, num_layers: int, num_experts: int, capacity: int):
        super().__init__(num_layers, num_experts, capacity)
        self._order: OrderedDict[int, None] = OrderedDict()
        self._last: dict[int, int] = {}    # key -> clock of its last use (resident or not)
        self._clock = 0

    def _use(self, key: int) -> None:
        self._clock += 1
        self._last[key] = self._clock

    def on_hit(self, key: int) -> None:
        self._order.move_to_end(key)
        self._use(key)

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        self._order[key] = None
        self._order.move_to_end(key)
        self._use(key)

    def on_host(self, key: int) -> None:
        self._use(key)

    def keep(self, key: int, victim: int) -> bool:
        # recency as admission: load a missed expert when its previous use (if any) is more
        # recent than the victim's last use; a first use stays on the host
        return self._last.get(key, 0) > self._last.get(victim, 0)

    def on_evict(self, key: int) -> None:
        self._order.pop(key, None)

    def victim(self, resident: Iterable[int], pinned: set[int]) -> int:
        for key in self._order:
            if key not in pinned:
                return key
        raise RuntimeError("every resident expert is pinned; cannot evict")


@register
class LFUPolicy(Policy):
    """Least frequently used. Frequency counts every use (hit or demand load) since the policy
    was created, kept for experts that were evicted too, so an expert that returns keeps its
    history. Ties go to the least recently used. Prefetch inserts do not add to the count."""

    name = "lfu"

    def __init__(self, num_layers: int, num_experts: int, capacity: int):
        super().__init__(num_layers, num_experts, capacity)
        self._freq = [0] * (num_layers * num_experts)
        self._clock = 0
        self._last = {}  # key -> time of last use, resident keys only
        # min-heap of ints encoding (freq, last_use, key) lexicographically; lazy deletion
        self._heap: list[int] = []
        self._kbits = max(1, (num_layers * num_experts - 1).bit_length())

    _TBITS = 48  # time field width (2.8e14 events)

    @property
    def freq(self) -> np.ndarray:
        """Use count of every key (a copy), int64 [L * E]."""
        return np.array(self._freq, dtype=np.int64)

    def _item(self, f: int, t: int, key: int) -> int:
        return (((f << self._TBITS) | t) << self._kbits) | key

    def _push(self, f: int, t: int, key: int) -> None:
        heap = self._heap
        heapq.heappush(heap, (((f << self._TBITS) | t) << self._kbits) | key)
        if len(heap) > 4 * len(self._last) + 1024:
            # drop stale entries (same order: one live entry per resident key)
            fr = self._freq
            self._heap = [self._item(fr[k], t, k) for k, t in self._last.items()]
            heapq.heapify(self._heap)

    def _touch(self, key: int) -> None:
        self._clock += 1
        f = self._freq[key] + 1
        self._freq[key] = f
        self._last[key] = self._clock
        self._push(f, self._clock, key)

    def on_hit(self, key: int) -> None:
        self._touch(key)

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        if prefetch:
            self._clock += 1
            self._last[key] = self._clock
            self._push(self._freq[key], self._clock, key)
        else:
            self._touch(key)

    def on_evict(self, key: int) -> None:
        self._last.pop(key, None)

    def victim(self, resident: Iterable[int], pinned: set[int]) -> int:
        # an entry is live when its time is the key's last use (times are unique)
        heap, last = self._heap, self._last
        kb, kmask, tmask = self._kbits, (1 << self._kbits) - 1, (1 << self._TBITS) - 1
        skipped = []
        try:
            while heap:
                item = heap[0]
                key = item & kmask
                if last.get(key) != (item >> kb) & tmask:
                    heapq.heappop(heap)  # stale entry
                    continue
                if key in pinned:
                    skipped.append(heapq.heappop(heap))
                    continue
                return key
        finally:
            for item in skipped:
                heapq.heappush(heap, item)
        raise RuntimeError("every resident expert is pinned; cannot evict")
