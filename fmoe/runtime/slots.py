"""Slot table: which routed expert sits in which device-cache slot. Bookkeeping only.

The device cache owns one buffer per expert weight shaped ``[S, ...]``; this table maps a key
(``layer * E + expert``) to a slot index in ``0 .. S-1``, keeps the experts of the running layer
pinned against eviction, and asks the policy for victims. The simulator uses the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .policies import Policy


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
        self.slot_of: dict[int, int] = {}
        self.key_of: list[int | None] = [None] * capacity
        self.free: list[int] = list(range(capacity - 1, -1, -1))  # pop() gives slot 0 first
        self.pinned: set[int] = set()
        self.unused_prefetch: set[int] = set()  # prefetched keys not used yet
        self.stats = SlotStats()
        self._take = getattr(policy, "take", None)   # the policy's one-call form of a layer

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
        self.key_of[slot] = None
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
            self.slot_of[key] = slot
            self.key_of[slot] = key
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
        policy with `take` gets them in one call, which names the victims in order. `slots`
        and `hits`, when given (both), receive each key's slot and whether it was resident."""
        slot_of, stats, policy = self.slot_of, self.stats, self.policy
        pinned, unused = self.pinned, self.unused_prefetch
        taken = pin and self._take is not None
        if taken:
            missing = sum(1 for key in keys if key not in slot_of)
            victims = iter(self._take(keys, len(self.free), pinned, missing > len(self.free)))
        misses = 0
        for key in keys:
            slot = slot_of.get(key)
            hit = slot is not None
            if hit:
                stats.hits += 1
                if unused and key in unused:
                    unused.discard(key)
                    stats.prefetch_used += 1
                if not taken:
                    policy.on_hit(key)
            else:
                misses += 1
                stats.misses += 1
                if taken:
                    slot, _ = self._make_room(None if self.free else next(victims), notify=False)
                else:
                    slot, _ = self._make_room()
                slot_of[key] = slot
                self.key_of[slot] = key
                if not taken:
                    policy.on_insert(key, prefetch=False)
                if len(slot_of) > stats.resident_peak:
                    stats.resident_peak = len(slot_of)
            if pin:
                pinned.add(key)
            if slots is not None:
                slots.append(slot)
                hits.append(hit)
        return misses

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
        self.slot_of[key] = slot
        self.key_of[slot] = key
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
        self.key_of[slot] = None
        self.unused_prefetch.discard(key)
        self.free.append(slot)
        self.stats.released += 1
        self.policy.on_evict(key)
        return slot

    def unpin(self, keys=None) -> None:
        if keys is None:
            self.pinned.clear()
        else:
            self.pinned.difference_update(keys)
