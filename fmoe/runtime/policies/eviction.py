"""Eviction rules of the fmoe policy, as strategies: each keeps its own bookkeeping from the cache
events and names a victim. `FmoePolicy` owns one rule and forwards events to it; every call comes
from the forward thread.

* ``"reuse"`` (default): the expert least likely to be used again soon, from the learned reuse
  model (`fmoe.runtime.predictor.ReuseModel`): highest ``layers to its next pass + expected wait``.
* ``"distance"``: the largest expected distance (layers) to the next use, from the expert maps'
  prediction and a decayed per-iteration use rate.
* ``"pfreq"`` (the paper's): the lowest (p + ε) × (frequency + ε), p the neighbour map's
  probability, frequency a use count decayed per iteration.
* ``"lru-pred"``: the least recently used expert not predicted for the next `d` layers.
* ``"lru"``: least recently used.

Every rule also gives `scores()`: [L * E], higher = evicted sooner (used by the simulator's
horizon bound to rank the keys it does not know the future of).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..reuse_scoring import kernels

EVICTIONS = ("reuse", "distance", "lru-pred", "pfreq", "lru")
MAP_EVICTIONS = ("distance", "lru-pred", "pfreq")   # the rules that read expert maps


_take = None     # the compiled `take`, once loaded (one global lookup per layer)


def _load_take():
    global _take
    _take = kernels().take
    return _take


def best(score: np.ndarray, pinned) -> int | None:
    """The key with the highest score once `pinned` keys are masked (in place); None when
    nothing finite is left. Non-resident keys must already be -inf."""
    for key in pinned:
        score[key] = -np.inf
    key = int(np.argmax(score))
    return key if np.isfinite(score[key]) else None


class EvictionRule:
    """Base rule: tracks residency, the running layer, and a touch clock (ties)."""

    name = "base"
    reads_maps = False

    def __init__(self, num_layers: int, num_experts: int):
        self.L, self.E = num_layers, num_experts
        n = num_layers * num_experts
        self.resident = np.zeros(n, bool)
        self.touch = np.zeros(n, np.float64)     # last hit or insert (event counter)
        self.clock = 0
        self.l_now = 0
        self.demand = 0                          # demand inserts (not prefetched) so far

    # events (forward thread)
    def layer_start(self, layer: int) -> None:
        self.l_now = layer

    def routed(self, layer: int, keys: list[int]) -> None:
        pass

    def token_end(self) -> None:
        pass

    def apply(self, prediction, layer: int, k: int) -> None:
        """The map predictor's prediction for this layer (None: nothing predicted)."""

    def on_hit(self, key: int) -> None:
        self.clock += 1
        self.touch[key] = self.clock

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        self.clock += 1
        self.touch[key] = self.clock
        self.resident[key] = True
        if not prefetch:
            self.demand += 1

    def on_evict(self, key: int) -> None:
        self.resident[key] = False

    def scores(self) -> np.ndarray:
        """[L * E] higher = evict sooner (least recently touched first)."""
        return -self.touch

    def victim(self, pinned) -> int:
        key = best(np.where(self.resident, self.scores(), -np.inf), pinned)
        if key is None:
            raise RuntimeError("every resident expert is pinned; cannot evict")
        return key

    def admit(self, key: int, victim: int) -> bool:
        return True

    # hybrid execution
    def on_host(self, key: int) -> None:
        """`key` was used without entering the cache (computed on the host)."""
        self.clock += 1
        self.touch[key] = self.clock

    def keep(self, key: int, victim: int) -> bool:
        """Whether the missed `key` is worth more in the cache than `victim`: this rule would
        evict it later than `victim` (a key never used scores as the least recent)."""
        s = self.scores()
        return bool(s[key] < s[victim])


class LruRule(EvictionRule):
    name = "lru"

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__(num_layers, num_experts)
        self.order: OrderedDict[int, None] = OrderedDict()
        self.window: frozenset[int] = frozenset()

    def on_hit(self, key: int) -> None:
        super().on_hit(key)
        self.order.move_to_end(key)

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        super().on_insert(key, prefetch)
        self.order[key] = None
        self.order.move_to_end(key)

    def on_evict(self, key: int) -> None:
        super().on_evict(key)
        self.order.pop(key, None)

    def apply(self, prediction, layer: int, k: int) -> None:
        # plain LRU reads the prediction only to refuse prefetches that would evict a
        # predicted expert
        self.window = prediction.window if prediction is not None else frozenset()

    def victim(self, pinned) -> int:
        window = self.window if self.reads_maps else ()
        fallback = None
        for key in self.order:
            if key in pinned:
                continue
            if key not in window:
                return key
            if fallback is None:
                fallback = key
        if fallback is None:
            raise RuntimeError("every resident expert is pinned; cannot evict")
        return fallback

    def admit(self, key: int, victim: int) -> bool:
        # never evict an expert predicted for the coming layers to make room for a prefetch
        return victim not in self.window


class LruPredRule(LruRule):
    """LRU plus prediction: the least recently used expert not predicted for the next `d`
    layers; plain LRU when every candidate is predicted."""

    name = "lru-pred"
    reads_maps = True


