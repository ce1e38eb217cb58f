"""Hand-written model families and `from_pretrained`."""

from __future__ import annotations

from .registry import FAMILIES, family_for


def from_pretrained(name_or_path, device="cpu", dtype=None, expert_cache=None, policy="fmoe",
                    execution="load", **kwargs):
    """Load a MoE checkpoint (local directory with config.json + *.safetensors, or a hub id).

    device: "cpu", "cuda", "cuda:1", ...; dtype: None (the checkpoint's), torch.float32,
    torch.bfloat16 or torch.float16. expert_cache: None keeps every routed expert resident on
    `device`; a float in (0, 1] keeps that fraction, an int that many experts, a string such as
    "8GiB" a byte budget, "auto" the largest cache the memory allows, "mmap" every expert
    memory-mapped (CPU), in a device cache managed by `policy` ("fmoe", "lru", "lfu",
    "moe-infinity"). execution: "load" (a miss is copied into the cache; bit-exact), "host" (a
    miss is computed where the expert lives), "hybrid" (the policy decides per miss).
    Returns a `fmoe.runtime.lm.MoEModel`: ``model(input_ids)`` gives logits [B, T, vocab];
    ``model.generate(input_ids, max_new_tokens=32)``; ``model.expert_stats()``.
    """
    # The runtime assembles family module, experts backend and generation; imported here so
    # that the model files themselves depend only on kernels.
    from ..runtime.lm import load

    return load(name_or_path, device=device, dtype=dtype, expert_cache=expert_cache,
                policy=policy, execution=execution, **kwargs)


__all__ = ["from_pretrained", "FAMILIES", "family_for"]
