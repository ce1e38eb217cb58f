"""Generation: prefill + decode with a KV cache, greedy or sampled, batches of mixed lengths.

Batches are left-padded: every row's last prompt token sits at the same index, padding keys are
masked out, and rotary positions count real tokens only, so a row generates exactly what it
would generate alone.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# The smallest positive float32 normal: a temperature or top_p below it cannot be represented
# in the float32 arithmetic of sampling (it would divide by zero or keep no token).
MIN_SAMPLING_VALUE = 1.1754943508222875e-38
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)          # what torch.Generator.manual_seed accepts


class SamplingError(ValueError):
    """A sampling value that cannot be sampled; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise SamplingError(name, f"{name} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise SamplingError(name, f"{name} must be a finite number, got {v!r}")
    return f


def validate_sampling(max_new_tokens=32, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                      repetition_penalty=1.0, min_p=0.0, min_new_tokens=0) -> None:
    """The checks every entry point shares (Python API, CLI, server, chat): raises
    `SamplingError` (a ValueError naming the field) for a value that cannot be sampled."""
    if not _is_int(max_new_tokens):
        raise SamplingError("max_new_tokens", f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if int(max_new_tokens) < 0:
        raise SamplingError("max_new_tokens", f"max_new_tokens must be >= 0, got {max_new_tokens}")
    t = _real("temperature", temperature)
    if t < 0:
        raise SamplingError("temperature", f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if 0 < t < MIN_SAMPLING_VALUE:
        raise SamplingError("temperature", f"temperature must be 0 (greedy) or at least "
                                           f"{MIN_SAMPLING_VALUE:.3g} (float32 cannot represent it), "
                                           f"got {temperature}")
    p = _real("top_p", top_p)
    if not 0 < p <= 1:
        raise SamplingError("top_p", f"top_p must be in (0, 1], got {top_p}")
    if p < MIN_SAMPLING_VALUE:
        raise SamplingError("top_p", f"top_p must be at least {MIN_SAMPLING_VALUE:.3g} "
                                     f"(float32 cannot represent it), got {top_p}")
    if not _is_int(top_k):
        raise SamplingError("top_k", f"top_k must be an integer, got {top_k!r}")
    if int(top_k) < 0:
        raise SamplingError("top_k", f"top_k must be >= 0 (0 = off), got {top_k}")
    if seed is not None:
        if not _is_int(seed):
            raise SamplingError("seed", f"seed must be an integer, got {seed!r}")
        if not SEED_RANGE[0] <= int(seed) <= SEED_RANGE[1]:
            raise SamplingError("seed", f"seed must be in [-2**63, 2**64 - 1], got {seed}")
    r = _real("repetition_penalty", repetition_penalty)
    if r < MIN_SAMPLING_VALUE:
        raise SamplingError("repetition_penalty", f"repetition_penalty must be > 0 (1 = off), "
                                                  f"got {repetition_penalty}")
    m = _real("min_p", min_p)
    if not 0 <= m <= 1:
        raise SamplingError("min_p", f"min_p must be in [0, 1] (0 = off), got {min_p}")
    if not _is_int(min_new_tokens):
        raise SamplingError("min_new_tokens", f"min_new_tokens must be an integer, got {min_new_tokens!r}")
    if int(min_new_tokens) < 0:
        raise SamplingError("min_new_tokens", f"min_new_tokens must be >= 0, got {min_new_tokens}")


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0        # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 -> off
    eos_token_id: int | Sequence[int] | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1 -> off; as HF: seen tokens' logits / it (x it when < 0)
    min_p: float = 0.0              # 0 -> off; tokens below min_p x the top probability go
    min_new_tokens: int = 0         # EOS is held back until this many tokens are out

    def __post_init__(self):
        validate_sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed,
                          self.repetition_penalty, self.min_p, self.min_new_tokens)
        self.max_new_tokens = int(self.max_new_tokens)
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.top_k = int(self.top_k)
        self.repetition_penalty = float(self.repetition_penalty)
        self.min_p = float(self.min_p)
        self.min_new_tokens = int(self.min_new_tokens)
        if self.seed is not None:
            self.seed = int(self.seed)
        try:
            _ = self.eos_ids          # builds the id list: raises for a malformed eos_token_id
        except (TypeError, ValueError):
            raise SamplingError("eos_token_id", f"eos_token_id must be an integer or a list of "
                                                f"integers, got {self.eos_token_id!r}") from None

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return [int(e)] if isinstance(e, int) else [int(i) for i in e]


    @property
    def processes(self) -> bool:
        """Whether `process` changes logits (a penalty, or EOS held back)."""
        return self.repetition_penalty != 1.0 or (self.min_new_tokens > 0 and bool(self.eos_ids))


# generation_config.json's keys taken as sampling defaults (by the server, as vLLM does, and by
# `generate` when it samples, as HF does), with the name a request gives each
_GEN_DEFAULTS = (("temperature", "temperature", float), ("top_p", "top_p", float),
                 ("top_k", "top_k", int), ("repetition_penalty", "repetition_penalty", float),
                 ("min_p", "min_p", float), ("max_new_tokens", "max_tokens", int))


def sampling_defaults(gen: dict) -> dict:
    """The sampling defaults a ``generation_config.json`` (`gen`, parsed) recommends (temperature,
    top_p, top_k, repetition_penalty, min_p, and max_new_tokens as max_tokens: the ones it
    sets, of the right type and usable; an unusable one is logged and left out), or {}."""
    out = {}
    for key, name, kind in _GEN_DEFAULTS:
        v = gen.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer()):
            out[name] = kind(v)
    if out.get("max_tokens", 1) < 1:
        out.pop("max_tokens")
    while True:
        try:
            SamplingParams(temperature=out.get("temperature", 1.0), top_p=out.get("top_p", 1.0),
                           top_k=max(out.get("top_k", 0), 0),
                           repetition_penalty=out.get("repetition_penalty", 1.0),
                           min_p=out.get("min_p", 0.0))
            return out
        except SamplingError as e:
            logging.getLogger("fmoe").warning("generation_config.json: %s; ignored", e)
            out.pop(e.param)



def process(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None,
            generated: int) -> torch.Tensor:
    """The logits processors that come before greedy or sampling, in HF's order: the repetition
    penalty (logits of the tokens in `seen` [B, V] bool, prompt and output, divided by it where
    positive, multiplied where negative), then EOS held back (-inf) while fewer than
    `min_new_tokens` tokens have been `generated`. logits [B, V] -> [B, V] (a new tensor when
    anything applies)."""
    if p.repetition_penalty != 1.0 and seen is not None:
        r = p.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * r, logits / r), logits)
    if generated < p.min_new_tokens and p.eos_ids:
        logits = logits.clone()
        eos = [e for e in p.eos_ids if 0 <= e < logits.shape[-1]]
        logits[:, eos] = float("-inf")
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
           seen: torch.Tensor | None = None, generated: int = 0) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] (greedy when temperature == 0), after `process`
    (`seen` [B, V] bool: the tokens the repetition penalty applies to; `generated`: tokens out
    so far). HF's order: temperature, top-k, top-p, min-p.

    Scaling works on `logits - max`, so any temperature float32 can represent gives finite
    probabilities (a tiny one tends to greedy); the most likely token always survives top-p
    and min-p."""
    if p.processes:
        logits = process(logits, p, seen, generated)
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        # as HF's top-p: sorted ascending, the least likely tokens whose mass stays within
        # 1 - top_p go; the most likely always stays. Same sort, same order among equal
        # logits: a tie at the cut keeps the token HF keeps, so seeded samples agree
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - p.top_p)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def seen_tokens(ids: torch.Tensor, valid: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """ids [B, T] long (and `valid` [B, T] bool: False on padding) -> [B, vocab] bool, True for
    the token ids a row holds (what the repetition penalty applies to)."""
    count = torch.zeros(ids.shape[0], vocab, dtype=torch.int32, device=ids.device)
    ones = (torch.ones_like(ids, dtype=torch.int32) if valid is None else valid.to(torch.int32))
    count.scatter_add_(1, ids.clamp(0, vocab - 1), ones)
    return count > 0


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


def context_length(model) -> int | None:
    """The model's context, or None when its config does not say: `max_position_embeddings`,
    or with YaRN the length it extends to (original_max_position_embeddings x factor) where
    that is more, as vLLM takes it (Qwen3's long-context recipe adds YaRN x4 over 32,768
    positions to a config that says 40,960). Other rope types stop at max_position_embeddings
    (dynamic NTK changes its frequencies beyond it, which fmoe does not compute)."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    if not (isinstance(n, numbers.Integral) and n > 0):
        return None
    rope = getattr(cfg, "rope", None)
    if getattr(rope, "type", None) == "yarn":
        orig, factor = rope.get("original_max_position_embeddings"), rope.get("factor")
        if isinstance(orig, numbers.Real) and isinstance(factor, numbers.Real) and factor > 1:
            n = max(n, int(orig * factor))
    return int(n)


