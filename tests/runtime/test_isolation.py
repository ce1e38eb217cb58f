"""One request never hurts another: sampling values that cannot be sampled are refused by the
shared validation; a failure while sampling one row fails that row alone; a failed step answers
every sequence it touched (running rows and the newcomers being admitted) and leaves the waiting
queue alone; no sequence is ever left unanswered."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fmoe
from fmoe.models.synthetic import write_random_checkpoint
from fmoe.runtime.batching import Batcher, Sequence
from fmoe.runtime.engine import MIN_SAMPLING_VALUE, SamplingError, SamplingParams, sample

CFG = dict(model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=48,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
           rope_theta=10000.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("iso"), CFG, dtype=torch.float32, seed=4)
    return fmoe.models.from_pretrained(path)


def alone(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])
    return out[0, len(prompt):].tolist()


# -- validation (one place: SamplingParams, used by the API, the CLI, the server, chat) --------
@pytest.mark.parametrize("field, value, needle", [
    ("temperature", 1e-39, "float32"),           # passed validation before, then broke the batch
    ("temperature", 5e-324, "float32"),
    ("temperature", float("nan"), "finite"),
    ("temperature", float("inf"), "finite"),
    ("temperature", -0.5, ">= 0"),
    ("temperature", True, "number"),
    ("temperature", "0.7", "number"),
    ("top_p", 1e-46, "float32"),
    ("top_p", float("nan"), "finite"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_k", -1, ">= 0"),
    ("top_k", 2.5, "integer"),
    ("max_new_tokens", -1, ">= 0"),
    ("max_new_tokens", 3.0, "integer"),
    ("seed", 2 ** 64, "seed"),
    ("seed", "7", "integer"),
])
def test_values_that_cannot_be_sampled_are_refused(field, value, needle):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field
    assert needle in str(e.value)


def test_generate_refuses_them_before_any_work(model):
    ids = torch.tensor([[5, 6, 7]])
    for kw in ({"temperature": 1e-39}, {"top_p": float("nan")}, {"top_k": -3}):
        with pytest.raises(ValueError):
            model.generate(ids, 4, **kw)


def test_generate_refuses_more_tokens_than_the_context(model):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="context of 64"):
        model.generate(ids, 62)
    assert model.generate(ids, 61, eos_token_id=[]).shape == (1, 64)


@pytest.mark.parametrize("bad", [torch.tensor([[5, 128]]), torch.tensor([[-1, 5]]),
                                 torch.zeros(1, 0, dtype=torch.long), torch.tensor([5, 6])])
def test_generate_refuses_bad_input_ids(model, bad):
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(bad, 2)


def test_smallest_accepted_values_sample_the_most_likely_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 30
    ref = logits.argmax(-1)                     # the independent reference: plain argmax
    for p in (SamplingParams(temperature=MIN_SAMPLING_VALUE),
              SamplingParams(temperature=1.0, top_p=MIN_SAMPLING_VALUE),
              SamplingParams(temperature=1e-30, top_p=1e-30, top_k=3)):
        got = sample(logits, p, torch.Generator().manual_seed(1))
        assert torch.equal(got, ref), p


def test_sampling_tolerates_huge_logits():
    logits = torch.tensor([[3e38, -3e38, 1.0, 3e38]])
    got = sample(logits, SamplingParams(temperature=0.5), torch.Generator().manual_seed(0))
    assert int(got) in (0, 3)


# -- isolation in the batch --------------------------------------------------------------------
def _poison(params: SamplingParams) -> SamplingParams:
    """Params that slipped past validation (set after construction): sampling them raises."""
    params.temperature = math.nan
    return params


def test_a_row_whose_sampling_fails_fails_alone(model):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    b = Batcher(model, max_batch=8)
    good = [Sequence(p, SamplingParams(max_new_tokens=6, eos_token_id=[])) for p in prompts]
    bad = Sequence([20, 21], _poison(SamplingParams(max_new_tokens=6, eos_token_id=[])))
    b.submit([good[0], bad, good[1]])
    b.step()                  # prefill of three (the bad row fails while sampling its first token)
    b.submit(good[2])
    b.run_until_idle()        # the old engine raised here: one row's failure broke the step
    assert bad.finish_reason == "error" and "sampling failed" in bad.error
    for s, p in zip(good, prompts):
        assert s.finish_reason == "length"
        assert s.output == alone(model, p, 6)
    assert all(s.done.is_set() for s in good + [bad])


def test_a_row_failing_during_decode_fails_alone(model):
    b = Batcher(model, max_batch=8)
    good = Sequence([5, 6, 7], SamplingParams(max_new_tokens=5, eos_token_id=[]))
    bad = Sequence([8, 9], SamplingParams(max_new_tokens=5, temperature=1.0, eos_token_id=[]))
    b.submit([good, bad])
    b.step()
    _poison(bad.params)       # its next sampling (in a decode step) fails
    b.run_until_idle()
    assert bad.finish_reason == "error" and len(bad.output) == 2   # prefill + one decode step
    assert good.finish_reason == "length" and good.output == alone(model, [5, 6, 7], 5)


class Flaky(nn.Module):
    """The model's module, but its forward raises while `fail` is set (a read error, an OOM)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.fail = False

    def new_cache(self):
        return self.inner.new_cache()

    def forward(self, *a, **kw):
        if self.fail:
            self.fail = False
            raise OSError("disk on fire")
        return self.inner(*a, **kw)


