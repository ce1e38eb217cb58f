"""Fused MoE kernels over cache slots. See `fused_moe` and docs/kernels.md.

Importing this package never imports triton; the Triton backend loads on first use.
"""

from .align import AlignedPairs, moe_align_block_size
from .fused_moe import BACKENDS, available_backends, fused_moe, select_backend, triton_unavailable_reason
from .torch_moe import moe_gather, moe_grouped_mm

__all__ = [
    "AlignedPairs",
    "BACKENDS",
    "available_backends",
    "fused_moe",
    "moe_align_block_size",
    "moe_gather",
    "moe_grouped_mm",
    "select_backend",
    "triton_unavailable_reason",
]
