"""Continuous batching: rows that join and leave a running batch generate exactly what they
generate alone, for every cache layout (GQA K/V, MLA latent + rope key); independent finishing,
cancellation, hooks, the queue bound, and incremental detokenization with stop strings."""

from __future__ import annotations

import threading

import pytest
import torch

import fmoe
from fmoe.models.synthetic import write_random_checkpoint
from fmoe.runtime.batching import Batcher, QueueFull, Sequence
from fmoe.runtime.engine import SamplingParams, left_pad
from fmoe.runtime.text_stream import TextStream

FAMILIES = {
    "mixtral": dict(model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                    rope_theta=10000.0),
    "mixtral-sliding": dict(model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                            rope_theta=10000.0, sliding_window=8),
    "deepseek_v2": dict(model_type="deepseek_v2", vocab_size=128, hidden_size=32, intermediate_size=48,
                        moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=2, first_k_dense_replace=1, max_position_embeddings=256,
                        rope_theta=10000.0),
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=128, hidden_size=64, intermediate_size=96,
                      moe_intermediate_size=32, shared_expert_intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                      max_position_embeddings=256, rope_theta=10000.0),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    return {name: write_random_checkpoint(root / name, cfg, dtype=torch.float32, seed=1)
            for name, cfg in FAMILIES.items()}


@pytest.fixture(scope="module")
def mixtral(checkpoints):
    return fmoe.models.from_pretrained(checkpoints["mixtral"])


def prompts_of(lengths, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])
    return out[0, len(prompt):].tolist()


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, eos_token_id=[], **kw)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_staggered_joins_equal_alone(checkpoints, family):
    """Requests arrive while others run (more than max_batch, so some wait), with different
    prompt lengths and budgets; every one equals its solo greedy run."""
    model = fmoe.models.from_pretrained(checkpoints[family])
    prompts = prompts_of((3, 17, 8, 1, 30, 12, 5, 9))
    budgets = [12, 5, 9, 12, 3, 7, 12, 1]
    seqs = [Sequence(p, greedy(n)) for p, n in zip(prompts, budgets)]
    b = Batcher(model, max_batch=3)
    b.submit(seqs[:2])
    b.step()
    b.step()
    b.submit(seqs[2:5])
    b.step()
    b.submit(seqs[5:])
    b.run_until_idle()
    assert b.num_running == 0 and b.num_waiting == 0
    for s, p, n in zip(seqs, prompts, budgets):
        assert s.finish_reason == "length"
        assert s.output == alone(model, p, n), (family, len(p))


def test_offloaded_batch_equals_resident_alone(checkpoints, mixtral):
    """The offload runtime under a batch (union of the rows' experts, tiny cache) stays lossless."""
    model = fmoe.models.from_pretrained(checkpoints["mixtral"], expert_cache=0.25, policy="lru")
    prompts = prompts_of((4, 11, 7, 2), seed=5)
    seqs = [Sequence(p, greedy(10)) for p in prompts]
    b = Batcher(model, max_batch=4)
    b.submit(seqs[:2])
    b.step()
    b.submit(seqs[2:])
    b.run_until_idle()
    for s, p in zip(seqs, prompts):
        assert s.output == alone(mixtral, p, 10)
    st = model.expert_stats()
    assert st["misses"] > 0 and st["resident_peak"] <= st["capacity"]
    model.close()


