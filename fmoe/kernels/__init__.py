"""Fused MoE kernels over cache slots. See `fused_moe`."""

from .fused_moe import fused_moe

__all__ = ["fused_moe"]
