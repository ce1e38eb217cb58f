"""Shared helpers for the kernel tests: the float64 reference and seeded inputs."""

import os

import torch

# where the Triton tests put their tensors: the GPU when the kernels are compiled (conftest.py)
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def reference_moe(x, w13, w2, topk_weights, topk_ids):
    """The contract's formula in float64, one (token, k) at a time. x [T, H] -> [T, H] float64."""
    x, w13, w2, tw = (t.detach().cpu().double() for t in (x, w13, w2, topk_weights))
    T, H = x.shape
    inter = w2.shape[2]
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(topk_ids.shape[1]):
            slot = int(topk_ids[t, k])
            gate_up = w13[slot] @ x[t]
            h = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += tw[t, k] * (w2[slot] @ h)
    return out


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm()).item()


def make_case(T, H, inter, S, K, dtype, *, seed, id_dtype=torch.int64, used_slots=None, device="cpu"):
    """Seeded random (x, w13, w2, topk_weights, topk_ids) on ``device``.

    Routing is over ``used_slots`` only (default: all S), K distinct slots per token.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(S, 2 * inter, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(S, H, inter, generator=g) / inter ** 0.5).to(dtype)
    pool = torch.arange(S) if used_slots is None else torch.as_tensor(used_slots)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    return tuple(t.to(device) for t in (x, w13, w2, weights, ids.to(id_dtype)))
