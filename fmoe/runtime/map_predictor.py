"""fMoE's map predictor: expert maps turned into prefetch predictions, one event at a time.

`MapPredictor` owns a map store and its searches (`fmoe.runtime.expert_maps`), builds the
semantic key of each iteration (token embeddings, prompt embeddings or both; `TokenEmbedder`
stands in for the model's embeddings when replaying traces), and answers each layer start with
an immutable `Prediction`: the keys expected in the next d layers and prefetch orders.
`weight_rows` / `rank_rows` turn a trace's routed experts into map rows when it has no gate
probabilities. Everything here is numpy on the host.
"""

from __future__ import annotations

import numpy as np

from .expert_maps import MapStore, TrajectorySearch, select

TOKEN_DIM = 64


class TokenEmbedder:
    """Semantic surrogate for traces without the model: a fixed random unit vector per token id
    (deterministic across runs). Live runs pass the model's embedding-layer output instead."""

    def __init__(self, dim: int = TOKEN_DIM):
        self.dim = dim
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, token_id: int) -> np.ndarray:
        import hashlib

        v = self._cache.get(token_id)
        if v is None:
            seed = int.from_bytes(hashlib.blake2b(str(token_id).encode(), digest_size=8).digest(), "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            v /= np.linalg.norm(v)
            self._cache[token_id] = v
        return v


class Prediction:
    """What the map predictor says at the start of one layer; immutable once made.

    Stamped with the iteration (token step) and layer it was computed for. Targets are *steps*,
    ``iteration * L + layer``: a target past the iteration's last layer belongs to the next
    iteration (a prediction that leads across the token boundary).

    * ``orders``: ((target step, key, priority), ...), highest priority first;
    * ``window``: keys predicted for the next `d` layers;
    * ``row``: the neighbour map [L, E] (read-only), or None when not asked for;
    * ``similarity``: the neighbour's similarity."""

    __slots__ = ("iteration", "layer", "orders", "window", "row", "similarity")

    def __init__(self, iteration: int, layer: int, orders=(), window=frozenset(), row=None,
                 similarity: float = 0.0):
        if row is not None:
            row = np.array(row, np.float32)
            row.flags.writeable = False
        object.__setattr__(self, "iteration", int(iteration))
        object.__setattr__(self, "layer", int(layer))
        object.__setattr__(self, "orders", tuple(orders))
        object.__setattr__(self, "window", frozenset(window))
        object.__setattr__(self, "row", row)
        object.__setattr__(self, "similarity", float(similarity))

    def __setattr__(self, name, value):
        raise AttributeError("a Prediction is immutable")

    def __repr__(self) -> str:
        return (f"Prediction(iteration={self.iteration}, layer={self.layer}, "
                f"orders={len(self.orders)}, window={len(self.window)}, sim={self.similarity:.3f})")


class MapPredictor:
    """fMoE's expert-map predictor: the map store, semantic and trajectory search, δ-selection
    and prefetch orders. Owned by one thread at a time: the policy drives it synchronously
    (simulator, tests) or through `fmoe.runtime.scheduler.PredictorWorker` (live prefetch). Its
    only output is `Prediction` values; it never reads the cache or the eviction state.

    Events, in order: `request_start`, `set_token_embedding`, then per layer `layer_start`
    (returns a Prediction, or None when there is nothing to say) and `routed`, then
    `token_end`. `layer_start` changes no state, so a worker may skip a stale one.
    """

    def __init__(self, num_layers: int, num_experts: int, *, top_k: int | None = None,
                 prefetch_distance: int = 3, store_capacity: int = 1024, encoder: str = "token",
                 semantic: bool = True, trajectory: bool = True, max_orders: int = 0,
                 min_similarity: float = 0.6, embed_dim: int | None = None, prompt_encoder=None,
                 learn: bool = True, lead: bool = True, want_window: bool = False,
                 want_row: bool = False):
        if encoder not in ("token", "prompt", "both"):
            raise ValueError(f"unknown fmoe encoder {encoder!r}; use token, prompt or both")
        L, E = num_layers, num_experts
        self.L, self.E = L, E
        self.top_k = top_k
        self.d = max(1, int(prefetch_distance))
        self.encoder = encoder
        self.use_semantic, self.use_trajectory = semantic, trajectory
        self.max_orders = int(max_orders)
        self.min_similarity = min_similarity
        self.learn = learn
        self.lead = lead
        self.want_window, self.want_row = want_window, want_row
        self.token_embedder = TokenEmbedder(embed_dim or TOKEN_DIM)
        if prompt_encoder is None and encoder in ("prompt", "both"):
            from .encoders import PromptEncoder

            prompt_encoder = PromptEncoder()   # loads its model on the first prompt
        self.prompt_encoder = prompt_encoder
        dim = self._dim(embed_dim)
        self.store = MapStore(store_capacity, L, E, dim, self.d)
        self.search = TrajectorySearch(self.store)
        self.cur = np.zeros((L, E), np.float32)
        self.emb = np.zeros(dim, np.float32)
        self._sem: tuple[int, float] = (-1, 0.0)
        self._prompt_emb: np.ndarray | None = None
        self._token_ids = None
        self._pos = 0
        self._live_emb: np.ndarray | None = None
        self.seen_k = 0
        self.iteration = 0

    # -- embeddings ----------------------------------------------------------------------------
    def _dim(self, embed_dim):
        tok = embed_dim or TOKEN_DIM
        if self.encoder == "token":
            return tok
        pdim = self.prompt_encoder.dim if self.prompt_encoder is not None else 384
        return pdim if self.encoder == "prompt" else tok + pdim

    def _embedding(self) -> np.ndarray:
        parts = []
        tdim = self.token_embedder.dim
        if self.encoder in ("token", "both"):
            if self._live_emb is not None:
                parts.append(self._live_emb)
            elif self._token_ids is not None and self._pos < len(self._token_ids):
                parts.append(self.token_embedder(int(self._token_ids[self._pos])))
            else:
                parts.append(self.emb[:tdim] if self.encoder == "both" else self.emb)
        if self.encoder in ("prompt", "both"):
            p = self._prompt_emb
            parts.append(p if p is not None else
                         np.zeros(self.store.dim - (tdim if self.encoder == "both" else 0), np.float32))
        v = np.concatenate(parts).astype(np.float32)
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def set_token_embedding(self, emb) -> None:
        """Live runs: the model's embedding-layer output of the step's token(s) (mean over a
        batch), the semantic key of the coming iteration."""
        self._live_emb = None if emb is None else np.asarray(emb, np.float32)
        if self.encoder in ("token", "both"):
            self.emb = self._embedding()
            self._sem = self.store.semantic(self.emb) if self.use_semantic else (-1, 0.0)

    # -- events ----------------------------------------------------------------------------------
    def _start(self, prompt, token_ids) -> None:
        self._token_ids = token_ids
        self._pos = 0
        self._prompt_emb = None
        if self.encoder in ("prompt", "both") and self.prompt_encoder is not None and prompt:
            self._prompt_emb = self.prompt_encoder(prompt)

    def request_start(self, prompt=None, token_ids=None) -> None:
        self._start(prompt, token_ids)
        self._reset_iteration()

    def _reset_iteration(self) -> None:
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

    def layer_start(self, iteration: int, layer: int) -> Prediction | None:
        """The prediction at the start of `layer` of `iteration` (pure: no state changes)."""
        if self.store.size == 0:
            return None
        i, sim = self._neighbour(layer)
        if i < 0:
            return None
        L, E = self.L, self.E
        nb = self.store.maps[i]
        order = self.max_orders > 0 and sim >= self.min_similarity
        orders, window = [], set()
        if order or self.want_window:
            k = self.top_k or self.seen_k or 1
            last = layer + self.d if self.lead else min(layer + self.d, L)
            step0 = iteration * L
            for t in range(layer, last):
                row = nb[t % L]
                for e in select(row, sim, k).tolist():
                    p = float(row[e])
                    if p <= 0:
                        continue
                    key = (t % L) * E + e
                    if t < L:
                        window.add(key)
                    orders.append((step0 + t, key, p / (t - layer + 1)))
            if order:
                orders.sort(key=lambda o: -o[2])
                orders = orders[: self.max_orders]
            else:
                orders = []
        return Prediction(iteration, layer, orders, window, nb if self.want_row else None, sim)

    def routed(self, layer: int, experts, probs=None) -> None:
        experts = np.asarray(experts, dtype=np.int64)
        if len(experts) > self.seen_k:
            self.seen_k = len(experts)
        if probs is not None:
            probs = np.asarray(probs)
            row = probs if probs.ndim == 1 else probs.max(axis=0)
            row = row.astype(np.float32)
        else:
            row = np.zeros(self.E, np.float32)
            K = len(experts)
            w = np.arange(K, 0, -1, dtype=np.float32)
            row[experts] = w / w.sum()
        self.cur[layer] = row
        if self.use_trajectory and self.store.size:
            nz = np.flatnonzero(row)
            self.search.observe(layer, nz, row[nz])

    def token_end(self) -> None:
        self._pos += 1
        self.iteration += 1
        if self.learn:
            self.store.add(self.cur.copy(), self.emb)
        self._reset_iteration()

    # -- history -----------------------------------------------------------------------------------
    def learn_history(self, expert_ids: np.ndarray, seq_offsets: np.ndarray, gate_probs=None,
                      texts=None, token_ids=None, weights=None) -> None:
        """Fill the map store from a trace (maps from `gate_probs`, else `weights`, else ranks)."""
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
                    maps = weight_rows(expert_ids[s:e], weights[s:e], self.E)
                else:
                    maps = rank_rows(expert_ids[s:e], self.E)
                embs = []
                for _ in range(s, e):
                    embs.append(self._embedding())
                    self._pos += 1
                self.store.add_many(maps, np.stack(embs))
        self._reset_iteration()


def weight_rows(ids: np.ndarray, w: np.ndarray, E: int) -> np.ndarray:
    """[B, L, K] ids with gate weights [B, L, K] -> [B, L, E] rows holding the weights at the
    routed experts (the unrouted experts' mass is unknown: zero); ids of -1 are left out."""
    B, L, K = ids.shape
    m = np.zeros((B, L, E + 1), np.float32)
    b_idx, l_idx = np.meshgrid(np.arange(B), np.arange(L), indexing="ij")
    for k in range(K):
        col = ids[:, :, k].astype(np.int64)
        m[b_idx, l_idx, np.where(col >= 0, col, E)] = w[:, :, k]
    return m[:, :, :E]


def rank_rows(ids: np.ndarray, E: int) -> np.ndarray:
    """[B, L, K] ids in router order -> [B, L, E] rank-weighted rows, (K - r) / sum."""
    K = ids.shape[2]
    w = np.arange(K, 0, -1, dtype=np.float32)
    return weight_rows(ids, np.broadcast_to(w / w.sum(), ids.shape), E)