def check_generate_inputs(model, input_ids, max_new_tokens: int, attention_mask=None) -> None:
    """Shape, dtype, vocabulary and context checks of a generation request (ValueError)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D LongTensor [batch, tokens], got "
                         f"{type(input_ids).__name__}{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.dtype not in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                         f"input_ids {tuple(input_ids.shape)}")
    if attention_mask is not None and T > 1 and max_new_tokens > 0:
        m = attention_mask.bool()
        if bool((m[:, :-1] & ~m[:, 1:]).any()):
            # a 0 after a 1: padding on the right, where the next token would follow a pad
            raise ValueError("attention_mask pads on the right; generation needs left padding "
                             "(padding_side='left' in HF tokenizers, or fmoe.runtime.engine.left_pad)")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, numbers.Integral) and input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {vocab})")
    ctx = context_length(model)
    if ctx is not None and T + max_new_tokens > ctx:
        raise ValueError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) is "
                         f"{T + max_new_tokens} tokens, beyond the model's context of {ctx}")


# -- the one decode loop: prefill, decode step, row operations ------------------------------------
class NoHooks:
    """The runtime hooks of a model without an offload runtime: all no-ops."""

    def on_request_start(self, *a): pass
    def on_request_end(self, *a): pass
    def begin_step(self, *a, **k): pass
    def on_token_end(self): pass


class DecodeBatch:
    """The state of a left-padded batch between forwards, shared by `generate` and the serving
    `Batcher`: every row's newest cached position sits at column ``S - 1`` of every cache tensor.

    cache: the model's `KVCache` (``seen`` = S). key_valid [B, S] bool: False on left padding.
    next_pos [B] long: the rotary position of each row's next token (its count of real tokens).
    padded: any False in `key_valid` (the forward then needs the mask).
    """

    def __init__(self, cache, key_valid: torch.Tensor, next_pos: torch.Tensor):
        self.cache = cache
        self.key_valid = key_valid
        self.next_pos = next_pos
        self.padded = not bool(key_valid.all())

    def __len__(self) -> int:
        return self.key_valid.shape[0]

    def keep(self, index: torch.Tensor) -> None:
        """Keep rows `index` [b] (long) and drop the leading columns that are padding in all of
        them: the cache, `key_valid` and `next_pos` alike."""
        kv = self.key_valid.index_select(0, index)
        first = first_valid_column(kv)
        self.cache.trim(first)
        self.cache.select(index)
        self.key_valid = kv[:, first:]
        self.next_pos = self.next_pos.index_select(0, index)
        self.padded = not bool(self.key_valid.all())

    def merge(self, other: "DecodeBatch") -> None:
        """Append the rows of `other` (a fresh prefill) below these rows; the side with fewer
        columns is left-padded (masked) so that both stay right-aligned."""
        S = max(self.cache.seen, other.cache.seen)
        self.cache.merge(other.cache)
        self.key_valid = torch.cat([pad_left(self.key_valid, S, False), pad_left(other.key_valid, S, False)], 0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.padded = not bool(self.key_valid.all())


def prefill(module, input_ids: torch.Tensor, valid: torch.Tensor, hooks,
            seq_ids: list, max_len: int | None = None, record: torch.Tensor | None = None,
            chunk: int | None = None) -> tuple[torch.Tensor, DecodeBatch]:
    """One forward over left-padded prompts on a fresh cache (`max_len`: its `KVCache.max_len`).

    input_ids [B, T] long, valid [B, T] bool (False on left padding); `hooks` get the step with
    `seq_ids` (one per row) and `record` [B, T] (default `valid`): the positions they count as
    new tokens. One prompt longer than `chunk` tokens is prefilled in forwards of `chunk`
    tokens over the growing cache (chunked prefill: its temporaries are bounded by the chunk;
    the rounding differs from one forward's). Returns (logits [B, V] of each row's last
    position, the batch)."""
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)        # real tokens before each column
    cache = module.new_cache()
    cache.max_len = max_len
    if chunk is not None and input_ids.shape[0] == 1 and input_ids.shape[1] > chunk and bool(valid.all()):
        return _prefill_chunks(module, input_ids, positions, cache, hooks, seq_ids, chunk, record)
    batch = DecodeBatch(cache, valid, positions[:, -1] + 1)
    hooks.begin_step(input_ids, valid if record is None else record, seq_ids)
    logits = module(input_ids, positions=positions, cache=cache, key_valid=valid if batch.padded else None,
                    last_only=True)
    hooks.on_token_end()
    return logits[:, -1], batch


def _prefill_chunks(module, input_ids, positions, cache, hooks, seq_ids, chunk: int,
                    record) -> tuple[torch.Tensor, DecodeBatch]:
    """`prefill` of one unpadded prompt [1, T] in forwards of `chunk` tokens. The hooks see one
    step per forward; a fresh prompt's chunks all count as prompt tokens (`prompt=True`), a
    resumed one's as `record` says."""
    T = input_ids.shape[1]
    for a in range(0, T, chunk):
        part = slice(a, min(a + chunk, T))
        if record is None:
            hooks.begin_step(input_ids[:, part], None, seq_ids, True)
        else:
            hooks.begin_step(input_ids[:, part], record[:, part], seq_ids)
        logits = module(input_ids[:, part], positions=positions[:, part], cache=cache, last_only=True)
        hooks.on_token_end()
    valid = torch.ones_like(input_ids, dtype=torch.bool)
    return logits[:, -1], DecodeBatch(cache, valid, positions[:, -1] + 1)


