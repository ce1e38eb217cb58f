"""The repetition penalty, min-p and min_new_tokens against transformers' own logits processors
and its `generate`, and the batcher against `generate` with them."""

from __future__ import annotations

import json

import pytest
import torch

import fmoe
from fmoe.runtime.batching import Batcher, Sequence
from fmoe.runtime.engine import SamplingParams, sample, seen_tokens


def hf_draw(logits, ids, *, penalty=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0):
    """transformers' processors and warpers in its generate's order, then its multinomial draw
    on the global generator seeded with `seed` (greedy when temperature is 0)."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    s = logits.clone()
    if penalty != 1.0:
        s = RepetitionPenaltyLogitsProcessor(penalty)(ids, s)
    if temperature == 0:
        return s.argmax(-1)
    s = TemperatureLogitsWarper(temperature)(ids, s)
    if top_k:
        s = TopKLogitsWarper(top_k)(ids, s)
    if top_p < 1:
        s = TopPLogitsWarper(top_p)(ids, s)
    if min_p:
        s = MinPLogitsWarper(min_p)(ids, s)
    torch.manual_seed(seed)
    return torch.multinomial(s.softmax(-1), 1).squeeze(-1)


@pytest.mark.parametrize("kw", [
    dict(penalty=1.3, temperature=0),
    dict(penalty=0.7, temperature=0),
    dict(penalty=1.2, temperature=0.8),
    dict(min_p=0.1, temperature=1.0),
    dict(min_p=0.3, temperature=0.7, top_k=20, top_p=0.9, penalty=1.1),
])
def test_draws_equal_hf_processors(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 64, generator=g) * 3
    ids = torch.randint(0, 64, (3, 12), generator=g)
    # the penalty reaches the likeliest token (> 1) or the runner-up (< 1)
    ids[:, 0] = logits.topk(2).indices[:, 0 if kw.get("penalty", 1.0) > 1 else 1]
    p = SamplingParams(temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k", 0),
                       top_p=kw.get("top_p", 1.0), min_p=kw.get("min_p", 0.0),
                       repetition_penalty=kw.get("penalty", 1.0))
    seen = seen_tokens(ids, None, 64)
    for seed in range(40):
        want = hf_draw(logits, ids, seed=seed, **kw)
        got = sample(logits, p, torch.Generator().manual_seed(seed), seen)
        assert torch.equal(got, want), (seed, got, want)
    if kw.get("penalty", 1.0) != 1.0:       # the penalty changes what is drawn
        plain = SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
        assert any(not torch.equal(sample(logits, plain, torch.Generator().manual_seed(s)),
                                   sample(logits, p, torch.Generator().manual_seed(s), seen))
                   for s in range(40))


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, min_p=0.35)      # keeps p >= 0.175
    drawn = {int(sample(logits, p, torch.Generator().manual_seed(s))) for s in range(200)}
    assert drawn == {0, 1}


def test_padding_is_not_penalised():
    ids = torch.tensor([[7, 7, 3], [0, 0, 5]])
    seen = seen_tokens(ids, torch.tensor([[True, True, True], [False, False, True]]), 10)
    assert seen[0].nonzero().flatten().tolist() == [3, 7]
    assert seen[1].nonzero().flatten().tolist() == [5]


def test_min_new_tokens_holds_eos_back():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    p = SamplingParams(temperature=0, eos_token_id=[1], min_new_tokens=2)
    assert int(sample(logits, p, None, None, 0)) == 2
    assert int(sample(logits, p, None, None, 1)) == 2
    assert int(sample(logits, p, None, None, 2)) == 1


@pytest.mark.parametrize("kw", [dict(repetition_penalty=-1.0), dict(repetition_penalty=0.0),
                                dict(min_p=1.5), dict(min_p=-0.1), dict(min_new_tokens=-1),
                                dict(min_new_tokens=1.5)])
def test_bad_values_name_the_field(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


@pytest.fixture(scope="module")
def pair(mixtral_ckpt):
    path, hf = mixtral_ckpt
    return fmoe.models.from_pretrained(path), hf


def test_generate_equals_hf_generate(pair):
    """Greedy with a repetition penalty and min_new_tokens, and seeded sampling with min-p,
    token for token against transformers' generate on the same checkpoint."""
    model, hf = pair
    ids = torch.randint(3, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    plain = model.generate(ids, 12, eos_token_id=[])
    eos = int(plain[0, 11])                          # greedy emits it at the third step
    kw = dict(repetition_penalty=1.8, min_new_tokens=6)
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0,
                       attention_mask=torch.ones_like(ids), **kw)
    got = model.generate(ids, 12, eos_token_id=eos, pad_token_id=0, **kw)
    assert torch.equal(got, want), (got, want)
    assert not torch.equal(got[:, :want.shape[1]], plain[:, :want.shape[1]])   # it did something

    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        want = hf.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=0,
                           min_p=0.05, repetition_penalty=1.3, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones_like(ids))
        got = model.generate(ids, 10, temperature=0.9, top_k=0, min_p=0.05, repetition_penalty=1.3,
                             seed=seed, eos_token_id=[])
        assert torch.equal(got, want), (seed, got, want)