def test_seeded_sampling_does_not_depend_on_the_batch(mixtral):
    prompts = prompts_of((6, 13, 3), seed=2)
    params = [SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, eos_token_id=[], seed=s)
              for s in (1, 2, 3)]
    solo = []
    for p, sp in zip(prompts, params):
        s = Sequence(p, sp)
        b = Batcher(mixtral, max_batch=1)
        b.submit(s)
        b.run_until_idle()
        solo.append(s.output)
    seqs = [Sequence(p, sp) for p, sp in zip(prompts, params)]
    b = Batcher(mixtral, max_batch=8)
    b.submit(seqs[0])
    b.step()
    b.submit(seqs[1:])
    b.run_until_idle()
    assert [s.output for s in seqs] == solo
    # the engine's seeded sampler gives the same tokens
    ref = mixtral.generate(torch.tensor([prompts[0]]), 10, temperature=0.9, top_p=0.9, top_k=0, seed=1,
                           eos_token_id=[])
    assert solo[0] == ref[0, len(prompts[0]):].tolist()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_generate_and_the_batcher_give_the_same_tokens(mixtral, sampled):
    """The one decode loop: `generate` (the Python API) and the `Batcher` (the server) produce the
    same tokens for the same prompts and seeds. Greedy: one left-padded `generate` batch; seeded
    sampling: one `generate` per prompt (its rows share one generator, the batcher's have one each).
    max_batch=3 makes the fourth prompt wait and join a running batch."""
    prompts = prompts_of((5, 12, 2, 8), seed=7)
    n, seeds = 9, (11, 12, 13, 14)
    kw = dict(temperature=0.8, top_p=0.9, top_k=20) if sampled else {}
    seqs = [Sequence(p, SamplingParams(max_new_tokens=n, eos_token_id=[], seed=s if sampled else None, **kw))
            for p, s in zip(prompts, seeds)]
    b = Batcher(mixtral, max_batch=3)
    b.submit(seqs)
    b.run_until_idle()
    if sampled:
        ref = [mixtral.generate(torch.tensor([p]), n, seed=s, eos_token_id=[], **kw)[0, len(p):].tolist()
               for p, s in zip(prompts, seeds)]
    else:
        ids, valid = left_pad(prompts, 0, "cpu")
        ref = mixtral.generate(ids, n, attention_mask=valid, eos_token_id=[])[:, ids.shape[1]:].tolist()
    assert [s.output for s in seqs] == ref


def test_eos_stop_callback_and_cancel_finish_rows_independently(mixtral):
    prompts = prompts_of((5, 9, 14, 2), seed=3)
    free = alone(mixtral, prompts[0], 12)
    eos = free[4]                                 # row 0 meets this token at step 5 (or earlier)
    cut = free.index(eos) + 1
    stops = []

    def stop_after_three(seq, tok):
        stops.append(tok)
        return len(seq.output) == 3

    s_eos = Sequence(prompts[0], SamplingParams(max_new_tokens=12, eos_token_id=[eos]))
    s_cb = Sequence(prompts[1], greedy(12), on_token=stop_after_three)
    s_cancel = Sequence(prompts[2], greedy(12))
    s_len = Sequence(prompts[3], greedy(12))
    finished = []
    for s in (s_eos, s_cb, s_cancel, s_len):
        s.on_finish = finished.append
    b = Batcher(mixtral, max_batch=4)
    b.submit([s_eos, s_cb, s_cancel, s_len])
    b.step()
    b.step()
    b.cancel(s_cancel)
    b.run_until_idle()
    assert s_eos.finish_reason == "stop" and s_eos.output == free[:cut]
    assert s_cb.finish_reason == "stop" and len(s_cb.output) == 3 and stops == s_cb.output
    assert s_cancel.finish_reason == "cancelled" and len(s_cancel.output) == 3
    assert s_len.finish_reason == "length" and s_len.output == alone(mixtral, prompts[3], 12)
    assert sorted(id(s) for s in finished) == sorted(id(s) for s in (s_eos, s_cb, s_cancel, s_len))
    assert all(s.done.is_set() for s in finished)


def test_finished_rows_leave_and_padding_columns_are_trimmed(mixtral):
    long_p, short_p = prompts_of((40, 3), seed=4)
    s_long = Sequence(long_p, greedy(2))
    s_short = Sequence(short_p, greedy(10))
    b = Batcher(mixtral, max_batch=2)
    b.submit([s_long, s_short])
    b.step()                       # prefill both + one decode: the long row is done
    assert s_long.finished and b.num_running == 1
    assert b._cache.seen == len(short_p) + 1       # 40-token columns are gone
    assert b._key_valid.shape == (1, len(short_p) + 1) and bool(b._key_valid.all())
    b.run_until_idle()
    assert s_short.output == alone(mixtral, short_p, 10)


