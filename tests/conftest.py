"""Shared fixtures: tiny random HF checkpoints saved to disk, loaded back through fmoe's loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


# config.json of a small DeepSeek-style MoE (3 MoE layers x 8 experts, top-2): the simulator's
# and its tools' tests read model shapes from it
SIM_CONFIG = {"model_type": "deepseek_v2", "hidden_size": 64, "num_hidden_layers": 4,
              "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2,
              "moe_intermediate_size": 32, "n_shared_experts": 1, "intermediate_size": 128,
              "num_attention_heads": 4, "kv_lora_rank": 16, "q_lora_rank": None,
              "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "vocab_size": 1000,
              "torch_dtype": "bfloat16"}


def load_tool(name: str):
    """tools/NAME.py as a module (the tools are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_tool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_mixtral_config(**overrides):
    from transformers import MixtralConfig

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
              num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    kw.update(overrides)
    return MixtralConfig(**kw)


def save_hf(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def mixtral_ckpt(tmp_path_factory):
    """A tiny random HF Mixtral (fp32) saved per expert; returns (path, hf_model)."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    hf = MixtralForCausalLM(tiny_mixtral_config()).eval()
    path = save_hf(hf, tmp_path_factory.mktemp("mixtral"))
    return path, hf


def rewrite_config(path: Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
