"""Shared by the benchmark-facility tests."""

from __future__ import annotations

import numpy as np

# A DeepSeek-V2-Lite config shrunk to test size: same family, routing and layout rules.
TINY_DEEPSEEK = {
    "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "qk_nope_head_dim": 16, "vocab_size": 400, "max_position_embeddings": 512, "rope_scaling": None,
    "bos_token_id": 1, "eos_token_id": 2,
}


def random_trace(path, *, tokens=(7, 5), layers=2, experts=8, top_k=2, seed=0, token_ids=True,
                 weights=False):
    """A format-v1 trace of random routing: distinct ids per (token, layer)."""
    from fmoe.sim.trace import load_trace, write_trace

    rng = np.random.default_rng(seed)
    T = sum(tokens)
    ids = np.stack([np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)])
                    for _ in range(T)]).astype(np.int16)
    offs = np.concatenate([[0], np.cumsum(tokens)]).astype(np.int64)
    kw = {}
    if token_ids:
        kw["token_ids"] = rng.integers(0, 300, T).astype(np.int32)
    if weights:
        w = rng.random((T, layers, top_k)).astype(np.float32)
        kw["weights"] = w / w.sum(-1, keepdims=True)
    write_trace(path, expert_ids=ids, seq_offsets=offs, num_experts=experts, model="test/tiny", **kw)
    return load_trace(path)
