"""Routing traces and the trace replay simulator (`fmoe simulate`).

* `load_trace` / `write_trace`: routing trace format v1 (CONTRACT), validated.
* `simulate`: replay a trace through the runtime's policy objects (`fmoe.runtime.policies`) and
  `SlotTable`, under a timing model built from a model shape and a hardware profile.
* `run_sweep`: cache fractions x policies x hardware, with CSV and plot output.

See docs/simulator.md.
"""

from .hardware import HARDWARE, HardwareProfile, get_hardware
from .oracle import BeladyPolicy, OraclePolicy
from .replay import SimError, SimResult, build_policy, capacity_for, policy_names, simulate
from .shapes import MODEL_SHAPES, ModelShape, get_shape, guess_shape, load_config_shape
from .timing import TimingModel
from .trace import Trace, TraceError, load_trace, validate_arrays, write_trace

__all__ = [
    "HARDWARE", "HardwareProfile", "get_hardware", "BeladyPolicy", "OraclePolicy", "SimError",
    "SimResult", "build_policy", "capacity_for", "policy_names", "simulate", "MODEL_SHAPES",
    "ModelShape", "get_shape", "guess_shape", "load_config_shape", "TimingModel", "Trace",
    "TraceError", "load_trace", "validate_arrays", "write_trace", "run_sweep",
]


def __getattr__(name):
    if name == "run_sweep":
        from .sweep import run_sweep

        return run_sweep
    raise AttributeError(name)
