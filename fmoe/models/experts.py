"""The experts interface: the one seam between a model's MoE layer and where experts live.

An MoE layer routes (family-specific: softmax top-k, group-limited, sigmoid with bias, ...) and
then calls its `experts` module with the routing result. It never sees caches or devices.
`ResidentExperts` keeps every routed expert of the layer on the model's device; the offload
runtime (`fmoe.runtime.offload`) provides a drop-in module that maps experts to cache slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..kernels import fused_moe


@dataclass(frozen=True)
class ExpertShape:
    """Routed experts of one model: `num_layers` MoE layers of `num_experts` SwiGLU experts."""

    num_layers: int
    num_experts: int
    hidden: int
    inter: int
    top_k: int


class Experts(nn.Module):
    """Interface. forward(x [N, H], topk_weights [N, K] float32, topk_ids [N, K] int64 expert ids,
    router_probs [N, E] float32 or None) -> [N, H] in x's dtype."""

    moe_layer: int

    def forward(self, x, topk_weights, topk_ids, router_probs=None):  # pragma: no cover
        raise NotImplementedError


class ResidentExperts(Experts):
    """Every expert of one layer on the device: w13 [E, 2I, H] (gate rows, then up rows),
    w2 [E, H, I]. Buffers are not in the state dict (they are not checkpoint names)."""

    def __init__(self, moe_layer: int, w13: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        self.moe_layer = moe_layer
        self.register_buffer("w13", w13, persistent=False)
        self.register_buffer("w2", w2, persistent=False)
        # routed-expert uses (distinct experts per call, as the offload runtime counts them):
        # every one a hit; a device tensor, so that counting never waits for the device
        self.register_buffer("uses", torch.zeros((), dtype=torch.int64, device=w13.device),
                             persistent=False)

    def forward(self, x, topk_weights, topk_ids, router_probs=None):
        # not bincount: on CUDA it reads the ids' range back to the host (a sync per layer)
        seen = torch.zeros(self.w13.shape[0], dtype=torch.bool, device=topk_ids.device)
        seen[topk_ids.reshape(-1)] = True
        self.uses += seen.sum()
        return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)


class PendingExperts(Experts):
    """Placeholder until the loader installs the real backend; fails loudly if called."""

    def __init__(self, moe_layer: int):
        super().__init__()
        self.moe_layer = moe_layer

    def forward(self, x, topk_weights, topk_ids, router_probs=None):
        raise RuntimeError(f"experts of MoE layer {self.moe_layer} were never loaded")
