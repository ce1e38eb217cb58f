"""Routing replay: every MoE layer routes to the experts a recorded trace chose for the token
being replayed, so that random weights see real routing.

The seam is the experts interface (`fmoe.models.experts.Experts`): the layer's router still
runs (its cost is the real model's), then `ReplayedExperts` replaces its output (ids and gate
weights) with the trace's before calling the real experts backend, resident or offloaded. Nothing
else changes, and every policy sees the same routing, so outputs stay comparable across
policies. Replay is never on unless `attach_replay` is called; results that used it carry
``routing = "replayed:<file name>"`` and say so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models.experts import Experts


class RoutingReplay:
    """The routing of one trace, one token at a time.

    `set_token(t)` selects global token t of the trace; `route(layer, n)` then gives that
    token's ids [n, K] int64 and weights [n, K] float32 for MoE layer `layer` (n rows, all the
    same: one replayed token per step)."""

    def __init__(self, trace, num_layers: int, num_experts: int, top_k: int):
        if trace.num_layers < num_layers:
            raise ValueError(f"{_name(trace)}: the trace has {trace.num_layers} MoE layers, the model "
                             f"{num_layers}; a trace must cover every MoE layer of the model")
        ids = np.asarray(trace.expert_ids[:, :num_layers])
        if ids.size and int(ids.max()) >= num_experts:
            raise ValueError(f"{_name(trace)}: expert id {int(ids.max())} is out of range for a "
                             f"model with {num_experts} routed experts per layer")
        if trace.top_k != top_k:
            # a different top-k changes the compute per token: refuse rather than mislead
            raise ValueError(f"{_name(trace)}: the trace routes {trace.top_k} experts per token, "
                             f"the model {top_k}")
        self.trace = trace
        self.num_layers = num_layers
        self.ids = ids
        self.weights = None if trace.weights is None else np.asarray(trace.weights[:, :num_layers], np.float32)
        self.label = f"replayed:{_name(trace)}"
        self.token: int | None = None
        self.replayed = 0                     # layer calls whose routing came from the trace

    def set_token(self, t: int | None) -> None:
        self.token = t

    def route(self, layer: int, n: int, model_ids: torch.Tensor, model_weights: torch.Tensor):
        """ids [n, K], weights [n, K] for `layer` at the current token; the model's own routing
        where nothing is selected or the trace did not record this layer (-1)."""
        if self.token is None:
            return model_weights, model_ids
        row = self.ids[self.token, layer]
        if (row < 0).any():
            return model_weights, model_ids
        K = row.shape[0]
        ids = torch.as_tensor(row.astype(np.int64), device=model_ids.device).expand(n, K)
        if self.weights is not None:
            w = torch.as_tensor(self.weights[self.token, layer], device=model_ids.device)
        else:
            w = torch.full((K,), 1.0 / K, device=model_ids.device)
        self.replayed += 1
        return w.to(model_weights.dtype).expand(n, K).contiguous(), ids.contiguous()


def _name(trace) -> str:
    return Path(trace.path).name if getattr(trace, "path", None) else "trace"


class ReplayedExperts(Experts):
    """Wraps one layer's experts backend: the router's output is replaced by the trace's."""

    def __init__(self, inner: Experts, replay: RoutingReplay):
        super().__init__()
        self.inner = inner
        self.moe_layer = inner.moe_layer
        self._replay = [replay]         # a list keeps it out of the module tree

    def forward(self, x, topk_weights, topk_ids, router_probs=None):
        w, ids = self._replay[0].route(self.moe_layer, x.shape[0], topk_ids, topk_weights)
        if ids is not topk_ids:
            router_probs = None         # the model's softmax no longer describes this routing
        return self.inner(x, w, ids, router_probs)


def attach_replay(model, trace) -> RoutingReplay:
    """Route every MoE layer of `model` (a `fmoe.runtime.lm.MoEModel`) by `trace` from now on.
    Returns the `RoutingReplay`; select a token with `set_token` before each forward."""
    shp = model.config.experts
    replay = RoutingReplay(trace, shp.num_layers, shp.num_experts, shp.top_k)
    for block in model.module.moe_blocks():
        if isinstance(block.experts, ReplayedExperts):
            raise ValueError("routing replay is already attached to this model")
        block.experts = ReplayedExperts(block.experts, replay)
    model.routing = replay.label
    return replay
