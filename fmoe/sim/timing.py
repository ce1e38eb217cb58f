"""Timing model of one decoding iteration (batch one), as the replay uses it.

Per token::

    token_pre (embedding, dense decoder layers)
    for each MoE layer l:
        attn[l] + ctx * attn_ctx[l]      attention + router; the routing is known at its end
        shared[l]                        shared experts: run while missed experts load
        experts_used * expert            routed experts, once all of them are ready
    token_post (final norm, lm_head)

Each part costs its roofline time ``max(bytes / mem_bw, flops / matmul)`` on the hardware
profile (at batch one every weight matrix is read once per token, so the GEMMs are
memory-bound). One host->device copy engine moves one expert in ``copy = expert_bytes /
link_bw`` seconds, demand loads first, then prefetches by priority. A disk read by `lanes`
reader threads (a CPU machine's profile from `fmoe calibrate`) is `lanes` copies in flight at
once, each taking ``lanes * copy``: the same rate, but a layer's k misses land after
``ceil(k / lanes)`` such reads, not k copies. A layer's routed experts
start when every one of them is ready; the wait past the shared experts is stall.
TPOT = compute + stall.

With a host path (`execution="host"|"hybrid"`), a routed expert computed on the host costs
``host = expert_bytes / host_bw`` seconds on one host queue that runs beside the device and the
link, plus ``host_latency`` per layer that used it (the activations' round trip); the layer
ends when both the device's and the host's experts are done.

`TimingModel` can also be built by hand (tests use round numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .hardware import HardwareProfile
from .shapes import ModelShape


@dataclass
class TimingModel:
    attn: float | np.ndarray = 0.0       # s, per MoE layer (scalar or [L])
    shared: float | np.ndarray = 0.0     # s, per MoE layer, overlaps demand loads
    expert: float = 0.0                  # s per routed expert used
    copy: float = 1.0                    # s per expert host->device copy
    attn_ctx: float | np.ndarray = 0.0   # s per context token per MoE layer
    token_pre: float = 0.0               # s per token before the first MoE layer
    token_pre_ctx: float = 0.0           # s per context token (dense layers' attention)
    token_post: float = 0.0              # s per token after the last MoE layer
    host: float = 0.0                    # s per routed expert computed on the host (0: no host path)
    host_latency: float = 0.0            # s per layer with host work (activations there and back)
    expert_bytes: int = 1                # bytes per expert copy
    lanes: int = 1                       # copies in flight at once, each lanes * copy seconds
    name: str = "custom"
    details: dict = field(default_factory=dict)

    def per_layer(self, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(attn, attn_ctx, shared) as float64 arrays of length L."""
        def arr(x):
            a = np.broadcast_to(np.asarray(x, dtype=np.float64), (L,))
            return np.ascontiguousarray(a)
        return arr(self.attn), arr(self.attn_ctx), arr(self.shared)

    def layer_seconds(self, L: int, top_k: int) -> float:
        """Compute of one MoE layer at batch one (mean over layers, no context): attention,
        shared experts and `top_k` routed experts. What a prefetch ordered one layer ahead has
        to land in."""
        attn, _, shared = self.per_layer(L)
        return float(attn.mean() + shared.mean() + top_k * self.expert)

    @classmethod
    def from_shape(cls, shape: ModelShape, hw: HardwareProfile) -> "TimingModel":
        b = shape.dtype_bytes

        def roof(params: float, flops: float | None = None, extra_bytes: float = 0.0) -> float:
            f = 2.0 * params if flops is None else flops
            return max((params * b + extra_bytes) / hw.mem_bw, f / hw.matmul_flops)

        attn = roof(shape.attn_params + shape.router_params)
        attn_ctx = max(shape.kv_elems * b / hw.mem_bw, shape.attn_ctx_flops / hw.matmul_flops)
        shared = roof(shape.shared_params) if shape.shared_params else 0.0
        expert = roof(shape.expert_params)
        dense = shape.num_dense_layers
        token_pre = dense * roof(shape.attn_params + shape.dense_mlp_params)
        token_post = roof(shape.lm_head_params)
        copy = shape.expert_bytes / hw.link_bw
        host = shape.expert_bytes / hw.host_bw
        # a token's activations to the host and its result back, plus a synchronisation
        host_latency = 2 * shape.hidden * b / hw.link_bw + 10e-6
        return cls(attn=attn, shared=shared, expert=expert, copy=copy, attn_ctx=attn_ctx,
                   token_pre=token_pre, token_pre_ctx=dense * attn_ctx, token_post=token_post,
                   host=host, host_latency=host_latency,
                   expert_bytes=shape.expert_bytes, name=f"{shape.name}@{hw.name}",
                   details={"model": shape.name, "hardware": hw.name,
                            "expert_bytes": shape.expert_bytes, "copy_ms": copy * 1e3,
                            "host_ms": host * 1e3, "host_gbps": hw.host_bw / 1e9,
                            "layer_compute_ms": (attn + shared + shape.top_k * expert) * 1e3,
                            "resident_tpot_ms": (token_pre + token_post + shape.num_moe_layers
                                                 * (attn + shared + shape.top_k * expert)) * 1e3})
