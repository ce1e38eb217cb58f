"""A generation cut short (Ctrl-C, an error) anywhere inside the offload runtime leaves a model
whose next call computes what the resident model computes: the cache starts over
(`OffloadRuntime.recover`). The interrupt is injected deterministically, at the n-th call of a
runtime method, so no test depends on timing."""

from __future__ import annotations

import pytest
import torch

import fmoe
from fmoe.runtime.batching import Batcher, Sequence
from fmoe.runtime.engine import SamplingParams

IDS = torch.tensor([[5, 9, 17, 33, 2, 71]])


@pytest.fixture(scope="module")
def resident(mixtral_ckpt):
    return fmoe.models.from_pretrained(mixtral_ckpt[0])


def interrupt_at(obj, name: str, n: int, exc=KeyboardInterrupt):
    """Make `obj.name` raise `exc` on its n-th call (once), then behave again."""
    real = getattr(obj, name)
    calls = [0]

    def hooked(*a, **kw):
        calls[0] += 1
        if calls[0] == n:
            raise exc("injected")
        return real(*a, **kw)
    setattr(obj, name, hooked)
    return calls


def _method(rt, where: str):
    return (rt, where) if "." not in where else (getattr(rt, where.split(".")[0]), where.split(".")[1])


@pytest.mark.parametrize("policy, cache", [("lru", 2), ("lru", 0.5), ("fmoe", 0.5), ("moe-infinity", 2)])
@pytest.mark.parametrize("where", ["engine.assign", "engine.load", "_issue", "table.acquire_many"])
@pytest.mark.parametrize("frac", [0.15, 0.6])
def test_generate_after_an_interrupt_equals_the_resident_model(mixtral_ckpt, resident, policy, cache,
                                                               where, frac):
    want = resident.generate(IDS, 16, eos_token_id=[])
    m = fmoe.models.from_pretrained(mixtral_ckpt[0], expert_cache=cache, policy=policy)
    counted = interrupt_at(*_method(m.runtime, where), 0)       # a dry run counts the calls
    assert torch.equal(m.generate(IDS, 16, eos_token_id=[]), want)
    m.close()
    n = max(1, int(frac * counted[0]))
    assert counted[0] >= 2
    m = fmoe.models.from_pretrained(mixtral_ckpt[0], expert_cache=cache, policy=policy)
    calls = interrupt_at(*_method(m.runtime, where), n)
    with pytest.raises(KeyboardInterrupt):
        m.generate(IDS, 16, eos_token_id=[])
    assert calls[0] == n                         # it was cut short where asked
    for _ in range(2):
        assert torch.equal(m.generate(IDS, 16, eos_token_id=[]), want)
    m.close()


def test_an_error_inside_a_served_step_leaves_the_next_step_exact(mixtral_ckpt, resident):
    """The batcher fails the step's sequences; the next request is served as the resident model
    serves it; Ctrl-C propagates to the caller and leaves the model exact too."""
    want = resident.generate(IDS, 10, eos_token_id=[])[0, IDS.shape[1]:].tolist()
    m = fmoe.models.from_pretrained(mixtral_ckpt[0], expert_cache=2, policy="lru")
    b = Batcher(m, max_batch=2)
    interrupt_at(m.runtime.engine, "assign", 9, exc=RuntimeError)
    s = Sequence(IDS[0].tolist(), SamplingParams(max_new_tokens=10, eos_token_id=[]))
    b.submit([s])
    b.run_until_idle()
    assert s.finish_reason == "error"
    s = Sequence(IDS[0].tolist(), SamplingParams(max_new_tokens=10, eos_token_id=[]))
    b.submit([s])
    b.run_until_idle()
    assert s.output == want
    interrupt_at(m.runtime.engine, "assign", 5)
    s = Sequence(IDS[0].tolist(), SamplingParams(max_new_tokens=10, eos_token_id=[]))
    b.submit([s])
    with pytest.raises(KeyboardInterrupt):
        b.run_until_idle()
    b = Batcher(m, max_batch=2)                 # as `fmoe chat` does after Ctrl-C
    s = Sequence(IDS[0].tolist(), SamplingParams(max_new_tokens=10, eos_token_id=[]))
    b.submit([s])
    b.run_until_idle()
    assert s.output == want
    m.close()


def test_bad_input_or_a_callback_between_steps_keeps_the_cache(mixtral_ckpt):
    """Only a step cut short starts the cache over: an input refused before generation, or a
    caller's callback raising between steps, leaves the cache and the policy as they were."""
    m = fmoe.models.from_pretrained(mixtral_ckpt[0], expert_cache=0.5, policy="lru")
    m.generate(IDS, 4, eos_token_id=[])
    policy, cached = m.runtime.policy, len(m.runtime.table)
    with pytest.raises(ValueError):
        m.generate(torch.tensor([[10**6]]), 4)
    with pytest.raises(ValueError, match="right"):
        m.generate(torch.tensor([[5, 9, 0]]), 4, attention_mask=torch.tensor([[1, 1, 0]]))

    def stop(ids):
        raise StopIteration("enough")
    with pytest.raises(StopIteration):
        m.generate(IDS, 4, eos_token_id=[], on_token=stop)
    assert m.runtime.policy is policy and len(m.runtime.table) == cached > 0
    m.close()


def test_a_batcher_keeps_its_model_alive(mixtral_ckpt):
    import gc

    b = Batcher(fmoe.models.from_pretrained(mixtral_ckpt[0], expert_cache=0.5, policy="lru"), max_batch=1)
    gc.collect()                      # the MoEModel is only the batcher's now
    s = Sequence(IDS[0].tolist(), SamplingParams(max_new_tokens=3, eos_token_id=[]))
    b.submit([s])
    b.run_until_idle()
    assert s.finish_reason == "length"
    b.model.close()
