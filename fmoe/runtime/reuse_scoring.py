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


class ReuseScoring:
    """Scores of `ReuseModel` (a mixin): estimates, in layers, of how far off each key's next
    use is. Keys are ``layer * E + expert``; vectors are [L * E]."""

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
