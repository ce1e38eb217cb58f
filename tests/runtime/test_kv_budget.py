"""The KV budget of continuous batching: the padded cache never holds more than `kv_budget`
positions (rows x capacity), rows that outgrow it are preempted and resume by recomputation
with the same tokens as an unbounded run, and the families' `kv_bytes_per_position` is what
their caches take."""

from __future__ import annotations

import pytest
import torch

import fmoe
from fmoe.models.synthetic import write_random_checkpoint
from fmoe.runtime.batching import ERROR, LENGTH, Batcher, Sequence
from fmoe.runtime.engine import NoHooks, SamplingParams, left_pad, prefill
from tests.runtime.test_batching import FAMILIES, prompts_of


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv-budget")
    return {name: write_random_checkpoint(root / name, cfg, dtype=torch.float32, seed=1)
            for name, cfg in FAMILIES.items()}


def params(n, **kw):
    return SamplingParams(max_new_tokens=n, eos_token_id=[], **kw)


def run(model, prompts, budgets, kv_budget, **kw):
    """Every sequence submitted at once; after each step, rows x capacity is checked against
    the budget. Returns (outputs, finish reasons, batcher)."""
    seqs = [Sequence(p, params(n, **kw)) for p, n in zip(prompts, budgets)]
    b = Batcher(model, max_batch=8, kv_budget=kv_budget)
    b.submit(seqs)
    peak = 0
    while b.num_waiting or b.rows:
        b.step()
        if kv_budget is not None and b.rows:
            for layer in b._cache.layers:
                for t in layer or ():
                    # the whole buffer, also where the batch sees a trimmed view of it
                    held = t.untyped_storage().nbytes() // (t[0, 0].numel() * t.element_size())
                    assert held <= kv_budget, (held, kv_budget)
            peak = max(peak, len(b.rows) * b._cache.seen)
    if kv_budget is not None:
        assert peak <= kv_budget
    return [s.output for s in seqs], [s.finish_reason for s in seqs], b


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_preempted_rows_resume_with_the_same_tokens(checkpoints, family):
    """Eight sequences under a budget that holds about two of them: rows wait, are preempted
    and resumed, and every one ends with the tokens of the unbounded run (greedy, and seeded
    sampling whose generator carries across the preemption)."""
    model = fmoe.models.from_pretrained(checkpoints[family])
    prompts = prompts_of((9, 4, 15, 6, 11, 3, 8, 13), seed=3)
    budgets = [14, 20, 9, 16, 12, 18, 10, 15]
    for kw in ({}, {"temperature": 0.9, "top_k": 20, "seed": 5}):
        free, reasons_free, _ = run(model, prompts, budgets, None, **kw)
        bound, reasons, b = run(model, prompts, budgets, 56, **kw)
        assert b.preemptions > 0
        assert bound == free
        assert reasons == reasons_free == [LENGTH] * 8


def test_a_sequence_larger_than_the_budget_fails_alone(checkpoints):
    """One that cannot run even alone finishes with an error naming the budget; the others run."""
    model = fmoe.models.from_pretrained(checkpoints["mixtral"])
    prompts = prompts_of((30, 4), seed=1)
    outs, reasons, _ = run(model, prompts, [3, 5], 24)
    assert reasons == [ERROR, LENGTH]
    assert outs[0] == [] and len(outs[1]) == 5


def test_error_message_names_the_budget(checkpoints):
    model = fmoe.models.from_pretrained(checkpoints["mixtral"])
    s = Sequence(prompts_of((30,))[0], params(3))
    b = Batcher(model, kv_budget=24)
    b.submit(s)
    b.run_until_idle()
    assert s.finish_reason == ERROR and "31 KV cache positions" in s.error and "24" in s.error


def test_a_lone_row_that_outgrows_the_budget_stops_with_length(checkpoints):
    model = fmoe.models.from_pretrained(checkpoints["mixtral"])
    prompt = prompts_of((6,))[0]
    outs, reasons, _ = run(model, [prompt], [40], 12)
    # positions 6 + 5 = 11 are cached when the 6th token is sampled; the next step needs 12 + 1
    assert reasons == [LENGTH] and 1 <= len(outs[0]) < 40
    free, _, _ = run(model, [prompt], [len(outs[0])], None)
    assert outs[0] == free[0]


def test_kv_budget_is_checked():
    with pytest.raises(ValueError, match="kv_budget"):
        Batcher(torch.nn.Linear(1, 1), kv_budget=1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_bytes_per_position_is_what_the_cache_takes(checkpoints, family):
    model = fmoe.models.from_pretrained(checkpoints[family])
    ids, valid = left_pad(prompts_of((5, 9)), 0, torch.device("cpu"))
    with torch.inference_mode():
        _, batch = prefill(model.module, ids, valid, NoHooks(), [0, 1])
    cache = batch.cache
    taken = sum(t.numel() * t.element_size() for layer in cache.layers if layer is not None for t in layer)
    assert taken == model.module.kv_bytes_per_position() * 2 * cache.capacity
