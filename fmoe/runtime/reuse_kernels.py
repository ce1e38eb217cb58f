"""Compiled hot paths of the reuse eviction rule (numba).

The default policy's decisions run on the forward thread once per layer: a routed layer's keys
get their scores for the next pass (`score_after`), and a layer's misses get their victims
(`take`). Written as numpy, each is a dozen small array operations, and their call overhead, not
their arithmetic, set the policy's cost (milliseconds per token at DeepSeek-V2-Lite shape). Here
each is one compiled loop over the layer's E keys or the cache's L * E keys.

Every kernel reproduces the numpy formula it replaces operation for operation (same
floating-point expressions, first index on ties), so decisions do not change; the tests compare
them with the numpy forms. Compiled on first use and cached on disk (``cache=CACHE``). The
counting kernels (`count_segment`, `backoffs`, `wait_table`) release the GIL: they run on the
counting thread beside the forward pass.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..files import numba_cache
from .reuse_features import NQ

CACHE = numba_cache(__file__)     # before the kernels below are made: where they are cached

NO_ROW = NQ - 1     # the next-pass class of a key whose layer has no row


@numba.njit(cache=CACHE)
def score_after(after, cur, tab, c_after0, c_used0, tp_l, ex, edges, layer, num_layers, done,
                no_row):  # pragma: no cover - compiled
    """Scores, for the next pass, of one routed layer's E keys (`ReuseScoring._score_after`).

    after, cur [L * E] float64 (written: the layer's slice of `after`; of `cur`, the whole slice
    when `done`, else the routed keys); tab [cells] expected waits; c_after0, c_used0 [L * E]
    int64 cells without the next-pass class; tp_l [E, E] the layer's transition probabilities;
    ex [k] int64 the routed experts; edges [NQ - 2] next-pass edges (already times K / E)."""
    E = tp_l.shape[0]
    base = layer * E
    k = ex.shape[0]
    off = layer + num_layers
    if k:
        q = np.zeros(E)
        for i in range(k):
            row = tp_l[ex[i]]
            for e in range(E):
                q[e] += row[e]
        nxt = np.empty(E, np.int64)
        for e in range(E):
            n = 0
            for j in range(edges.shape[0]):
                if edges[j] * k <= q[e]:       # searchsorted(edges * k, q, side="right")
                    n += 1
            nxt[e] = n
            after[base + e] = tab[c_after0[base + e] + n] + off
        for i in range(k):
            e = ex[i]
            after[base + e] = tab[c_used0[base + e] + nxt[e]] + off
    else:
        for e in range(E):
            after[base + e] = tab[c_after0[base + e] + no_row] + off
    if done:
        for e in range(E):
            cur[base + e] = after[base + e]
    else:
        for i in range(k):
            cur[base + ex[i]] = after[base + ex[i]]


@numba.njit(cache=CACHE)
def _candidates(key_of, pin, epoch, touch, score_clock, cur, l_now, m):  # pragma: no cover
    """The `m` best eviction candidates among the keys in the cache's slots (`key_of`, -1
    free) not pinned, by score ``cur - l_now + 1e-3 * (1 - touch / (score_clock + 1))``, best
    first; among equal scores the lower key first (argmax's order over keys). Returns (keys [m],
    how many there are)."""
    keys = np.empty(m, np.int64)
    scores = np.empty(m)
    n = 0
    scale = score_clock + 1
    for slot in range(key_of.shape[0]):
        j = key_of[slot]
        if j < 0 or pin[j] == epoch:
            continue
        base = cur[j] - l_now
        # the touch term lies in [0, 1e-3]: a key whose base + 1e-3 is below the m-th score
        # cannot enter (rounding is monotone), so its division is skipped
        if n == m and base + 1e-3 < scores[m - 1]:
            continue
        s = base + 1e-3 * (1.0 - touch[j] / scale)
        if n == m and not (s > scores[m - 1] or (s == scores[m - 1] and j < keys[m - 1])):
            continue
        i = n if n < m else m - 1          # insert after every better one
        while i > 0 and (scores[i - 1] < s or (scores[i - 1] == s and keys[i - 1] > j)):
            if i < m:
                scores[i] = scores[i - 1]
                keys[i] = keys[i - 1]
            i -= 1
        scores[i] = s
        keys[i] = j
        if n < m:
            n += 1
    return keys, n


@numba.njit(cache=CACHE)
def take(keys, slot_of, key_of, free, n_free, resident, pin, epoch, touch, clock, score_clock,
         after, cur, upto, tab, c_after0, c_used0, tp, edges, pend, l_now, num_experts, start,
         misses, n_vict, out_slot, out_hit, victims):  # pragma: no cover - compiled
    """One layer's uses, in order, as `SlotTable.acquire_many` makes them (pinned), on the slot
    table's arrays and the reuse rule's at once: a key with a slot is a hit; a missing one takes
    the last free slot while `n_free` lasts, then the slot of the highest
    ``cur - l_now + 1e-3 * (1 - touch / (score_clock + 1))`` among cached keys not pinned
    (``pin == epoch``); every use touches its key (the clock counts uses) and pins it.

    The candidates are ranked once, at the first victim: a use changes only its own key's
    touch, and that key is pinned from then on, so the ranking of the others holds for the
    layer; 2n + 1 candidates cover n victims past up to 2n keys pinned or evicted meanwhile.
    First the routed layers pending in `pend` ([n, then n records (layer, k, k experts)]) get
    their after-scores (`score_after`, with tab, c_after0, c_used0, tp [L, E, E] and edges); before
    ranking, the running scores catch up: ``cur[upto * E : l_now * E] = after[...]``
    (`ReuseScoring.running`).

    keys [n] int64, taken from index `start` on; the table's slot_of [L * E] int64 (-1: not
    cached), key_of [S] int64 (-1: free) and free [>= n_free] int64, its free slots popped from
    the end; the rule's resident [L * E] bool, pin [L * E] int64, touch [L * E] float64; after,
    cur [L * E] float64 the pass's scores (empty when the pass has none yet); upto [1] int64;
    out_slot [n] int64, out_hit [n] bool, victims [n] int64 (out). `score_clock` < 0: the clock
    at the first victim. `misses` and `n_vict` count on from a call that stopped. Every array
    given is updated in place but free.

    Returns (status, stop, n_free, clock, score_clock, misses, victims named): status 0 when
    every key is taken (stop = n); 1 when a victim needs scores the pass does not have yet
    (stop = the key that needs it, nothing done for it: make them, then call again from there);
    2 when every cached key is pinned (no room for key `stop`)."""
    if pend[0] > 0 and after.shape[0] > 0:
        j = 1
        for _ in range(pend[0]):
            lay, k = pend[j], pend[j + 1]
            score_after(after, cur, tab, c_after0, c_used0, tp[lay], pend[j + 2:j + 2 + k], edges,
                        lay, tp.shape[0], lay < upto[0], NO_ROW)
            j += 2 + k
        pend[0] = 0
    ranked = keys[:0]                   # typed for numba; set at the first victim
    n_ranked = -1
    for i in range(start, keys.shape[0]):
        key = keys[i]
        s = slot_of[key]
        if s >= 0:
            out_hit[i] = True
        else:
            if n_free > 0:
                n_free -= 1
                s = free[n_free]
            else:
                if n_ranked < 0:
                    if cur.shape[0] == 0:
                        return 1, i, n_free, clock, score_clock, misses, n_vict
                    if upto[0] < l_now:
                        for j in range(upto[0] * num_experts, l_now * num_experts):
                            cur[j] = after[j]
                        upto[0] = l_now
                    if score_clock < 0:
                        score_clock = clock
                    ranked, n_ranked = _candidates(key_of, pin, epoch, touch, score_clock,
                                                   cur, l_now, 2 * keys.shape[0] + 1)
                best = -1
                for r in range(n_ranked):
                    j = ranked[r]
                    if slot_of[j] >= 0 and pin[j] != epoch:
                        best = j
                        break
                if best < 0:
                    return 2, i, n_free, clock, score_clock, misses, n_vict
                resident[best] = False
                s = slot_of[best]
                slot_of[best] = -1
                victims[n_vict] = best
                n_vict += 1
            misses += 1
            out_hit[i] = False
            slot_of[key] = s
            key_of[s] = key
            resident[key] = True
        out_slot[i] = s
        clock += 1
        touch[key] = clock
        pin[key] = epoch
    return 0, keys.shape[0], n_free, clock, score_clock, misses, n_vict


@numba.njit(cache=CACHE)
def touch_keys(touch, keys, clock):  # pragma: no cover - compiled
    """Touch `keys` [n] int64 in order on the clock: ``touch[key] = clock += 1`` for each (the
    hits `take` would have touched). Returns the clock."""
    for i in range(keys.shape[0]):
        clock += 1
        touch[keys[i]] = clock
    return clock


@numba.njit(cache=CACHE)
def pass_vectors(last, count, pos, pb, tab, prev_keys, tp, edges, gap_lut, count_lut, n_count,
                 slot_size, no_row, now, after, used, c_after0,
                 c_used0):  # pragma: no cover - compiled
    """The per-pass vectors of `ReuseScoring.pass_vectors`, all [L * E]: writes now, after,
    used (float64) and the cells without next-pass class c_after0, c_used0 (int64).

    last, count [L * E] int64 the stream's last use (pass index, -1 none) and uses; pb [L * E]
    int64 the cell base (layer and popularity); tab [cells] expected waits; prev_keys [n] int64
    the previous pass's keys, sorted; tp [L, E, E] transition probabilities; edges [NQ - 2]
    next-pass edges (times K / E); slot_size = NP * NQ."""
    L, E = tp.shape[0], tp.shape[1]
    # the next-pass class of every key from the previous pass's experts
    nxt = np.full(L * E, no_row, np.int64)
    n = prev_keys.shape[0]
    if n:
        per = np.zeros(L, np.int64)
        for i in range(n):
            per[prev_keys[i] // E] += 1
        usual = n % L == 0
        if usual:
            for l in range(L):
                if per[l] != n // L:
                    usual = False
        q = np.zeros(E)
        i = 0
        for l in range(L):
            k = per[l]
            if k == 0:
                continue
            q[:] = 0.0
            for j in range(i, i + k):
                row = tp[l, prev_keys[j] - l * E]
                for e in range(E):
                    q[e] += row[e]
            i += k
            for e in range(E):
                # the usual pass (as many experts at every layer) scales by L / n, the
                # others divide by their own count: the numpy forms round each their way
                v = q[e] * (L / n) if usual else q[e] / k
                c = 0
                for j in range(edges.shape[0]):
                    if edges[j] <= v:
                        c += 1
                nxt[l * E + e] = c
    g1 = gap_lut[1]
    for key in range(L * E):
        lay = float(key // E)
        seen = last[key] >= 0
        gap = pos - last[key] if seen else 0
        cb = count_lut[min(count[key], 18)]
        cb1 = count_lut[min(count[key] + 1, 18)]
        g_now = gap_lut[min(gap, 65)]
        g_after = gap_lut[min(gap + 1 if seen else 0, 65)]
        ca = pb[key] + (g_after * n_count + cb) * slot_size
        cu = pb[key] + (g1 * n_count + cb1) * slot_size
        c_after0[key] = ca
        c_used0[key] = cu
        now[key] = tab[pb[key] + (g_now * n_count + cb) * slot_size + nxt[key]] + lay
        after[key] = tab[ca + no_row] + (lay + L)
        used[key] = tab[cu + no_row] + (lay + L)


@numba.njit(cache=CACHE)
def sync(last, count, uses, keys, first_pos, lengths):  # pragma: no cover - compiled
    """Apply passes of keys to the stream's last use, use counts and popularity: keys [n] int64
    (the passes one after another), lengths [m] keys per pass, the first pass at `first_pos`."""
    i = 0
    for p in range(lengths.shape[0]):
        pos = first_pos + p
        for _ in range(lengths[p]):
            k = keys[i]
            i += 1
            if pos > last[k]:
                last[k] = pos
            count[k] += 1
            uses[k] += 1.0


@numba.njit(cache=CACHE, nogil=True)
def count_segment(u, last0, count0, prev0, m, pop, tp, edges, horizon, cell_base, gap_lut,
                  count_lut, n_count, n_pop, n_next, none, seen, reused, trans, trans_from,
                  transitions):  # pragma: no cover - compiled
    """Count the first `m` passes u [n, L * E] (bool) of one stream into the reuse model's
    cells (`ReuseModel._count_segment`): each key's cell at each pass (gap since its last use,
    uses so far, popularity `pop`, next-pass class from the previous pass's row through `tp`)
    and its label (used at that pass or the next ``horizon - 1`` within u). Adds to seen and
    reused [cells], and with `transitions` to trans [L, E, E] / trans_from [L, E].

    last0 [L * E] the last use before u[0], relative to it (`none` when none); count0 the uses
    before it; prev0 the previous pass's row. Returns the last use (relative) and the uses as of
    pass m, the state a later segment starts from."""
    n, N = u.shape
    L, E = tp.shape[0], tp.shape[1]
    last = last0.copy()
    cnt = count0.copy()
    q = np.zeros(E)
    for i in range(m):
        for l in range(L):
            base = l * E
            k = 0
            q[:] = 0.0
            for e in range(E):
                if (prev0[base + e] if i == 0 else u[i - 1, base + e]):
                    k += 1
                    row = tp[l, e]
                    for f in range(E):
                        q[f] += row[f]
                    if transitions:
                        trans_from[l, e] += 1.0
                        for f in range(E):
                            if u[i, base + f]:
                                trans[l, e, f] += 1.0
            for e in range(E):
                key = base + e
                c = n_next - 1
                if k:
                    v = q[e] / k
                    c = 0
                    for j in range(edges.shape[0]):
                        if edges[j] <= v:
                            c += 1
                gap = i - last[key] if last[key] > none else 0
                g = gap_lut[min(gap, 65)]
                cell = cell_base[key] + ((g * n_count + count_lut[min(cnt[key], 18)]) * n_pop
                                         + pop[key]) * n_next + c
                label = False
                for j in range(horizon):
                    if i + j < n and u[i + j, key]:
                        label = True
                        break
                seen[cell] += 1.0
                if label:
                    reused[cell] += 1.0
        for key in range(N):
            if u[i, key]:
                last[key] = i
                cnt[key] += 1
    return last, cnt


@numba.njit(cache=CACHE, nogil=True)
def _wait(p, horizon, num_layers):  # pragma: no cover - compiled
    # the fourth root (the default horizon) as two square roots: a pow per cell is most of a
    # rebuild's time
    x = min(max(1.0 - p, 0.0), 1.0)
    r = math.sqrt(math.sqrt(x)) if horizon == 4 else x ** (1.0 / horizon)
    return num_layers * (1.0 / max(1.0 - r, 1e-3) - 1.0)


@numba.njit(cache=CACHE, nogil=True)
def wait_table(seen, reused, rate, coarse_of, min_count, horizon, num_layers,
               out):  # pragma: no cover - compiled
    """out [cells] = the expected wait (`ReuseScoring._wait`) of each cell's P(reuse): its own
    rate once seen `min_count` times, else its back-off `rate[coarse_of]` (one wait per back-off
    cell, computed once)."""
    coarse = np.empty(rate.shape[0])
    for c in range(rate.shape[0]):
        coarse[c] = _wait(rate[c], horizon, num_layers)
    for c in range(seen.shape[0]):
        s = seen[c]
        if s >= min_count:
            out[c] = _wait(reused[c] / max(s, 1.0), horizon, num_layers)
        else:
            out[c] = coarse[coarse_of[c]]


@numba.njit(cache=CACHE, nogil=True)
def backoffs(seen, reused, n_gap, n_count, n_pop, n_next, c_seen, c_reused):  # pragma: no cover - compiled
    """The (gap, count, next-pass) back-off counts c_seen, c_reused [NG * NC * NQ] (written):
    sums of the full cells [L, NG, NC, NP, NQ] over layers and popularity classes."""
    c_seen[:] = 0.0
    c_reused[:] = 0.0
    per_layer = n_gap * n_count * n_pop * n_next
    c = 0
    for _ in range(seen.shape[0] // per_layer):
        for gc in range(n_gap * n_count):
            for _p in range(n_pop):
                i = gc * n_next
                for q in range(n_next):
                    c_seen[i + q] += seen[c]
                    c_reused[i + q] += reused[c]
                    c += 1