class _Frequency(EvictionRule):
    """Shared bookkeeping of the map-reading rules: a use count decayed per iteration and a
    per-iteration use rate."""

    def __init__(self, num_layers: int, num_experts: int, decay: float):
        super().__init__(num_layers, num_experts)
        n = num_layers * num_experts
        self.decay = decay
        self.freq = np.zeros(n, np.float64)
        self.ema = np.zeros(n, np.float64)       # per-iteration use rate, decayed
        self.used = np.zeros(n, bool)

    def on_hit(self, key: int) -> None:
        super().on_hit(key)
        self.freq[key] += 1
        self.used[key] = True

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        super().on_insert(key, prefetch)
        if not prefetch:
            self.freq[key] += 1
            self.used[key] = True

    def token_end(self) -> None:
        self.freq *= self.decay
        self.ema = self.decay * self.ema + (1 - self.decay) * self.used
        self.used[:] = False


class PfreqRule(_Frequency):
    """fMoE's rule: evict the lowest (p + ε) × (frequency + ε)."""

    name = "pfreq"
    reads_maps = True

    def __init__(self, num_layers: int, num_experts: int, decay: float):
        super().__init__(num_layers, num_experts, decay)
        self.pred = np.zeros(num_layers * num_experts, np.float32)   # neighbour probability
        self.window: frozenset[int] = frozenset()

    def apply(self, prediction, layer: int, k: int) -> None:
        if prediction is not None:
            if prediction.row is not None:
                self.pred = prediction.row.reshape(-1)
            self.window = prediction.window
        else:
            self.window = frozenset()

    def scores(self) -> np.ndarray:
        return -((self.pred.astype(np.float64) + 1e-3) * (self.freq + 1e-3))

    def admit(self, key: int, victim: int) -> bool:
        return victim not in self.window


class DistanceRule(_Frequency):
    """Expected layers to the next use (see `expected_distance`); the largest goes."""

    name = "distance"
    reads_maps = True

    def __init__(self, num_layers: int, num_experts: int, decay: float):
        super().__init__(num_layers, num_experts, decay)
        self.layer_of = np.repeat(np.arange(num_layers), num_experts)
        self.p_cur = np.zeros(num_layers * num_experts, np.float64)   # P(use later this iteration)

    def apply(self, prediction, layer: int, k: int) -> None:
        if prediction is None or prediction.row is None:
            self.p_cur = np.zeros(self.L * self.E, np.float64)
            return
        nb_p = np.minimum(1.0, k * prediction.row.reshape(-1).astype(np.float64))
        w = min(max(prediction.similarity, 0.0), 1.0)
        self.p_cur = np.where(self.layer_of >= layer, w * nb_p, 0.0)

    def expected_distance(self) -> np.ndarray:
        """[L * E] expected number of layers until each key is used again. A layer still to run
        in this iteration (the running one included) comes after d0 = layer - l_now layers: with
        the predicted probability p it is used then, otherwise a geometric guess from the
        decayed per-iteration use rate takes over; a layer already passed comes next at
        d0 + L. Evicting the largest approximates Belady's rule."""
        L = self.L
        d0 = (self.layer_of - self.l_now) % L
        rate = self.ema + 1e-4
        p = self.p_cur
        this = p * d0 + (1 - p) * (d0 + L / rate)
        passed = d0 + L * (1.0 / rate - 1.0)
        return np.where(self.layer_of >= self.l_now, this, passed)

    scores = expected_distance

    def admit(self, key: int, victim: int) -> bool:
        # a prefetch must be needed sooner than what it evicts
        d = self.expected_distance()
        return bool(d[victim] > d[key])


