"""The reuse model's features: the buckets that turn a key's history into a cell.

A key (one layer's expert) is described at each pass of its layer by five features (see
`fmoe.runtime.reuse_model.ReuseModel`); the edges below bucket them and the class counts fix the
cell layout ``(((layer * NG + gap) * NC + count) * NP + popularity) * NQ + next-pass``. The
refresh constants set how often the model's derived tables are rebuilt. Shared by the counting
side (`reuse_model`) and the scoring side (`reuse_scoring`).
"""

from __future__ import annotations

import numpy as np

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
COUNT_LAG = 4             # ... each on the counting thread, landing this many passes after it starts
POP_REFRESH = 64          # passes between refreshes of the popularity classes
WAIT_REFRESH = 1.1        # rebuild the wait table once the samples grew by this factor
_NONE = -(1 << 40)        # "no use yet" as a pass index
