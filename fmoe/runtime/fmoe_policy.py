"""The fMoE policy: expert maps + semantic and trajectory search -> prefetch orders, and
prediction-aware eviction. A plain object driven by events, like every policy.

Per iteration (token step) and MoE layer l:

* ``on_layer_start(l)``: predict the next `d` layers (l .. l+d-1). Before any routing of the
  iteration is known (l = 0) the semantic neighbour's rows are used; afterwards the trajectory
  neighbour over the observed rows 0..l-1. Each target layer's experts come from `select`
  (δ = 1 - similarity), with priority p / (t - l + 1).
* ``on_routed(l, experts, probs)``: the observed row joins the running trajectory search.
* ``on_token_end``: the finished iteration's map joins the store (online learning).

Eviction (``eviction=``):

* ``"lru-pred"`` (LRU plus prediction): the least recently used resident expert that is not
  predicted for the next `d` layers; plain LRU when every candidate is predicted.
* ``"pfreq"`` (the paper's): the lowest (p + ε) × (frequency + ε), where p is the neighbour map's
  probability for the expert and frequency a use count decayed per iteration.

Prefetch is off by default (``max_orders=0``): on PCIe-attached GPUs the link is the bottleneck
and the simulator measured every prefetching variant slower than prediction-aware eviction alone
(docs/benchmarks.md). ``policy_options={"max_orders": 1}`` turns on one order per layer, issued
only when the neighbour's similarity reaches ``min_similarity``.

Maps, best first: the router's full softmax (`probs` live, `gate_probs` in a trace); the gate
weights of the routed experts (a trace's `weights`: the unrouted experts' mass is lost); the
routed ids alone, weighted by rank, (K - r) / sum (the order survives, the magnitudes do not).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np

from .policies import Policy
from .predictor import MapStore, ReuseModel, TrajectorySearch, select

TOKEN_DIM = 64
EVICTIONS = ("reuse", "distance", "lru-pred", "pfreq", "lru")
MAP_EVICTIONS = ("distance", "lru-pred", "pfreq")   # the rules that read expert maps


class TokenEmbedder:
    """Semantic surrogate for traces without the model: a fixed random unit vector per token id
    (deterministic across runs). Live runs pass the model's embedding-layer output instead."""

    def __init__(self, dim: int = TOKEN_DIM):
        self.dim = dim
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, token_id: int) -> np.ndarray:
        v = self._cache.get(token_id)
        if v is None:
            seed = int.from_bytes(hashlib.blake2b(str(token_id).encode(), digest_size=8).digest(), "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            v /= np.linalg.norm(v)
            self._cache[token_id] = v
        return v


class FmoePolicy(Policy):
    name = "fmoe"

    @property
    def prefetches(self) -> bool:
        # without prefetch orders the runtime drives the policy on the forward thread: its
        # searches are cheap, and a second busy thread costs more on small CPU boxes
        return self.max_orders > 0

    @property
    def uses_maps(self) -> bool:
        """Whether expert maps (store, searches) feed any decision: prefetch orders or a
        map-reading eviction rule. Without them the per-layer work is the reuse model's."""
        return self.max_orders > 0 or self.eviction in MAP_EVICTIONS or self.keep_maps

    @property
    def wants_probs(self) -> bool:
        return self.uses_maps

    def __init__(self, num_layers: int, num_experts: int, capacity: int, *, top_k: int | None = None,
                 prefetch_distance: int = 3, store_capacity: int = 1024, encoder: str = "token",
                 semantic: bool = True, trajectory: bool = True, eviction: str = "reuse",
                 decay: float = 0.9, max_orders: int = 0, min_similarity: float = 0.6,
                 embed_dim: int | None = None, prompt_encoder=None, learn: bool = True,
                 reuse_horizon: int = 4, reuse_min_count: int = 50):
        super().__init__(num_layers, num_experts, capacity)
        if eviction not in EVICTIONS:
            raise ValueError(f"unknown fmoe eviction rule {eviction!r}; use one of {', '.join(EVICTIONS)}")
        if encoder not in ("token", "prompt", "both"):
            raise ValueError(f"unknown fmoe encoder {encoder!r}; use token, prompt or both")
        L, E = num_layers, num_experts
        self.top_k = top_k
        self.d = max(1, int(prefetch_distance))
        self.encoder = encoder
        self.use_semantic, self.use_trajectory = semantic, trajectory
        self.eviction = eviction
        self.decay = decay
        self.max_orders = max_orders
        self.min_similarity = min_similarity
        self.learn = learn
        self.keep_maps = False      # fill the map store even when no decision reads it
        self._active: set[int] = set()
        self.tokens = TokenEmbedder(embed_dim or TOKEN_DIM)
        if prompt_encoder is None and encoder in ("prompt", "both"):
            from .encoders import PromptEncoder

            prompt_encoder = PromptEncoder()   # loads its model on the first prompt
        self.prompt_encoder = prompt_encoder
        dim = self._dim(embed_dim)
        self.store = MapStore(store_capacity, L, E, dim, self.d)
        self.search = TrajectorySearch(self.store)
        # running iteration
        self.cur = np.zeros((L, E), np.float32)
        self.emb = np.zeros(dim, np.float32)
        self._prompt_emb: np.ndarray | None = None
        self._token_ids: Sequence[int] | None = None
        self._pos = 0
        self._live_emb: np.ndarray | None = None
        self._seen_k = 0
        # eviction state over all keys
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.freq = np.zeros(L * E, np.float64)
        self.pred = np.zeros(L * E, np.float32)          # neighbour-map probability per key
        self.window: set[int] = set()                     # keys predicted for the next d layers
        self._resident = np.zeros(L * E, bool)
        self.layer_of = np.repeat(np.arange(L), E)
        self.ema = np.zeros(L * E, np.float64)            # per-iteration use rate, decayed
        self._used = np.zeros(L * E, bool)
        self.p_cur = np.zeros(L * E, np.float64)          # P(use later in this iteration)
        self.l_now = 0
        self.reuse = ReuseModel(L, E, top_k or 1, horizon=reuse_horizon, min_count=reuse_min_count)
        self._score: np.ndarray | None = None             # reuse scores of the running layer
        self._masked: np.ndarray | None = None            # ... over the eviction candidates
        self._touch = np.zeros(L * E, np.float64)         # last hit or insert (event counter)
        self._reuse_lock = threading.Lock()
        self._clock = 0

    def __getstate__(self) -> dict:
        # copies (ablations start variants from one learned policy) get a lock of their own
        state = dict(self.__dict__)
        del state["_reuse_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reuse_lock = threading.Lock()

    # -- embeddings -------------------------------------------------------------------------
    def _dim(self, embed_dim):
        tok = embed_dim or TOKEN_DIM
        if self.encoder == "token":
            return tok
        pdim = self.prompt_encoder.dim if self.prompt_encoder is not None else 384
        return pdim if self.encoder == "prompt" else tok + pdim

    def _embedding(self) -> np.ndarray:
        parts = []
        if self.encoder in ("token", "both"):
            if self._live_emb is not None:
                parts.append(self._live_emb)
            elif self._token_ids is not None and self._pos < len(self._token_ids):
                parts.append(self.tokens(int(self._token_ids[self._pos])))
            else:
                parts.append(self.emb[: self.tokens.dim] if self.encoder == "both" else self.emb)
        if self.encoder in ("prompt", "both"):
            p = self._prompt_emb
            parts.append(p if p is not None else np.zeros(self.store.dim - (self.tokens.dim if self.encoder == "both" else 0), np.float32))
        v = np.concatenate(parts).astype(np.float32)
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def set_token_embedding(self, emb: np.ndarray | None) -> None:
        """Live runs: the model's embedding-layer output of the step's token(s) (mean over a
        batch), used as the semantic key of the coming iteration."""
        self._live_emb = None if emb is None else np.asarray(emb, np.float32)

    # -- history ----------------------------------------------------------------------------
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
        if not self.uses_maps:
            return
        if texts and self.encoder in ("prompt", "both") and hasattr(self.prompt_encoder, "encode_many"):
            self.prompt_encoder.encode_many([t for t in texts if t])   # batched, then cached
        batch = 256
        for n in range(len(seq_offsets) - 1):
            a, b = int(seq_offsets[n]), int(seq_offsets[n + 1])
            self._start(texts[n] if texts else None, None if token_ids is None else token_ids[a:b])
            for s in range(a, b, batch):
                e = min(b, s + batch)
                if gate_probs is not None:
                    maps = gate_probs[s:e].astype(np.float32)
                elif weights is not None:
                    maps = self._weight_rows(expert_ids[s:e], weights[s:e])
                else:
                    maps = self._rank_rows(expert_ids[s:e])
                embs = []
                for _ in range(s, e):
                    embs.append(self._embedding())
                    self._pos += 1
                self.store.add_many(maps, np.stack(embs))
        self._reset_iteration()

    def _weight_rows(self, ids: np.ndarray, w: np.ndarray) -> np.ndarray:
        """[B, L, K] ids with gate weights [B, L, K] -> [B, L, E] rows holding the weights at
        the routed experts (the unrouted experts' mass is unknown: zero)."""
        B, L, K = ids.shape
        m = np.zeros((B, L, self.num_experts + 1), np.float32)
        b_idx, l_idx = np.meshgrid(np.arange(B), np.arange(L), indexing="ij")
        for k in range(K):
            col = ids[:, :, k].astype(np.int64)
            m[b_idx, l_idx, np.where(col >= 0, col, self.num_experts)] = w[:, :, k]
        return m[:, :, : self.num_experts]

    def _rank_rows(self, ids: np.ndarray) -> np.ndarray:
        """[B, L, K] ids in router order -> [B, L, E] rank-weighted rows (see module doc);
        ids of -1 (not recorded) leave their weight out."""
        K = ids.shape[2]
        w = np.arange(K, 0, -1, dtype=np.float32)
        return self._weight_rows(ids, np.broadcast_to(w / w.sum(), ids.shape))

    # -- workload events --------------------------------------------------------------------
    def _start(self, prompt, token_ids) -> None:
        self._token_ids = token_ids
        self._pos = 0
        self._prompt_emb = None
        if self.encoder in ("prompt", "both") and self.prompt_encoder is not None and prompt:
            self._prompt_emb = self.prompt_encoder(prompt)

    def on_request_start(self, seq_id: int, prompt: str | None = None, token_ids=None) -> None:
        # in a batch the iteration is shared: a request that joins does not wipe it
        fresh = not self._active
        self._active.add(seq_id)
        if fresh:
            with self._reuse_lock:
                self.reuse.reset_stream()
            self._start(prompt, token_ids)
            if self.uses_maps:
                self._reset_iteration()

    def on_request_end(self, seq_id: int) -> None:
        self._active.discard(seq_id)
        if not self._active:
            with self._reuse_lock:
                self.reuse.reset_stream()  # the stream ended: count its last passes

    def _reset_iteration(self) -> None:
        if not self.uses_maps:
            return
        self.cur[:] = 0
        self.search.reset()
        self.emb = self._embedding()
        self._sem = self.store.semantic(self.emb) if self.use_semantic else (-1, 0.0)

    def _neighbour(self, layer: int) -> tuple[int, float]:
        if layer == 0 or not self.use_trajectory:
            return self._sem
        i, sim = self.search.best(layer - 1)
        if i < 0 and self.use_semantic:
            return self._sem
        return i, sim

    def on_layer_start(self, layer: int) -> list[tuple[int, float]]:
        self.l_now = layer
        self._score = self._masked = None
        if not self.uses_maps:
            return []
        self.p_cur[:] = 0
        if self.store.size == 0:
            self.window = set()
            return []
        i, sim = self._neighbour(layer)
        if i < 0:
            self.window = set()
            return []
        if self.eviction == "distance":
            k = self.top_k or self._seen_k or 1
            nb_p = np.minimum(1.0, k * self.store.maps[i].reshape(-1).astype(np.float64))
            w = min(max(sim, 0.0), 1.0)
            self.p_cur = np.where(self.layer_of >= layer, w * nb_p, 0.0)
        order = self.max_orders > 0 and sim >= self.min_similarity
        if self.eviction == "pfreq":
            self.pred[:] = self.store.maps[i].reshape(-1)
        if not order and self.eviction != "lru-pred":
            self.window = set()
            return []
        E = self.num_experts
        k = self.top_k or self._seen_k or 1
        nb = self.store.maps[i]
        orders = []
        window = set()
        for t in range(layer, min(layer + self.d, self.num_layers)):
            row = nb[t]
            for e in select(row, sim, k).tolist():
                p = float(row[e])
                if p <= 0:
                    continue
                key = t * E + e
                window.add(key)
                orders.append((key, p / (t - layer + 1)))
        self.window = window
        if not order:
            return []
        orders.sort(key=lambda o: -o[1])
        return orders[: self.max_orders]

    def on_routed(self, layer: int, experts: np.ndarray, probs: np.ndarray | None = None) -> None:
        if len(experts) > self._seen_k:
            self._seen_k = len(experts)
        base = layer * self.num_experts
        with self._reuse_lock:
            self.reuse.observe([base + e for e in np.asarray(experts).tolist()])
        self._score = self._masked = None
        if not self.uses_maps:
            return
        if probs is not None:
            row = probs if probs.ndim == 1 else probs.max(axis=0)
            row = row.astype(np.float32)
        else:
            row = np.zeros(self.num_experts, np.float32)
            K = len(experts)
            w = np.arange(K, 0, -1, dtype=np.float32)
            row[experts] = w / w.sum()
        self.cur[layer] = row
        if self.use_trajectory and self.store.size:
            nz = np.flatnonzero(row)
            self.search.observe(layer, nz, row[nz])

    def on_token_end(self) -> None:
        with self._reuse_lock:
            self.reuse.end_pass()
        self._score = self._masked = None
        self._pos += 1
        if not self.uses_maps:
            return
        if self.learn:
            self.store.add(self.cur.copy(), self.emb)
        self.freq *= self.decay
        self.ema = self.decay * self.ema + (1 - self.decay) * self._used
        self._used[:] = False
        self._reset_iteration()

    # -- cache events -----------------------------------------------------------------------
    def on_hit(self, key: int) -> None:
        self._clock += 1
        self._touch[key] = self._clock
        if self._masked is not None:
            self._masked[key] = -np.inf
        if self.eviction != "reuse":       # the other rules' recency and frequency
            self._lru.move_to_end(key)
            self.freq[key] += 1
            self._used[key] = True

    def on_insert(self, key: int, prefetch: bool = False) -> None:
        self._clock += 1
        self._touch[key] = self._clock
        if self._masked is not None:
            if prefetch:
                self._masked = None       # a prefetched key is a candidate like any other
            else:
                self._masked[key] = -np.inf
        self._resident[key] = True
        if self.eviction != "reuse":
            self._lru[key] = None
            if not prefetch:
                self.freq[key] += 1
                self._used[key] = True

    def on_evict(self, key: int) -> None:
        self._lru.pop(key, None)
        self._resident[key] = False
        if self._masked is not None:
            self._masked[key] = -np.inf

    def expected_distance(self) -> np.ndarray:
        """[L * E] expected number of layers until each key is used again. A layer still to run
        in this iteration (the running one included) comes after d0 = layer - l_now layers: with
        the predicted probability p it is used then, otherwise a geometric guess from the
        decayed per-iteration use rate takes over; a layer already passed comes next at
        d0 + L. Evicting the largest approximates Belady's rule."""
        L = self.num_layers
        d0 = (self.layer_of - self.l_now) % L
        rate = self.ema + 1e-4
        p = self.p_cur
        this = p * d0 + (1 - p) * (d0 + L / rate)
        passed = d0 + L * (1.0 / rate - 1.0)
        return np.where(self.layer_of >= self.l_now, this, passed)

    # -- persistence ------------------------------------------------------------------------
    def save_state(self, path) -> None:
        """The map store and the reuse model's counts, in one file (atomic write)."""
        self.store.save(path, extra=self.reuse.state())

    def load_state(self, path) -> bool:
        """Load `save_state` output; a missing, corrupt or mismatched file is reported and
        ignored (the policy starts empty)."""
        ok = self.store.load(path)
        if ok and self.store.loaded_extra:
            self.reuse.set_state(self.store.loaded_extra)
        return ok

    def _reuse_score(self) -> np.ndarray:
        # resident keys' scores for the running layer; evictions within a layer change nothing
        # a score reads (the inserted keys are pinned), so one computation serves them all
        score = self._score
        if score is None:
            # ties (equal cells) go to the least recently touched key, as in LRU; the lock
            # keeps a prefetch worker's bookkeeping out while the model is read
            with self._reuse_lock:
                score = self.reuse.next_use_score(self.l_now)
            score = self._score = score + 1e-3 * (1.0 - self._touch / (self._clock + 1))
        return score

    @staticmethod
    def _best(score: np.ndarray, pinned: set[int]) -> int | None:
        """The key with the highest score once `pinned` keys are masked (in place); None when
        nothing finite is left. Non-resident keys must already be -inf."""
        for key in pinned:
            score[key] = -np.inf
        key = int(np.argmax(score))
        return key if np.isfinite(score[key]) else None

    def victim(self, resident: Iterable[int], pinned: set[int]) -> int:
        key = None
        if self.eviction == "reuse":
            # the candidates of the running layer, masked once: later victims only lose the
            # keys evicted, hit or inserted since (on_evict / on_hit / on_insert); pinned keys
            # stay masked for the rest of the layer
            key = None if self._masked is None else self._best(self._masked, pinned)
            if key is None:              # first victim of the layer, or keys unpinned since
                self._masked = np.where(self._resident, self._reuse_score(), -np.inf)
                key = self._best(self._masked, pinned)
        elif self.eviction == "distance":
            key = self._best(np.where(self._resident, self.expected_distance(), -np.inf), pinned)
        elif self.eviction == "pfreq":
            score = (self.pred.astype(np.float64) + 1e-3) * (self.freq + 1e-3)
            key = self._best(np.where(self._resident, -score, -np.inf), pinned)
        else:
            return self._lru_victim(pinned)
        if key is None:
            raise RuntimeError("every resident expert is pinned; cannot evict")
        return key

    def _lru_victim(self, pinned: set[int]) -> int:
        window = self.window if self.eviction == "lru-pred" else ()
        fallback = None
        for key in self._lru:
            if key in pinned:
                continue
            if key not in window:
                return key
            if fallback is None:
                fallback = key
        if fallback is None:
            raise RuntimeError("every resident expert is pinned; cannot evict")
        return fallback

    def admit_prefetch(self, key: int, victim: int | None) -> bool:
        if victim is None:
            return True
        if self.eviction == "reuse":
            # the prefetch is predicted for a layer at most d ahead: admit it when the victim's
            # expected next use is later than that
            ahead = (key // self.num_experts - self.l_now) % self.num_layers
            return bool(self._reuse_score()[victim] > ahead)
        if self.eviction == "distance":
            # a prefetch must be needed sooner than what it evicts
            d = self.expected_distance()
            return bool(d[victim] > d[key])
        # never evict an expert predicted for the coming layers to make room for a prefetch
        return victim not in self.window
