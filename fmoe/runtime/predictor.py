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

Everything here is numpy on the host; no tensors, no devices.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

STORE_FORMAT = 1


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
        return w_sem * (self.sem[:n] @ _unit(emb.astype(np.float32))) + (1 - w_sem) * (self.flat_unit[:n] @ flat)

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
        sims = self.sem[: self.size] @ _unit(np.asarray(emb, np.float32))
        i = int(np.argmax(sims))
        return i, float(sims[i])

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: dict[str, np.ndarray] | None = None) -> None:
        """Write atomically (temporary file in the same directory, then rename). `extra`
        arrays (a policy's other learned state) are stored under ``x_<name>``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, format=np.int64(STORE_FORMAT), shape=np.array([self.L, self.E, self.dim], np.int64),
                         maps=self.maps[: self.size], sem=self.sem[: self.size],
                         **{f"x_{k}": v for k, v in (extra or {}).items()})
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

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
            self.dots[:n] += self.store.maps[:n, layer, experts].astype(np.float64) @ values.astype(np.float64)
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


# -- reuse model (the default eviction rule's predictor) ---------------------------------------

# passes of a layer since the expert's last use: 1, 2, 3, 4, 5-6, 7-8, 9-12, 13-16, 17-24,
# 25-32, 33-48, 49-64, >64; bucket 13 = not used yet in this stream
_GAP_EDGES = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64])
# uses so far in this stream: 0, 1, 2, 3, 4-5, 6-9, 10-17, >17
_COUNT_EDGES = np.array([0, 1, 2, 3, 5, 9, 17])
# next-pass probability from the layer's last routed row, relative to the uniform top_k / E;
# the last class = no row yet in this stream
_NEXT_EDGES = np.array([0.7, 0.85, 1.0, 1.25])
NG, NC = len(_GAP_EDGES) + 2, len(_COUNT_EDGES) + 1
# bucket lookup tables (a gather is much cheaper than searchsorted on every key and pass)
_GAP_LUT = np.concatenate([[NG - 1], np.searchsorted(_GAP_EDGES, np.arange(1, 66), side="left")])
_COUNT_LUT = np.searchsorted(_COUNT_EDGES, np.arange(19), side="left")
NP = 8     # popularity classes: octiles of the long-run use counts
NQ = len(_NEXT_EDGES) + 2
TRANSITION_REFRESH = 64   # passes between refreshes of the transition probabilities
FLUSH_PASSES = 64         # online counting runs in batches of this many passes
POP_REFRESH = 64          # passes between refreshes of the popularity classes
WAIT_REFRESH = 1.1        # rebuild the wait table once the samples grew by this factor
_NONE = -(1 << 40)        # "no use yet" as a pass index


class ReuseModel:
    """P(an expert is used again within the next `horizon` passes of its layer), from counts.

    Each (layer, expert) key is described at each pass of its layer (one pass per token) by a
    cell of five features:

    * its layer;
    * passes since its last use in this stream (bucketed; "not yet");
    * its uses in this stream so far (bucketed);
    * its long-run popularity class (octile of all-time use counts);
    * a next-pass class: P(expert e' at layer l | the experts layer l routed to last), from
      layer-wise transition counts between consecutive tokens, relative to uniform.

    The model counts, per cell, how often the key was used at that pass or the next
    ``horizon - 1``. Counts come from past traffic (`learn`, a history trace) and keep growing
    online (`observe` / `end_pass`, live traffic), so an empty model starts as plain recency and
    sharpens as it sees routing. Cells with fewer than `min_count` samples fall back to their
    gap bucket's rate.

    A *stream* is the run of tokens of one request (a batch shares one stream); `reset_stream`
    starts a new one. Keys are ``layer * E + expert``.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, horizon: int = 4,
                 min_count: int = 50):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        L, E = num_layers, num_experts
        self.L, self.E, self.K = L, E, max(1, top_k)
        self.horizon, self.min_count = horizon, min_count
        n = L * E
        self.layer_of = np.repeat(np.arange(L), E)
        self.cell_base = self.layer_of * (NG * NC * NP * NQ)
        cells = L * NG * NC * NP * NQ
        self.seen = np.zeros(cells, np.float64)
        self.reused = np.zeros(cells, np.float64)
        # back-offs for cells seen too rarely: (gap, count, next-pass) over all layers and
        # popularity classes, then the gap bucket alone
        self.c_seen = np.zeros(NG * NC * NQ, np.float64)
        self.c_reused = np.zeros(NG * NC * NQ, np.float64)
        self.g_seen = np.zeros(NG, np.float64)
        self.g_reused = np.zeros(NG, np.float64)
        # long-run popularity (all streams)
        self.uses = np.zeros(n, np.float64)
        self.tokens = 0
        # layer-wise transitions between consecutive tokens: trans[l, e, e'] counts e then e'
        self.trans = np.zeros((L, E, E), np.float64)
        self.trans_from = np.zeros((L, E), np.float64)
        self._tprob: np.ndarray | None = None
        self._tprob_age = 0
        # running stream
        self.last = np.full(n, -1, np.int64)     # pass index of the last use, -1 none
        self.count = np.zeros(n, np.int64)
        self.pos = 0                             # passes so far in the stream
        # the hot path keeps keys in Python lists (a few per layer): small numpy operations
        # between torch ones cost far more than their size says
        self._keys: list[int] = []               # keys used at the current pass (token)
        self._prev: list[int] = []               # keys of the previous pass
        self._used: np.ndarray | None = None     # dense views, built when asked for
        self._prev_row: np.ndarray | None = None
        self._buf: list[list[int]] = []          # passes (keys) not counted yet: labels need later ones
        self._synced = 0                         # of them, applied to last / count / uses
        self._blk: tuple | None = None           # stream state before self._buf[0]
        self._pop: np.ndarray | None = None
        self._pop_age = 0
        self._wait_tab: np.ndarray | None = None # expected wait of every cell (back-offs folded)
        self._tab_seen = 1.0                     # samples counted when it was built
        self._backoff_dirty = False
        self.samples = 0                         # (cell, label) samples counted
        self._pop_base: tuple | None = None
        self._observed: set[int] = set()         # layers reported in this pass
        self._cur: np.ndarray | None = None      # per pass: the running scores
        self._cur_upto = 0
        self._coarse_of: np.ndarray | None = None
        self._vectors: tuple | None = None       # per pass: (now, after unused, after used)
        self._now: np.ndarray | None = None      # per pass: score of keys whose pass is to come
        self._after: np.ndarray | None = None    # per pass: score of keys whose pass is done

    # -- features ----------------------------------------------------------------------------
    def _pop_class(self) -> np.ndarray:
        """[L * E] popularity class 0 .. NP-1: the key's rank by long-run uses, in NP equal
        groups (equal counts share the lower class)."""
        if self._pop is None or self._pop_age >= POP_REFRESH:
            self._pop_age = 0
            n = len(self.uses)
            rank = np.searchsorted(np.sort(self.uses), self.uses, side="left")
            self._pop = rank * NP // n
        return self._pop

    def transition(self) -> np.ndarray:
        """[L, E, E] P(e' at the next pass | e at this one), refreshed every
        TRANSITION_REFRESH passes (rows never seen: uniform top_k / E)."""
        if self._tprob is None or self._tprob_age >= TRANSITION_REFRESH:
            uniform = self.K / self.E
            f = self.trans_from[:, :, None]
            self._tprob = np.where(f > 0, self.trans / np.maximum(f, 1), uniform)
            self._tprob_age = 0
        return self._tprob

    def next_class(self, rows: np.ndarray, tprob: np.ndarray | None = None) -> np.ndarray:
        """rows [..., L', E] bool (each layer's last routed experts; L' = L, or the layers of
        `tprob` [L', E, E]) -> [..., L' * E] next-pass class; a layer whose row is empty gets the
        last class."""
        tp = self.transition() if tprob is None else tprob
        r = rows.astype(np.float64)
        q = np.empty(r.shape)
        for i in range(r.shape[-2]):
            q[..., i, :] = r[..., i, :] @ tp[i]
        k = r.sum(axis=-1, keepdims=True)
        return self._next_classes(q / np.maximum(k, 1), k > 0).reshape(*rows.shape[:-2], -1)

    def _next_classes(self, q: np.ndarray, has_row) -> np.ndarray:
        """Next-pass probabilities q -> classes; where `has_row` is False, the last class."""
        c = np.zeros(q.shape, np.int64)
        for edge in _NEXT_EDGES * (self.K / self.E):     # = searchsorted(..., side="right")
            c += q >= edge
        return np.where(has_row, c, NQ - 1)

    def cells(self, gap: np.ndarray, count: np.ndarray, pop: np.ndarray, nxt: np.ndarray,
              base: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """gap (0 = not used yet), count, popularity class, next-pass class, each [..., L * E]
        (or [..., E] of one layer, with that layer's `base`) -> (cell, back-off cell, gap
        bucket): the full cell; its (gap, count, next-pass) cell over all layers and
        popularity classes; its gap bucket."""
        g = _GAP_LUT[np.minimum(gap, 65)]
        gc = g * NC + _COUNT_LUT[np.minimum(count, 18)]
        full = (self.cell_base if base is None else base) + (gc * NP + pop) * NQ + nxt
        return full, gc * NQ + nxt, g

    def probability(self, cells: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """P(reuse within the horizon) of each cell (`cells` output); a cell seen fewer than
        `min_count` times backs off to its (gap, count, next-pass) rate, then to its gap
        bucket's."""
        cells, coarse, g = cells
        self._backoffs()
        seen = self.seen[cells]
        g_rate = np.where(self.g_seen > 0, self.g_reused / np.maximum(self.g_seen, 1),
                          1.0 / (2.0 + np.arange(NG)))    # nothing seen yet: recency order
        c_seen = self.c_seen[coarse]
        p = np.where(c_seen >= self.min_count, self.c_reused[coarse] / np.maximum(c_seen, 1), g_rate[g])
        return np.where(seen >= self.min_count, self.reused[cells] / np.maximum(seen, 1), p)

    # -- the running stream --------------------------------------------------------------------
    def _dense(self, keys) -> np.ndarray:
        row = np.zeros(self.L * self.E, bool)
        row[np.asarray(keys, dtype=np.int64)] = True
        return row

    @property
    def used(self) -> np.ndarray:
        """[L * E] bool: the keys used so far by the current pass."""
        if self._used is None:
            self._used = self._dense(self._keys)
        return self._used

    @property
    def prev_row(self) -> np.ndarray:
        """[L, E] bool: the previous pass's experts per layer."""
        if self._prev_row is None:
            self._prev_row = self._dense(self._prev).reshape(self.L, self.E)
        return self._prev_row

    def reset_stream(self) -> None:
        self._flush(final=True)
        self.last[:] = -1
        self.count[:] = 0
        self.pos = 0
        self._keys = []
        self._prev = []
        self._used = self._prev_row = None
        self._now = self._after = self._vectors = None
        self._observed = set()

    def observe(self, keys) -> None:
        """Keys (ints) used by the current pass (token), any number of calls per pass; a key is
        reported at most once per pass."""
        self._keys.extend(keys)
        self._used = None
        if self._after is None or not len(keys):
            return                      # no scores this pass yet: nothing to keep current
        E = self.E
        layers = {k // E for k in keys}
        if len(layers) == 1 and not (layers & self._observed):
            (l,) = layers
            self._score_after([l], np.asarray(keys, dtype=np.int64) - l * E)
        else:                           # a layer reported in parts: from all its keys
            self._score_after(sorted(layers))
        self._observed |= layers

    def end_pass(self) -> None:
        """The token is done: roll the stream on. Pure Python: the arrays (last use, counts)
        catch up in `_sync` when a score or a count needs them, and counting (labels need the
        next passes) is batched every FLUSH_PASSES passes and at the end of the stream."""
        if not self._buf:
            self._blk = (self.pos, self.last.copy(), self.count.copy(), self._prev)
        self._buf.append(self._keys)
        self._prev = self._keys
        self._keys = []
        self.pos += 1
        self.tokens += 1
        self._used = self._prev_row = self._now = self._after = self._vectors = None
        self._observed = set()
        if len(self._buf) >= FLUSH_PASSES + self.horizon - 1:
            self._flush(final=False)

    def _sync(self) -> None:
        """Apply the buffered passes not yet applied to last use, counts and popularity."""
        todo = self._buf[self._synced:]
        if not todo:
            return
        keys = np.fromiter(itertools.chain.from_iterable(todo), np.int64)
        first = self._blk[0] + self._synced
        pos = np.repeat(np.arange(first, first + len(todo)), [len(k) for k in todo])
        np.maximum.at(self.last, keys, pos)
        n = len(self.count)
        self.count += np.bincount(keys, minlength=n)
        self.uses += np.bincount(keys, minlength=n)
        self._pop_age += len(todo)
        self._synced = len(self._buf)

    def _flush(self, final: bool) -> None:
        """Count the buffered passes whose labels are complete (all of them when `final`)."""
        if not self._buf:
            return
        self._sync()
        pos0, last0, count0, prev0 = self._blk
        k = len(self._buf)
        u = np.zeros((k, self.L * self.E), bool)
        u[np.repeat(np.arange(k), [len(b) for b in self._buf]),
          np.fromiter(itertools.chain.from_iterable(self._buf), np.int64)] = True
        m, lb, cb = self._count_segment(u, np.where(last0 >= 0, last0 - pos0, _NONE), count0,
                                        self._dense(prev0), final, self._pop_class(), self.transition())
        self._tprob_age += m
        if final or m == k:
            self._buf = []
            self._synced = 0
            return
        # the passes left wait for their labels; the block restarts at pass m
        self._blk = (pos0 + m, np.where(lb[m] > _NONE, lb[m] + pos0, -1), cb[m],
                     self._buf[m - 1] if m else prev0)
        self._buf = self._buf[m:]
        self._synced -= m

    def _count_segment(self, u: np.ndarray, last0: np.ndarray, count0: np.ndarray, prev0: np.ndarray,
                       final: bool, pop: np.ndarray, tp: np.ndarray, transitions: bool = True):
        """Count the passes u [n, L * E] (bool) of one stream, given the state before u[0]: the
        last use relative to u[0] (negative; _NONE when none), the use counts, and the previous
        pass's row. Counts the first n - (horizon - 1) passes, or all n when `final` (the stream
        ended: later uses will not come). Returns (counted, last-use [n, L * E], counts
        [n, L * E]) as of each pass."""
        n, N = u.shape
        L, E, h = self.L, self.E, self.horizon
        ar = np.arange(n)[:, None]
        run = np.maximum.accumulate(np.where(u, ar, _NONE), axis=0)
        lb = np.maximum(np.vstack([np.full((1, N), _NONE), run[:-1]]), last0[None, :])
        cb = count0[None, :] + np.vstack([np.zeros((1, N), np.int64), np.cumsum(u, axis=0)[:-1]])
        m = n if final else max(0, n - (h - 1))
        if m == 0:
            return 0, lb, cb
        prev = np.vstack([prev0[None, :], u[:m - 1]]).reshape(m, L, E)
        if transitions:
            self._count_transitions(prev, u[:m].reshape(m, L, E))
        gap = np.where(lb[:m] > _NONE, ar[:m] - lb[:m], 0)
        cells = self.cells(gap, cb[:m], pop[None, :], self.next_class(prev, tp))
        label = u.copy()
        for j in range(1, h):
            label[:-j] |= u[j:]
        self._count(tuple(c.reshape(-1) for c in cells), label[:m].reshape(-1))
        return m, lb, cb

    def _count_transitions(self, prev: np.ndarray, cur: np.ndarray) -> None:
        """prev, cur [n, L, E] bool: consecutive passes."""
        p, c = prev.astype(np.float64), cur.astype(np.float64)
        for l in range(self.L):
            self.trans[l] += p[:, l].T @ c[:, l]
        self.trans_from += p.sum(axis=0)

    def _cells_now(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells of every key for the current pass, from what was known before it."""
        seen = self.last >= 0
        return self.cells(np.where(seen, self.pos - self.last, 0), self.count, self._pop_class(),
                          self.next_class(self.prev_row))

    def _count(self, cells: tuple[np.ndarray, np.ndarray, np.ndarray], reused: np.ndarray) -> None:
        """Add samples: one bincount over (cell, label); the back-off counts (sums of the full
        ones over layers and popularity classes) follow lazily (`_backoffs`)."""
        n = len(self.seen)
        both = np.bincount(cells[0] * 2 + reused.astype(np.int64), minlength=2 * n).reshape(n, 2)
        self.seen += both.sum(axis=1)
        self.reused += both[:, 1]
        self.samples += len(reused)
        self._backoff_dirty = True

    def _backoffs(self) -> None:
        """Back-off counts from the full ones: (gap, count, next-pass) over layers and
        popularity classes, and the gap bucket alone."""
        if not self._backoff_dirty:
            return
        shape = (self.L, NG, NC, NP, NQ)
        self.c_seen = self.seen.reshape(shape).sum(axis=(0, 3)).reshape(-1)
        self.c_reused = self.reused.reshape(shape).sum(axis=(0, 3)).reshape(-1)
        self.g_seen = self.c_seen.reshape(NG, -1).sum(axis=1)
        self.g_reused = self.c_reused.reshape(NG, -1).sum(axis=1)
        self._backoff_dirty = False

    # -- scoring ---------------------------------------------------------------------------------
    def _score_after(self, layers, experts=None) -> None:
        """Scores, for the next pass, of the keys of `layers` (routed in this pass): the cell a
        key moves to (gap and count after this pass) with the next-pass class from this pass's
        row. Runs once per routed layer while evictions happen: a few operations on E values.
        `experts`: the routed experts when `layers` is one layer reported in one call."""
        L, E = self.L, self.E
        tab = self.wait_table()
        c_after0, c_used0 = self._after_cells
        edges = _NEXT_EDGES * (self.K / self.E)
        tp = self.transition()
        cur = None
        for l in layers:
            sl = slice(l * E, (l + 1) * E)
            if experts is None:
                if cur is None:
                    cur = self.used.reshape(L, E)
                ex = np.flatnonzero(cur[l])
            else:
                ex = experts
            k = len(ex)
            if k:
                nxt = np.searchsorted(edges * k, tp[l][ex].sum(axis=0), side="right")
                c = c_after0[sl] + nxt
                c[ex] = c_used0[sl][ex] + nxt[ex]
            else:
                c = c_after0[sl] + (NQ - 1)
            after = self._after[sl] = tab[c] + (l + L)
            # the running score: a routed layer's used keys are done now, its others once
            # the next layer starts (`next_use_score`)
            if l < self._cur_upto:
                self._cur[sl] = after
            elif k:
                self._cur[sl][ex] = after[ex]

    def _wait(self, p: np.ndarray) -> np.ndarray:
        """P(reuse within `horizon` passes) -> expected layers of waiting beyond the next pass,
        L * (1/q - 1), with q the per-pass use probability of a geometric wait that gives p."""
        q = 1.0 - np.power(np.clip(1.0 - p, 0.0, 1.0), 1.0 / self.horizon)
        return self.L * (1.0 / np.maximum(q, 1e-3) - 1.0)

    def next_use_score(self, l_now: int) -> np.ndarray:
        """[L * E] an estimate of how far off each key's next use is, in layers (larger = later):
        layers until the key's next pass + the expected wait `_wait` beyond it. During
        layer `l_now` of a token, the keys of routed layers have had their pass (their next comes
        with the next token); the others have theirs still to come."""
        L, E = self.L, self.E
        if self._now is None:
            now, after, _ = self.pass_vectors()
            self._now = now
            # layers not routed yet this pass keep a no-row estimate until they are
            self._after = after.copy()
            self._cur = now.copy()          # after for done keys, now for the others
            self._cur_upto = 0
            routed = np.flatnonzero(self.used.reshape(L, E).any(axis=1)).tolist()
            self._observed = set(routed)    # layers reported before the scores existed
            if routed:
                self._score_after(routed)
        if l_now > self._cur_upto:          # the layers before l_now have had their pass
            self._cur[self._cur_upto * E: l_now * E] = self._after[self._cur_upto * E: l_now * E]
            self._cur_upto = l_now
        return self._cur - l_now

    # -- per-pass score vectors (the eviction rule's hot path) ---------------------------------
    def wait_table(self) -> np.ndarray:
        """[cells] the expected wait (`_wait` of `probability`, back-offs folded in) of every
        cell; rebuilt once the counted samples have grown by WAIT_REFRESH (often while a model
        learns from an empty start, rarely once it holds a long history)."""
        total = self.samples
        if self._wait_tab is None or total > self._tab_seen * WAIT_REFRESH:
            self._backoffs()
            # back-off rates per (gap, count, next-pass) cell, then spread over every cell
            coarse = np.arange(NG * NC * NQ)
            g = coarse // (NC * NQ)
            g_rate = np.where(self.g_seen > 0, self.g_reused / np.maximum(self.g_seen, 1),
                              1.0 / (2.0 + np.arange(NG)))    # nothing seen yet: recency order
            rate = np.where(self.c_seen >= self.min_count,
                            self.c_reused / np.maximum(self.c_seen, 1), g_rate[g])
            if self._coarse_of is None:
                rest = np.arange(len(self.seen)) % (NG * NC * NP * NQ)
                self._coarse_of = (rest // (NP * NQ)) * NQ + rest % NQ
            p = np.where(self.seen >= self.min_count, self.reused / np.maximum(self.seen, 1),
                         rate[self._coarse_of])
            self._wait_tab = self._wait(p)
            self._tab_seen = max(total, 1.0)
        return self._wait_tab

    def pass_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Three [L * E] estimates, in layers from the start of the current pass, of when each
        key is next used (larger = later), computed once per pass:

        * ``now``: its layer has its pass still to come: layer + the wait from its cell now
          (next-pass class from the previous pass's row);
        * ``after``: its layer has had this pass without it: layer + L + the wait from the
          cell it moves to (gap + 1; next-pass class unknown until the next pass);
        * ``after_used``: its layer has had this pass and used it (gap 1, count + 1).
        """
        if self._vectors is None:
            L = self.L
            self._sync()
            tab = self.wait_table()
            pop = self._pop_class()
            if self._pop_base is None or self._pop_base[0] is not pop:
                self._pop_base = (pop, self.cell_base + pop * NQ, self.layer_of.astype(np.float64))
            _, pb, lay = self._pop_base
            S = NP * NQ
            seen = self.last >= 0
            gap = np.where(seen, self.pos - self.last, 0)
            cb = _COUNT_LUT[np.minimum(self.count, 18)]
            cb1 = _COUNT_LUT[np.minimum(self.count + 1, 18)]
            g_now = _GAP_LUT[np.minimum(gap, 65)]
            g_after = _GAP_LUT[np.minimum(np.where(seen, gap + 1, 0), 65)]
            c_after0 = pb + (g_after * NC + cb) * S
            c_used0 = pb + (int(_GAP_LUT[1]) * NC + cb1) * S
            self._after_cells = (c_after0, c_used0)
            c_now = pb + (g_now * NC + cb) * S + self._next_from_prev()
            c_after = c_after0 + (NQ - 1)
            c_used = c_used0 + (NQ - 1)
            self._vectors = (tab[c_now] + lay, tab[c_after] + (lay + L), tab[c_used] + (lay + L))
        return self._vectors

    def _next_from_prev(self) -> np.ndarray:
        """[L * E] next-pass class of every key from the previous pass's experts (the sparse
        form of `next_class(prev_row)`)."""
        L, E = self.L, self.E
        if not self._prev:
            return np.full(L * E, NQ - 1)
        keys = np.sort(np.asarray(self._prev, dtype=np.int64))
        rows = self.transition().reshape(L * E, E)[keys]
        edges = _NEXT_EDGES * (self.K / self.E)
        n = len(keys)
        if n % L == 0 and np.array_equal(keys[:: n // L] // E, np.arange(L)) \
                and np.array_equal(keys[n // L - 1:: n // L] // E, np.arange(L)):
            # the usual pass: the same number of experts at every layer
            q = rows.reshape(L, n // L, E).sum(axis=1) * (L / n)
            return np.searchsorted(edges, q, side="right").reshape(-1)
        lay = keys // E
        starts = np.flatnonzero(np.concatenate(([True], lay[1:] != lay[:-1])))
        q = np.zeros((L, E))
        q[lay[starts]] = np.add.reduceat(rows, starts, axis=0)
        k = np.bincount(lay, minlength=L)[:, None]
        c = np.searchsorted(edges, q / np.maximum(k, 1), side="right")
        return np.where(k > 0, c, NQ - 1).reshape(-1)

    # -- history ---------------------------------------------------------------------------------
    def learn(self, used: np.ndarray, seq_offsets: np.ndarray) -> None:
        """Count a history: used [T, L * E] bool, sequences split by seq_offsets [S + 1].
        Popularity classes and transitions use the history's own counts (added first)."""
        L, E = self.L, self.E
        spans = [(a, b) for a, b in zip(seq_offsets[:-1].tolist(), seq_offsets[1:].tolist()) if b > a]
        self.uses += used.sum(axis=0)
        self.tokens += used.shape[0]
        for a, b in spans:
            u = used[a:b].reshape(b - a, L, E)
            self._count_transitions(u[:-1], u[1:])
        self._pop = self._tprob = self._wait_tab = self._vectors = None
        pop = self._pop_class()
        tp = self.transition()
        n = used.shape[1]
        for a, b in spans:
            self._count_segment(used[a:b], np.full(n, _NONE), np.zeros(n, np.int64),
                                np.zeros(n, bool), True, pop, tp, transitions=False)
        self._now = self._after = None

    def state(self) -> dict[str, np.ndarray]:
        """The learned counts, for saving next to the map store."""
        self._sync()
        self._backoffs()
        return {"reuse_seen": self.seen, "reuse_reused": self.reused, "reuse_uses": self.uses,
                "reuse_tokens": np.array(self.tokens, np.int64), "reuse_trans": self.trans,
                "reuse_trans_from": self.trans_from, "reuse_g_seen": self.g_seen,
                "reuse_g_reused": self.g_reused, "reuse_c_seen": self.c_seen,
                "reuse_c_reused": self.c_reused}

    def set_state(self, state: dict[str, np.ndarray]) -> bool:
        """Restore `state()` output; a mismatched one is reported and ignored."""
        names = {"seen": "reuse_seen", "reused": "reuse_reused", "uses": "reuse_uses",
                 "trans": "reuse_trans", "trans_from": "reuse_trans_from",
                 "g_seen": "reuse_g_seen", "g_reused": "reuse_g_reused",
                 "c_seen": "reuse_c_seen", "c_reused": "reuse_c_reused"}
        try:
            new = {a: np.asarray(state[k], np.float64) for a, k in names.items()}
            tokens = int(state["reuse_tokens"])
            for a, v in new.items():
                if v.shape != getattr(self, a).shape:
                    raise ValueError(f"{names[a]} has shape {v.shape}, this model needs "
                                     f"{getattr(self, a).shape}")
                if not np.isfinite(v).all():
                    raise ValueError(f"{names[a]} has non-finite values")
        except (KeyError, ValueError, TypeError) as e:
            log.warning("reuse-model counts ignored: %s", e)
            return False
        for a, v in new.items():
            setattr(self, a, v)
        self.tokens = tokens
        self.samples = int(self.seen.sum())
        self._backoff_dirty = False
        self._pop = self._tprob = self._now = self._after = None
        self._wait_tab = self._vectors = None
        return True


# -- the map predictor (fMoE's search side) ------------------------------------------------------

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
