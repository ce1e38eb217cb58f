"""The reuse model: the default eviction rule's predictor, learned from routing counts.

`ReuseModel` estimates, per (layer, expert) key, P(used again within the next few passes of its
layer) from counts over cells of five features (`fmoe.runtime.reuse_features`). This module
holds the features of the running stream, the counting (online, batched, and from a history
trace) and the saved state; the scores the eviction rule reads come from its base class
`fmoe.runtime.reuse_scoring.ReuseScoring`. Everything here is numpy on the host.

Online counting runs off the forward thread: every FLUSH_PASSES passes a batch of passes is
counted on one shared counting thread (compiled loops that release the GIL), and the new counts
(and the wait table, when due) land at the end of the pass COUNT_LAG passes later, or earlier
when something reads the counts. When they land depends only on the passes, never on the
thread's speed, so decisions are the same with the thread (`background=True`) or without it.
"""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .reuse_features import (
    _COUNT_LUT,
    _GAP_LUT,
    _NONE,
    COUNT_LAG,
    FLUSH_PASSES,
    NC,
    NG,
    NP,
    NQ,
    POP_REFRESH,
    TRANSITION_REFRESH,
    WAIT_REFRESH,
)
from .reuse_scoring import ReuseScoring, kernels

log = logging.getLogger(__name__)

_counter: ThreadPoolExecutor | None = None
_counter_lock = threading.Lock()


def _counting_thread() -> ThreadPoolExecutor:
    """The one thread that counts every model's batches (each model has at most one in flight)."""
    global _counter
    with _counter_lock:
        if _counter is None:
            _counter = ThreadPoolExecutor(1, thread_name_prefix="fmoe-reuse-count")
        return _counter


@dataclass(frozen=True)
class _Counted:
    """A counted batch of passes, applied to the model when it lands."""

    m: int                   # passes counted (the first m of the batch)
    last: np.ndarray         # [L * E] last use relative to the batch's first pass, as of pass m
    count: np.ndarray        # [L * E] uses in the stream as of pass m
    prev: list               # keys of pass m - 1 (the row before the passes left)
    tables: tuple | None     # `_tables` output when the wait table was due, else None