def test_waiting_queue_is_bounded_and_cancelled_waiters_never_run(mixtral):
    b = Batcher(mixtral, max_batch=1, max_queue=2)
    a, c = Sequence([5, 6], greedy(3)), Sequence([7], greedy(3))
    b.submit([a, c])
    with pytest.raises(QueueFull):
        b.submit(Sequence([8], greedy(3)))
    with pytest.raises(QueueFull):            # all or nothing
        Batcher(mixtral, max_queue=1).submit([Sequence([1], greedy(1)), Sequence([2], greedy(1))])
    b.cancel(c)                               # a waiter leaves the queue at once
    assert c.finish_reason == "cancelled" and c.done.is_set() and b.num_waiting == 1
    d = Sequence([8], greedy(3))
    b.submit(d)
    b.run_until_idle()
    assert a.finish_reason == d.finish_reason == "length" and c.output == []


class RecordingHooks:
    def __init__(self):
        self.events = []
        self.rows = []

    def on_request_start(self, seq_id, prompt=None, token_ids=None):
        self.events.append(("start", seq_id, len(token_ids)))

    def on_request_end(self, seq_id):
        self.events.append(("end", seq_id))

    def begin_step(self, input_ids, valid, seq_ids):
        assert len(seq_ids) == input_ids.shape[0]
        self.events.append(("step", tuple(input_ids.shape), int(valid.sum())))
        self.rows.append(list(seq_ids))

    def on_token_end(self):
        self.events.append(("token_end",))


def test_runtime_hooks_see_the_batch(mixtral):
    hooks = RecordingHooks()
    a, c = Sequence([5, 6, 7], greedy(3)), Sequence([9], greedy(2))
    b = Batcher(mixtral, max_batch=4, hooks=hooks)
    b.submit([a, c])
    b.run_until_idle()
    ev = hooks.events
    assert ev[:2] == [("start", a.id, 3), ("start", c.id, 1)]
    assert ev[2] == ("step", (2, 3), 4)                    # one left-padded prefill: 4 real tokens
    steps = [e for e in ev if e[0] == "step"]
    assert steps[1:] == [("step", (2, 1), 2), ("step", (1, 1), 1)]   # c leaves after its 2nd token
    assert sum(e[0] == "token_end" for e in ev) == len(steps)
    assert ev.index(("end", c.id)) < ev.index(("end", a.id))
    assert ev[-1] == ("end", a.id)
    assert hooks.rows == [[a.id, c.id], [a.id, c.id], [a.id]]   # each row's request, per step


def test_runtime_receives_hooks_from_model(checkpoints):
    """With an offloaded model the hooks go to `model.runtime` (its policy sees the requests)."""
    model = fmoe.models.from_pretrained(checkpoints["mixtral"], expert_cache=0.5, policy="lfu")
    seen = []
    orig = model.runtime.on_request_start
    model.runtime.on_request_start = lambda *a: (seen.append(a[0]), orig(*a))
    s = Sequence([4, 5, 6], greedy(2), prompt_text="hello")
    b = Batcher(model)
    b.submit(s)
    b.run_until_idle()
    assert seen == [s.id]
    model.close()


