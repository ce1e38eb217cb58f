"""MoE-Infinity's activation-aware policy (request-level expert activation matrices)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..expert_maps import matvec
from .base import Policy, register


@dataclass(frozen=True)
class MoEInfinityOptions:
    store_size: int = 256
    max_orders: int = 16
    eps: float = 1e-2
    prefetch_distance: int | None = None


@register
class MoEInfinityPolicy(Policy):
    """MoE-Infinity (Xue et al., arXiv 2401.14361): request-level expert activation tracing.

    * Expert activation matrix (EAM): for the running request, ``eam[l, e]`` counts the tokens
      routed to expert e at MoE layer l so far (prompt and generated tokens alike).
    * EAM collection (EAMC): up to `store_size` EAMs of finished requests. When full, a new EAM
      replaces the entry matched least often (ties: the oldest), as the reference code does.
    * Prediction: at the start of each iteration the running EAM is matched to the EAMC by the
      mean over layers of the per-layer cosine similarity; the best match's activation ratios
      (count / tokens of that request) predict the remaining layers. Before the request has an
      EAM (its first token) the mean ratio over the whole EAMC is used.
    * Prefetch: experts of layers l <= l' < l + `prefetch_distance` (None: all) with
      predicted ratio r > 0, priority ``r * (1 - (l' - l) / L)`` (nearer layers first), at most
      `max_orders`, resident ones skipped.
    * Activation-aware eviction: the resident expert with the lowest
      ``(max(ratio in the running EAM, predicted ratio) + eps) * (1 - l / L)`` goes first:
      experts the request uses (or is predicted to use) often, and experts of early layers
      (least time to prefetch them), stay. Ties: least recently used. (Taking the predicted
      ratio into account keeps a prefetched expert from being the first victim before its
      layer runs.)

    For batches the running EAM sums all active requests (the paper targets batch size one).
    """

    name = "moe-infinity"
    Options = MoEInfinityOptions
    prefetches = True

    def __init__(self, num_layers: int, num_experts: int, capacity: int, *,
                 store_size: int = 256, max_orders: int = 16, eps: float = 1e-2,
                 prefetch_distance: int | None = None):
        super().__init__(num_layers, num_experts, capacity)
        L, E = num_layers, num_experts
        n = L * E
        self.store_size = int(store_size)
        self.max_orders = int(max_orders)
        self.eps = float(eps)
        self.prefetch_distance = (None if prefetch_distance is None
                                  else max(1, int(prefetch_distance)))
        self.eam = np.zeros(n, dtype=np.float64)           # running request, flat keys
        self._c = [0.0] * n                                 # the same, as a list
        self._pl: list[float] | None = None                 # `pred` as a list
        self.tokens = 0                                     # finished tokens of the request
        self._unit = np.zeros((self.store_size, n), dtype=np.float32)   # per-layer unit rows
        self._ratio = np.zeros((self.store_size, n), dtype=np.float32)  # count / tokens
        self._matched = np.zeros(self.store_size, dtype=np.int64)
        self._born = np.zeros(self.store_size, dtype=np.int64)
        self._n = 0
        self._added = 0
        self.pred: np.ndarray | None = None                 # [L * E] predicted ratios (float64)
        self.layer_w = np.repeat(1.0 - np.arange(L) / L, E)  # eviction weight per key
        self._w = self.layer_w.tolist()
        self._prox = (1.0 - np.arange(L) / L)[:, None]       # prefetch weight by distance
        # cache bookkeeping: resident set, last use, and a lazy min-heap of
        # (priority, last_use, version, key); priorities change every token -> rebuilt then
        self.resident = np.zeros(n, dtype=bool)
        self._res: set[int] = set()
        self._last = [0] * n
        self._ver = [0] * n
        self._clock = 0
        self._heap: list[tuple[float, int, int, int]] = []
        self._dirty = True
        self._stale: set[int] = set()   # used since their last heap entry; pushed before a victim

    # -- EAM collection --------------------------------------------------------------------
    def add_eam(self, counts: np.ndarray, tokens: int) -> None:
        """Store one finished request's EAM (`counts` [L, E] or [L * E], `tokens` >= 1)."""
        counts = np.asarray(counts, dtype=np.float64).reshape(-1)
        if tokens <= 0 or not counts.any():
            return
        L, E = self.num_layers, self.num_experts
        rows = counts.reshape(L, E)
        norm = np.linalg.norm(rows, axis=1, keepdims=True)
        unit = np.divide(rows, norm, out=np.zeros_like(rows), where=norm > 0)
        if self._n < self.store_size:
            i = self._n
            self._n += 1
        else:
            # least matched, then oldest
            i = int(np.lexsort((self._born, self._matched))[0])
        self._unit[i] = unit.reshape(-1)
        self._ratio[i] = counts / tokens
        self._matched[i] = 1
        self._born[i] = self._added
        self._added += 1

    def learn_history(self, expert_ids: np.ndarray, seq_offsets: np.ndarray, **_) -> None:
        """Fill the EAMC from a routing history (trace arrays: ids [T, L, K], offsets [N+1])."""
        L, E = self.num_layers, self.num_experts
        keys = expert_ids.astype(np.int64) + (np.arange(L, dtype=np.int64) * E)[None, :, None]
        keys[expert_ids < 0] = -1
        for a, b in zip(seq_offsets[:-1], seq_offsets[1:]):
            if b <= a:
                continue
            k = keys[a:b].reshape(-1)
            k = k[k >= 0]
            self.add_eam(np.bincount(k, minlength=L * E), int(b - a))

    def _predict(self) -> None:
        self._dirty = True
        self._pl = None
        n = self._n
        if n == 0:
            self.pred = None
            return
        if self.tokens == 0 or not self.eam.any():
            self.pred = self._ratio[:n].mean(axis=0, dtype=np.float64)
            self._pl = self.pred.tolist()
            return
        L, E = self.num_layers, self.num_experts
        rows = self.eam.reshape(L, E)
        norm = np.linalg.norm(rows, axis=1, keepdims=True)
        cur = np.divide(rows, norm, out=np.zeros_like(rows), where=norm > 0)
        sims = matvec(self._unit[:n], cur.reshape(-1).astype(np.float32))
        best = int(np.argmax(sims))
        self._matched[best] += 1
        self.pred = self._ratio[best].astype(np.float64)
        self._pl = self.pred.tolist()

    # -- workload events -------------------------------------------------------------------
    def on_request_start(self, seq_id, prompt=None, token_ids=None) -> None:
        self.eam[:] = 0
        self._c = [0.0] * len(self._c)
        self.tokens = 0
        self.pred = None
        self._pl = None
        self._dirty = True

    def on_layer_start(self, layer: int) -> list[tuple[int, float]]:
        if layer == 0:
            self._predict()
        pred = self.pred
        if pred is None or self.max_orders <= 0:
            return []
        L, E = self.num_layers, self.num_experts
        d = self.prefetch_distance
        hi = L if d is None else min(L, layer + d)
        lo = layer * E
        score = (pred[lo:hi * E].reshape(hi - layer, E) * self._prox[: hi - layer]).reshape(-1)
        score[self.resident[lo:hi * E]] = 0.0
        m = self.max_orders
        if score.size > m:
            idx = np.argpartition(score, score.size - m)[score.size - m:]
        else:
            idx = np.arange(score.size)
        idx = idx[score[idx] > 0]
        idx = idx[np.argsort(-score[idx], kind="stable")]
        return list(zip((idx + lo).tolist(), score[idx].tolist()))

    def on_routed(self, layer: int, experts: np.ndarray, probs: np.ndarray | None = None) -> None:
        keys = layer * self.num_experts + np.asarray(experts, dtype=np.int64)
        self.eam[keys] += 1
        c = self._c
        dirty = self._dirty
        stale = self._stale
        for k in keys.tolist():
            c[k] += 1.0
            if not dirty and k in self._res:
                self._repush(k)
                stale.discard(k)

    def on_token_end(self) -> None:
        self.tokens += 1
        self._dirty = True

    def on_request_end(self, seq_id: int) -> None:
        self.add_eam(self.eam, self.tokens)

    # -- cache events ----------------------------------------------------------------------
    def _score(self, key: int) -> float:
        # scalar twin of `priority` (same float operations, so the same values)
        r = self._c[key] / (self.tokens + 1)
        pl = self._pl
        if pl is not None and pl[key] > r:
            r = pl[key]
        return (r + self.eps) * self._w[key]

    def _repush(self, key: int) -> None:
        v = self._ver[key] + 1
        self._ver[key] = v
        heapq.heappush(self._heap, (self._score(key), self._last[key], v, key))
        if len(self._heap) > 4 * len(self._res) + 1024:
            self._dirty = True

    def _rebuild(self) -> None:
        keys = np.fromiter(self._res, dtype=np.int64, count=len(self._res))
        pr = self.priority(keys).tolist()
        last, ver = self._last, self._ver
        kl = keys.tolist()
        self._heap = [(p, last[k], ver[k], k) for p, k in zip(pr, kl)]
        heapq.heapify(self._heap)
        self._dirty = False
        self._stale.clear()

    # A use changes the key's last-use time; its heap entry is refreshed lazily (on_routed
    # usually follows and refreshes it anyway; `victim` flushes the rest first), which gives
    # the same victims as refreshing at once.
    def on_hit(self, key: int) -> None:
        self._clock += 1
        self._last[key] = self._clock
        if not self._dirty:
            self._stale.add(key)

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        self._clock += 1
        self._last[key] = self._clock
        if key not in self._res:
            self._res.add(key)
            self.resident[key] = True
        if not self._dirty:
            self._stale.add(key)

    def on_evict(self, key: int) -> None:
        if key in self._res:
            self._res.discard(key)
            self.resident[key] = False
            self._ver[key] += 1
            self._stale.discard(key)

    def priority(self, keys: np.ndarray) -> np.ndarray:
        """Caching priority of `keys` (lowest is evicted first)."""
        keys = np.asarray(keys, dtype=np.int64)
        ratio = self.eam[keys] / (self.tokens + 1)
        if self.pred is not None:
            ratio = np.maximum(ratio, self.pred[keys])
        return (ratio + self.eps) * self.layer_w[keys]

    def victim(self, resident: Iterable[int], pinned: set[int]) -> int:
        if self._dirty:
            self._rebuild()
        elif self._stale:
            for k in self._stale:
                self._repush(k)
            self._stale.clear()
            if self._dirty:                 # the heap grew too large: rebuild it
                self._rebuild()
        heap, ver = self._heap, self._ver
        skipped = []
        try:
            while heap:
                item = heap[0]
                key = item[3]
                if ver[key] != item[2] or key not in self._res:
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
