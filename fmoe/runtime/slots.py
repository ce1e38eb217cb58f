"""Slot table: which routed expert sits in which device-cache slot. Bookkeeping only.

The device cache owns one buffer per expert weight shaped ``[S, ...]``; this table maps a key
(``layer * E + expert``) to a slot index in ``0 .. S-1``, keeps the experts of the running layer
pinned against eviction, and asks the policy for victims. The simulator uses the same table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .policies import Policy


@dataclass
class SlotStats:
    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    resident_peak: int = 0


@dataclass
class Acquired:
    """Result of `SlotTable.acquire` for one key."""

    key: int
    slot: int
    hit: bool           # resident before this call (ready or not is the copy engine's business)
    evicted: int | None  # key evicted to make room, if any


class SlotTable:
    def __init__(self, capacity: int, policy: Policy):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.policy = policy
        self.slot_of: dict[int, int] = {}
        self.key_of: list[int | None] = [None] * capacity
        self.free: list[int] = list(range(capacity - 1, -1, -1))  # pop() gives slot 0 first
        self.pinned: set[int] = set()
        self.unused_prefetch: set[int] = set()  # prefetched keys not used yet
        self.stats = SlotStats()

    def __contains__(self, key: int) -> bool:
        return key in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def _make_room(self) -> tuple[int, int | None]:
        if self.free:
            return self.free.pop(), None
        victim = self.policy.victim(self.slot_of.keys(), self.pinned)
        slot = self.slot_of.pop(victim)
        self.key_of[slot] = None
        self.unused_prefetch.discard(victim)
        self.policy.on_evict(victim)
        return slot, victim

    def acquire(self, key: int, pin: bool = True) -> Acquired:
        """A use of `key` by the running layer: a hit, or a miss that takes a slot (evicting
        the policy's victim when full). Counts hits/misses; pins the key when `pin`."""
        slot = self.slot_of.get(key)
        if slot is not None:
            self.stats.hits += 1
            if key in self.unused_prefetch:
                self.unused_prefetch.discard(key)
                self.stats.prefetch_used += 1
            self.policy.on_hit(key)
            evicted = None
            hit = True
        else:
            self.stats.misses += 1
            slot, evicted = self._make_room()
            self.slot_of[key] = slot
            self.key_of[slot] = key
            self.policy.on_insert(key, prefetch=False)
            hit = False
            self.stats.resident_peak = max(self.stats.resident_peak, len(self.slot_of))
        if pin:
            self.pinned.add(key)
        return Acquired(key, slot, hit, evicted)

    def prefetch(self, key: int) -> Acquired | None:
        """Place `key` ahead of need. Returns None when already resident or when every
        resident key is pinned and no slot is free."""
        if key in self.slot_of:
            return None
        if not self.free and len(self.pinned) >= len(self.slot_of):
            return None
        slot, evicted = self._make_room()
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.unused_prefetch.add(key)
        self.stats.prefetched += 1
        self.policy.on_insert(key, prefetch=True)
        self.stats.resident_peak = max(self.stats.resident_peak, len(self.slot_of))
        return Acquired(key, slot, False, evicted)

    def unpin(self, keys=None) -> None:
        if keys is None:
            self.pinned.clear()
        else:
            self.pinned.difference_update(keys)
