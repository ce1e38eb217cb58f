"""The fMoE policy lives in `fmoe.runtime.policies.fmoe`; this module keeps the old import path."""

from .policies.eviction import EVICTIONS, MAP_EVICTIONS  # noqa: F401
from .policies.fmoe import FmoeOptions, FmoePolicy, prefetch_plan  # noqa: F401
from .predictor import TOKEN_DIM, TokenEmbedder  # noqa: F401