def decode_step(module, batch: DecodeBatch, tokens: torch.Tensor, hooks, seq_ids: list,
                live: torch.Tensor | None = None) -> torch.Tensor:
    """One forward of one new token per row: tokens [B] long -> logits [B, V].

    `live` [B] bool (default: all) tells the hooks which rows are real requests (finished rows
    of `generate` still run, padded); the new column is a valid key in every row."""
    ones = torch.ones(len(batch), 1, dtype=torch.bool, device=tokens.device)
    batch.key_valid = torch.cat([batch.key_valid, ones], 1)
    hooks.begin_step(tokens[:, None], ones if live is None else live[:, None], seq_ids)
    logits = module(tokens[:, None], positions=batch.next_pos[:, None], cache=batch.cache,
                    key_valid=batch.key_valid if batch.padded else None, last_only=True)
    hooks.on_token_end()
    batch.next_pos = batch.next_pos + 1
    return logits[:, -1]


def first_valid_column(valid: torch.Tensor) -> int:
    """Number of leading columns of `valid` [B, S] that are padding in every row."""
    any_valid = valid.any(0)
    if not bool(any_valid.any()):
        return valid.shape[1]
    return int(any_valid.to(torch.int8).argmax())


def pad_left(t: torch.Tensor, S: int, value) -> torch.Tensor:
    """[B, s, ...] -> [B, S, ...], new columns on the left filled with `value`."""
    s = t.shape[1]
    if s == S:
        return t
    pad = torch.full((t.shape[0], S - s) + tuple(t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], 1)


