"""Routing trace format v1: reader, validator and (atomic) writer.

A trace is one ``.npz`` file (loadable with ``allow_pickle=False``) plus an optional sidecar
``<stem>.texts.jsonl`` holding the prompt of each sequence. Keys (CONTRACT, "Routing trace format
v1"):

========== ===================== =================================================================
key        dtype, shape          meaning
========== ===================== =================================================================
expert_ids int16 [T, L, K]       routed experts of token t at MoE layer l; -1 = not recorded
seq_offsets int64 [N+1]          sequence n owns tokens ``seq_offsets[n]:seq_offsets[n+1]``
num_experts int64 scalar         routed experts per layer (E)
model      unicode scalar        hub id of the model that produced the trace
moe_layers int16 [L]             optional: model layer index of each MoE layer
weights    float32 [T, L, K]     optional: gate weights of the chosen experts
gate_probs float16/32 [T, L, E]  optional: full router softmax
phase      uint8 [T]             optional: 0 prompt token, 1 generated token
token_ids  int32 [T]             optional: input token ids
model_config unicode scalar      optional: the producing model's config.json (a JSON object), so
                                 a trace of a local checkpoint replays without ``--model-config``
========== ===================== =================================================================

Every problem is reported as a `TraceError` whose message names the file and the problem.

`Trace` is the loaded form; `load_trace` reads and validates a file, `write_trace` writes one
atomically. The keys and the checks live in `fmoe.trace_checks` and are re-exported here. The
runtime's recorder (`fmoe.runtime.recorder`) writes this format and the simulator (`fmoe.sim`)
reads it; neither depends on the other.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import atomic_write
from .trace_checks import (
    DEFAULT_MAX_BYTES,
    FORMAT_VERSION,
    KEYS,
    OPTIONAL,
    REQUIRED,
    TraceError,
    _check_members,
    _header_only,
    _HeaderOnly,
    _max_bytes,
    _parse_model_config,
    _shape,
    validate_arrays,
)

__all__ = ["DEFAULT_MAX_BYTES", "FORMAT_VERSION", "KEYS", "OPTIONAL", "REQUIRED", "Trace", "TraceError",
           "load_trace", "texts_path", "validate_arrays", "write_trace"]


@dataclass
class Trace:
    """A loaded, validated routing trace. Arrays keep their on-disk dtypes."""

    expert_ids: np.ndarray               # int16 [T, L, K], -1 = not recorded
    seq_offsets: np.ndarray              # int64 [N + 1]
    num_experts: int
    model: str
    moe_layers: np.ndarray | None = None
    weights: np.ndarray | None = None
    gate_probs: np.ndarray | None = None
    phase: np.ndarray | None = None
    token_ids: np.ndarray | None = None
    texts: list[str] | None = None
    path: Path | None = None
    model_config: dict | None = None     # the producing model's config.json, when recorded
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def num_sequences(self) -> int:
        return int(len(self.seq_offsets) - 1)

    def sequence(self, n: int) -> slice:
        return slice(int(self.seq_offsets[n]), int(self.seq_offsets[n + 1]))

    def fingerprint(self) -> str:
        """A content hash of the routing (ids and offsets, with their shapes and dtypes): the key
        of on-disk caches."""
        if self._fingerprint is None:
            import hashlib

            h = hashlib.blake2b(digest_size=16)
            for a in (self.expert_ids, self.seq_offsets):
                # the bytes alone do not tell [T, L, K] from [T, L', K'] with L*K = L'*K': both
                # would share one cached access sequence
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype.str}{a.shape}\0".encode())
                h.update(a.view(np.uint8).data)
            h.update(str(self.num_experts).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def first_layers(self, n: int) -> "Trace":
        """The first `n` MoE layers: the routing a model with `n` MoE layers sees when this
        trace is replayed into it (`fmoe.bench.replay`)."""
        if n >= self.num_layers:
            return self
        if n < 1:
            raise TraceError("a trace needs at least one MoE layer")

        def cut(a):
            return None if a is None else a[:, :n]

        return Trace(self.expert_ids[:, :n], self.seq_offsets, self.num_experts, self.model,
                     None if self.moe_layers is None else self.moe_layers[:n], cut(self.weights),
                     cut(self.gate_probs), self.phase, self.token_ids, self.texts, self.path,
                     self.model_config)

    def head(self, max_tokens: int) -> "Trace":
        """The first `max_tokens` tokens (the sequence cut there is truncated)."""
        T = self.num_tokens
        if max_tokens is None or max_tokens >= T:
            return self
        if max_tokens < 1:
            raise TraceError("max_tokens must be >= 1")
        offs = self.seq_offsets
        n = int(np.searchsorted(offs, max_tokens, side="left"))  # offs[n] >= max_tokens
        new_offs = np.concatenate([offs[:n], [max_tokens]]).astype(np.int64)
        nseq = len(new_offs) - 1

        def cut(a):
            return None if a is None else a[:max_tokens]

        return Trace(self.expert_ids[:max_tokens], new_offs, self.num_experts, self.model,
                     self.moe_layers, cut(self.weights), cut(self.gate_probs), cut(self.phase),
                     cut(self.token_ids), None if self.texts is None else self.texts[:nseq],
                     self.path, self.model_config)


def texts_path(path: str | os.PathLike) -> Path:
    """The sidecar of ``<stem>.npz``: ``<stem>.texts.jsonl`` in the same directory."""
    p = Path(path)
    stem = p.name[:-4] if p.name.endswith(".npz") else p.name
    return p.with_name(stem + ".texts.jsonl")


def _read_texts(path: Path, n: int, where: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["text"]
            except (ValueError, KeyError, TypeError):
                raise TraceError(f"{path}: line {i + 1} is not a JSON object with a 'text'"
                                 ) from None
            if not isinstance(text, str):
                raise TraceError(f"{path}: line {i + 1}: 'text' is not a string")
            texts.append(text)
    if len(texts) != n:
        raise TraceError(f"{path}: {len(texts)} prompts for {n} sequences in {where}")
    return texts


def load_trace(path: str | os.PathLike, *, texts: bool = True, gate_probs: bool = True,
               validate: bool = True, max_bytes: int | None = None) -> Trace:
    """Read and validate a format-v1 trace (and its ``.texts.jsonl`` sidecar when present).

    `gate_probs=False` skips the (large) router softmax. Pickled content is refused. Every
    member's declared shape and size are checked before any data is read; arrays that would
    expand past `max_bytes` (default `FMOE_TRACE_MAX_BYTES`, else 8 GiB) are refused, and the
    validation streams, so a small file cannot make the loader allocate more than that."""
    p = Path(path)
    where = str(p)
    if not p.exists():
        raise TraceError(f"{where}: no such file")
    if p.is_dir():
        raise TraceError(f"{where}: is a directory, not a trace file")
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise TraceError(f"{where}: cannot read ({e.strerror or e})") from None
    if magic[:1] == b"\x80":
        raise TraceError(f"{where}: is a pickle; refused (format v1 stores plain arrays only)")
    if not (magic.startswith(b"PK") or magic == b"\x93NUMPY"):
        raise TraceError(f"{where}: not a readable .npz trace (no zip archive header)")
    try:
        npz = np.load(p, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise TraceError(f"{where}: holds pickled (object) data; refused (format v1 stores "
                             "plain arrays only)") from None
        raise TraceError(f"{where}: not a readable .npz trace ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise TraceError(f"{where}: not a readable .npz trace ({type(e).__name__}: {e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise TraceError(f"{where}: holds a single array, not an .npz archive of trace arrays")
    arrays = {}
    load = {k for k in npz.files if gate_probs or k != "gate_probs"}
    try:
        _check_members(npz, where, load, _max_bytes(max_bytes))
    except BaseException:
        npz.close()
        raise
    try:
        with npz:
            for k in npz.files:
                if k == "gate_probs" and not gate_probs:
                    arrays[k] = _header_only(npz, k)   # validated, not loaded
                    continue
                arrays[k] = npz[k]
    except ValueError as e:
        msg = str(e)
        if "allow_pickle" in msg or "Object arrays" in msg:
            raise TraceError(f"{where}: key {k!r} holds pickled (object) data; refused "
                             "(format v1 stores plain arrays only)") from None
        raise TraceError(f"{where}: cannot read key {k!r} ({msg})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise TraceError(f"{where}: cannot read key {k!r} ({type(e).__name__}: {e})") from None
    for k, a in arrays.items():
        if a.dtype.hasobject:
            raise TraceError(f"{where}: key {k!r} holds object data; refused")
    if validate:
        validate_arrays(arrays, where)
    if isinstance(arrays.get("gate_probs"), _HeaderOnly):
        del arrays["gate_probs"]
    t = Trace(
        expert_ids=arrays["expert_ids"],
        seq_offsets=arrays["seq_offsets"],
        num_experts=int(arrays["num_experts"]),
        model=str(arrays["model"]),
        moe_layers=arrays.get("moe_layers"),
        weights=arrays.get("weights"),
        gate_probs=arrays.get("gate_probs"),
        phase=arrays.get("phase"),
        token_ids=arrays.get("token_ids"),
        path=p,
        model_config=(_parse_model_config(arrays["model_config"], where)
                      if "model_config" in arrays else None),
    )
    tp = texts_path(p)
    if texts and tp.exists():
        t.texts = _read_texts(tp, t.num_sequences, where)
    return t


# -- writing ------------------------------------------------------------------------------

def _as(a, dtype, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.hasobject:
        raise TraceError(f"write_trace: '{name}' holds Python objects")
    if np.issubdtype(np.dtype(dtype), np.integer) and arr.size:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise TraceError(f"write_trace: '{name}' holds non-integer values")
        info = np.iinfo(dtype)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise TraceError(f"write_trace: '{name}' values {lo}..{hi} do not fit "
                             f"{np.dtype(dtype).name}")
    return np.ascontiguousarray(arr.astype(dtype, copy=False))


def _atomic_write(path: Path, write) -> None:
    atomic_write(path, write, fsync=True)        # a trace is meant to be shared: plain mode


def _public_model(model, model_config):
    """A trace names its model, never a local path: a checkpoint directory becomes its name, and
    its config.json goes into `model_config` (so the trace replays anywhere)."""
    model = str(model)
    local = Path(model).expanduser()
    if os.path.isabs(model) or model.startswith((".", "~")) or local.is_dir():
        if model_config is None and (local / "config.json").is_file():
            try:
                model_config = json.loads((local / "config.json").read_text())
            except (OSError, ValueError):
                model_config = None
        model = local.resolve().name if local.name in ("", ".", "..") else local.name
    return model, model_config


def write_trace(path: str | os.PathLike, *, expert_ids, seq_offsets, num_experts: int, model: str,
                moe_layers=None, weights=None, gate_probs=None, phase=None, token_ids=None,
                texts: Sequence[str] | None = None, compress: bool = True,
                model_config: dict | str | None = None) -> Path:
    """Write a format-v1 trace atomically (temp file in the same directory, then `os.replace`).

    Arrays are converted to the format's dtypes (values must fit); the result is validated
    before anything is written. `texts` (one prompt per sequence) go to the
    ``<stem>.texts.jsonl`` sidecar, also written atomically. Returns the trace path."""
    p = Path(path)
    if not p.name.endswith(".npz"):
        raise TraceError(f"write_trace: {p} must end with .npz")
    model, model_config = _public_model(model, model_config)
    ids = np.asarray(expert_ids)
    if ids.ndim != 3:
        raise TraceError(f"write_trace: 'expert_ids' has shape {_shape(ids)}, expected [T, L, K]")
    arrays = {
        "expert_ids": _as(ids, np.int16, "expert_ids"),
        "seq_offsets": _as(seq_offsets, np.int64, "seq_offsets"),
        "num_experts": np.array(int(num_experts), dtype=np.int64),
        "model": np.array(str(model), dtype=np.str_),
    }
    if moe_layers is not None:
        arrays["moe_layers"] = _as(moe_layers, np.int16, "moe_layers")
    if weights is not None:
        arrays["weights"] = np.ascontiguousarray(np.asarray(weights, dtype=np.float32))
    if gate_probs is not None:
        g = np.asarray(gate_probs)
        g = g if g.dtype in (np.float16, np.float32) else g.astype(np.float32)
        arrays["gate_probs"] = np.ascontiguousarray(g)
    if phase is not None:
        arrays["phase"] = _as(phase, np.uint8, "phase")
    if token_ids is not None:
        arrays["token_ids"] = _as(token_ids, np.int32, "token_ids")
    if model_config is not None:
        text = model_config if isinstance(model_config, str) else json.dumps(model_config, sort_keys=True)
        arrays["model_config"] = np.array(text, dtype=np.str_)
    validate_arrays(arrays, f"write_trace({p})")
    n = len(arrays["seq_offsets"]) - 1
    if texts is not None:
        texts = [str(t) for t in texts]
        if len(texts) != n:
            raise TraceError(f"write_trace: {len(texts)} texts for {n} sequences")
    p.parent.mkdir(parents=True, exist_ok=True)
    saver = np.savez_compressed if compress else np.savez
    _atomic_write(p, lambda f: saver(f, **arrays))
    if texts is not None:
        body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
        _atomic_write(texts_path(p), lambda f: f.write(body.encode("utf-8")))
    else:
        # the prompts of a trace this one replaced would be read as this one's
        texts_path(p).unlink(missing_ok=True)
    return p
