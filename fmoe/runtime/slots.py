"""Slot table: which routed expert sits in which device-cache slot. Bookkeeping only.

The device cache owns one buffer per expert weight shaped ``[S, ...]``; this table maps a key
(``layer * E + expert``) to a slot index in ``0 .. S-1``, keeps the experts of the running layer
pinned against eviction, and asks the policy for victims. The simulator uses the same table.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass

import numpy as np

from .policies import Policy


def fraction_slots(fraction: float, total: int) -> int:
    """A cache of `fraction` of `total` experts: floor(fraction x total), the product's rounding
    error aside (0.57 x 100 is 56.99999 in floating point: 57 slots). The runtime and the
    simulator size a fraction alike."""
    return int(math.floor(fraction * total + 1e-9))


class SlotArray(MutableMapping):
    """`SlotTable.slot_of` as an array, for a policy with `take`: key -> slot, stored as
    ``a[key]`` (-1: not resident) so that the policy's compiled `take` updates it in place; `n`
    counts the resident keys (the table keeps it in step after a `take`). Iterates in key
    order."""

    __slots__ = ("a", "n")

    def __init__(self, size: int):
        self.a = np.full(size, -1, np.int64)
        self.n = 0

    def __contains__(self, key) -> bool:
        return self.a[key] >= 0

    def __getitem__(self, key) -> int:
        slot = int(self.a[key])
        if slot < 0:
            raise KeyError(key)
        return slot

    def get(self, key, default=None):
        slot = int(self.a[key])
        return default if slot < 0 else slot

    def __setitem__(self, key, slot: int) -> None:
        if self.a[key] < 0:
            self.n += 1
        self.a[key] = slot

    def __delitem__(self, key) -> None:
        if self.a[key] < 0:
            raise KeyError(key)
        self.a[key] = -1
        self.n -= 1

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(np.flatnonzero(self.a >= 0).tolist())


@dataclass
class SlotStats:
    """Counts since the table was made. ``hits + misses`` is the number of uses.

    A use is a hit only when the expert was resident *and ready* (the caller says so through
    `acquire(..., ready=...)`); ``late`` counts the misses that found the expert resident with its
    copy still in flight (no new load), so ``misses - late`` uses took a new slot (demand loads).
    """

    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    resident_peak: int = 0
    late: int = 0
    evictions: int = 0
    released: int = 0
    host: int = 0          # uses computed on the host (hybrid/host execution): neither hit nor miss

    @property
    def demand_loads(self) -> int:
        return self.misses - self.late


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
        self._take = getattr(policy, "take", None)   # the policy's one-call form of a layer
        # ... and of a layer whose uses all hit
        self._hit_all = getattr(policy, "hit_all", None) if self._take is not None else None
        # key -> slot; with `take`, an array the policy's compiled call updates in place
        self.slot_of: MutableMapping[int, int] = (
            SlotArray(policy.num_layers * policy.num_experts) if self._take is not None else {})
        self.key_of = np.full(capacity, -1, np.int64)       # slot -> key (-1: free)
        self.free: list[int] = list(range(capacity - 1, -1, -1))  # pop() gives slot 0 first
        self.pinned: set[int] = set()
        self.unused_prefetch: set[int] = set()  # prefetched keys not used yet
        self.stats = SlotStats()
        if self._take is not None:
            # the slot array read from Python without numpy scalars (the all-hit check)
            self._slot_mv = memoryview(self.slot_of.a)
            # the free list as an array for `take`: its first len(free) entries are the list's
            self._free = np.array(self.free, np.int64)
            self._grow(16)

    def _grow(self, n: int) -> None:
        self._out_slot = np.empty(n, np.int64)
        self._out_hit = np.empty(n, bool)
        self._victims = np.empty(n, np.int64)

    def _place(self, key: int, slot: int) -> None:
        self.slot_of[key] = slot
        self.key_of[slot] = key

    def __contains__(self, key: int) -> bool:
        return key in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def _make_room(self, victim: int | None = None, notify: bool = True) -> tuple[int, int | None]:
        """A slot for a new key: a free one, else the victim's (the policy's choice when None).
        `notify=False`: the policy has already applied the eviction (`take`)."""
        if self.free:
            return self.free.pop(), None
        if victim is None:
            victim = self.policy.victim(self.slot_of.keys(), self.pinned)
        slot = self.slot_of.pop(victim)
        self.key_of[slot] = -1
        self.unused_prefetch.discard(victim)
        self.stats.evictions += 1
        if notify:
            self.policy.on_evict(victim)
        return slot, victim

    def acquire(self, key: int, pin: bool = True, ready: bool = True) -> Acquired:
        """A use of `key` by the running layer: a hit, or a miss that takes a slot (evicting
        the policy's victim when full). Counts hits/misses; pins the key when `pin`.

        `ready=False` says that a resident key's copy is still in flight: the use counts as a
        miss (and in ``stats.late``) although it takes no new slot; `Acquired.hit` stays True
        (the key was resident)."""
        slot = self.slot_of.get(key)
        if slot is not None:
            if ready:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
                self.stats.late += 1
            if key in self.unused_prefetch:
                self.unused_prefetch.discard(key)
                self.stats.prefetch_used += 1
            self.policy.on_hit(key)
            evicted = None
            hit = True
        else:
            self.stats.misses += 1
            slot, evicted = self._make_room()
            self._place(key, slot)
            self.policy.on_insert(key, prefetch=False)
            hit = False
            self.stats.resident_peak = max(self.stats.resident_peak, len(self.slot_of))
        if pin:
            self.pinned.add(key)
        return Acquired(key, slot, hit, evicted)

    def acquire_many(self, keys, pin: bool = True, slots: list | None = None,
                     hits: list | None = None) -> int:
        """`acquire(key, pin)` for each key in order (all ready), without building `Acquired`
        results; returns the number of misses. Same counts and policy events as `acquire`; a
        policy with `take` gets them in one call. `slots` and `hits`, when given (both),
        receive each key's slot and whether it was resident."""
        if pin and self._take is not None:
            return self._acquire_taken(keys, slots, hits)
        slot_of, stats, policy = self.slot_of, self.stats, self.policy
        pinned, unused = self.pinned, self.unused_prefetch
        misses = 0
        for key in keys:
            slot = slot_of.get(key)
            hit = slot is not None
            if hit:
                stats.hits += 1
                if unused and key in unused:
                    unused.discard(key)
                    stats.prefetch_used += 1
                policy.on_hit(key)
            else:
                misses += 1
                stats.misses += 1
                slot, _ = self._make_room()
                self._place(key, slot)
                policy.on_insert(key, prefetch=False)
                if len(slot_of) > stats.resident_peak:
                    stats.resident_peak = len(slot_of)
            if pin:
                pinned.add(key)
            if slots is not None:
                slots.append(slot)
                hits.append(hit)
        return misses

    def _acquire_taken(self, keys, slots: list | None, hits: list | None) -> int:
        """`acquire_many` through the policy's `take`, which updates the table's arrays (slot_of,
        key_of, free) itself; the counts and the free list follow from what it wrote."""
        n = len(keys)
        if self._hit_all is not None and n:
            mv = self._slot_mv
            for key in keys:            # stops at the first miss (most layers of a small cache)
                if mv[key] < 0:
                    break
            else:
                return self._hit_many(keys, slots, hits)
        if n > len(self._out_slot):
            self._grow(2 * n)
        free = self.free
        n_free = len(free)
        slot_of = self.slot_of
        done, misses, nv = self._take(np.array(keys, np.int64), slot_of.a, self.key_of,
                                      self._free, n_free, self.pinned, self._out_slot,
                                      self._out_hit, self._victims)
        stats, unused = self.stats, self.unused_prefetch
        if done < n:
            keys = keys[:done]
        if misses:
            stats.hits += done - misses
            stats.misses += misses
            if nv:
                stats.evictions += nv
                if unused:
                    unused.difference_update(self._victims[:nv].tolist())
            if misses > nv:             # the others took free slots, from the end
                del free[n_free - (misses - nv):]
                slot_of.n += misses - nv
                if slot_of.n > stats.resident_peak:
                    stats.resident_peak = slot_of.n
        else:
            stats.hits += done
        if unused:
            self._pin_used(keys)
        else:
            self.pinned.update(keys)
        if slots is not None:
            slots += self._out_slot[:done].tolist()
            hits += self._out_hit[:done].tolist()
        if done < n:
            raise RuntimeError("every resident expert is pinned; cannot evict")
        return misses

    def _pin_used(self, keys) -> None:
        """Pin the taken `keys`; a prefetched one among them (resident, so a hit) is used."""
        unused = self.unused_prefetch
        if unused:
            for key in keys:
                if key in unused:
                    unused.discard(key)
                    self.stats.prefetch_used += 1
        self.pinned.update(keys)

    def _hit_many(self, keys, slots: list | None, hits: list | None) -> int:
        """`_acquire_taken` of keys that are all resident: the policy's `hit_all`, and the
        counts; no compiled call (most layers of a large cache)."""
        self._hit_all(keys)
        self.stats.hits += len(keys)
        self._pin_used(keys)
        if slots is not None:
            mv = self._slot_mv
            slots.extend([mv[key] for key in keys])
            hits.extend([True] * len(keys))
        return 0

    def host(self, key: int) -> None:
        """A use of `key` (not resident) computed on the host: counted apart from hits and
        misses; the cache does not change. The policy sees `on_host`."""
        self.stats.host += 1
        self.policy.on_host(key)

    def prefetch(self, key: int) -> Acquired | None:
        """Place `key` ahead of need. Returns None when already resident, when every
        resident key is pinned and no slot is free, or when the policy's
        `admit_prefetch(key, victim)` refuses (victim None when a slot is free)."""
        if key in self.slot_of:
            return None
        if self.free:
            if not self.policy.admit_prefetch(key, None):
                return None
            slot, evicted = self._make_room()
        else:
            if len(self.pinned) >= len(self.slot_of):
                return None
            victim = self.policy.victim(self.slot_of.keys(), self.pinned)
            if not self.policy.admit_prefetch(key, victim):
                return None
            slot, evicted = self._make_room(victim)
        self._place(key, slot)
        self.unused_prefetch.add(key)
        self.stats.prefetched += 1
        self.policy.on_insert(key, prefetch=True)
        self.stats.resident_peak = max(self.stats.resident_peak, len(self.slot_of))
        return Acquired(key, slot, False, evicted)

    def release(self, key: int) -> int | None:
        """Drop a resident, unpinned `key` without a policy decision (e.g. a prefetch cancelled
        before its copy started). Returns the freed slot, or None when `key` is not resident.
        The policy sees `on_evict`."""
        slot = self.slot_of.get(key)
        if slot is None:
            return None
        if key in self.pinned:
            raise RuntimeError(f"cannot release pinned key {key}")
        del self.slot_of[key]
        self.key_of[slot] = -1
        self.unused_prefetch.discard(key)
        self.free.append(slot)
        if self._take is not None:
            self._free[len(self.free) - 1] = slot
        self.stats.released += 1
        self.policy.on_evict(key)
        return slot

    def unpin(self, keys=None) -> None:
        if keys is None:
            self.pinned.clear()
        else:
            self.pinned.difference_update(keys)
