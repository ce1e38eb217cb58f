"""Invariants of moe_align_block_size, the sort-by-slot layout the grouped GEMMs consume."""

import pytest
import torch

from fmoe.kernels.align import max_padded_pairs, moe_align_block_size


def _random_ids(T, K, S, seed, used=None):
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(S) if used is None else torch.as_tensor(used)
    return torch.stack([pool[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)])


@pytest.mark.parametrize("T,K,S,B", [(1, 1, 1, 1), (1, 2, 8, 16), (7, 6, 64, 4), (33, 2, 8, 16),
                                     (5, 8, 9, 3), (40, 4, 13, 64)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_layout_invariants(T, K, S, B, id_dtype):
    ids = _random_ids(T, K, S, seed=T * 100 + K, used=range(0, S, 2) if S > 2 * K else None).to(id_dtype)
    a = moe_align_block_size(ids, B, S)
    P = T * K
    flat = ids.reshape(-1).long()
    total = int(a.num_tokens_post_padded)

    assert a.sorted_token_ids.dtype == torch.int32 and a.expert_ids.dtype == torch.int32
    assert a.sorted_token_ids.numel() == max_padded_pairs(P, S, B) >= total
    assert total % B == 0
    assert a.expert_ids.numel() * B == a.sorted_token_ids.numel()

    used = a.sorted_token_ids[:total].long()
    real = used[used < P]
    # each (token, k) pair exactly once
    assert sorted(real.tolist()) == list(range(P))
    # padding entries are the sentinel, including the unused tail
    assert (a.sorted_token_ids[total:] == P).all()
    assert ((used == P) | (used < P)).all()
    # each block holds one slot: every real pair in block b is routed to expert_ids[b]
    for b in range(total // B):
        rows = used[b * B:(b + 1) * B]
        rows = rows[rows < P]
        assert rows.numel() > 0, "a used block without a real row"
        assert (flat[rows] == a.expert_ids[b].long()).all()
    assert (a.expert_ids[total // B:] == -1).all()
    # blocks are in slot order; within a slot the pairs keep their original order (stable)
    assert (a.expert_ids[:total // B].diff() >= 0).all()
    assert (real.diff()[flat[real][1:] == flat[real][:-1]] > 0).all()
    # counts, padding per slot, and the inverse map
    assert torch.equal(a.counts, torch.bincount(flat, minlength=S))
    assert total == int(((a.counts + B - 1) // B * B).sum())
    assert torch.equal(a.sorted_token_ids[a.pair_positions].long(), torch.arange(P))


def test_slot_numbering_only_permutes_blocks():
    """The rows an expert sees (and their order) do not depend on its slot number."""
    T, K, E, B = 9, 3, 6, 4
    ids = _random_ids(T, K, E, seed=1)
    slot_of = torch.tensor([11, 3, 7, 0, 12, 5])            # expert -> slot in a 14-slot cache
    a = moe_align_block_size(ids, B, E)
    b = moe_align_block_size(slot_of[ids], B, 14)

    def rows_per(al, slot):
        total = int(al.num_tokens_post_padded)
        blocks = (al.expert_ids[:total // B] == slot).nonzero().flatten()
        return torch.cat([al.sorted_token_ids[i * B:(i + 1) * B] for i in blocks.tolist()]).tolist()

    for e in range(E):
        assert rows_per(a, e) == rows_per(b, int(slot_of[e]))