def test_a_failed_step_answers_what_it_touched_and_spares_the_queue(model):
    flaky = Flaky(model.module)
    b = Batcher(flaky, max_batch=2)
    a = Sequence([5, 6, 7], SamplingParams(max_new_tokens=6, eos_token_id=[]))
    c = Sequence([8, 9, 10], SamplingParams(max_new_tokens=6, eos_token_id=[]))
    w = Sequence([11, 12], SamplingParams(max_new_tokens=4, eos_token_id=[]))
    b.submit([a, c])
    b.step()                                   # a and c are running
    b.submit(w)                                # w waits: the batch is full
    flaky.fail = True
    b.step()                                   # the decode forward fails
    for s in (a, c):
        assert s.finish_reason == "error" and "disk on fire" in s.error and s.done.is_set()
    assert w.finish_reason is None and b.num_waiting == 1
    assert b.last_step_ok is False and "disk on fire" in b.last_error
    b.run_until_idle()
    assert w.finish_reason == "length" and w.output == alone(model, [11, 12], 4)
    assert b.last_step_ok is True


def test_a_failed_admission_answers_the_newcomers(model):
    flaky = Flaky(model.module)
    b = Batcher(flaky, max_batch=4)
    a = Sequence([5, 6, 7], SamplingParams(max_new_tokens=4, eos_token_id=[]))
    b.submit(a)
    b.step()
    n1 = Sequence([8, 9], SamplingParams(max_new_tokens=4, eos_token_id=[]))
    n2 = Sequence([10], SamplingParams(max_new_tokens=4, eos_token_id=[]))
    b.submit([n1, n2])
    flaky.fail = True                          # the prefill of n1 and n2 fails
    b.step()
    for s in (n1, n2):
        assert s.finish_reason == "error" and s.done.is_set()
    b.run_until_idle()
    assert all(s.done.is_set() for s in (a, n1, n2))


def test_the_engine_thread_answers_everyone(model):
    """The same with the background loop: every sequence's `done` is set, none is lost."""
    b = Batcher(model, max_batch=2).start()
    try:
        seqs = [Sequence([5 + i, 6, 7], SamplingParams(max_new_tokens=4, eos_token_id=[]))
                for i in range(5)]
        poisoned = [Sequence([9, 9], _poison(SamplingParams(max_new_tokens=4, eos_token_id=[])))
                    for _ in range(2)]
        b.submit(seqs[:2] + poisoned[:1] + seqs[2:] + poisoned[1:])
        for s in seqs + poisoned:
            assert s.done.wait(120), s
        assert [s.finish_reason for s in seqs] == ["length"] * 5
        assert [s.finish_reason for s in poisoned] == ["error"] * 2
    finally:
        b.close()


# -- graceful shutdown (the server's SIGTERM path) -----------------------------------------------
def test_stop_admitting_lets_accepted_sequences_finish(model):
    b = Batcher(model, max_batch=2).start()
    try:
        seqs = [Sequence([5 + i, 6], SamplingParams(max_new_tokens=3, eos_token_id=[])) for i in range(3)]
        b.submit(seqs)
        b.stop_admitting()
        with pytest.raises(RuntimeError, match="shutting down"):
            b.submit(Sequence([7], SamplingParams(max_new_tokens=3)))
        assert b.wait_idle(120)
        assert [s.finish_reason for s in seqs] == ["length"] * 3
    finally:
        b.close()


def test_abort_ends_running_and_waiting_sequences_with_an_error(model):
    import threading

    first, gate = threading.Event(), threading.Event()

    def hold(seq, tok):                     # the running row stops at its second token until told
        if len(seq.output) == 2:
            first.set()
            gate.wait(120)

    b = Batcher(model, max_batch=1).start()
    try:
        run = Sequence([5, 6], SamplingParams(max_new_tokens=50, eos_token_id=[]), on_token=hold)
        wait = Sequence([7, 8], SamplingParams(max_new_tokens=50, eos_token_id=[]))
        b.submit([run, wait])
        assert first.wait(120)
        b.abort("the server is shutting down (SIGTERM)")
        gate.set()
        for s in (run, wait):
            assert s.done.wait(120)
            assert s.finish_reason == "error" and "shutting down" in s.error
        assert len(run.output) == 2 and wait.output == []
    finally:
        b.close()
