"""Generation: prefill + decode with a KV cache, greedy or sampled, batches of mixed lengths.

Batches are left-padded: every row's last prompt token sits at the same index, padding keys are
masked out, and rotary positions count real tokens only, so a row generates exactly what it
would generate alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0        # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 -> off
    eos_token_id: int | Sequence[int] | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return [int(e)] if isinstance(e, int) else [int(i) for i in e]


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] (greedy when temperature == 0)."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> input_ids [B, T] left-padded, key_valid [B, T] bool."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            valid[i, T - len(p):] = True
    return ids.to(device), valid.to(device)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, params: SamplingParams,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             hooks=None) -> torch.Tensor:
    """input_ids [B, T] (left-padded when `attention_mask` [B, T] marks padding with 0)
    -> [B, T + n], n <= max_new_tokens; rows that finished are filled with `pad_token_id`
    (default: the first EOS id, else 0). `on_token(ids [B])` sees every new step.
    `hooks` (the offload runtime) receives token boundaries."""
    B, T = input_ids.shape
    device = input_ids.device
    eos = torch.tensor(params.eos_ids, dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (params.eos_ids[0] if params.eos_ids else 0)
    valid = (attention_mask.bool() if attention_mask is not None
             else torch.ones(B, T, dtype=torch.bool, device=device))
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    key_valid = valid if not bool(valid.all()) else None
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    if params.max_new_tokens == 0:
        return input_ids
    if hooks is None:
        hooks = NoHooks()
    for b in range(B):
        hooks.on_request_start(b, None, input_ids[b][valid[b]].tolist())
    try:
        return _decode(model, input_ids, params, valid, positions, key_valid, pad, eos, generator,
                       on_token, hooks)
    finally:
        for b in range(B):
            hooks.on_request_end(b)


class NoHooks:
    """The runtime hooks of a model without an offload runtime: all no-ops."""

    def on_request_start(self, *a): pass
    def on_request_end(self, *a): pass
    def begin_step(self, *a): pass
    def on_token_end(self): pass


def _decode(model, input_ids, params, valid, positions, key_valid, pad, eos, generator, on_token, hooks):
    B = input_ids.shape[0]
    device = input_ids.device
    cache = model.new_cache()
    out = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    hooks.begin_step(input_ids, valid, list(range(B)))
    logits = model(input_ids, positions=positions, cache=cache, key_valid=key_valid, last_only=True)
    hooks.on_token_end()
    next_pos = positions[:, -1:] + 1
    for step in range(params.max_new_tokens):
        tok = sample(logits[:, -1], params, generator)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out.append(tok[:, None])
        if on_token is not None:
            on_token(tok)
        if eos.numel():
            done = done | torch.isin(tok, eos)
            if bool(done.all()):
                break
        if step == params.max_new_tokens - 1:
            break
        if key_valid is not None:
            key_valid = torch.cat([key_valid, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
        hooks.begin_step(tok[:, None], (~done)[:, None], list(range(B)))
        logits = model(tok[:, None], positions=next_pos, cache=cache, key_valid=key_valid, last_only=True)
        hooks.on_token_end()
        next_pos = next_pos + 1
    return torch.cat(out, dim=1)