class ReuseModel(ReuseScoring):
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
                 min_count: int = 50, background: bool = True):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        L, E = num_layers, num_experts
        self.L, self.E, self.K = L, E, max(1, top_k)
        self.horizon, self.min_count = horizon, min_count
        self.background = background             # count on the counting thread
        self._pending: tuple | None = None       # (Future or _Counted, pass at which it lands)
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
        self._prev_keys: tuple | None = None     # (that list, its keys as an array)
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
        self._upto = np.zeros(1, np.int64)       # ... layers before this hold after-scores
        self._arrays: tuple | None = None        # per pass: what `running_arrays` hands out
        # the routed layers whose after-scores wait for the next reader, in order: [n, then n
        # records (layer, k, its k experts)]; at most one record per layer and pass
        self._pend = np.zeros(1 + num_layers * (2 + num_experts), np.int64)
        self._pend_mv = memoryview(self._pend)   # ... its scalars, written from Python
        self._pend_end = 1                       # ... where the next record goes
        rest = np.arange(cells) % (NG * NC * NP * NQ)
        self._coarse_of = (rest // (NP * NQ)) * NQ + rest % NQ   # cell -> its back-off cell
        self._edges: tuple | None = None         # (K, next-pass edges times K / E)
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
            self._land()              # it reads the transition counts a batch in flight writes
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
        for edge in self.next_edges():                  # = searchsorted(..., side="right")
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
        self._backoffs()              # lands a batch in flight
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
        self._vectors = None
        self._drop_scores()
        self._observed = set()

    def observe(self, keys) -> None:
        """Keys (ints) used by the current pass (token), any number of calls per pass; a key is
        reported at most once per pass."""
        self._keys.extend(keys)
        self._used = None
        if self._after is None or not len(keys):
            return                      # no scores this pass yet: nothing to keep current
        self._apply_pending()
        E = self.E
        layers = {k // E for k in keys}
        if len(layers) == 1 and not (layers & self._observed):
            (l,) = layers
            self._score_after([l], np.asarray(keys, dtype=np.int64) - l * E)
        else:                           # a layer reported in parts: from all its keys
            self._score_after(sorted(layers))
        self._observed |= layers

    def observe_layer(self, layer: int, keys: list[int], experts) -> None:
        """`observe(keys)` for the keys of one layer reported whole: `experts` their expert
        ids (array-like) in the same order. The layer's after-scores are computed by the next
        reader (`running`, or the compiled `take` of the next layer), in the same call."""
        self._keys += keys
        self._used = None
        if self._after is None or not keys:
            return
        observed = self._observed
        if layer in observed:
            self._apply_pending()
            self._score_after([layer])
            return
        observed.add(layer)
        # one layer per call on the forward thread: scalar writes through a memoryview (a
        # numpy item assignment costs several times more)
        mv = self._pend_mv
        k, i = len(keys), (self._pend_end if mv[0] else 1)     # a reader emptied it: restart
        mv[i] = layer
        mv[i + 1] = k
        try:
            mv[i + 2:i + 2 + k] = experts       # an int64 array
        except (TypeError, ValueError):
            self._pend[i + 2:i + 2 + k] = experts
        mv[0] += 1
        self._pend_end = i + 2 + k

    def end_pass(self) -> None:
        """The token is done: roll the stream on. Pure Python: the arrays (last use, counts)
        catch up in `_sync` when a score or a count needs them, and counting (labels need the
        next passes) is batched every FLUSH_PASSES passes, on the counting thread, and at the
        end of the stream."""
        if not self._buf:
            self._blk = (self.pos, self.last.copy(), self.count.copy(), self._prev)
        self._buf.append(self._keys)
        self._prev = self._keys
        self._keys = []
        self.pos += 1
        self.tokens += 1
        self._used = self._prev_row = self._vectors = None
        self._drop_scores()
        self._observed = set()
        if self._pending is not None and self.pos >= self._pending[1]:
            self._land()
        if self._pending is None and len(self._buf) >= FLUSH_PASSES + self.horizon - 1:
            self._start_count()

    def _sync(self) -> None:
        """Apply the buffered passes not yet applied to last use, counts and popularity."""
        todo = self._buf[self._synced:]
        if not todo:
            return
        keys = np.fromiter(itertools.chain.from_iterable(todo), np.int64)
        kernels().sync(self.last, self.count, self.uses, keys, self._blk[0] + self._synced,
             np.array([len(k) for k in todo], np.int64))
        if todo[-1] is self._prev:      # its keys as an array, for `pass_vectors`
            self._prev_keys = (self._prev, keys[len(keys) - len(self._prev):])
        self._pop_age += len(todo)
        self._synced = len(self._buf)

    def _flush(self, final: bool) -> None:
        """Count the buffered passes whose labels are complete (all of them when `final`), now
        (after landing a batch in flight)."""
        self._land()
        if not self._buf:
            return
        self._pending = (self._count_batch(*self._batch_args(final)), self.pos)
        self._land()

    def _start_count(self) -> None:
        """Count the buffered passes whose labels are complete on the counting thread (or now,
        without `background`); the result lands COUNT_LAG passes on (`_land`)."""
        args = self._batch_args(False)
        job = (_counting_thread().submit(self._count_batch, *args) if self.background
               else self._count_batch(*args))
        self._pending = (job, self.pos + COUNT_LAG)

    def _batch_args(self, final: bool) -> tuple:
        """`_count_batch`'s arguments for the buffered passes, as of now (buffered passes
        applied to the stream state first)."""
        self._sync()
        return (list(self._buf), self._blk, final, self._pop_class(), self.transition(),
                self.next_edges(), self.samples, self._tab_seen)

    def _count_batch(self, bufs: list, blk: tuple, final: bool, pop: np.ndarray, tp: np.ndarray,
                     edges: np.ndarray, samples: float, tab_seen: float) -> _Counted:
        """Count the passes `bufs` (lists of keys) given the stream state `blk` before the
        first; rebuild the wait table when the samples have grown by WAIT_REFRESH. May run on
        the counting thread: it reads only its arguments and writes only the count arrays
        (seen, reused, trans, trans_from), which nothing else touches until it lands."""
        pos0, last0, count0, prev0 = blk
        k = len(bufs)
        u = np.zeros((k, self.L * self.E), bool)
        u[np.repeat(np.arange(k), [len(b) for b in bufs]),
          np.fromiter(itertools.chain.from_iterable(bufs), np.int64)] = True
        m = self._countable(k, final)
        last, count = self._count_kernel(u, np.where(last0 >= 0, last0 - pos0, _NONE), count0,
                                         self._dense(prev0), m, pop, tp, edges, True)
        total = samples + m * u.shape[1]
        tables = self._tables(total) if m and total > tab_seen * WAIT_REFRESH else None
        return _Counted(m, last, count, bufs[m - 1] if m else prev0, tables)

    def _land(self) -> None:
        """Apply the batch in flight (waiting for the counting thread if it is not done; its
        error, if any, is raised here)."""
        if self._pending is None:
            return
        job = self._pending[0]
        self._pending = None
        c = job.result() if isinstance(job, Future) else job
        if not c.m:
            return
        pos0 = self._blk[0]
        self.samples += c.m * self.L * self.E
        self._tprob_age += c.m
        if c.tables is not None:
            self._install_tables(c.tables)
        else:
            self._backoff_dirty = True
        self._blk = (pos0 + c.m, np.where(c.last > _NONE, c.last + pos0, -1), c.count, c.prev)
        self._buf = self._buf[c.m:]
        self._synced -= c.m

    def __getstate__(self) -> dict:
        # a copy gets the counts landed, never a batch in flight
        self._land()
        state = dict(self.__dict__)
        del state["_pend_mv"]                    # a memoryview does not copy: made anew
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pend_mv = memoryview(self._pend)

    def _count_segment(self, u: np.ndarray, last0: np.ndarray, count0: np.ndarray, prev0: np.ndarray,
                       final: bool, pop: np.ndarray, tp: np.ndarray, transitions: bool = True):
        """Count the passes u [n, L * E] (bool) of one stream, given the state before u[0]: the
        last use relative to u[0] (negative; _NONE when none), the use counts, and the previous
        pass's row. Counts the first n - (horizon - 1) passes, or all n when `final` (the stream
        ended: later uses will not come), in one compiled loop
        (`fmoe.runtime.reuse_kernels.count_segment`). Returns (counted m, last use relative to
        u[0] [L * E], counts [L * E]) as of pass m."""
        self._land()
        n, N = u.shape
        m = self._countable(n, final)
        last, count = self._count_kernel(u, last0, count0, prev0, m, pop, tp, self.next_edges(),
                                         transitions)
        if m:
            self.samples += m * N
            self._backoff_dirty = True
        return m, last, count

    def _countable(self, n: int, final: bool) -> int:
        """Of n buffered passes, those whose labels are complete: all when `final` (the stream
        ended), else all but the last horizon - 1."""
        return n if final else max(0, n - (self.horizon - 1))

    def _count_kernel(self, u, last0, count0, prev0, m: int, pop, tp, edges, transitions: bool):
        """The first `m` passes of u into seen, reused (and trans, trans_from with
        `transitions`): (last use relative to u[0], counts) as of pass m."""
        return kernels().count_segment(
            np.ascontiguousarray(u), np.asarray(last0, np.int64), np.asarray(count0, np.int64),
            np.asarray(prev0, bool), m, np.asarray(pop, np.int64), tp, edges,
            self.horizon, self.cell_base, _GAP_LUT, _COUNT_LUT, NC, NP, NQ, _NONE, self.seen,
            self.reused, self.trans, self.trans_from, transitions)

    def _count_transitions(self, prev: np.ndarray, cur: np.ndarray) -> None:
        """prev, cur [n, L, E] bool: consecutive passes."""
        p, c = prev.astype(np.float64), cur.astype(np.float64)
        for l in range(self.L):
            self.trans[l] += p[:, l].T @ c[:, l]
        self.trans_from += p.sum(axis=0)

    def _backoffs(self) -> None:
        """Back-off counts from the full ones: (gap, count, next-pass) over layers and
        popularity classes, and the gap bucket alone."""
        self._land()
        if not self._backoff_dirty:
            return
        self.c_seen, self.c_reused, self.g_seen, self.g_reused = self._backoff_counts()
        self._backoff_dirty = False

    def _backoff_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(c_seen, c_reused, g_seen, g_reused) from seen and reused (new arrays)."""
        # counts are whole numbers: any summation order gives the same sums
        c_seen, c_reused = np.empty(NG * NC * NQ), np.empty(NG * NC * NQ)
        kernels().backoffs(self.seen, self.reused, NG, NC, NP, NQ, c_seen, c_reused)
        return (c_seen, c_reused, c_seen.reshape(NG, -1).sum(axis=1),
                c_reused.reshape(NG, -1).sum(axis=1))

    # -- history ---------------------------------------------------------------------------------
    def learn(self, used: np.ndarray, seq_offsets: np.ndarray) -> None:
        """Count a history: used [T, L * E] bool, sequences split by seq_offsets [S + 1].
        Popularity classes and transitions use the history's own counts (added first)."""
        self._land()
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
        self._drop_scores()

    def state(self) -> dict[str, np.ndarray]:
        """The learned counts, for saving next to the map store."""
        self._land()
        self._sync()
        self._backoffs()
        return {"reuse_seen": self.seen, "reuse_reused": self.reused, "reuse_uses": self.uses,
                "reuse_tokens": np.array(self.tokens, np.int64), "reuse_trans": self.trans,
                "reuse_trans_from": self.trans_from, "reuse_g_seen": self.g_seen,
                "reuse_g_reused": self.g_reused, "reuse_c_seen": self.c_seen,
                "reuse_c_reused": self.c_reused}

    def set_state(self, state: dict[str, np.ndarray]) -> bool:
        """Restore `state()` output; a mismatched one is reported and ignored."""
        self._land()
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
        self._pop = self._tprob = None
        self._wait_tab = self._vectors = None
        self._drop_scores()
        return True