class ReuseRule(EvictionRule):
    """Score = L × (1 − P(reuse within the horizon)) turned into an expected wait, plus the
    layers until the key's next pass (`ReuseModel.next_use_score`); the highest resident score
    goes, ties to the least recently touched key.

    Scores are computed once per layer, and only when a victim is needed: evictions within a
    layer change nothing a score reads (the inserted keys are pinned)."""

    name = "reuse"

    def __init__(self, num_layers: int, num_experts: int, reuse):
        super().__init__(num_layers, num_experts)
        self.reuse = reuse
        self._score: np.ndarray | None = None     # scores of the running layer
        self._score_clock: int | None = None      # ... as of this touch clock
        self._masked: np.ndarray | None = None    # ... over the eviction candidates
        n = num_layers * num_experts
        self._pin = np.zeros(n, np.int64)         # == _epoch: pinned in the running `take`
        self._epoch = 0
        self._touched: list[int] = []             # hits not yet on the clock (`hit_all`)

    def _forget(self) -> None:
        self._score = self._masked = self._score_clock = None

    def _settle(self) -> None:
        """Put the hits `hit_all` deferred on the clock, in order (before the clock or a touch
        is read or moved)."""
        if self._touched:
            self.clock = kernels().touch_keys(self.touch, np.array(self._touched, np.int64),
                                              self.clock)
            self._touched = []

    def layer_start(self, layer: int) -> None:
        self.l_now = layer
        self._score = self._masked = self._score_clock = None     # `_forget`, once per layer

    def routed(self, layer: int, keys) -> None:
        self._score = self._masked = self._score_clock = None     # `_forget`, once per layer

    def token_end(self) -> None:
        self._settle()
        self._forget()

    def hit_all(self, keys: list[int]) -> None:
        """`take` of a layer's uses that are all hits (the table has checked): the same
        touches, deferred to the next reader of the clock (most layers of a large cache hit
        throughout; this keeps them off the compiled call)."""
        self._touched.extend(keys)
        self._score = self._masked = None

    def on_hit(self, key: int) -> None:
        self._settle()
        super().on_hit(key)
        if self._masked is not None:
            self._masked[key] = -np.inf

    def on_host(self, key: int) -> None:
        self._settle()
        super().on_host(key)

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        self._settle()
        super().on_insert(key, prefetch)
        if prefetch:
            # a prefetched key is a candidate like any other, with its touch just now (as
            # `take` ranks it)
            self._masked = self._score = None
        elif self._masked is not None:
            self._masked[key] = -np.inf

    def on_evict(self, key: int) -> None:
        super().on_evict(key)
        if self._masked is not None:
            self._masked[key] = -np.inf

    def scores(self) -> np.ndarray:
        score = self._score
        if score is None:
            self._settle()
            if self._score_clock is None:
                self._score_clock = self.clock
            score = self.reuse.next_use_score(self.l_now)
            score = self._score = score + 1e-3 * (1.0 - self.touch / (self._score_clock + 1))
        return score

    def victim(self, pinned) -> int:
        # the candidates of the running layer, masked once: later victims only lose the keys
        # evicted, hit or inserted since; pinned keys stay masked for the rest of the layer
        key = None if self._masked is None else best(self._masked, pinned)
        if key is None:              # first victim of the layer, or keys unpinned since
            self._masked = np.where(self.resident, self.scores(), -np.inf)
            key = best(self._masked, pinned)
        if key is None:
            raise RuntimeError("every resident expert is pinned; cannot evict")
        return key

    def take(self, keys: np.ndarray, slot_of: np.ndarray, key_of: np.ndarray, free: np.ndarray,
             n_free: int, pinned, out_slot: np.ndarray, out_hit: np.ndarray,
             victims: np.ndarray) -> tuple[int, int, int]:
        """`Policy.take`: a layer's uses in one compiled call (`fmoe.runtime.reuse_kernels.take`)
        on the table's arrays, with the same hits, inserts, victims and touches as the per-use
        events `on_hit` / `victim` / `on_evict` / `on_insert` in order, each use pinned."""
        if self._touched:
            self._settle()
        self._epoch += 1
        ep = self._epoch
        if pinned:
            pin = self._pin
            for key in pinned:
                pin[key] = ep
        sc = self._score_clock
        if sc is None:
            sc = -1
        take = _take or _load_take()
        reuse = self.reuse
        if not n_free and len(keys) and not reuse.has_scores:
            # the table sends only layers with a miss: with no free slot it needs a victim, so
            # the pass's scores are made now rather than after a first call that stops for them
            reuse.running(self.l_now)
        status, stop, nf, self.clock, sc, misses, nv = take(
            keys, slot_of, key_of, free, n_free, self.resident, self._pin, ep, self.touch,
            self.clock, sc, *reuse.running_arrays(), self.l_now, self.E, 0, 0, 0, out_slot,
            out_hit, victims)
        if status == 1:                 # the first victim of the pass: make its scores
            reuse.running(self.l_now)
            status, stop, nf, self.clock, sc, misses, nv = take(
                keys, slot_of, key_of, free, nf, self.resident, self._pin, ep, self.touch,
                self.clock, sc, *reuse.running_arrays(), self.l_now, self.E, stop, misses, nv,
                out_slot, out_hit, victims)
        self._score = self._masked = None
        if sc >= 0:
            self._score_clock = sc
        self.demand += misses
        return stop, misses, nv

    def keep(self, key: int, victim: int) -> bool:
        # `key` is being used in this layer: its next use is estimated as for a key used in
        # this pass (the model's `after_used` vector), against the victim's current estimate
        used = self.reuse.pass_vectors()[2]
        return bool(used[key] - self.l_now < self.scores()[victim])

    def admit(self, key: int, victim: int) -> bool:
        # the prefetch is predicted for a layer at most d ahead: admit it when the victim's
        # expected next use is later than that
        ahead = (key // self.E - self.l_now) % self.L
        return bool(self.scores()[victim] > ahead)


def make_rule(name: str, num_layers: int, num_experts: int, *, reuse, decay: float) -> EvictionRule:
    if name == "reuse":
        return ReuseRule(num_layers, num_experts, reuse)
    if name == "distance":
        return DistanceRule(num_layers, num_experts, decay)
    if name == "pfreq":
        return PfreqRule(num_layers, num_experts, decay)
    if name == "lru-pred":
        return LruPredRule(num_layers, num_experts)
    if name == "lru":
        return LruRule(num_layers, num_experts)
    raise ValueError(f"unknown fmoe eviction rule {name!r}; use one of {', '.join(EVICTIONS)}")
