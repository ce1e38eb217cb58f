"""Tiny random transformers models saved as checkpoints, and parity checks of fmoe against them.

Weights are drawn with a large std (0.2) so that routing is not degenerate (different tokens
choose different experts) and next-token logits are far from ties; fp32 on CPU throughout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import fmoe

REL_TOL = 1e-4


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Re-draw every parameter (norm weights around 1) and DeepSeek-V3's correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else std * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def tiny_hf(config_cls, model_cls, seed: int = 0, **kwargs):
    """A random transformers model in fp32 (no EOS, so generation always runs its full length)."""
    kwargs = {"vocab_size": 128, "eos_token_id": None, "bos_token_id": None, "pad_token_id": None,
              "tie_word_embeddings": False, **kwargs}
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    return randomize(model, seed)


def save(model, path: Path, *, fused: bool = False, max_shard_size=None) -> Path:
    """save_pretrained: per-expert keys (the hub layout, transformers' default) or, with `fused`,
    the in-memory ``gate_up_proj``/``down_proj`` layout; sharded when `max_shard_size` is given."""
    kwargs = {"save_original_format": False} if fused else {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return Path(path)


def rewrite_config(path: Path, edit) -> dict:
    """Apply `edit(cfg_dict)` (in place) to path/config.json; returns the new dict."""
    file = Path(path) / "config.json"
    cfg = json.loads(file.read_text())
    edit(cfg)
    file.write_text(json.dumps(cfg, indent=2))
    return cfg


def to_legacy_rope(cfg: dict) -> None:
    """transformers-5 ``rope_parameters`` -> the hub's ``rope_theta`` + ``rope_scaling`` (with
    the old ``type`` key)."""
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    rtype = params.pop("rope_type", "default")
    cfg["rope_scaling"] = None if rtype == "default" else {"type": rtype, **params}


def prompt(batch: int = 2, length: int = 7, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max(‖a−b‖/‖b‖, max|a−b| / max|b|)."""
    a, b = a.detach().double(), b.detach().double()
    return max(float((a - b).norm() / b.norm()), float((a - b).abs().max() / b.abs().max()))


class RoutingRecorder(torch.nn.Module):
    """Wraps an installed experts backend and records the top-k ids it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.moe_layer = inner.moe_layer
        self.ids: list[torch.Tensor] = []

    def forward(self, x, topk_weights, topk_ids, router_probs=None):
        assert topk_weights.dtype == torch.float32 and topk_ids.dtype == torch.int64
        self.ids.append(topk_ids.clone())
        return self.inner(x, topk_weights, topk_ids, router_probs)


def record_routing(model) -> list[RoutingRecorder]:
    recs = []
    for block in model.module.moe_blocks():
        block.experts = RoutingRecorder(block.experts)
        recs.append(block.experts)
    return recs


@torch.no_grad()
def check_parity(hf, path: Path, *, new_tokens: int = 16, ids: torch.Tensor | None = None):
    """fmoe loaded from `path` against the transformers model `hf`: full-forward logits within
    REL_TOL, routing that varies across tokens, cached decode logits within REL_TOL, and the same
    greedy tokens for `new_tokens` steps. Returns the fmoe model."""
    model = fmoe.models.from_pretrained(path)
    ids = prompt(vocab=hf.config.vocab_size) if ids is None else ids

    recs = record_routing(model)
    ref = hf(ids).logits
    ours = model(ids)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert rel_err(ours, ref) < REL_TOL, rel_err(ours, ref)
    for rec in recs:                                 # routing is not degenerate
        chosen = rec.ids[-1]
        assert len({tuple(sorted(r.tolist())) for r in chosen}) > 1
        assert len(torch.unique(chosen)) > chosen.shape[1]

    expected = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           attention_mask=torch.ones_like(ids))
    got = model.generate(ids, max_new_tokens=new_tokens)
    assert got.shape == expected.shape
    assert torch.equal(got, expected), (got, expected)

    # decode step by step with the cache against one full forward over the generated sequence
    full = hf(expected).logits
    cache = model.module.new_cache()
    T = ids.shape[1]
    steps = [model.module(expected[:, :T], cache=cache)]
    for t in range(T, expected.shape[1]):
        steps.append(model.module(expected[:, t:t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    assert rel_err(cached, full) < REL_TOL, rel_err(cached, full)
    return model
