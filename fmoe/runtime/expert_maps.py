"""fMoE's expert maps: the map store, semantic and trajectory search, and δ-selection.

An *expert map* is one iteration's (one token step's) router softmax at every MoE layer, an
[L, E] matrix. The store keeps up to C maps, each with a semantic embedding. Two searches turn
past maps into predictions for the running iteration:

* semantic search (the first d layers, before any routing of this iteration is known): the
  stored map whose embedding is nearest (cosine) to the current one;
* trajectory search (layer l >= d): the stored map whose rows 0..l-d are nearest (cosine over
  the concatenated rows) to the rows observed so far; its row l is the prediction. Running dot
  products make each observed layer cost O(C * K) for a K-sparse row (O(C * E) dense), not
  O(C * L * E).

`select` turns a predicted row into experts: δ = clip(1 - similarity, 0, 1); experts by falling
probability until their mass reaches δ, never fewer than top-k.

The predictor that drives these per event is `fmoe.runtime.map_predictor.MapPredictor`.
Everything here is numpy on the host; no tensors, no devices.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..files import atomic_write

log = logging.getLogger(__name__)

STORE_FORMAT = 1


def matvec(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """a [n, d] @ v [d] -> [n], in numpy's own loops, not BLAS. A multi-threaded BLAS leaves its
    threads spinning for about 0.1 s after a product large enough to split (two threads: 76-94
    ms of CPU in the 200 ms after one 415- or 1024-row product, `tools/bench_blas_spin.py`): on
    a CPU box that takes a core from the model's compute at every token. One thread is as fast
    here (memory-bound)."""
    return np.einsum("ij,j->i", a, v)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


class MapStore:
    """Up to `capacity` expert maps [L, E] (float32) with unit semantic embeddings [D].

    When full, a new map replaces the most redundant stored one: the entry with the highest
    ``(d / L) * cos(semantic) + ((L - d) / L) * cos(full map)`` against the new map, so the store
    keeps a spread of iterations instead of many copies of a common one.
    """

    def __init__(self, capacity: int, num_layers: int, num_experts: int, dim: int,
                 prefetch_distance: int = 3):
        if capacity < 1:
            raise ValueError(f"map store capacity must be >= 1, got {capacity}")
        self.capacity, self.L, self.E, self.dim = capacity, num_layers, num_experts, dim
        self.d = prefetch_distance
        self.maps = np.zeros((capacity, num_layers, num_experts), np.float32)
        self.sem = np.zeros((capacity, dim), np.float32)
        self.flat_unit = np.zeros((capacity, num_layers * num_experts), np.float32)
        self.prefix_sq = np.zeros((capacity, num_layers), np.float64)  # cumsum of row norms²
        self.size = 0
        self.version = 0       # bumped on every change: searches cache against it

    def redundancy(self, m: np.ndarray, emb: np.ndarray) -> np.ndarray:
        """[size] redundancy of every stored map against map `m` [L, E] with embedding `emb`."""
        n = self.size
        w_sem = min(self.d, self.L) / self.L
        flat = _unit(m.reshape(-1).astype(np.float32))
        return (w_sem * matvec(self.sem[:n], _unit(emb.astype(np.float32)))
                + (1 - w_sem) * matvec(self.flat_unit[:n], flat))

    def add(self, m: np.ndarray, emb: np.ndarray) -> int:
        """Insert map `m` [L, E]; returns its index (a replaced entry's when full)."""
        if self.size < self.capacity:
            i = self.size
            self.size += 1
        else:
            i = int(np.argmax(self.redundancy(m, emb)))
        self._put(i, m, emb)
        return i

    def add_many(self, maps: np.ndarray, embs: np.ndarray) -> None:
        """`add` each of maps [B, L, E] with embs [B, D], in order, with the same result as B
        calls of `add`, but with the redundancy of the whole batch in one matrix product."""
        B = len(maps)
        j = 0
        while j < B and self.size < self.capacity:       # free room first
            self.add(maps[j], embs[j])
            j += 1
        if j == B:
            return
        maps, embs = np.asarray(maps[j:], np.float32), np.asarray(embs[j:], np.float32)
        flat = maps.reshape(len(maps), -1)
        flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-30)
        sem = embs / np.maximum(np.linalg.norm(embs, axis=1, keepdims=True), 1e-30)
        w_sem = min(self.d, self.L) / self.L
        # redundancy against the store as it was before this batch ...
        red = w_sem * (self.sem @ sem.T) + (1 - w_sem) * (self.flat_unit @ flat.T)   # [C, B']
        changed: list[int] = []
        for b in range(len(maps)):
            r = red[:, b].copy()
            # ... corrected for the entries this batch already replaced
            for i in changed:
                r[i] = w_sem * float(self.sem[i] @ sem[b]) + (1 - w_sem) * float(self.flat_unit[i] @ flat[b])
            i = int(np.argmax(r))
            self._put(i, maps[b], embs[b])
            if i not in changed:
                changed.append(i)

    def _put(self, i: int, m: np.ndarray, emb: np.ndarray) -> None:
        m = np.asarray(m, np.float32)
        self.maps[i] = m
        self.sem[i] = _unit(np.asarray(emb, np.float32))
        self.flat_unit[i] = _unit(m.reshape(-1))
        self.prefix_sq[i] = np.cumsum((m.astype(np.float64) ** 2).sum(axis=1))
        self.version += 1

    # -- search ---------------------------------------------------------------------------
    def semantic(self, emb: np.ndarray) -> tuple[int, float]:
        """Nearest stored map by cosine of embeddings: (index, similarity); (-1, 0) if empty."""
        if self.size == 0:
            return -1, 0.0
        sims = matvec(self.sem[: self.size], _unit(np.asarray(emb, np.float32)))
        i = int(np.argmax(sims))
        return i, float(sims[i])

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: dict[str, np.ndarray] | None = None) -> None:
        """Write atomically (temporary file in the same directory, then rename). `extra`
        arrays (a policy's other learned state) are stored under ``x_<name>``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(
            f, format=np.int64(STORE_FORMAT), shape=np.array([self.L, self.E, self.dim], np.int64),
            maps=self.maps[: self.size], sem=self.sem[: self.size],
            **{f"x_{k}": v for k, v in (extra or {}).items()}), prefix=path.name)

    def load(self, path: str | os.PathLike) -> bool:
        """Fill from `path`. A missing, corrupt or mismatched file is reported (logged) and
        ignored: the store stays as it was. Returns whether anything was loaded; the file's
        `extra` arrays are left in ``self.loaded_extra`` (empty when none or not loaded)."""
        path = Path(path)
        self.loaded_extra: dict[str, np.ndarray] = {}
        if not path.exists():
            return False
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = int(z["format"])
                shape = tuple(int(x) for x in z["shape"])
                maps, sem = z["maps"], z["sem"]
                extra = {k[2:]: z[k] for k in z.files if k.startswith("x_")}
            if fmt != STORE_FORMAT:
                raise ValueError(f"format {fmt}, expected {STORE_FORMAT}")
            if shape != (self.L, self.E, self.dim):
                raise ValueError(f"maps of {shape[0]} layers x {shape[1]} experts, embeddings of "
                                 f"{shape[2]}; this model needs {self.L} x {self.E}, {self.dim}")
            if maps.shape[1:] != (self.L, self.E) or sem.shape != (maps.shape[0], self.dim):
                raise ValueError("inconsistent array shapes")
            if not (np.isfinite(maps).all() and np.isfinite(sem).all()):
                raise ValueError("non-finite values")
        except Exception as e:  # noqa: BLE001 - any unreadable file is ignored, never fatal
            log.warning("expert-map store %s ignored: %s", path, e)
            return False
        for m, s in zip(maps, sem):
            self.add(m, s)
        self.loaded_extra = extra
        return True


class TrajectorySearch:
    """Running prefix cosine between the current iteration's observed rows and every stored map.

    Call `reset` at each iteration, `observe(l, ...)` once per MoE layer in order, and
    `best(l)` for the nearest map over rows 0..l. Stored maps must not change within an
    iteration (the policy adds the finished iteration's map after `reset`... before the next).
    """

    def __init__(self, store: MapStore):
        self.store = store
        self.reset()

    def reset(self) -> None:
        self.dots = np.zeros(self.store.capacity, np.float64)
        self.q_sq = 0.0
        self.last = -1

    def observe(self, layer: int, experts: np.ndarray, values: np.ndarray) -> None:
        """Add row `layer` of the current map, given sparsely: `values` at `experts` (zero
        elsewhere). O(C * len(experts))."""
        n = self.store.size
        if n:
            self.dots[:n] += matvec(self.store.maps[:n, layer, experts].astype(np.float64),
                                    values.astype(np.float64))
        self.q_sq += float(np.dot(values, values))
        self.last = layer

    def similarities(self, layer: int | None = None) -> np.ndarray:
        """[size] cosine over rows 0..layer (default: the last observed)."""
        layer = self.last if layer is None else layer
        n = self.store.size
        if n == 0 or layer < 0 or self.q_sq == 0:
            return np.zeros(n)
        den = np.sqrt(self.store.prefix_sq[:n, layer]) * np.sqrt(self.q_sq)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where(den > 0, self.dots[:n] / den, 0.0)
        return cos

    def best(self, layer: int | None = None) -> tuple[int, float]:
        cos = self.similarities(layer)
        if cos.size == 0:
            return -1, 0.0
        i = int(np.argmax(cos))
        return i, float(cos[i])


def select(row: np.ndarray, similarity: float, top_k: int) -> np.ndarray:
    """Experts of a predicted row [E], by falling probability, until their mass reaches
    δ = clip(1 - similarity, 0, 1); never fewer than `top_k`."""
    delta = min(max(1.0 - similarity, 0.0), 1.0)
    order = np.argsort(-row, kind="stable")
    total = float(row.sum())
    if total <= 0:
        return order[:top_k]
    mass = np.cumsum(row[order]) / total
    n = int(np.searchsorted(mass, delta - 1e-12) + 1)
    return order[: max(top_k, min(n, len(order)))]
