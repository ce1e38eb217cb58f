"""Trace recorder: routing of live runs written in trace format v1 (see `fmoe.trace`).

Every real (non-padding) token of every sequence becomes one row: its routed experts per MoE
layer, the router's full softmax (`gate_probs`, fMoE's expert-map rows), its phase (prompt or
generated) and its token id. Rows of one sequence stay together, in order.
"""

from __future__ import annotations

import numpy as np
import torch

from ..trace import write_trace


class TraceRecorder:
    """Collects the routing of live forwards per request and writes it as one trace.

    Per forward: `begin_step` (the step's input ids [B, T]), `record` once per MoE layer
    (topk_ids [B * T, K], router softmax [B * T, E] or None), `end_step`; `end_request` closes a
    request's sequence; `write` / `close` write every closed sequence to `path`."""

    def __init__(self, path, num_layers: int, num_experts: int, top_k: int, model: str = ""):
        self.path = path
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.model = model
        self.done: list[dict] = []        # finished sequences, in the order they finished
        self.open: dict[int, dict] = {}   # request id -> sequence being recorded
        self._step = None

    def begin_step(self, input_ids: torch.Tensor, valid: torch.Tensor | None,
                   seq_ids: list[int] | None = None) -> None:
        """input_ids [B, T] of this forward; valid [B, T] False on padding; row b belongs to
        request seq_ids[b] (default: b)."""
        ids = input_ids.detach().cpu().numpy()
        mask = np.ones_like(ids, dtype=bool) if valid is None else valid.detach().cpu().numpy().astype(bool)
        B, T = ids.shape
        self._step = {"ids": ids, "valid": mask, "experts": np.full((B * T, self.L, self.K), -1, np.int16),
                      "probs": np.zeros((B * T, self.L, self.E), np.float32),
                      "seqs": list(range(B)) if seq_ids is None else list(seq_ids)}

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
            phase = 1 if sid in self.open else 0      # a request's first step is its prompt
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

    def write(self, path=None) -> None:
        self.end_request()
        seqs = [{k: np.concatenate(v) for k, v in s.items()} for s in self.done if s["ids"]]
        lengths = [len(s["ids"]) for s in seqs]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        def cat(k, shape, dt):
            # no sequence recorded: an empty array of the format's shape, still a valid trace
            return np.concatenate([s[k] for s in seqs]) if seqs else np.zeros(shape, dt)

        write_trace(path or self.path,
                    expert_ids=cat("experts", (0, self.L, self.K), np.int16),
                    seq_offsets=offsets, num_experts=self.E, model=self.model,
                    gate_probs=cat("probs", (0, self.L, self.E), np.float32),
                    phase=cat("phase", (0,), np.uint8),
                    token_ids=cat("ids", (0,), np.int64).astype(np.int32))

    def close(self) -> None:
        self.write()
