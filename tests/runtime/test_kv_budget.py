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


def test_a_recorded_trace_keeps_each_token_once_under_preemption(checkpoints, tmp_path):
    """A preempted request stays one sequence of the trace: its resume prefill records only
    its new position, so the trace equals the unbounded run's (tokens, phases, experts)."""
    import numpy as np

    def record(budget):
        path = tmp_path / f"{budget}.npz"
        model = fmoe.models.from_pretrained(checkpoints["mixtral"], expert_cache=0.5, trace_path=path)
        seqs = [Sequence(p, params(20)) for p in prompts_of((9, 4, 15), seed=3)]
        b = Batcher(model, max_batch=8, kv_budget=budget)
        b.submit(seqs)
        b.run_until_idle()
        model.close()
        t = np.load(path)
        offs = t["seq_offsets"]
        rows = {}
        for a, z in zip(offs[:-1], offs[1:]):
            rows[tuple(t["token_ids"][a:z])] = (t["phase"][a:z].tolist(), t["expert_ids"][a:z].tolist())
        return rows, b.preemptions

    free, _ = record(None)
    bound, preemptions = record(40)
    assert preemptions > 0 and len(free) == 3
    assert bound == free


def test_a_step_failing_during_a_preemption_loses_no_sequence(checkpoints, monkeypatch):
    """The preempted row is queued before its cache rows are dropped: when dropping them fails
    (an allocation, as memory runs short), the step's rows end with the error and the
    preempted sequence still runs to its end."""
    from fmoe.runtime import batching

    model = fmoe.models.from_pretrained(checkpoints["mixtral"])
    seqs = [Sequence(p, params(20)) for p in prompts_of((9, 4, 15), seed=3)]
    b = Batcher(model, max_batch=8, kv_budget=40)
    real, failed = batching.DecodeBatch.keep, []

    def keep(self, index):
        if not failed and len(index) == len(b.rows) and b._preempted:
            failed.extend(b._preempted)
            raise RuntimeError("out of memory")
        return real(self, index)

    monkeypatch.setattr(batching.DecodeBatch, "keep", keep)
    b.submit(seqs)
    b.run_until_idle()
    assert failed and b.failed_steps == 1
    assert all(s.done.is_set() for s in seqs) and ERROR in [s.finish_reason for s in seqs]
    for s in failed:              # preempted when the step failed: not lost, ran to its end
        assert s.finish_reason == LENGTH and len(s.output) == 20


class Hooks:
    """Counts the request events the batcher sends (as the offload runtime receives them)."""

    def __init__(self):
        self.open, self.events = set(), []

    def on_request_start(self, seq_id, prompt=None, token_ids=None):
        assert seq_id not in self.open
        self.open.add(seq_id)
        self.events.append(("start", seq_id))

    def on_request_end(self, seq_id):
        assert seq_id in self.open
        self.open.discard(seq_id)
        self.events.append(("end", seq_id))

    def begin_step(self, *a):
        pass

    def on_token_end(self):
        pass


def test_request_events_stay_balanced_with_preemption_and_cancellation(checkpoints):
    """A preempted request stays open for the hooks (no end and start again); cancelling it
    while it waits ends it once, on the engine thread."""
    model = fmoe.models.from_pretrained(checkpoints["mixtral"])
    hooks = Hooks()
    seqs = [Sequence(p, params(20)) for p in prompts_of((9, 4, 15), seed=3)]
    b = Batcher(model, max_batch=8, kv_budget=40, hooks=hooks)
    b.submit(seqs)
    while not b._preempted:
        b.step()
    waiting = next(iter(b._preempted))
    b.cancel(waiting)
    assert not waiting.done.is_set()          # ended by the engine thread's next step
    b.run_until_idle()
    assert waiting.finish_reason == "cancelled" and not hooks.open
    assert sorted(e for e in hooks.events if e[0] == "start") == sorted(("start", s.id) for s in seqs)
    assert len(hooks.events) == 2 * len(seqs)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "mixtral-sliding"])
def test_a_prompt_longer_than_max_prefill_tokens_is_prefilled_in_chunks(checkpoints, family):
    """A lone prompt over `max_prefill_tokens` runs in forwards of that many tokens over the
    growing cache (its temporaries bounded by the chunk): the generated tokens are the one-forward
    run's (float32), the hooks see one prompt step per chunk."""
    model = fmoe.models.from_pretrained(checkpoints[family])
    prompt = prompts_of((30,), seed=4)[0]
    want = model.generate(torch.tensor([prompt]), 12, eos_token_id=[])[0, 30:].tolist()
    calls = []

    class Steps(Hooks):
        def begin_step(self, ids, valid, seq_ids, prompt=None):
            calls.append((ids.shape[1], prompt))

    s = Sequence(prompt, params(12))
    b = Batcher(model, max_prefill_tokens=8, hooks=Steps())
    b.submit(s)
    b.run_until_idle()
    assert s.output == want
    assert calls[:4] == [(8, True), (8, True), (8, True), (6, True)] and calls[4] == (1, None)


def test_a_chunked_prefill_is_recorded_as_prompt_tokens(checkpoints, tmp_path):
    import numpy as np

    path = tmp_path / "t.npz"
    model = fmoe.models.from_pretrained(checkpoints["mixtral"], expert_cache=0.5, trace_path=path)
    b = Batcher(model, max_prefill_tokens=8)
    b.submit(Sequence(prompts_of((30,), seed=4)[0], params(5)))
    b.run_until_idle()
    model.close()
    t = np.load(path)
    assert t["phase"].tolist() == [0] * 30 + [1] * 4       # the 5th token is never fed back
