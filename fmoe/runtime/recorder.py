"""Trace recorder: routing of live runs written in trace format v1 (see `fmoe.trace`).

Every real (non-padding) token of every sequence becomes one row: its routed experts per MoE
layer, the router's full softmax (`gate_probs`, fMoE's expert-map rows), its phase (prompt or
generated) and its token id. Rows of one sequence stay together, in order.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..files import unwritable
from ..trace import write_trace


def check_trace_path(path) -> Path:
    """Refuse (ValueError naming the path) a trace path that could not be written: checked when
    recording starts, not after the whole run when the trace is written."""
    p = Path(path)
    where = f"trace_path (--trace-out) {p}"
    if not p.name.endswith(".npz"):
        raise ValueError(f"{where}: must end with .npz (a trace is an .npz archive)")
    if p.is_dir():
        raise ValueError(f"{where}: is a directory; give a file path (e.g. {p / 'trace.npz'})")
    why = unwritable(p)
    if why:
        raise ValueError(f"{where}: {why}")
    if p.exists() and not _is_trace(p):
        raise ValueError(f"{where}: the file exists but is not a routing trace; fmoe would overwrite "
                         "it, so it refuses: move the file away or choose another path")
    return p


def _is_trace(p: Path) -> bool:
    """Whether `p` is an .npz archive with a trace's required arrays (one fmoe may replace)."""
    from ..trace_checks import REQUIRED

    try:
        with np.load(p, allow_pickle=False) as z:
            return hasattr(z, "files") and all(k in z.files for k in REQUIRED)
    except Exception:
        return False


class TraceRecorder:
    """Collects the routing of live forwards per request and writes it as one trace.

    Per forward: `begin_step` (the step's input ids [B, T]), `record` once per MoE layer
    (topk_ids [B * T, K], router softmax [B * T, E] or None), `end_step`; `end_request` closes a
    request's sequence; `write` / `close` write every closed sequence to `path`."""

    def __init__(self, path, num_layers: int, num_experts: int, top_k: int, model: str = ""):
        self.path = check_trace_path(path)
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.model = model
        self.done: list[dict] = []        # finished sequences, in the order they finished
        self.open: dict[int, dict] = {}   # request id -> sequence being recorded
        self._step = None

    def begin_step(self, input_ids: torch.Tensor, valid: torch.Tensor | None,
                   seq_ids: list[int] | None = None, prompt: bool | None = None) -> None:
        """input_ids [B, T] of this forward; valid [B, T] False on padding; row b belongs to
        request seq_ids[b] (default: b); `prompt` True: prompt tokens (a chunked prefill's later
        chunks), None: a request's first step is its prompt."""
        ids = input_ids.detach().cpu().numpy()
        mask = np.ones_like(ids, dtype=bool) if valid is None else valid.detach().cpu().numpy().astype(bool)
        B, T = ids.shape
        self._step = {"ids": ids, "valid": mask, "experts": np.full((B * T, self.L, self.K), -1, np.int16),
                      "probs": np.zeros((B * T, self.L, self.E), np.float32),
                      "seqs": list(range(B)) if seq_ids is None else list(seq_ids), "prompt": prompt}

    def record(self, layer: int, topk_ids: torch.Tensor, probs: np.ndarray | None) -> None:
        if self._step is None:
            return
        self._step["experts"][:, layer] = topk_ids.detach().cpu().numpy().astype(np.int16)
        if probs is not None:
            self._step["probs"][:, layer] = probs

    def end_step(self) -> None:
        st, self._step = self._step, None
        if st is None:
            return
        B, T = st["ids"].shape
        for b, sid in enumerate(st["seqs"]):
            # a request's first step is its prompt (and every chunk of a chunked prefill)
            phase = 0 if st["prompt"] or sid not in self.open else 1
            seq = self.open.setdefault(sid, {"experts": [], "probs": [], "ids": [], "phase": []})
            rows = np.nonzero(st["valid"][b])[0]
            flat = b * T + rows
            seq["experts"].append(st["experts"][flat])
            seq["probs"].append(st["probs"][flat])
            seq["ids"].append(st["ids"][b, rows])
            seq["phase"].append(np.full(len(rows), phase, np.uint8))

    def end_request(self, seq_id: int | None = None) -> None:
        """Close request `seq_id` (None: every open one)."""
        for sid in (sorted(self.open) if seq_id is None else [seq_id]):
            seq = self.open.pop(sid, None)
            if seq is not None:
                self.done.append(seq)

    def write(self, path=None) -> Path | None:
        """Write the closed sequences; returns the trace's path. With no token recorded there is
        no trace (format v1 needs T >= 1): nothing is written, a note on stderr says so, and
        the result is None."""
        self.end_request()
        path = path or self.path
        seqs = [{k: np.concatenate(v) for k, v in s.items()} for s in self.done if s["ids"]]
        lengths = [len(s["ids"]) for s in seqs]
        if not sum(lengths):
            print(f"fmoe: no token was recorded; no trace written to {path}", file=sys.stderr)
            return None
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        def cat(k):
            return np.concatenate([s[k] for s in seqs])

        return write_trace(path, expert_ids=cat("experts"), seq_offsets=offsets, num_experts=self.E,
                           model=self.model, gate_probs=cat("probs"), phase=cat("phase"),
                           token_ids=cat("ids").astype(np.int32))

    def close(self) -> Path | None:
        return self.write()
