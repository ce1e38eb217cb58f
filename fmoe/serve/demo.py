"""`fmoe demo`: the embedded default. Builds (once, cached) a small random Mixtral-shaped
checkpoint with a byte-level BPE tokenizer, then generates with a quarter of the routed experts
in the device cache and checks that the output equals the fully resident run."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..files import plain_mode

DEMO_CONFIG = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = """\
A mixture of experts replaces one large feed-forward block with many smaller ones, the experts,
and a router that sends every token to a few of them. Only the chosen experts run, so a model
with many parameters costs little compute per token. The catch is memory: every expert must be
somewhere the accelerator can reach quickly. Offloading keeps attention, norms and embeddings on
the device, keeps a bounded pool of experts in a cache, and brings the others in from host
memory or disk when the router asks for them. Prediction turns waiting into overlap: if the
runtime knows which experts the next layers will want, it can copy them while the current layer
computes. Expert maps record, for each token step, the router's full distribution at every
layer; similar prompts and similar routing so far tend to continue alike. The output of an
offloaded model must equal the output of the fully resident one, token for token.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
"""


def cache_dir() -> Path:
    root = os.environ.get("FMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fmoe")
    return Path(root)


def write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
        "model_max_length": DEMO_CONFIG["max_position_embeddings"]}, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2}, indent=2))


def demo_checkpoint(dtype: torch.dtype = torch.float32) -> Path:
    """The demo checkpoint directory, built on first use (atomically: a temp dir renamed)."""
    from ..models.synthetic import write_random_checkpoint

    target = cache_dir() / "demo-mixtral-v1"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_random_checkpoint(tmp, DEMO_CONFIG, dtype=dtype, seed=0)
        write_tokenizer(tmp, DEMO_CONFIG["vocab_size"])
        plain_mode(tmp)       # mkdtemp's 0700 is for the partial directory only (the files have theirs)
        try:
            os.rename(tmp, target)
        except OSError:       # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def run(prompt: str = "Offloading keeps attention on the device and", max_new_tokens: int = 32,
        expert_cache="0.25", policy: str = "fmoe", device: str = "cpu", out=print) -> int:
    from ..models import from_pretrained

    path = demo_checkpoint()
    out(f"demo checkpoint: {path}")
    resident = from_pretrained(path, device=device)
    tok = resident.tokenizer
    ids = torch.tensor([tok.encode(prompt)])
    ref = resident.generate(ids, max_new_tokens=max_new_tokens)

    model = from_pretrained(path, device=device, expert_cache=expert_cache, policy=policy)
    model.generate(ids, max_new_tokens=2)          # warm-up
    model.reset_expert_stats()
    t0 = time.perf_counter()
    got = model.generate(ids, max_new_tokens=max_new_tokens)
    dt = time.perf_counter() - t0
    n = got.shape[1] - ids.shape[1]
    stats = model.expert_stats()
    model.close()

    out(f"prompt: {prompt}")
    out(f"text:   {tok.decode(got[0, ids.shape[1]:].tolist())!r}")
    out(f"tokens: {n} in {dt:.3f} s ({n / dt:.1f} tokens/s, policy={policy}, expert_cache={expert_cache})")
    uses = stats["hits"] + stats["misses"]
    out(f"cache:  {stats['capacity']} slots, hit rate {stats['hits'] / max(uses, 1):.3f} "
        f"({stats['hits']} hits, {stats['misses']} misses), {stats['bytes_loaded'] / 2**20:.1f} MiB loaded, "
        f"stall {stats['stall_seconds'] * 1e3:.1f} ms, resident peak {stats['resident_peak']}")
    same = torch.equal(got, ref)
    out(f"lossless: {'yes' if same else 'NO'} (offloaded tokens {'equal' if same else 'differ from'} "
        "the fully resident run)")
    return 0 if same else 1
