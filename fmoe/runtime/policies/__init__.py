"""Eviction and prefetch policies: plain objects driven by events (see `.base` for the protocol).

* `base`: the event protocol (`Policy`), options, the registry (`make_policy`);
* `classic`: LRU and LFU;
* `moe_infinity`: MoE-Infinity's activation-aware policy;
* `fmoe`: the fMoE policy, an eviction rule (`eviction`) plus a map predictor;
* `placement`: where a miss runs under ``execution="host"|"hybrid"`` (load or compute on the host).
"""

from .base import (  # noqa: F401
                   LAZY_POLICIES,
                   POLICIES,
                   NoOptions,
                   Policy,
                   check_option_types,
                   make_options,
                   make_policy,
                   option_names,
                   policy_class,
                   policy_names,
                   register,
)
from .classic import LFUPolicy, LRUPolicy  # noqa: F401
from .fmoe import FmoeOptions, FmoePolicy, prefetch_plan  # noqa: F401,E402
from .moe_infinity import MoEInfinityOptions, MoEInfinityPolicy  # noqa: F401
from .placement import EXECUTIONS, MissCost, check_execution, place  # noqa: F401

__all__ = ["Policy", "NoOptions", "POLICIES", "LAZY_POLICIES", "make_policy", "make_options",
           "check_option_types", "option_names", "policy_class", "policy_names", "register", "LRUPolicy", "LFUPolicy",
           "MoEInfinityPolicy", "MoEInfinityOptions", "FmoePolicy", "FmoeOptions", "prefetch_plan",
           "EXECUTIONS", "MissCost", "check_execution", "place"]