def test_generate_takes_hf_defaults_and_generation_config(mixtral_ckpt, tmp_path):
    """Values a call leaves out come from generation_config.json, else HF's defaults (top_k 50
    when sampling), token for token against transformers' generate on the same checkpoint;
    generation_config's do_sample is not followed (greedy unless asked), its repetition_penalty
    is, as in HF's greedy search."""
    import shutil

    from transformers import GenerationConfig

    path, hf = mixtral_ckpt
    ids = torch.randint(3, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    common = dict(eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    model = fmoe.models.from_pretrained(path)
    for seed in (1, 2):                  # sampling, top_k not passed: HF's 50
        torch.manual_seed(seed)
        want = hf.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, **common)
        got = model.generate(ids, 10, do_sample=True, temperature=1.5, seed=seed, eos_token_id=[])
        assert torch.equal(got, want), (seed, got, want)
    full = model.generate(ids, 10, do_sample=True, temperature=1.5, top_k=None, seed=1, eos_token_id=[])
    assert not torch.equal(full, got)    # top-k off is another distribution
    model.close()

    gc_dir = tmp_path / "gc"
    shutil.copytree(path, gc_dir)
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.4}
    (gc_dir / "generation_config.json").write_text(json.dumps(gen))
    old, hf.generation_config = hf.generation_config, GenerationConfig(**gen)
    model = fmoe.models.from_pretrained(gc_dir)
    try:
        for seed in (1, 2):
            torch.manual_seed(seed)
            want = hf.generate(ids, max_new_tokens=10, **common)
            got = model.generate(ids, 10, do_sample=True, seed=seed, eos_token_id=[])
            assert torch.equal(got, want), (seed, got, want)
        want = hf.generate(ids, max_new_tokens=10, do_sample=False, **common)
        got = model.generate(ids, 10, eos_token_id=[])     # greedy by default, with the penalty
        assert torch.equal(got, want), (got, want)
        plain = model.generate(ids, 10, eos_token_id=[], repetition_penalty=None)
        assert not torch.equal(plain, got)
    finally:
        model.close()
        hf.generation_config = old


def test_batched_rows_equal_generate(pair):
    """Rows with their own penalties and min_new_tokens in one continuous batch generate what
    `generate` gives each alone."""
    model, _ = pair
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 11, 3)]
    eos = int(model.generate(torch.tensor([prompts[0]]), 4, eos_token_id=[])[0, -1])
    kws = [dict(repetition_penalty=1.5), dict(repetition_penalty=0.8, min_new_tokens=4),
           dict(temperature=0.8, min_p=0.2, repetition_penalty=1.2, seed=9)]
    seqs = [Sequence(p, SamplingParams(max_new_tokens=8, eos_token_id=[eos], **kw))
            for p, kw in zip(prompts, kws)]
    b = Batcher(model, max_batch=3)
    b.submit(seqs)
    b.run_until_idle()
    for s, p, kw in zip(seqs, prompts, kws):
        solo = model.generate(torch.tensor([p]), 8, eos_token_id=[eos], **kw)[0, len(p):].tolist()
        if eos in solo:
            solo = solo[:solo.index(eos) + 1]
        assert s.output == solo, (kw, s.output, solo)


def test_generate_edge_values_and_the_cli_follow_the_same_rules(mixtral_ckpt, tmp_path):
    """A numpy temperature samples as a float does; do_sample with a generation_config
    temperature of 0 is refused (HF raises too); `fmoe generate` leaves the flags it is not
    given to generate, so generation_config's repetition_penalty applies there as well."""
    import shutil

    import numpy as np

    path, hf = mixtral_ckpt
    ids = torch.randint(3, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(6))
    model = fmoe.models.from_pretrained(path)
    try:
        a = model.generate(ids, 8, temperature=np.float32(1.5), seed=3, eos_token_id=[])
        b = model.generate(ids, 8, temperature=1.5, seed=3, eos_token_id=[])
        assert torch.equal(a, b) and not torch.equal(a, model.generate(ids, 8, eos_token_id=[]))
    finally:
        model.close()

    gc_dir = tmp_path / "gc"
    shutil.copytree(path, gc_dir)
    (gc_dir / "generation_config.json").write_text(json.dumps({"temperature": 0, "repetition_penalty": 1.6}))
    model = fmoe.models.from_pretrained(gc_dir)
    try:
        with pytest.raises(ValueError, match="temperature 0"):
            model.generate(ids, 4, do_sample=True)
        want = model.generate(ids, 6, eos_token_id=[])          # greedy with the config's penalty
        assert not torch.equal(want, model.generate(ids, 6, eos_token_id=[], repetition_penalty=None))
    finally:
        model.close()
    # the CLI hands generate only the flags given: the rest come from generation_config.json
    from fmoe.serve.cli import build_parser, sampling_kwargs

    args = build_parser().parse_args(["generate", str(gc_dir), "--prompt", "x"])
    assert sampling_kwargs(args) == {}
    args = build_parser().parse_args(["chat", str(gc_dir), "--top-k", "0", "--temperature", "0.5"])
    assert sampling_kwargs(args) == {"top_k": 0, "temperature": 0.5}


def test_reset_expert_stats_of_a_model_loaded_under_inference_mode(mixtral_ckpt):
    with torch.inference_mode():
        model = fmoe.models.from_pretrained(mixtral_ckpt[0])
    model.generate(torch.tensor([[5, 6, 7]]), 2, eos_token_id=[])
    assert model.expert_stats()["hits"] > 0
    model.reset_expert_stats()
    assert model.expert_stats()["hits"] == 0
