"""The published ``config.json`` of the models `fmoe synth` can imitate, as the hub serves them.

Random weights of these exact shapes measure the system at real size: the bytes per expert,
the resident part and the compute per token are the real model's; only the values differ.
"""

from __future__ import annotations

import copy

_DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}

_QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 1408,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

_QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

_MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}

# The conversation formats of the families' chat models, written for fmoe (not the hub's
# template files): enough for `fmoe serve` and `fmoe chat` to take chat requests on a synthesized
# checkpoint with the family's turn markers at their published ids. A system message goes where
# the family puts it (Mixtral has no system turn: it opens the first user turn).
_CHATML = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\n' + (m['content'] or '') + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
_CHATML_DEFAULT_SYSTEM = (
    "{%- if messages and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}" + _CHATML)
_DEEPSEEK_CHAT = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{- (m['content'] or '') + '\n\n' }}"
    "{%- elif m['role'] == 'user' %}{{- 'User: ' + (m['content'] or '') + '\n\n' }}"
    "{%- elif m['role'] == 'assistant' %}{{- 'Assistant: ' + (m['content'] or '') + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}")
_MISTRAL_INST = (
    "{{- bos_token }}"
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' "
    "else none %}"
    "{%- for m in messages if m['role'] != 'system' %}"
    "{%- if m['role'] == 'user' %}"
    "{{- '[INST] ' + (system + '\n\n' if loop.first and system else '') + (m['content'] or '')"
    " + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' %}{{- ' ' + (m['content'] or '') + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}")

# name -> (hub id, config.json, special tokens {content: id}, chat template)
PUBLISHED: dict[str, tuple[str, dict, dict[str, int], str]] = {
    "deepseek-v2-lite": ("deepseek-ai/DeepSeek-V2-Lite", _DEEPSEEK_V2_LITE,
                         {"<｜begin▁of▁sentence｜>": 100000, "<｜end▁of▁sentence｜>": 100001},
                         _DEEPSEEK_CHAT),
    "qwen1.5-moe-a2.7b": ("Qwen/Qwen1.5-MoE-A2.7B", _QWEN15_MOE_A27B,
                          {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
                          _CHATML_DEFAULT_SYSTEM),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", _QWEN3_30B_A3B,
                      {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
                      _CHATML),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", _MIXTRAL_8X7B, {"<unk>": 0, "<s>": 1, "</s>": 2},
                     _MISTRAL_INST),
}


def published_config(name: str, layers: int | None = None) -> dict:
    """A copy of `name`'s published config.json, with `num_hidden_layers` = `layers` if given."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(PUBLISHED)}")
    cfg = copy.deepcopy(PUBLISHED[name][1])
    if layers is not None:
        dense = cfg.get("first_k_dense_replace", 0)
        most = cfg["num_hidden_layers"]
        if not dense + 1 <= layers <= most:
            raise ValueError(f"--layers must be between {dense + 1} and {most} (the published count) "
                             f"for {name} ({dense} dense layer(s) come first), got {layers}")
        cfg["num_hidden_layers"] = int(layers)     # nothing else: the published config otherwise
    return cfg
