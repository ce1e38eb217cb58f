"""The fMoE policy: an eviction rule (strategy) plus a map predictor (expert maps, semantic and
trajectory search) that turns past iterations into prefetch orders. A plain object driven by
events, like every policy; every event comes from one thread.

* `FmoeOptions` holds its options (`policy_options={...}` in Python, `--policy-option K=V` in the
  simulator); unknown names are refused.
* The eviction rule (`eviction=`, default ``"reuse"``) is one of `fmoe.runtime.policies.eviction`:
  it sees the cache events and names victims, on the forward thread.
* The map predictor (`fmoe.runtime.predictor.MapPredictor`) exists only when a decision reads
  expert maps (prefetch on, a map-reading eviction rule, or maps kept for a `map_store`). It runs
  on the caller's thread (deterministic: the simulator and tests), or on a worker thread when
  `worker=True` and prefetch is on (the live runtime). Either way it hands back immutable,
  iteration-stamped `Prediction` values, applied at the start of a layer: orders whose target
  layer has passed are dropped, and a worker's error is raised by the next event.

Prefetch is decided from the hardware: with `copy_seconds` (the link's time per expert),
`layer_seconds` (one MoE layer's compute) and `lanes` (copies in flight at once, each taking
lanes x copy_seconds) given, `prefetch="auto"` turns it on only when one copy is covered by
at most `PREFETCH_MAX_RATIO` layers of compute, and the prefetch distance d is the number of
layers whose compute covers one copy (`prefetch_plan`); and while it is on, orders go out only
while the demand loads of recent layers keep the link less than half busy (`LINK_SLACK`: a
link saturated by demand loads only delays a prefetch behind them, and a wrong one costs a
copy). Without a profile, auto means off.
Prefetch orders lead across the token boundary (`lead=True`): near the end of a token, the
next token's first layers are predicted from the neighbour map's first rows.

Maps, best first: the router's full softmax (`probs` live, `gate_probs` in a trace); the gate
weights of the routed experts (a trace's `weights`: the unrouted experts' mass is lost); the
routed ids alone, weighted by rank, (K - r) / sum (the order survives, the magnitudes do not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ..predictor import TOKEN_DIM, MapPredictor, ReuseModel, TokenEmbedder  # noqa: F401
from .base import Policy, make_options, register
from .eviction import EVICTIONS, MAP_EVICTIONS, EvictionRule, make_rule

DEFAULT_DISTANCE = 3        # prefetch distance without a hardware profile
PREFETCH_MAX_RATIO = 2.0    # prefetch only where <= this many layers of compute cover a copy
MAX_AUTO_ORDERS = 4
LINK_SLACK = 0.5            # ... and only while demand loads leave the link this idle
DEMAND_DECAY = 0.98         # per layer: the running mean of demand loads per layer


def prefetch_plan(copy_seconds: float | None, layer_seconds: float | None,
                  lanes: int = 1) -> tuple[bool, int, int]:
    """The automatic rule: (prefetch on, distance d, orders per layer) for a link that copies
    one expert per `copy_seconds` (its rate) beside MoE layers of `layer_seconds` compute each,
    with `lanes` copies in flight at once (a CPU's reader threads), so that one copy takes
    lanes x copy_seconds from start to end.

    d = ceil(lanes x copy / layer), at least 1: a prefetch ordered at the start of layer l for
    layer l + d has d layers of compute to land in. On only when d <= PREFETCH_MAX_RATIO
    layers: with a longer copy an order lands late (a miss and a wasted slot) and the link is
    the bottleneck, where every wrong prefetch costs a copy. Orders per layer: the copies one
    layer's compute covers at the link's rate (at least 1, at most MAX_AUTO_ORDERS). Without a
    profile: off."""
    if not copy_seconds or not layer_seconds or copy_seconds <= 0 or layer_seconds <= 0:
        return False, DEFAULT_DISTANCE, 1
    ratio = max(1, int(lanes)) * copy_seconds / layer_seconds
    d = max(1, math.ceil(ratio - 1e-9))
    orders = max(1, min(MAX_AUTO_ORDERS, int(layer_seconds / copy_seconds)))
    return ratio <= PREFETCH_MAX_RATIO, d, orders


@dataclass(frozen=True)
class FmoeOptions:
    """Options of the fmoe policy (all keyword; defaults are the shipped default)."""

    eviction: str = "reuse"               # reuse | distance | pfreq | lru-pred | lru
    prefetch: Any = "auto"                # "auto" (from the profile below) | True | False
    max_orders: int | None = None         # orders per layer; None: 1, or from the profile;
                                          # an explicit value > 0 with prefetch="auto" turns
                                          # prefetch on, 0 turns it off
    prefetch_distance: int | None = None  # d; None: from the profile, else 3
    copy_seconds: float | None = None     # hardware profile: the link's time per expert ...
    layer_seconds: float | None = None    # ... one MoE layer's compute ...
    lanes: int = 1                        # ... and the copies it runs at once
    lead: bool = True                     # orders lead across the token boundary
    worker: bool = False                  # predictor on a worker thread (when prefetching)
    top_k: int | None = None              # the model's top-k (None: from the routing seen)
    store_capacity: int = 1024            # expert maps kept
    encoder: str = "token"                # token | prompt | both
    semantic: bool = True
    trajectory: bool = True
    min_similarity: float = 0.6           # no orders below this neighbour similarity
    decay: float = 0.9                    # per-iteration decay of pfreq / distance counts
    embed_dim: int | None = None          # token embedding size (live: the model's hidden)
    learn: bool = True                    # add each finished iteration's map to the store
    reuse_horizon: int = 4                # reuse model: passes of the label window
    reuse_min_count: int = 50             # reuse model: samples before a cell is trusted
    reuse_background: bool = True         # reuse model: count on the counting thread
    prompt_encoder: Any = field(default=None, compare=False)


@register
class FmoePolicy(Policy):
    name = "fmoe"
    Options = FmoeOptions

    def __init__(self, num_layers: int, num_experts: int, capacity: int,
                 options: FmoeOptions | None = None, **kwargs):
        super().__init__(num_layers, num_experts, capacity)
        opts = make_options(type(self), kwargs, base=options)
        if opts.eviction not in EVICTIONS:
            raise ValueError(f"unknown fmoe eviction rule {opts.eviction!r}; use one of "
                             f"{', '.join(EVICTIONS)}")
        if opts.encoder not in ("token", "prompt", "both"):
            raise ValueError(f"unknown fmoe encoder {opts.encoder!r}; use token, prompt or both")
        if opts.prefetch not in ("auto", True, False):
            raise ValueError(f"fmoe prefetch must be 'auto', true or false, not {opts.prefetch!r}")
        self.options = opts
        L, E = num_layers, num_experts
        auto_on, auto_d, auto_orders = prefetch_plan(opts.copy_seconds, opts.layer_seconds,
                                                       opts.lanes)
        if opts.max_orders is not None and opts.max_orders <= 0:
            on = False
        elif opts.prefetch == "auto":
            on = opts.max_orders is not None or auto_on
        else:
            on = bool(opts.prefetch)
        self.max_orders = (opts.max_orders or auto_orders) if on else 0
        self.d = max(1, int(opts.prefetch_distance or auto_d))
        self.top_k = opts.top_k
        self.eviction = opts.eviction
        self.learn = opts.learn
        self.reuse = ReuseModel(L, E, opts.top_k or 1, horizon=opts.reuse_horizon,
                                min_count=opts.reuse_min_count, background=opts.reuse_background)
        self.rule: EvictionRule = make_rule(opts.eviction, L, E, reuse=self.reuse, decay=opts.decay)
        # the cache events go straight to the rule (the hottest calls: one per expert use)
        events = ("on_hit", "on_insert", "on_evict", "victim")
        for name in ("on_hit", "on_insert", "on_evict"):
            if getattr(type(self), name) is getattr(FmoePolicy, name):
                setattr(self, name, getattr(self.rule, name))
        # a layer's uses in one compiled call, where the rule has one and no subclass listens
        # to the per-use events
        if hasattr(self.rule, "take") and all(getattr(type(self), n) is getattr(FmoePolicy, n)
                                              for n in events):
            self.take = self.rule.take
            self.hit_all = self.rule.hit_all
        self.prefetches = self.max_orders > 0
        self._keep_maps = False
        self.predictor: MapPredictor | None = None
        self.runner = None
        self._active: set[int] = set()
        self.iteration = 0          # token steps since the policy was made
        self.l_now = 0
        self._seen_k = 0
        self.applied = None         # the prediction applied at the running layer
        # the link-slack gate of prefetch="auto": orders only while the demand loads of recent
        # layers (a running mean, from this policy's own cache events) keep the link less
        # than LINK_SLACK busy; it starts closed (as if every use missed)
        self.gated = opts.prefetch == "auto" and opts.max_orders is None and self.prefetches
        self._copy_s, self._layer_s = opts.copy_seconds or 0.0, opts.layer_seconds or 0.0
        self.demand_per_layer = float(opts.top_k or 1)
        self._demand_seen = 0       # the rule's demand inserts at the last layer start
        self._update_caps()

    # -- capabilities ---------------------------------------------------------------------------
    def _update_caps(self) -> None:
        self.uses_maps = self.prefetches or self.eviction in MAP_EVICTIONS or self._keep_maps
        self.wants_probs = self.uses_maps
        if self.uses_maps and self.predictor is None:
            self._make_predictor()

    @property
    def keep_maps(self) -> bool:
        """Fill the map store even when no decision reads it (a `map_store` to persist)."""
        return self._keep_maps

    @keep_maps.setter
    def keep_maps(self, value: bool) -> None:
        self._keep_maps = bool(value)
        self._update_caps()

    def _make_predictor(self) -> None:
        from ..scheduler import PredictorWorker, SyncRunner

        o = self.options
        self.predictor = MapPredictor(
            self.num_layers, self.num_experts, top_k=o.top_k, prefetch_distance=self.d,
            store_capacity=o.store_capacity, encoder=o.encoder, semantic=o.semantic,
            trajectory=o.trajectory, max_orders=self.max_orders, min_similarity=o.min_similarity,
            embed_dim=o.embed_dim, prompt_encoder=o.prompt_encoder, learn=o.learn, lead=o.lead,
            want_window=self.eviction in ("lru-pred",),
            want_row=self.eviction in ("pfreq", "distance"))
        self.runner = (PredictorWorker(self.predictor) if o.worker and self.prefetches
                       else SyncRunner(self.predictor))

    @property
    def store(self):
        """The expert-map store (an empty one when no decision reads maps)."""
        if self.predictor is None:
            from ..predictor import MapStore

            return MapStore(1, self.num_layers, self.num_experts, 1)
        return self.predictor.store

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()

    def __getstate__(self) -> dict:
        # copies (ablations start variants from one learned policy) never share a worker
        if self.runner is not None and self.runner.threaded:
            raise TypeError("an fmoe policy with a predictor thread cannot be copied")
        return dict(self.__dict__)

    # -- embeddings and history -----------------------------------------------------------------
    def set_token_embedding(self, emb: np.ndarray | None) -> None:
        """Live runs: the model's embedding-layer output of the step's token(s) (mean over a
        batch), used as the semantic key of the coming iteration."""
        if self.runner is not None:
            self.runner.post("set_token_embedding", None if emb is None else np.array(emb, np.float32))

    def learn_history(self, expert_ids: np.ndarray, seq_offsets: np.ndarray, gate_probs=None,
                      texts=None, token_ids=None, weights=None, **_) -> None:
        """Learn from a trace (not measured: no cache events): the reuse model's counts, and
        the map store when expert maps are in use."""
        L, E = self.num_layers, self.num_experts
        if self.top_k is None:
            self.reuse.K = expert_ids.shape[2]
        used = np.zeros((len(expert_ids), L, E + 1), bool)     # column E takes the -1 ids
        t_idx, l_idx = np.meshgrid(np.arange(len(expert_ids)), np.arange(L), indexing="ij")
        for k in range(expert_ids.shape[2]):
            col = expert_ids[:, :, k].astype(np.int64)
            used[t_idx, l_idx, np.where(col >= 0, col, E)] = True
        self.reuse.learn(used[:, :, :E].reshape(len(expert_ids), L * E), np.asarray(seq_offsets))
        del used
        if self.runner is None:
            return
        self.runner.drain()
        self.predictor.learn_history(expert_ids, seq_offsets, gate_probs=gate_probs, texts=texts,
                                     token_ids=token_ids, weights=weights)

    # -- workload events ------------------------------------------------------------------------
    def on_request_start(self, seq_id: int, prompt: str | None = None, token_ids=None) -> None:
        # in a batch the iteration is shared: a request that joins does not wipe it
        fresh = not self._active
        self._active.add(seq_id)
        if fresh:
            self.reuse.reset_stream()
            if self.runner is not None:
                self.runner.post("request_start", prompt, token_ids)

    def on_request_end(self, seq_id: int) -> None:
        self._active.discard(seq_id)
        if not self._active:
            self.reuse.reset_stream()  # the stream ended: count its last passes

    def on_layer_start(self, layer: int) -> list[tuple[int, float]]:
        self.l_now = layer
        self.rule.layer_start(layer)
        if self.runner is None:
            return []
        closed = False
        if self.gated:
            demand = self.rule.demand - self._demand_seen
            self._demand_seen = self.rule.demand
            self.demand_per_layer = (DEMAND_DECAY * self.demand_per_layer
                                     + (1 - DEMAND_DECAY) * demand)
            # the link is busy with demand loads: no room to prefetch
            closed = self.demand_per_layer * self._copy_s > LINK_SLACK * self._layer_s
            if closed and not self.rule.reads_maps:
                self.applied = None     # nothing would read this layer's prediction: no search
                return []
        self.runner.post("layer_start", self.iteration, layer)
        orders = self._apply(self.runner.latest(), layer)
        return [] if closed else orders

    def _apply(self, pred, layer: int) -> list[tuple[int, float]]:
        """Apply the latest prediction at the start of `layer`: the eviction rule takes it when
        it was made for this iteration; orders whose target has passed are dropped."""
        self.applied = pred
        k = self.top_k or self._seen_k or 1
        self.rule.apply(pred if pred is not None and pred.iteration == self.iteration else None,
                        layer, k)
        if pred is None or not self.prefetches:
            return []
        step = self.iteration * self.num_layers + layer
        return [(key, prio) for target, key, prio in pred.orders if target >= step]

    def on_routed(self, layer: int, experts: np.ndarray, probs: np.ndarray | None = None) -> None:
        n = len(experts)
        if n > self._seen_k:
            self._seen_k = n
        base = layer * self.num_experts
        keys = [base + e for e in (experts.tolist() if hasattr(experts, "tolist") else experts)]
        self.reuse.observe_layer(layer, keys, experts)
        self.rule.routed(layer, keys)
        if self.runner is not None:
            self.runner.post("routed", layer, np.array(experts, dtype=np.int64),
                             None if probs is None else np.array(probs, copy=True))

    def on_token_end(self) -> None:
        self.reuse.end_pass()
        self.rule.token_end()
        self.iteration += 1
        if self.runner is not None:
            self.runner.post("token_end")

    # -- cache events ---------------------------------------------------------------------------
    def on_hit(self, key: int) -> None:
        self.rule.on_hit(key)

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        self.rule.on_insert(key, prefetch)

    def on_evict(self, key: int) -> None:
        self.rule.on_evict(key)

    def victim(self, resident: Iterable[int], pinned: set[int]) -> int:
        return self.rule.victim(pinned)

    def admit_prefetch(self, key: int, victim: int | None) -> bool:
        if victim is None:
            return True
        return self.rule.admit(key, victim)

    def keep(self, key: int, victim: int) -> bool:
        # the eviction rule's own ranking (reuse: expected layers to the next use) as admission
        return self.rule.keep(key, victim)

    def on_host(self, key: int) -> None:
        self.rule.on_host(key)

    # -- persistence ----------------------------------------------------------------------------
    def save_state(self, path) -> None:
        """The map store and the reuse model's counts, in one file (atomic write)."""
        if self.runner is not None:
            self.runner.drain()
        self.store.save(path, extra=self.reuse.state())

    def load_state(self, path) -> bool:
        """Load `save_state` output; a missing, corrupt or mismatched file is reported and
        ignored (the policy starts empty)."""
        if self.runner is not None:
            self.runner.drain()
        store = self.store
        ok = store.load(path)
        if ok and store.loaded_extra:
            self.reuse.set_state(store.loaded_extra)
        return ok