# -- generate: the Python API's loop -------------------------------------------------------------
@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, params: SamplingParams,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             hooks=None) -> torch.Tensor:
    """input_ids [B, T] (left-padded when `attention_mask` [B, T] marks padding with 0)
    -> [B, T + n], n <= max_new_tokens; rows that finished are filled with `pad_token_id`
    (default: the first EOS id, else 0). `on_token(ids [B])` sees every new step.
    `hooks` (the offload runtime) receives token boundaries."""
    check_generate_inputs(model, input_ids, params.max_new_tokens, attention_mask)
    B, T = input_ids.shape
    device = input_ids.device
    eos = torch.tensor(params.eos_ids, dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (params.eos_ids[0] if params.eos_ids else 0)
    valid = (attention_mask.bool() if attention_mask is not None
             else torch.ones(B, T, dtype=torch.bool, device=device))
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
        return _decode(model, input_ids, params, valid, pad, eos, generator, on_token, hooks)
    finally:
        for b in range(B):
            hooks.on_request_end(b)


def _decode(model, input_ids, params, valid, pad, eos, generator, on_token, hooks):
    B = input_ids.shape[0]
    rows = list(range(B))
    out = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits, batch = prefill(model, input_ids, valid, hooks, rows)
    seen = None
    if params.repetition_penalty != 1.0:
        # the prompt's tokens (not its left padding), then every token generated
        seen = seen_tokens(input_ids, valid, logits.shape[-1])
    for step in range(params.max_new_tokens):
        tok = sample(logits, params, generator, seen, step)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out.append(tok[:, None])
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        if on_token is not None:
            on_token(tok)
        if eos.numel():
            done = done | torch.isin(tok, eos)
            if bool(done.all()):
                break
        if step == params.max_new_tokens - 1:
            break
        logits = decode_step(model, batch, tok, hooks, rows, live=~done)
    return torch.cat(out, dim=1)