def test_background_thread_serves_concurrent_submitters(mixtral):
    prompts = prompts_of((3, 8, 5, 12, 7, 2), seed=6)
    b = Batcher(mixtral, max_batch=4).start()
    try:
        seqs = [Sequence(p, greedy(6)) for p in prompts]

        def submit(s):
            b.submit(s)

        threads = [threading.Thread(target=submit, args=(s,)) for s in seqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in seqs:
            assert s.done.wait(60)
        assert b.is_alive()
    finally:
        b.close()
    for s, p in zip(seqs, prompts):
        assert s.output == alone(mixtral, p, 6)
    with pytest.raises(RuntimeError):
        b.submit(Sequence([1], greedy(1)))


def test_a_failing_forward_fails_its_sequences_and_the_loop_survives(mixtral):
    class Boom(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.fail = inner, True

        def new_cache(self):
            return self.inner.new_cache()

        def forward(self, *a, **k):
            if self.fail:
                self.fail = False
                raise RuntimeError("out of memory (simulated)")
            return self.inner(*a, **k)

    b = Batcher(Boom(mixtral.module), max_batch=2).start()
    try:
        bad = Sequence([3, 4], greedy(3))
        b.submit(bad)
        assert bad.done.wait(30)
        assert bad.finish_reason == "error" and "simulated" in bad.error
        good = Sequence([3, 4], greedy(3))
        b.submit(good)
        assert good.done.wait(30) and good.finish_reason == "length"
    finally:
        b.close()


# -- TextStream ------------------------------------------------------------------------------
class CharTokenizer:
    """Token i decodes to chr(i) (0 is EOS and decodes to nothing)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


class ByteTokenizer:
    """Token i is byte i; decoding is UTF-8 with replacement, like byte-level BPE."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def run_stream(ts, ids):
    deltas, stopped = [], False
    for i in ids:
        d, stopped = ts.push(i)
        deltas.append(d)
        if stopped:
            break
    deltas.append(ts.flush())
    return deltas, stopped


def test_text_stream_stop_string_across_tokens_is_cut_and_held_back():
    ts = TextStream(CharTokenizer(), stop=["END", "zz"])
    deltas, stopped = run_stream(ts, [ord(c) for c in "hello ENDworld"])
    assert stopped and ts.text == "hello " and "".join(deltas) == "hello "
    # nothing that could begin a stop string was released early
    assert all("E" not in d for d in deltas)


def test_text_stream_finds_only_stops_that_end_in_a_searched_piece():
    """A stop string that ended in text not searched (before min_tokens) is not found later,
    whatever the other stop strings' lengths (vLLM's rule: a match must end in the new text)."""
    for stops in (["ab"], ["ab", "abcdefgh"]):
        ts = TextStream(CharTokenizer(), stop=stops)
        out = ""
        for n, c in enumerate("xabc!", 1):
            d, stopped = ts.push(ord(c), check_stop=n >= 4)
            out += d
            assert not stopped
        assert out + ts.flush() == "xabc!"


def test_text_stream_without_stop_streams_everything_and_skips_eos():
    ts = TextStream(CharTokenizer(), eos_token_ids=[0])
    deltas, stopped = run_stream(ts, [ord(c) for c in "abc"] + [0])
    assert not stopped and deltas[:3] == ["a", "b", "c"] and "".join(deltas) == "abc"


def test_text_stream_waits_for_complete_utf8_characters():
    data = "héllo €".encode()
    ts = TextStream(ByteTokenizer())
    deltas, _ = run_stream(ts, list(data))
    assert "".join(deltas) == "héllo €"
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_matches_full_decode_on_a_real_tokenizer(tmp_path):
    from fmoe.runtime.tokenizer import Tokenizer
    from fmoe.serve.demo import write_tokenizer

    write_tokenizer(tmp_path, 512)
    tok = Tokenizer.from_dir(tmp_path)
    prompt = tok.encode("The quick")
    gen = tok.encode(" brown fox jumps over the lazy dog. Offloading keeps", add_special_tokens=False)
    ts = TextStream(tok, prompt_ids=prompt)
    deltas, _ = run_stream(ts, gen)
    assert "".join(deltas) == tok.decode(gen) == ts.text
    ts = TextStream(tok, stop=["lazy"], prompt_ids=prompt)
    deltas, stopped = run_stream(ts, gen)
    assert stopped and "".join(deltas) == " brown fox jumps over the "
