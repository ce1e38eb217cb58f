"""Routing trace format v1: its keys and the checks a trace must pass.

`validate_arrays` checks a dict of trace arrays (in memory, or header-only stand-ins for members
left on disk) against the format; `_check_members` checks an opened ``.npz`` archive's declared
dtypes, shapes and sizes before any data is read (pickles, forged sizes, zip bombs past
`DEFAULT_MAX_BYTES` / ``FMOE_TRACE_MAX_BYTES``). Every problem is a `TraceError` whose message
names the file and the problem. Reading and writing traces is `fmoe.trace`; this module is the
rules they share. Everything here is numpy on the host.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Sequence

import numpy as np

from .errors import FmoeError

FORMAT_VERSION = 1
REQUIRED = ("expert_ids", "seq_offsets", "num_experts", "model")
OPTIONAL = ("moe_layers", "weights", "gate_probs", "phase", "token_ids", "model_config")
KEYS = REQUIRED + OPTIONAL


class TraceError(FmoeError, ValueError):
    """A trace file that does not follow routing trace format v1."""



# -- validation ---------------------------------------------------------------------------

def _shape(a: np.ndarray) -> str:
    return "[" + ", ".join(str(d) for d in a.shape) + "]"


def _need_dtype(name: str, a: np.ndarray, allowed: Sequence[str], where: str) -> None:
    if a.dtype.name not in allowed:
        want = " or ".join(allowed)
        raise TraceError(f"{where}: '{name}' has dtype {a.dtype.name}, expected {want}")


def _need_ndim(name: str, a: np.ndarray, ndim: int, desc: str, where: str) -> None:
    if a.ndim != ndim:
        raise TraceError(f"{where}: '{name}' has shape {_shape(a)}, expected {desc}")


def validate_arrays(arrays: dict, where: str = "trace", *, check_duplicates: bool = True) -> None:
    """Check a dict of trace arrays against format v1; raises `TraceError` naming the problem."""
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise TraceError(f"{where}: missing required key(s) {', '.join(map(repr, missing))} "
                         f"(format v1 needs {', '.join(REQUIRED)})")
    unknown = sorted(k for k in arrays if k not in KEYS)
    if unknown:
        raise TraceError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                         f"(format v1 keys: {', '.join(KEYS)})")

    ids = arrays["expert_ids"]
    _need_dtype("expert_ids", ids, ["int16"], where)
    _need_ndim("expert_ids", ids, 3, "[T, L, K]", where)
    T, L, K = ids.shape
    if T < 1 or L < 1 or K < 1:
        raise TraceError(f"{where}: 'expert_ids' has shape {_shape(ids)}; T, L and K must be >= 1")

    ne = arrays["num_experts"]
    _need_dtype("num_experts", ne, ["int64"], where)
    _need_ndim("num_experts", ne, 0, "a scalar", where)
    E = int(ne)
    if E < 1:
        raise TraceError(f"{where}: 'num_experts' is {E}, expected >= 1")
    if K > E:
        raise TraceError(f"{where}: 'expert_ids' has K={K} experts per token, more than "
                         f"num_experts={E}")

    model = arrays["model"]
    if model.dtype.kind != "U":
        raise TraceError(f"{where}: 'model' has dtype {model.dtype.name}, expected a unicode "
                         "string")
    _need_ndim("model", model, 0, "a scalar string", where)

    offs = arrays["seq_offsets"]
    _need_dtype("seq_offsets", offs, ["int64"], where)
    _need_ndim("seq_offsets", offs, 1, "[N + 1]", where)
    if offs.shape[0] < 2:
        raise TraceError(f"{where}: 'seq_offsets' has shape {_shape(offs)}; need at least "
                         "[0, T] (one sequence)")
    if offs[0] != 0 or offs[-1] != T:
        raise TraceError(f"{where}: 'seq_offsets' must start at 0 and end at T={T} "
                         f"(got {int(offs[0])} .. {int(offs[-1])})")
    if np.any(np.diff(offs) < 0):
        i = int(np.flatnonzero(np.diff(offs) < 0)[0])
        raise TraceError(f"{where}: 'seq_offsets' decreases at index {i + 1}")

    # streamed over tokens: temporaries stay within a few chunks, whatever T is
    step = _chunk_rows(L * K)
    for t0 in range(0, T, step):
        c = ids[t0:t0 + step]
        lo, hi = (int(c.min()), int(c.max()))
        if hi >= E:
            t, l, k = np.argwhere(c >= E)[0]
            raise TraceError(f"{where}: expert id {int(c[t, l, k])} at token {t0 + t}, layer {l} is >= "
                             f"num_experts={E}")
        if lo < -1:
            t, l, k = np.argwhere(c < -1)[0]
            raise TraceError(f"{where}: expert id {int(c[t, l, k])} at token {t0 + t}, layer {l} is "
                             "negative (only -1 = not recorded is allowed)")
        if check_duplicates and K > 1:
            for i in range(K - 1):
                a = c[:, :, i]
                dup = ((c[:, :, i + 1:] == a[:, :, None]).any(axis=2)) & (a >= 0)
                if dup.any():
                    t, l = np.argwhere(dup)[0]
                    raise TraceError(f"{where}: token {t0 + t}, layer {l} lists expert {int(a[t, l])} "
                                     "twice")

    opt = {
        "moe_layers": (["int16"], (L,), "[L]"),
        "weights": (["float32"], (T, L, K), "[T, L, K]"),
        "gate_probs": (["float16", "float32"], (T, L, E), "[T, L, E]"),
        "phase": (["uint8"], (T,), "[T]"),
        "token_ids": (["int32"], (T,), "[T]"),
    }
    for name, (dtypes, shape, desc) in opt.items():
        a = arrays.get(name)
        if a is None:
            continue
        _need_dtype(name, a, dtypes, where)
        if a.shape != shape:
            raise TraceError(f"{where}: '{name}' has shape {_shape(a)}, expected {desc} = "
                             f"[{', '.join(map(str, shape))}]")
    mc = arrays.get("model_config")
    if mc is not None:
        _parse_model_config(mc, where)
    ph = arrays.get("phase")
    if ph is not None and ph.size and ph.max() > 1:
        raise TraceError(f"{where}: 'phase' holds {int(ph.max())}; only 0 (prompt) and "
                         "1 (generated) are defined")
    for name in ("weights", "gate_probs"):
        a = arrays.get(name)
        if a is None or not a.size:
            continue
        step = _chunk_rows(int(np.prod(a.shape[1:])))
        for t0 in range(0, a.shape[0], step):
            if not np.isfinite(a[t0:t0 + step]).all():
                raise TraceError(f"{where}: '{name}' holds NaN or infinite values")


def _parse_model_config(a, where: str) -> dict:
    if getattr(a, "dtype", None) is None or a.dtype.kind != "U" or a.ndim != 0:
        raise TraceError(f"{where}: 'model_config' must be a unicode scalar holding a JSON object")
    try:
        cfg = json.loads(str(a))
    except ValueError as e:
        raise TraceError(f"{where}: 'model_config' is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TraceError(f"{where}: 'model_config' is not a JSON object")
    return cfg


def _chunk_rows(row_elems: int, elems: int = 1 << 22) -> int:
    """Rows per chunk so that a chunk holds about `elems` elements."""
    return max(1, elems // max(1, row_elems))


# The most bytes a trace's arrays may expand to in memory (a small .npz can declare huge arrays:
# a zip bomb). FMOE_TRACE_MAX_BYTES or load_trace(max_bytes=) raises it for real, large traces.
DEFAULT_MAX_BYTES = 8 << 30


def _max_bytes(max_bytes: int | None) -> int:
    if max_bytes is not None:
        return int(max_bytes)
    env = os.environ.get("FMOE_TRACE_MAX_BYTES")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise TraceError(f"FMOE_TRACE_MAX_BYTES={env!r}: expected a number of bytes") from None
    return DEFAULT_MAX_BYTES


def _check_members(npz, where: str, load: set[str], max_bytes: int) -> None:
    """Every member's declared dtype, shape and size, from its .npy header and zip entry, before
    any data is read: unknown keys, object dtypes, members whose shapes disagree with
    expert_ids, and a total past `max_bytes` are refused."""
    headers, total = {}, 0
    for k in npz.files:
        if k not in KEYS:
            continue                      # reported by validate_arrays with the format's keys
        try:
            h = _header_only(npz, k)
            info = npz.zip.getinfo(k + ".npy")
        except ValueError as e:
            if "allow_pickle" in str(e) or "Object arrays" in str(e):
                raise TraceError(f"{where}: key {k!r} holds pickled (object) data; refused "
                                 "(format v1 stores plain arrays only)") from None
            raise TraceError(f"{where}: key {k!r} has a corrupt array header ({e})") from None
        except (OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise TraceError(f"{where}: cannot read key {k!r} ({type(e).__name__}: {e})") from None
        if any(int(d) < 0 for d in h.shape):
            raise TraceError(f"{where}: key {k!r} declares a negative dimension {h.shape}")
        nbytes = int(np.prod(h.shape, dtype=object)) * h.dtype.itemsize
        if info.file_size < nbytes:
            raise TraceError(f"{where}: key {k!r} declares {nbytes} bytes of data ({_shape(h)} "
                             f"{h.dtype.name}) but its archive member holds {info.file_size}: "
                             "truncated or forged")
        headers[k] = h
        if k in load:
            total += nbytes
    if total > max_bytes:
        raise TraceError(f"{where}: its arrays expand to {total / 2**30:.2f} GiB in memory, more "
                         f"than the limit of {max_bytes / 2**30:.2f} GiB (set FMOE_TRACE_MAX_BYTES "
                         "to raise it for a trace you trust)")
    ids = headers.get("expert_ids")
    if ids is None or len(ids.shape) != 3:
        return                            # validate_arrays names the problem
    T, L, K = ids.shape
    want = {"weights": ((T, L, K), "[T, L, K]"), "phase": ((T,), "[T]"), "token_ids": ((T,), "[T]"),
            "moe_layers": ((L,), "[L]")}
    for k, (shape, desc) in want.items():
        h = headers.get(k)
        if h is not None and h.shape != shape:
            raise TraceError(f"{where}: '{k}' has shape {_shape(h)}, expected {desc} = "
                             f"[{', '.join(map(str, shape))}]")
    g = headers.get("gate_probs")
    if g is not None and (len(g.shape) != 3 or g.shape[:2] != (T, L)):
        raise TraceError(f"{where}: 'gate_probs' has shape {_shape(g)}, expected [T, L, E] = "
                         f"[{T}, {L}, E]")



class _HeaderOnly:
    """Shape and dtype of an .npz member, read from its .npy header (the data stays on disk)."""

    size = 0

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)


def _header_only(npz, key: str) -> _HeaderOnly:
    fmt = np.lib.format
    with npz.zip.open(key + ".npy") as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        else:
            shape, _, dtype = fmt.read_array_header_2_0(f)
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    return _HeaderOnly(shape, dtype)

