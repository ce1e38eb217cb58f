"""`fmoe synth`: published configs, the hub layout, a tokenizer of the config's vocabulary size,
atomic output."""

from __future__ import annotations

import json

import pytest
import torch

from fmoe.models.published import PUBLISHED, published_config
from fmoe.models.synthetic import checkpoint_bytes, synthesize, write_tokenizer
from fmoe.serve.cli import main

# parameters of the published models (public model cards): total ~15.7B, 14.3B, 30.5B, 46.7B
EXPECTED_GB = {"deepseek-v2-lite": 31.41, "qwen1.5-moe-a2.7b": 28.63, "qwen3-30b-a3b": 61.06,
               "mixtral-8x7b": 93.41}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes(name):
    assert checkpoint_bytes(published_config(name)) / 1e9 == pytest.approx(EXPECTED_GB[name], abs=0.01)


def test_layers_shrinks_and_refuses_too_few():
    assert published_config("deepseek-v2-lite", 8)["num_hidden_layers"] == 8
    assert published_config("deepseek-v2-lite")["num_hidden_layers"] == 27
    with pytest.raises(ValueError, match="between 2 and 27"):
        published_config("deepseek-v2-lite", 1)
    with pytest.raises(ValueError, match="unknown model"):
        published_config("llama-moe")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_layers_changes_num_hidden_layers_only(name):
    full, shrunk = published_config(name), published_config(name, 4)
    assert {k: v for k, v in shrunk.items() if full.get(k) != v} == {"num_hidden_layers": 4}
    assert set(full) == set(shrunk)


def test_tokenizer_matches_vocab_and_specials(tmp_path):
    from tokenizers import Tokenizer

    write_tokenizer(tmp_path, 102400, PUBLISHED["deepseek-v2-lite"][2])
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == 102400
    assert tok.token_to_id("<｜begin▁of▁sentence｜>") == 100000
    assert tok.token_to_id("<｜end▁of▁sentence｜>") == 100001
    text = "Offloading keeps attention resident. 123"
    assert tok.decode(tok.encode(text).ids) == text


def test_synth_layout(tiny_synth):
    cfg = json.loads((tiny_synth / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["kv_lora_rank"] == 16
    assert cfg["architectures"] == ["DeepseekV2ForCausalLM"] and cfg["topk_method"] == "greedy"
    assert cfg["torch_dtype"] == "float32"          # the dtype written, not the published one
    meta = json.loads((tiny_synth / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["total_size"] == sum(p.stat().st_size - 8 - int.from_bytes(p.open("rb").read(8), "little")
                                     for p in tiny_synth.glob("*.safetensors"))
    index = json.loads((tiny_synth / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1 and all((tiny_synth / s).exists() for s in shards)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index        # per-expert keys
    assert "model.layers.0.mlp.gate_proj.weight" in index                  # the dense first layer
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tiny_synth / "tokenizer.json")).get_vocab_size() == cfg["vocab_size"]
    assert not list(tiny_synth.parent.glob(".*partial*"))


def test_synth_loads_and_generates(tiny_synth):
    import fmoe

    m = fmoe.models.from_pretrained(tiny_synth)
    ids = torch.tensor([m.tokenizer.encode("hello experts")])
    out = m.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert out.shape == (1, ids.shape[1] + 4)


def test_synth_is_atomic(tmp_path, monkeypatch):
    import fmoe.models.synthetic as synthetic
    from bench_helpers import TINY_DEEPSEEK

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "write_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        synthesize("deepseek-v2-lite", tmp_path / "out", dtype=torch.float32, progress=False,
                   overrides=TINY_DEEPSEEK)
    assert list(tmp_path.iterdir()) == []          # neither the target nor a partial directory


def test_cli_refuses_existing_and_unknown(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["synth", "deepseek-v2-lite", str(tmp_path / "taken"), "--quiet"]) != 0
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as e:
        main(["synth", "gpt-moe", str(tmp_path / "x")])
    assert e.value.code == 2


# the conversation each family's chat format renders (by hand, from the formats' descriptions)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
RENDERED = {
    "deepseek-v2-lite": "<｜begin▁of▁sentence｜>Be brief.\n\nUser: Hi\n\nAssistant: Hello."
                        "<｜end▁of▁sentence｜>User: Why?\n\nAssistant:",
    "qwen1.5-moe-a2.7b": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                         "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
                         "<|im_start|>assistant\n",
    "qwen3-30b-a3b": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                     "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
                     "<|im_start|>assistant\n",
    "mixtral-8x7b": "<s>[INST] Be brief.\n\nHi [/INST] Hello.</s>[INST] Why? [/INST]",
}
# (marker, published id) pairs the rendering must encode to as single tokens
MARKERS = {"deepseek-v2-lite": [("<｜begin▁of▁sentence｜>", 100000), ("<｜end▁of▁sentence｜>", 100001)],
           "qwen1.5-moe-a2.7b": [("<|im_start|>", 151644), ("<|im_end|>", 151645)],
           "qwen3-30b-a3b": [("<|im_start|>", 151644), ("<|im_end|>", 151645)],
           "mixtral-8x7b": [("<s>", 1), ("</s>", 2)]}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_synth_tokenizer_chats_in_the_family_format(name, monkeypatch, tmp_path):
    """A synthesized checkpoint takes chat requests: its tokenizer carries the family's chat
    format with the turn markers at their published ids, BOS / EOS as the config's ids (the
    weights are skipped: only the tokenizer's files are checked)."""
    import fmoe.models.synthetic as synthetic
    from fmoe.runtime.tokenizer import Tokenizer

    monkeypatch.setattr(synthetic, "write_random_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr(synthetic, "checkpoint_bytes", lambda *a, **k: 0)
    out = synthesize(name, tmp_path / name, progress=False)
    cfg = published_config(name)
    tok = Tokenizer.from_dir(out)
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert text == RENDERED[name]
    ids = tok.encode(text, add_special_tokens=False)
    for marker, i in MARKERS[name]:
        assert ids.count(i) == text.count(marker) > 0
    assert tok.tok.token_to_id(tok.bos_token) == cfg["bos_token_id"]
    assert tok.tok.token_to_id(tok.eos_token) == cfg["eos_token_id"]
    # the same files read by transformers render the same text
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=False) == text


def test_cli_names_a_bad_destination_and_layer_count(tmp_path, capsys):
    """A destination that is a file, under a file, or where nothing can be written, and a
    layer count past the published one, are refused by name before anything is built."""
    (tmp_path / "f").write_text("x")
    for dst, words in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "sub", "is not a directory"),
                       ("/proc/fmoe-synth", "cannot write")):
        assert main(["synth", "mixtral-8x7b", str(dst), "--layers", "1", "--quiet"]) == 1
        err = capsys.readouterr().err
        assert words in err and "Error:" not in err, err
    assert main(["synth", "deepseek-v2-lite", str(tmp_path / "x"), "--layers", "28", "--quiet"]) == 1
    assert "between 2 and 27" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
