"""Policies that know the future: simulator only, bounds rather than products.

Both are driven like any other `Policy` (by `SlotTable` cache events and the workload events);
they are built from the trace's access sequence: ``keys[i]`` is the i-th routed-expert use in
replay order (token, then MoE layer, then the trace's column order, -1 entries skipped) and
``next_use[i]`` the index of the next use of the same key (``len(keys)`` when none). Each cache
use (`on_hit`, or `on_insert` of a demand load) advances a cursor over that sequence, so the
replay must acquire keys in exactly that order (`fmoe.sim.replay` does).

* `BeladyPolicy` ("belady"): demand paging with Belady's eviction (evict the resident expert whose
  next use is farthest; never-used-again first). With demand loads only it minimises the number
  of loads (= misses) of any policy on the same pool, so its loads per token are the floor every
  other policy is compared with.
* `OraclePolicy` ("oracle"): Belady's eviction plus perfect prefetch: at every layer it orders
  the next experts needed (in order of need) that are not resident, and admits a prefetch only
  when the expert it would evict is needed later than the one it fetches. A prefetch holds the
  link, so on a short trace it can delay a demand load more than it saves: `fmoe.sim.replay.
  simulate` reports for "oracle" the lower TPOT of this schedule and Belady demand paging
  (``schedule``: "prefetch" or "demand"), so the oracle is a bound, never worse than belady.
* `HorizonPolicy` ("horizon"): fmoe's reuse eviction told the exact routing of the next
  `tokens` tokens: how much a perfect short-range predictor could add.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..runtime.policies import Policy
from ..runtime.policies.eviction import best
from ..runtime.policies.fmoe import FmoeOptions, FmoePolicy


@dataclass(frozen=True)
class OracleOptions:
    max_orders: int = 16
    window: int | None = None


@dataclass(frozen=True)
class HorizonOptions(FmoeOptions):
    tokens: int = 1          # tokens past the running one whose routing is known


class BeladyPolicy(Policy):
    name = "belady"

    def __init__(self, num_layers: int, num_experts: int, capacity: int, *,
                 keys: np.ndarray, next_use: np.ndarray):
        super().__init__(num_layers, num_experts, capacity)
        if len(keys) != len(next_use):
            raise ValueError("keys and next_use differ in length")
        self.keys = keys
        self.next_use = next_use
        self.horizon = int(len(keys))               # "never used again"
        self.cursor = 0
        self._base = 0                              # python-list window over keys/next_use
        self._kc: list[int] = []
        self._nc: list[int] = []
        self._chunk_end = 0
        self._lookahead = 0
        n = num_layers * num_experts
        self.nu = [self.horizon] * n                # next use of each key (resident keys)
        self.res = [False] * n
        self._count = 0
        # min-heap of ints encoding (-next_use, key): farthest next use first, then lowest key
        self._kbits = max(1, (n - 1).bit_length())
        self._heap: list[int] = []

    def _push(self, key: int, nu: int) -> None:
        self.nu[key] = nu
        heapq.heappush(self._heap, ((self.horizon - nu) << self._kbits) | key)
        if len(self._heap) > 4 * self._count + 1024:
            self._compact()

    _CHUNK = 1 << 16

    def _use(self, key: int) -> None:
        c = self.cursor
        j = c - self._base
        if j >= self._chunk_end:
            self._load(c)
            j = 0
        if j >= len(self._kc) or self._kc[j] != key:
            got = self._kc[j] if j < len(self._kc) else None
            raise RuntimeError(f"{self.name}: use of key {key} at position {c} does not follow "
                               f"the trace (expected {got}); replay order must match")
        self.cursor = c + 1
        nu = self._nc[j]
        self.nu[key] = nu
        heap = self._heap
        heapq.heappush(heap, ((self.horizon - nu) << self._kbits) | key)
        if len(heap) > 4 * self._count + 1024:
            self._compact()

    def _load(self, c: int) -> None:
        # python lists over [c, c + CHUNK + lookahead): uses advance within the first CHUNK,
        # prefetch scans read up to `lookahead` past the cursor
        self._base = c
        end = c + self._CHUNK + self._lookahead
        self._kc = self.keys[c:end].tolist()
        self._nc = self.next_use[c:end].tolist()
        self._chunk_end = min(self._CHUNK, len(self._kc))

    def _compact(self) -> None:
        nu, h, kb = self.nu, self.horizon, self._kbits
        self._heap = [((h - nu[k]) << kb) | k for k, r in enumerate(self.res) if r]
        heapq.heapify(self._heap)

    def on_hit(self, key: int) -> None:
        self._use(key)

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        if not self.res[key]:
            self.res[key] = True
            self._count += 1
        if prefetch:
            self._push(key, self._prefetch_next_use(key))
        else:
            self._use(key)

    def _prefetch_next_use(self, key: int) -> int:
        # next use at or after the cursor (plain Belady never prefetches; used by tests/others)
        ks = self.keys[self.cursor:]
        hit = np.flatnonzero(ks == key)
        return self.cursor + int(hit[0]) if hit.size else self.horizon

    def on_evict(self, key: int) -> None:
        if self.res[key]:
            self.res[key] = False
            self._count -= 1

    def victim(self, resident: Iterable[int], pinned: set[int]) -> int:
        heap, nu, res = self._heap, self.nu, self.res
        kb, kmask, h = self._kbits, (1 << self._kbits) - 1, self.horizon
        skipped = []
        try:
            while heap:
                item = heap[0]
                key = item & kmask
                if not res[key] or nu[key] != h - (item >> kb):
                    heapq.heappop(heap)
                    continue
                if key in pinned:
                    skipped.append(heapq.heappop(heap))
                    continue
                return key
        finally:
            for item in skipped:
                heapq.heappush(heap, item)
        raise RuntimeError("every resident expert is pinned; cannot evict")


class OraclePolicy(BeladyPolicy):
    """Belady eviction + perfect prefetch in order of need (see the module docstring).

    Orders: the first `max_orders` distinct non-resident experts in order of next need, among
    the next `window` uses. A min-heap of the non-resident experts keyed by next use keeps this
    O(max_orders log n) per layer."""

    name = "oracle"
    Options = OracleOptions
    prefetches = True

    def __init__(self, num_layers: int, num_experts: int, capacity: int, *,
                 keys: np.ndarray, next_use: np.ndarray, max_orders: int = 16,
                 window: int | None = None):
        super().__init__(num_layers, num_experts, capacity, keys=keys, next_use=next_use)
        self.max_orders = int(max_orders)
        self.window = int(window) if window else 4 * capacity + 64
        self.pending: dict[int, int] = {}   # ordered key -> index of its next use
        n = num_layers * num_experts
        first = np.full(n, self.horizon, dtype=np.int64)
        if self.horizon:
            ks = np.asarray(keys, dtype=np.int64)
            first[ks[::-1]] = np.arange(self.horizon - 1, -1, -1, dtype=np.int64)  # last wins
        self._away = first.tolist()         # next use of each non-resident key
        self._need = [(u, k) for k, u in enumerate(self._away) if u < self.horizon]
        heapq.heapify(self._need)

    def on_evict(self, key: int) -> None:
        if self.res[key]:
            super().on_evict(key)
            nu = self.nu[key]
            self._away[key] = nu
            if nu < self.horizon:
                heapq.heappush(self._need, (nu, key))

    def on_layer_start(self, layer: int) -> list[tuple[int, float]]:
        c = self.cursor
        end = c + self.window
        heap, res, away, pending = self._need, self.res, self._away, self.pending
        out: list[tuple[int, float]] = []
        taken = []
        m = self.max_orders
        while heap and len(out) < m:
            nu, k = heap[0]
            if res[k] or away[k] != nu:
                heapq.heappop(heap)       # stale: resident again, or a newer entry exists
                continue
            if nu >= end:
                break
            taken.append(heapq.heappop(heap))
            pending[k] = nu
            out.append((k, 1.0 / (1 + nu - c)))
        for item in taken:
            heapq.heappush(heap, item)
        if len(pending) > 8 * m + 1024:
            for k in [k for k, v in pending.items() if v < c]:
                del pending[k]
        if len(heap) > 8 * len(away) + 1024:
            self._need = [(u, k) for k, u in enumerate(away) if not res[k] and u < self.horizon]
            heapq.heapify(self._need)
        return out

    def _prefetch_next_use(self, key: int) -> int:
        nu = self.pending.get(key)
        if nu is None or nu < self.cursor:
            return super()._prefetch_next_use(key)
        return nu

    def admit_prefetch(self, key: int, victim: int | None) -> bool:
        if victim is None:
            return True
        nu = self.pending.get(key)
        if nu is None or nu < self.cursor:
            nu = super()._prefetch_next_use(key)
        return self.nu[victim] > nu


class HorizonPolicy(FmoePolicy):
    """fmoe's eviction plus *exact* knowledge of the routing of the rest of the running token
    and the next `tokens` tokens: experts needed in that window are kept (when one must go, the
    one needed last), the others are ranked by the eviction rule's scores as in `fmoe`.

    A bound, not a product: what a perfect predictor of the next `tokens` tokens could add to
    fmoe's eviction. Needs the trace's access sequence (`keys`, `next_use`) and `token_starts`
    [T + 1], the access index at which each token starts."""

    name = "horizon"
    Options = HorizonOptions
    needs_token_starts = True

    def __init__(self, num_layers: int, num_experts: int, capacity: int, *, keys: np.ndarray,
                 next_use: np.ndarray, token_starts: np.ndarray, options=None, **kwargs):
        super().__init__(num_layers, num_experts, capacity, options=options, **kwargs)
        if self.options.tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {self.options.tokens}")
        # named apart from anything FmoePolicy holds (an attribute called `tokens` once
        # replaced its token embedder)
        self.lookahead = int(self.options.tokens)
        self.next_use = np.asarray(next_use)
        self.token_starts = np.asarray(token_starts)
        self.cursor = 0
        self.tok = 0
        self.nu = np.full(num_layers * num_experts, len(keys), np.int64)

    def _use(self, key: int) -> None:
        self.nu[key] = self.next_use[self.cursor]
        self.cursor += 1

    def on_hit(self, key: int) -> None:
        super().on_hit(key)
        self._use(key)

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        super().on_insert(key, prefetch)
        if not prefetch:
            self._use(key)

    def on_token_end(self) -> None:
        super().on_token_end()
        self.tok += 1

    def victim(self, resident: Iterable[int], pinned: set[int]) -> int:
        end = self.token_starts[min(self.tok + 1 + self.lookahead, len(self.token_starts) - 1)]
        # known-needed keys sort below every rule score, by next use (exact in float64)
        score = np.where(self.nu < end, self.nu - 1e12, self.rule.scores())
        key = best(np.where(self.rule.resident, score, -np.inf), pinned)
        if key is not None:
            return key
        raise RuntimeError("every resident expert is pinned; cannot evict")
