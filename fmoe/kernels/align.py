"""Sorting (token, k) pairs by cache slot into fixed-size blocks, in plain torch.

This is the bookkeeping step in front of a grouped GEMM over experts: the Triton kernel gives
each block of ``block_size`` sorted rows to one program, and every block must hold rows of a
single slot so the program streams one expert's weights. vLLM calls the same step
``moe_align_block_size``; this is an independent torch version, written without a host sync
(no ``.item()``, no data-dependent output shapes) so it can run inside CUDA graphs, and it also
serves as the test oracle for the layout invariants.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AlignedPairs(NamedTuple):
    """Layout of the (token, k) pairs sorted by slot and padded per slot.

    ``P = T*K`` pairs; ``pair = t*K + k`` names one (token, k). ``B`` is the block size.

    - ``sorted_token_ids`` int32 [max_padded]: pair index at each sorted position; padding
      positions (the tail of each slot's last block, and everything past
      ``num_tokens_post_padded``) hold the sentinel ``P``.
    - ``expert_ids`` int32 [max_padded // B]: slot of each block; ``-1`` for blocks past the end.
    - ``num_tokens_post_padded`` int32 [1]: number of sorted positions in use (a multiple of B).
    - ``counts`` int64 [S]: pairs routed to each slot.
    - ``pair_positions`` int64 [P]: sorted position of each pair (inverse of the above).
    """

    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    counts: torch.Tensor
    pair_positions: torch.Tensor


def max_padded_pairs(num_pairs: int, num_slots: int, block_size: int) -> int:
    """Upper bound on the padded length, known without looking at the ids.

    Each slot that receives a pair wastes at most ``block_size - 1`` padding positions, and at
    most ``min(S, P)`` slots receive pairs. Rounded up to a whole number of blocks.
    """
    bound = num_pairs + min(num_slots, num_pairs) * (block_size - 1)
    return (bound + block_size - 1) // block_size * block_size


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_slots: int) -> AlignedPairs:
    """Sort pairs by slot, padding each slot's run of pairs to a multiple of ``block_size``.

    topk_ids [T, K] int32/int64 slot ids in ``[0, num_slots)``. Within a slot, pairs keep their
    original order (stable sort), so the rows an expert sees, and their order, do not depend
    on which slot number the expert happens to occupy.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    max_padded = max_padded_pairs(num_pairs, num_slots, block_size)

    # counts per slot via scatter_add (bincount would sync on CUDA to size its output)
    counts = torch.zeros(num_slots, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_size - 1) // block_size * block_size
    padded_end = torch.cumsum(padded, 0)                       # [S] end of each slot's region
    padded_start = padded_end - padded
    count_start = torch.cumsum(counts, 0) - counts             # [S] start among unpadded pairs

    order = torch.argsort(flat, stable=True)                   # [P] pair ids sorted by slot
    slot_of_sorted = flat[order]
    rank_in_slot = torch.arange(num_pairs, device=device) - count_start[slot_of_sorted]
    dest = padded_start[slot_of_sorted] + rank_in_slot         # [P] position of order[j]

    sorted_token_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_token_ids[dest] = order.to(torch.int32)
    pair_positions = torch.empty_like(dest)
    pair_positions[order] = dest

    # block b belongs to the slot whose padded region contains position b*B
    block_start = torch.arange(0, max_padded, block_size, device=device)
    expert_ids = torch.searchsorted(padded_end, block_start, right=True)
    expert_ids = torch.where(expert_ids < num_slots, expert_ids, -1).to(torch.int32)

    total = padded_end[-1:] if num_slots > 0 else torch.zeros(1, dtype=torch.int64, device=device)
    return AlignedPairs(sorted_token_ids, expert_ids, total.to(torch.int32), counts, pair_positions)
