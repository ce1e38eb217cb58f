"""Routing trace format v1, under its original import path.

The format (`Trace`, `load_trace`, `write_trace`, `validate_arrays`, the keys) lives in
`fmoe.trace`, where both the runtime's recorder and the simulator import it from; this module
re-exports it so that ``fmoe.sim.trace.X`` keeps working.
"""

from __future__ import annotations

from ..trace import (
                     DEFAULT_MAX_BYTES,
                     FORMAT_VERSION,
                     KEYS,
                     OPTIONAL,
                     REQUIRED,
                     Trace,
                     TraceError,
                     load_trace,
                     texts_path,
                     validate_arrays,
                     write_trace,
)

__all__ = ["DEFAULT_MAX_BYTES", "FORMAT_VERSION", "KEYS", "OPTIONAL", "REQUIRED", "Trace", "TraceError",
           "load_trace", "texts_path", "validate_arrays", "write_trace"]
