"""Generation: batches of mixed prompt lengths, sampling, EOS."""

from __future__ import annotations

import pytest
import torch

import fmoe
from fmoe.runtime.engine import SamplingParams, left_pad, sample


@pytest.fixture(scope="module")
def model(mixtral_ckpt):
    return fmoe.models.from_pretrained(mixtral_ckpt[0])


def test_batched_mixed_lengths_equal_alone(model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 9, 6, 1)]
    ids, valid = left_pad(prompts, pad_id=0, device="cpu")
    out = model.generate(ids, max_new_tokens=16, attention_mask=valid, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=16, eos_token_id=[])
        assert out[i, ids.shape[1]:].tolist() == alone[0, len(p):].tolist()


def test_batched_logits_match_alone(model):
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    ids, valid = left_pad(prompts, 0, "cpu")
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    batch = model(ids, positions=positions, key_valid=valid)
    for i, p in enumerate(prompts):
        alone = model(torch.tensor([p]))
        torch.testing.assert_close(batch[i, -len(p):], alone[0], rtol=1e-5, atol=1e-5)


def test_sampling_seeded_and_top_k_one_is_greedy(model):
    ids = torch.tensor([[5, 9, 17, 33]])
    a = model.generate(ids, 12, temperature=1.0, top_p=0.9, seed=7, eos_token_id=[])
    b = model.generate(ids, 12, temperature=1.0, top_p=0.9, seed=7, eos_token_id=[])
    c = model.generate(ids, 12, temperature=1.0, seed=8, eos_token_id=[])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = model.generate(ids, 12, eos_token_id=[])
    assert torch.equal(model.generate(ids, 12, temperature=0.7, top_k=1, seed=1, eos_token_id=[]), greedy)


def test_eos_stops_and_pads(model):
    ids = torch.tensor([[5, 9, 17, 33], [40, 41, 42, 43]])
    free = model.generate(ids, 10, eos_token_id=[])
    eos = int(free[0, 6])            # the 3rd generated token of row 0 becomes the EOS
    out = model.generate(ids, 10, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 4:].tolist()
    stop = row0.index(eos)
    assert stop <= 2
    assert all(t == 0 for t in row0[stop + 1:])
    if eos not in free[1, 4:].tolist():
        assert out.shape[1] == free.shape[1]
        assert torch.equal(out[1], free[1])


def test_top_p_keeps_smallest_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.7)
    seen = {int(sample(logits, p, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}


@pytest.mark.parametrize("kw", [dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_p=0.0), dict(top_k=-2)])
def test_bad_sampling_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


@pytest.mark.parametrize("probs, top_p", [([0.3, 0.4, 0.3, 1e-9], 0.5), ([0.3, 0.4, 0.3, 1e-9], 0.6),
                                          ([0.25, 0.25, 0.25, 0.25], 0.3), ([0.5, 0.3, 0.15, 0.05], 0.7)])
def test_top_p_keeps_what_hf_keeps_ties_included(probs, top_p):
    """Against transformers' own top-p warper: the same tokens survive, a tie at the cut too
    (so seeded samples agree with HF's)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.log(torch.tensor([probs]))
    kept = set(torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone())).nonzero()[:, 1].tolist())
    p = SamplingParams(temperature=1.0, top_p=top_p)
    seen = {int(sample(logits, p, torch.Generator().manual_seed(s))) for s in range(300)}
    assert seen == {k for k in kept if probs[k] > 1e-6}
