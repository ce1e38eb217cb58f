"""What users coming from HF transformers type first: HF argument names, tokenizer calls,
streamers, context managers, casts, right padding. Each works as in HF or is refused by name."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import fmoe
from fmoe.serve import demo


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMOE_CACHE", str(tmp_path_factory.mktemp("fmoe-cache")))
        return demo.demo_checkpoint()


@pytest.fixture(scope="module")
def model(ckpt):
    return fmoe.models.from_pretrained(ckpt)


def test_right_padding_is_refused_for_generation_not_for_a_forward(model):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="right.*left padding"):
        model.generate(ids, 3, attention_mask=right)
    logits = model(ids, attention_mask=right)             # scoring a right-padded batch is fine
    torch.testing.assert_close(logits[1, :2], model(ids[1:, :2])[0])


def test_the_tokenizer_called_as_hf_feeds_generate(model):
    tok = model.tokenizer
    texts = ["Hello", "The quick brown fox"]
    enc = tok(texts, return_tensors="pt")
    assert enc["input_ids"].shape == enc["attention_mask"].shape
    assert enc["attention_mask"][0, 0] == 0                # padded on the left
    out = model.generate(**enc, max_new_tokens=4, eos_token_id=[])
    for i, t in enumerate(texts):
        alone = model.generate(tok(t, return_tensors="pt")["input_ids"], 4, eos_token_id=[])
        assert out[i, -4:].tolist() == alone[0, -4:].tolist()
    assert tok.batch_decode(out[:, -4:]) == [tok.decode(r) for r in out[:, -4:].tolist()]
    assert tok.decode(out[:1, -4:]) == tok.decode(out[0, -4:]) == tok.batch_decode(out[:1, -4:])[0]
    assert tok.decode(int(out[0, -1])) == tok.decode([int(out[0, -1])])
    assert tok.eos_token_id == tok.eos_token_ids[0] and len(tok) >= tok.vocab_size
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode(out)


def test_chat_template_tokenize_and_template_variables(model):
    tok = model.tokenizer
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs)
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert torch.equal(tok.apply_chat_template(msgs, tokenize=True, return_tensors="pt"), torch.tensor([ids]))
    with pytest.raises(ValueError, match="return_tensors needs tokenize=True"):
        tok.apply_chat_template(msgs, return_tensors="pt")     # the text would come back silently
    tok_template = tok.chat_template
    try:
        tok.chat_template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        assert tok.apply_chat_template(msgs, greeting=">> ") == ">> hi"
    finally:
        tok.chat_template = tok_template


def test_hf_generate_arguments(model):
    ids = torch.tensor([[5, 9, 17, 33]])
    want = model.generate(ids, 6, eos_token_id=[])
    assert torch.equal(model.generate(ids, max_length=10, eos_token_id=[]), want)
    assert torch.equal(model.generate(ids, 6, eos_token_id=torch.tensor([], dtype=torch.long),
                                      temperature=None, top_p=None, top_k=None), want)
    assert torch.equal(model.generate(ids, 6, eos_token_id=[], attention_mask=[[1, 1, 1, 1]]), want)

    class Recorder:                   # HF's streamer protocol: put(ids) ..., end()
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    model.generate(ids, 6, eos_token_id=[], streamer=rec)
    assert rec.puts[0] == ids.tolist() and rec.ended
    assert [p[0] for p in rec.puts[1:]] == want[0, 4:].tolist()


def test_hf_from_pretrained_arguments(ckpt):
    m = fmoe.models.from_pretrained(ckpt, torch_dtype=torch.float32, trust_remote_code=True,
                                    low_cpu_mem_usage=True)
    assert m.dtype == torch.float32
    with pytest.raises(TypeError, match="both dtype and torch_dtype"):
        fmoe.models.from_pretrained(ckpt, dtype="float32", torch_dtype=torch.float32)
    with pytest.raises(TypeError, match="device_map.*device='cpu'"):
        fmoe.models.from_pretrained(ckpt, device_map="auto")
    with pytest.raises(TypeError, match="revision.*snapshot_download"):
        fmoe.models.from_pretrained(ckpt, revision="main")
    lru = fmoe.models.from_pretrained(ckpt, expert_cache=0.5, policy="LRU")
    assert type(lru.runtime.policy).name == "lru"
    lru.close()


def test_a_gguf_file_is_named(tmp_path):
    f = tmp_path / "model-Q4_K_M.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(fmoe.errors.ModelNotFoundError, match="GGUF"):
        fmoe.models.from_pretrained(f)


@pytest.mark.parametrize("cache", [None, 0.5])
def test_casts_after_loading_are_refused_not_half_applied(ckpt, cache):
    m = fmoe.models.from_pretrained(ckpt, expert_cache=cache)
    ids = torch.tensor([[5, 9, 17]])
    want = m.generate(ids, 4)
    for cast in (lambda: m.half(), lambda: m.to(torch.bfloat16), lambda: m.double(),
                 lambda: m.to("cuda"), lambda: m.to(dtype=torch.float16)):
        with pytest.raises(TypeError, match="load it again"):
            cast()
    assert m.to("cpu") is m and m.float() is m and m.to(torch.float32) is m and m.cpu() is m
    assert torch.equal(m.generate(ids, 4), want)
    m.close()


def _copy_threads() -> int:
    return sum(t.name.startswith("fmoe-copy") and t.is_alive() for t in threading.enumerate())


def test_context_manager_and_a_dropped_model_free_the_runtime(ckpt):
    before = _copy_threads()
    with fmoe.models.from_pretrained(ckpt, expert_cache=0.5, policy="lru") as m:
        m.generate(torch.tensor([[5, 9, 17]]), 2)
        assert _copy_threads() > before
    assert m.closed and _copy_threads() == before
    m = fmoe.models.from_pretrained(ckpt, expert_cache=0.5, policy="lru")
    m.generate(torch.tensor([[5, 9, 17]]), 2)
    del m
    gc.collect()
    for t in threading.enumerate():                # the finalizer asked them to stop
        if t.name.startswith("fmoe-copy"):
            t.join(timeout=30)
    assert _copy_threads() == before


def test_close_releases_the_checkpoint_files(ckpt):
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    m = fmoe.models.from_pretrained(ckpt, expert_cache=0.5, policy="lru")
    m.generate(torch.tensor([[5, 9, 17]]), 3)
    held = open_fds()
    m.close()
    assert open_fds() < held              # the model is still referenced: close() did it
