"""The reuse model's scoring side: per-pass estimates of when each key is next used.

`ReuseScoring` is the part of `fmoe.runtime.reuse_model.ReuseModel` that the eviction rule
calls on its hot path (`next_use_score`, `pass_vectors`): it turns the counted cells into an
expected wait (`wait_table`) and keeps per-pass score vectors current as layers route. It holds
no state of its own; it reads and caches on the attributes `ReuseModel.__init__` sets (counts,
the running stream, the per-pass caches), and is not meant to be used on its own.
"""

from __future__ import annotations

import numpy as np

from .reuse_features import _COUNT_LUT, _GAP_LUT, _NEXT_EDGES, NC, NG, NP, NQ, WAIT_REFRESH

# `running_arrays` before a pass has scores: empty, of the types the compiled `take` expects
_NO_ARRAYS = (np.empty(0), np.empty(0), np.zeros(1, np.int64), np.empty(0),
              np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 0, 0)), np.empty(0),
              np.zeros(1, np.int64))


def kernels():
    """`fmoe.runtime.reuse_kernels`, imported on first use (numba takes a moment to load)."""
    global _kernels
    if _kernels is None:
        from . import reuse_kernels

        _kernels = reuse_kernels
    return _kernels


_kernels = None


class ReuseScoring:
    """Scores of `ReuseModel` (a mixin): estimates, in layers, of how far off each key's next
    use is. Keys are ``layer * E + expert``; vectors are [L * E]."""

    # -- scoring ---------------------------------------------------------------------------------
    def _score_after(self, layers, experts=None) -> None:
        """Scores, for the next pass, of the keys of `layers` (routed in this pass): the cell a
        key moves to (gap and count after this pass) with the next-pass class from this pass's
        row (`fmoe.runtime.reuse_kernels.score_after`, one compiled call per layer). Runs once
        per routed layer while evictions happen. `experts`: the routed experts (int64) when
        `layers` is one layer reported in one call."""
        score_after = kernels().score_after
        L, E = self.L, self.E
        tab = self.wait_table()
        c_after0, c_used0 = self._after_cells
        edges = self.next_edges()
        tp = self.transition()
        cur = None
        for l in layers:
            if experts is None:
                if cur is None:
                    cur = self.used.reshape(L, E)
                ex = np.flatnonzero(cur[l])
            else:
                ex = experts
            # the running score: a routed layer's used keys are done now, its others once
            # the next layer starts (`running`)
            score_after(self._after, self._cur, tab, c_after0, c_used0, tp[l], ex, edges, l, L,
                        l < self._upto[0], NQ - 1)

    def next_edges(self) -> np.ndarray:
        """The next-pass class edges for this top-k: `_NEXT_EDGES` times K / E (kept while K
        stays the same; a history may set K after the model is made)."""
        if self._edges is None or self._edges[0] != self.K:
            self._edges = (self.K, _NEXT_EDGES * (self.K / self.E))
        return self._edges[1]

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
        return self.running(l_now) - l_now

    @property
    def has_scores(self) -> bool:
        """Whether this pass's running scores exist (`running` has been called since the pass
        began)."""
        return self._now is not None

    def running(self, l_now: int) -> np.ndarray:
        """[L * E] `next_use_score(l_now) + l_now`: the running scores themselves (kept, not a
        copy: read them before the next event)."""
        E = self.E
        if self._now is None:
            now, after, _ = self.pass_vectors()
            self._now = now
            # layers not routed yet this pass keep a no-row estimate until they are
            self._after = after.copy()
            self._cur = now.copy()          # after for done keys, now for the others
            self._upto[0] = 0               # layers before this one hold their after-scores
            routed = sorted({key // E for key in self._keys})
            self._observed = set(routed)    # layers reported before the scores existed
            if routed:
                self._score_after(routed)
            c_after0, c_used0 = self._after_cells
            self._arrays = (self._after, self._cur, self._upto, self.wait_table(), c_after0,
                            c_used0, self.transition(), self.next_edges(), self._pend)
        elif self._pend_mv[0]:
            self._apply_pending()
        upto = int(self._upto[0])
        if l_now > upto:                    # the layers before l_now have had their pass
            self._cur[upto * E: l_now * E] = self._after[upto * E: l_now * E]
            self._upto[0] = l_now
        return self._cur

    def running_arrays(self) -> tuple:
        """What the compiled `fmoe.runtime.reuse_kernels.take` reads and updates of the running
        scores: (after, cur, upto, tab, c_after0, c_used0, tp, edges, pend), empty arrays when
        this pass has no scores yet. `take` applies the pending routed layer (`pend`) and
        catches `cur` up itself (the layers before ``upto[0]`` hold their after-scores)."""
        return _NO_ARRAYS if self._now is None else self._arrays

    def _apply_pending(self) -> None:
        """The after-scores of the routed layers `observe_layer` left pending, in order."""
        pend = self._pend
        i = 1
        for _ in range(int(pend[0])):
            layer, k = int(pend[i]), int(pend[i + 1])
            self._score_after([layer], pend[i + 2:i + 2 + k].copy())
            i += 2 + k
        pend[0] = 0
        self._pend_end = 1

    def _drop_scores(self) -> None:
        """Forget this pass's scores (and the layers pending for them)."""
        self._now = self._after = self._arrays = None
        self._pend[0] = 0
        self._pend_end = 1

    # -- per-pass score vectors (the eviction rule's hot path) ---------------------------------
    def wait_table(self) -> np.ndarray:
        """[cells] the expected wait (`_wait` of `probability`, back-offs folded in) of every
        cell; rebuilt once the counted samples have grown by WAIT_REFRESH (often while a model
        learns from an empty start, rarely once it holds a long history). A batch counted
        online brings its own rebuild when it lands."""
        if self._wait_tab is None or self.samples > self._tab_seen * WAIT_REFRESH:
            self._land()
            self._install_tables(self._tables(self.samples))
        return self._wait_tab

    def _tables(self, total: float) -> tuple:
        """(c_seen, c_reused, g_seen, g_reused, wait table, `total`): the back-off counts and
        the wait table from the counts as they are (new arrays; may run on the counting
        thread)."""
        c_seen, c_reused, g_seen, g_reused = self._backoff_counts()
        # back-off rates per (gap, count, next-pass) cell, then spread over every cell
        coarse = np.arange(NG * NC * NQ)
        g = coarse // (NC * NQ)
        g_rate = np.where(g_seen > 0, g_reused / np.maximum(g_seen, 1),
                          1.0 / (2.0 + np.arange(NG)))    # nothing seen yet: recency order
        rate = np.where(c_seen >= self.min_count, c_reused / np.maximum(c_seen, 1), g_rate[g])
        tab = np.empty(len(self.seen))
        kernels().wait_table(self.seen, self.reused, rate, self._coarse_of, self.min_count,
                             self.horizon, self.L, tab)
        return c_seen, c_reused, g_seen, g_reused, tab, total

    def _install_tables(self, tables: tuple) -> None:
        self.c_seen, self.c_reused, self.g_seen, self.g_reused, self._wait_tab, total = tables
        self._backoff_dirty = False
        self._tab_seen = max(total, 1.0)

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
            self._sync()
            tab = self.wait_table()
            pop = self._pop_class()
            if self._pop_base is None or self._pop_base[0] is not pop:
                self._pop_base = (pop, self.cell_base + pop * NQ)
            n = self.L * self.E
            now, after, used = np.empty(n), np.empty(n), np.empty(n)
            c_after0, c_used0 = np.empty(n, np.int64), np.empty(n, np.int64)
            prev = self._prev_keys      # made by `_sync` (converting a list costs ~60 ns a key)
            prev = (prev[1] if prev is not None and prev[0] is self._prev
                    else np.asarray(self._prev, dtype=np.int64))
            kernels().pass_vectors(self.last, self.count, self.pos, self._pop_base[1], tab,
                         np.sort(prev), self.transition(),
                         self.next_edges(), _GAP_LUT, _COUNT_LUT, NC, NP * NQ, NQ - 1,
                         now, after, used, c_after0, c_used0)
            self._after_cells = (c_after0, c_used0)
            self._vectors = (now, after, used)
        return self._vectors
