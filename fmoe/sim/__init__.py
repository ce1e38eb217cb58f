"""Routing traces and the trace replay simulator (`fmoe simulate`).

* `load_trace` / `write_trace`: routing trace format v1 (CONTRACT), validated.
* `simulate`: replay a trace through the runtime's policy objects (`fmoe.runtime.policies`) and
  `SlotTable`, under a timing model built from a model shape and a hardware profile.
* `run_sweep`: cache fractions x policies x hardware, with CSV and plot output.

See docs/simulator.md.
"""

# each name from its module, loaded on first use: `fmoe.sim.cli` (and the `fmoe` command's
# --help) does not wait for torch, which the replay's imports bring
_EXPORTS = {
    "HARDWARE": "hardware", "HardwareProfile": "hardware", "get_hardware": "hardware",
    "BeladyPolicy": "oracle", "OraclePolicy": "oracle",
    "SimError": "replay", "SimResult": "replay", "build_policy": "replay", "capacity_for": "replay",
    "policy_names": "replay", "simulate": "replay",
    "MODEL_SHAPES": "shapes", "ModelShape": "shapes", "get_shape": "shapes", "guess_shape": "shapes",
    "load_config_shape": "shapes", "TimingModel": "timing",
    "Trace": "trace", "TraceError": "trace", "load_trace": "trace", "validate_arrays": "trace",
    "write_trace": "trace", "run_sweep": "sweep",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    import importlib

    mod = _EXPORTS.get(name)
    if mod is None:
        try:                        # a submodule (fmoe.sim.replay, ...), as eager imports gave
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(importlib.import_module(f".{mod}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
