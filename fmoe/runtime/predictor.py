"""The fmoe policy's predictors, under their original import path.

The code lives in modules of one responsibility each; this module re-exports their names so
that ``fmoe.runtime.predictor.X`` keeps working:

* `fmoe.runtime.expert_maps`: the expert-map store (`MapStore`, persisted as `STORE_FORMAT`),
  trajectory search (`TrajectorySearch`) and δ-selection (`select`);
* `fmoe.runtime.map_predictor`: the map predictor driven by events (`MapPredictor`), its
  immutable output (`Prediction`), the trace-replay token embedder (`TokenEmbedder`,
  `TOKEN_DIM`) and map rows from a trace's routing (`weight_rows`, `rank_rows`);
* `fmoe.runtime.reuse_model`: the default eviction rule's reuse model (`ReuseModel`), whose
  features and cell layout are in `fmoe.runtime.reuse_features` (`NG`, `NC`, `NP`, `NQ`, the
  refresh constants) and whose scores are in `fmoe.runtime.reuse_scoring`.

New code should import from those modules.
"""

from __future__ import annotations

from .expert_maps import STORE_FORMAT, MapStore, TrajectorySearch, select
from .map_predictor import TOKEN_DIM, MapPredictor, Prediction, TokenEmbedder, rank_rows, weight_rows
from .reuse_features import FLUSH_PASSES, NC, NG, NP, NQ, POP_REFRESH, TRANSITION_REFRESH, WAIT_REFRESH
from .reuse_model import ReuseModel
from .reuse_scoring import ReuseScoring

__all__ = ["STORE_FORMAT", "MapStore", "TrajectorySearch", "select",
           "TOKEN_DIM", "MapPredictor", "Prediction", "TokenEmbedder", "rank_rows", "weight_rows",
           "FLUSH_PASSES", "NC", "NG", "NP", "NQ", "POP_REFRESH", "TRANSITION_REFRESH",
           "WAIT_REFRESH", "ReuseModel", "ReuseScoring"]
