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
