"""`MoEModel`: what `fmoe.models.from_pretrained` returns. A family module, its experts backend
(resident or offloaded), the tokenizer when the checkpoint has one, and generation."""

from __future__ import annotations

import contextlib
import numbers
import sys
import threading
import weakref
from pathlib import Path

import torch
import torch.nn as nn

from ..models.checkpoint import drop_cached_pages
from ..models.loading import build_model, install_resident_experts, resolve
from .engine import (
    SamplingParams,
    check_generate_inputs,
    context_length,
    generate,
    sampling_defaults,
    validate_sampling,
)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float": torch.float32}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in ("auto", "none"):
        return None
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def check_device(device) -> torch.device:
    """`device` as a torch.device fmoe runs on ("cpu", "cuda", "cuda:N"), or ValueError naming
    it: checked before anything is read."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a device; use 'cpu' or 'cuda[:N]'") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available (this torch has no CUDA, "
                             "or no GPU is visible)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif d.type != "cpu":
        raise ValueError(f"device {device!r}: fmoe runs on 'cpu' or 'cuda[:N]'")
    return d


def _id_list(v) -> list[int]:
    if v is None:
        return []
    return [int(v)] if isinstance(v, int) else [int(x) for x in v]


def generation_defaults(gen: dict, root: Path, config) -> tuple[list[int], int | None]:
    """(eos ids, pad id or None) as HF generate takes them: `gen` (the checkpoint's
    ``generation_config.json``; chat models list their end-of-turn token there), else
    ``config.json``."""
    from .tokenizer import _read_json

    eos = gen.get("eos_token_id")
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    pad = gen.get("pad_token_id")
    if pad is None:
        pad = _read_json(Path(root) / "config.json").get("pad_token_id")
    try:
        return _id_list(eos), (None if pad is None else int(pad))
    except (TypeError, ValueError):
        from ..errors import ConfigError

        raise ConfigError(f"{root}: eos_token_id {eos!r} / pad_token_id {pad!r} are not token ids") from None



class _Unset:
    """A `generate` argument not passed (its default comes from generation_config.json)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


def _positive(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0

class MoEModel(nn.Module):
    def __init__(self, module: nn.Module, config, path: Path, device: torch.device,
                 dtype: torch.dtype, runtime=None, tokenizer=None):
        super().__init__()
        self.module = module
        self.config = config
        self.path = path
        self.device = device
        self.dtype = dtype
        self.runtime = runtime          # OffloadRuntime or None (all experts resident)
        self.tokenizer = tokenizer
        # generate's defaults, as HF's: generation_config.json ({} when none), else config.json
        from .tokenizer import read_generation_config

        self.generation_config = read_generation_config(Path(path))
        self.eos_token_ids, self.pad_token_id = generation_defaults(self.generation_config, path, config)
        self.sampling_defaults = sampling_defaults(self.generation_config)
        if self.sampling_defaults.get("top_k", 0) < 0:     # -1: vLLM's "off", HF's 0
            self.sampling_defaults["top_k"] = 0
        # one forward or generation at a time: the runtime's per-step state (pins, the policy's
        # request) is the model's; a second thread waits its turn instead of corrupting it
        self._lock = threading.Lock()
        self.closed = False
        # a model dropped without close() (HF code never calls it) still stops the runtime's
        # threads and frees its cache when it is collected (or at exit); close() runs it once
        self._finalize = weakref.finalize(self, runtime.close) if runtime is not None else None

    # -- lifetime ----------------------------------------------------------------------------
    def __enter__(self) -> "MoEModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _refuse_cast(self, what: str) -> None:
        raise TypeError(f"{what}: an fmoe model keeps the dtype and device it was loaded with (its "
                        f"expert cache and kernels are built for them); load it again with "
                        f"from_pretrained(..., dtype=..., device=...)")

    def to(self, *args, **kwargs):
        """Only to the dtype and device the model has (a no-op, as for HF code that calls
        ``.to(device)``); anything else is refused: load with ``dtype=`` / ``device=``."""
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, torch.Tensor):
                device, dtype = a.device, a.dtype
            elif isinstance(a, (str, torch.device, int)):
                device = a if not isinstance(a, int) else f"cuda:{a}"
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        mine = self.device if self.device.type != "cuda" or self.device.index is not None else \
            torch.device("cuda", 0)
        if (dtype is not None and dtype != self.dtype) or (device is not None and device != mine):
            self._refuse_cast(f".to({', '.join(map(repr, args))})")
        return self

    def half(self):
        return self.to(torch.float16)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def float(self):
        return self.to(torch.float32)

    def double(self):
        self._refuse_cast(".double()")

    def cuda(self, device=None):
        return self.to("cuda" if device is None else torch.device("cuda", device) if isinstance(device, int)
                       else device)

    def cpu(self):
        return self.to("cpu")

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the model is closed (MoEModel.close() was called); load it again")

    # -- forward -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """LongTensor [B, T] -> FloatTensor [B, T, vocab]; a full forward with no cache.
        `attention_mask` [B, T] (0 on left padding), as HF takes it: padded keys are masked and
        each row's positions start at its first real token."""
        self._check_open()
        if "cache" not in kwargs:
            check_generate_inputs(self, input_ids, 0, attention_mask)
        else:       # the positions the cache already holds count against the context too
            ctx, seen = context_length(self), getattr(kwargs["cache"], "seen", 0)
            if ctx is not None and seen + input_ids.shape[-1] > ctx:
                raise ValueError(f"the cache holds {seen} positions; {input_ids.shape[-1]} more is beyond "
                                 f"the model's context of {ctx}")
        with self._lock, self._recovering():
            return self._forward(input_ids, attention_mask, **kwargs)

    @contextlib.contextmanager
    def _recovering(self):
        """A forward or generation that does not finish (an error, Ctrl-C) leaves the offload
        runtime's cache as if nothing had been cached (`OffloadRuntime.recover`), so the next
        call computes what the resident model computes."""
        try:
            yield
        except BaseException:
            if self.runtime is not None:
                self.runtime.recover()
            raise

    def _forward(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            valid = attention_mask.to(self.device).bool()
            kwargs["key_valid"] = valid
            kwargs["positions"] = (valid.long().cumsum(-1) - 1).clamp(min=0)
        rt = self.runtime if "cache" not in kwargs else None
        if rt is not None:
            for b in range(input_ids.shape[0]):
                rt.on_request_start(b, None, input_ids[b].tolist())
            rt.begin_step(input_ids, None, list(range(input_ids.shape[0])))
        logits = self.module(input_ids, **kwargs)
        if rt is not None:
            rt.on_token_end()
            for b in range(input_ids.shape[0]):
                rt.on_request_end(b)
        return logits

    def new_cache(self):
        return self.module.new_cache()

    # -- generation ----------------------------------------------------------------------
    def resolve_sampling(self, do_sample=None, temperature=UNSET, top_p=UNSET, top_k=UNSET,
                         min_p=UNSET, repetition_penalty=UNSET) -> tuple:
        """`generate`'s sampling values, as HF resolves them: (temperature, top_p, top_k, min_p,
        repetition_penalty), temperature 0 for greedy. Greedy unless `do_sample` (or a
        temperature > 0); a value left UNSET comes from generation_config.json, else HF's
        default; None turns it off. Raises SamplingError for a value that cannot be sampled."""
        gen = self.sampling_defaults
        sample = bool(do_sample) if do_sample is not None else (
            temperature not in (UNSET, None) and _positive(temperature))

        def pick(name, value, unset, off):
            if value is UNSET:
                return gen.get(name, unset)
            return off if value is None else value

        repetition_penalty = pick("repetition_penalty", repetition_penalty, 1.0, 1.0)
        if sample:
            if temperature is UNSET and gen.get("temperature") == 0:
                # as HF: sampling at the config's temperature 0 is no distribution
                raise ValueError("do_sample: generation_config.json sets temperature 0 (greedy); "
                                 "pass a temperature to sample")
            temperature = pick("temperature", temperature, 1.0, 1.0)
            top_p = pick("top_p", top_p, 1.0, 1.0)
            top_k = pick("top_k", top_k, 50, 0)
            min_p = pick("min_p", min_p, 0.0, 0.0)
            validate_sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              repetition_penalty=repetition_penalty)
            if temperature == 0.0:      # do_sample with an explicit 0: sample at 1, as before
                temperature = 1.0
            return temperature, top_p, top_k, min_p, repetition_penalty
        # greedy: the sampling values are checked, not used
        temperature = 0.0 if temperature in (UNSET, None) else temperature
        top_p = 1.0 if top_p in (UNSET, None) else top_p
        top_k = 0 if top_k in (UNSET, None) else top_k
        min_p = 0.0 if min_p in (UNSET, None) else min_p
        validate_sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=repetition_penalty)
        return 0.0, top_p, top_k, min_p, repetition_penalty

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *, temperature=UNSET,
                 top_p=UNSET, top_k=UNSET, do_sample: bool | None = None,
                 eos_token_id=None, pad_token_id: int | None = None, attention_mask=None,
                 seed: int | None = None, on_token=None, repetition_penalty=UNSET,
                 min_p=UNSET, min_new_tokens: int = 0, max_length: int | None = None,
                 streamer=None) -> torch.Tensor:
        """LongTensor [B, T] -> [B, T + n]. Greedy unless `do_sample` (or a `temperature` > 0).
        Stops at `eos_token_id` (default: ``generation_config.json``'s, else ``config.json``'s);
        finished rows are filled with `pad_token_id` (default: likewise, else the first eos);
        left-padded batches need `attention_mask` [B, T] with 0 on padding.
        `repetition_penalty`, `min_p` and `min_new_tokens` work as HF's (1, 0 and 0: off);
        `max_length` (prompt + new tokens) as HF's, in place of `max_new_tokens`; `streamer`
        (HF's `TextStreamer` or anything with ``put(ids)`` and ``end()``) gets the prompt, then
        each new token, then ``end()``.

        A value not passed comes, as HF's, from ``generation_config.json`` (temperature, top_p,
        top_k, min_p when sampling; repetition_penalty always), else HF's default (temperature 1,
        top_k 50, top_p 1 when sampling). Its ``do_sample`` is not followed: greedy unless asked.
        None for a value: off (temperature 1 when sampling)."""
        temperature, top_p, top_k, min_p, repetition_penalty = self.resolve_sampling(
            do_sample, temperature, top_p, top_k, min_p, repetition_penalty)
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.as_tensor(attention_mask)
        if isinstance(eos_token_id, torch.Tensor):
            eos_token_id = eos_token_id.flatten().tolist()
        if max_length is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                check_generate_inputs(self, input_ids, 0)
            max_new_tokens = max(0, int(max_length) - input_ids.shape[1])
        if eos_token_id is None:
            eos_token_id = self.eos_token_ids
        if pad_token_id is None:
            pad_token_id = self.pad_token_id
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, eos_token_id, seed,
                                repetition_penalty, min_p, min_new_tokens)
        if not isinstance(input_ids, torch.Tensor):
            check_generate_inputs(self, input_ids, 0)       # names what a tensor should be
        self._check_open()
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        check_generate_inputs(self, ids, params.max_new_tokens, mask)   # before anything starts
        if streamer is not None:
            on_token = _stream_to(streamer, input_ids, on_token)
        with self._lock, self._recovering():
            try:
                return generate(self.module, ids, params, mask, pad_token_id, on_token, hooks=self.runtime)
            finally:
                if streamer is not None:
                    streamer.end()

    # -- experts -------------------------------------------------------------------------
    def expert_stats(self) -> dict:
        if self.runtime is not None:
            return self.runtime.stats()
        shp = self.config.experts
        n = shp.num_layers * shp.num_experts
        # every expert resident and ready: each use a hit (memory-mapped ones are the page
        # cache's business: not counted)
        hits = sum(int(u) for u in self._resident_uses())
        return {"capacity": n, "resident_peak": n, "hits": hits, "misses": 0, "prefetched": 0,
                "prefetch_used": 0, "bytes_loaded": 0, "stall_seconds": 0.0, "policy_seconds": 0.0,
                "host_computed": 0}

    def _resident_uses(self) -> list[torch.Tensor]:
        return [b.experts.uses for b in self.module.moe_blocks() if hasattr(b.experts, "uses")]

    def reset_expert_stats(self) -> None:
        if self.runtime is not None:
            self.runtime.reset_stats()
        with torch.inference_mode():    # made (or last updated) under inference mode
            for u in self._resident_uses():
                u.zero_()

    def close(self) -> None:
        """Stop the runtime's threads and write what it keeps (a trace, a map store); the model
        cannot be used afterwards. Idempotent."""
        self.closed = True
        if self._finalize is not None:
            self._finalize()            # runtime.close(), once


def _stream_to(streamer, input_ids, on_token):
    """An `on_token` that feeds HF's streamer protocol: the prompt first (``put(ids [1, T])``,
    which ``skip_prompt`` streamers drop), then each step's ids [B]."""
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] > 1:
        raise ValueError("streamer streams one row; generate a batch without it (or use on_token)")
    streamer.put(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else torch.as_tensor(input_ids))

    def put(ids: torch.Tensor) -> None:
        streamer.put(ids.cpu())
        if on_token is not None:
            on_token(ids)
    return put


# the keyword arguments from_pretrained passes on to the offload runtime
RUNTIME_ARGS = frozenset({"link_bandwidth", "host_cache", "trace_path", "policy_options",
                          "prefetch_distance", "map_store", "hardware_profile", "execution",
                          "host_workers"})


# HF transformers' from_pretrained arguments: what each means here
_HF_ARGS = {
    "device_map": "place the model with device='cpu' or device='cuda[:N]' (one device; routed "
                  "experts beyond the memory go in expert_cache=...)",
    "revision": "download that revision (huggingface_hub.snapshot_download(repo, revision=...)) "
                "and pass its local path",
    "cache_dir": "download with huggingface_hub (cache_dir=...) and pass the local path",
    "token": "log in with `huggingface-cli login` (or HF_TOKEN), then pass the repo id",
    "local_files_only": "set HF_HUB_OFFLINE=1: a hub id then resolves from the local cache only",
    "attn_implementation": "fmoe's model files compute attention themselves",
    "quantization_config": "fmoe serves checkpoints as published (fp32, bf16, fp16, FP8 "
                           "block-scaled); it does not quantise at load",
    "load_in_8bit": "fmoe does not quantise at load", "load_in_4bit": "fmoe does not quantise at load",
}
# HF arguments that change nothing here: accepted and ignored (no remote code ever runs; loading
# is always lazy per tensor; only safetensors are read)
_HF_NO_OPS = frozenset({"trust_remote_code", "low_cpu_mem_usage", "use_safetensors"})


def load(name_or_path, device="cpu", dtype=None, expert_cache=None, policy="fmoe", **kwargs) -> MoEModel:
    from .policies import check_execution, policy_class, policy_names

    if "torch_dtype" in kwargs:          # HF's older name of dtype
        if dtype is not None:
            raise TypeError("from_pretrained() got both dtype and torch_dtype; pass dtype")
        dtype = kwargs.pop("torch_dtype")
    for k in _HF_NO_OPS & set(kwargs):
        kwargs.pop(k)
    if isinstance(policy, str) and policy_class(policy) is None and policy_class(policy.lower()) is not None:
        policy = policy.lower()
    if isinstance(policy, str) and policy_class(policy) is None:
        # checked with or without a cache: a typo is an error, not a silent default
        raise ValueError(f"unknown policy {policy!r}; choose one of {policy_names()}")
    unknown = sorted(set(kwargs) - RUNTIME_ARGS)
    if unknown:
        name = unknown[0]
        hint = f": {_HF_ARGS[name]}" if name in _HF_ARGS else ""
        accepted = sorted({"device", "dtype", "expert_cache", "policy"} | RUNTIME_ARGS)
        raise TypeError(f"from_pretrained() got an unexpected keyword argument {name!r}{hint} "
                        f"(accepted: {', '.join(accepted)})")
    from .offload import cache_form

    full_for_trace = expert_cache is None and kwargs.get("trace_path") is not None
    if full_for_trace:
        # routing is recorded by the offload runtime: one that keeps every expert (exact, as
        # the resident model)
        expert_cache = 1.0
    # its form, before anything is read
    kind = None if expert_cache is None else cache_form(expert_cache)[0]
    device = check_device(device)
    dtype = parse_dtype(dtype)
    execution = check_execution(kwargs.pop("execution", "load"))
    if execution != "load":
        # with every expert resident there is no miss to place: host/hybrid change nothing
        kwargs["execution"] = execution
    root = resolve(name_or_path)
    cfg, module, index, layouts, dtype, reader = build_model(root, device, dtype)
    if full_for_trace:
        if device.type == "cpu":
            from ..models.mapped import experts_fit
            from .memory import memory_limit

            free = memory_limit().available
            if not experts_fit(layouts, dtype, free):
                raise ValueError(f"trace_path without an expert_cache records through a cache of "
                                 f"every expert, and they do not fit in the {free / 2**30:.1f} GiB "
                                 f"this process may use: pass expert_cache='auto'")
        print("fmoe: trace_path records through a cache of every expert (expert_cache=1.0)",
              file=sys.stderr, flush=True)
    runtime = None
    mapped = kind == "mmap"
    if expert_cache is None or mapped:
        kwargs.pop("execution", None)
        kwargs.pop("host_workers", None)
        given = sorted(k for k, v in kwargs.items() if v is not None)     # None: not given
        if given:
            raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} a "
                             f"managed expert cache (expert_cache=a fraction, a count, a size or "
                             f"'auto')")
        kwargs = {}
        if not mapped and device.type == "cpu":
            from ..models.mapped import experts_fit
            from .memory import memory_limit

            # a model larger than memory runs from the page cache instead of being OOM-killed
            free = memory_limit().available
            mapped = not experts_fit(layouts, dtype, free)
            if mapped:
                print(f"fmoe: the routed experts do not fit in the {free / 2**30:.1f} GiB this process "
                      f"may use: memory-mapping them (the page cache decides what stays); "
                      f"expert_cache='auto' keeps a managed cache instead", file=sys.stderr, flush=True)
        if mapped:
            if device.type != "cpu":
                raise ValueError(f"expert_cache='mmap' runs on the CPU only, not {device}")
            if layouts[0][0].quantized:
                # a mapped expert is used in place, and FP8 weights need dequantising first
                raise ValueError(f"{root}: memory-mapped experts cannot serve an FP8 checkpoint; use "
                                 f"expert_cache='auto' (or a fraction), or convert it with --dtype bfloat16")
            if any(lay.dtype != dtype for row in layouts for lay in row):
                raise ValueError(f"memory-mapped experts compute in the checkpoint's dtype "
                                 f"({layouts[0][0].dtype}); pass dtype=None or that dtype, or use "
                                 f"expert_cache='auto'")
            from ..models.mapped import install_mapped_experts

            install_mapped_experts(module, cfg, layouts)
        else:
            install_resident_experts(module, cfg, layouts, reader, device, dtype)
        reader.close()
    else:
        from .offload import OffloadRuntime

        runtime = OffloadRuntime(module, cfg, layouts, reader, device=device, dtype=dtype,
                                 expert_cache=expert_cache, policy=policy, **kwargs)
        if runtime.recorder is not None:
            runtime.recorder.model = str(name_or_path)   # the hub id (or path) the user gave
    if not mapped:
        # the weights now live in the model's own memory: their cached file pages would only
        # crowd out the expert cache (and count against a memory cgroup until reclaimed)
        drop_cached_pages({info.file for info in index.tensors.values()})
    if dtype == torch.bfloat16 and device.type == "cpu":
        from ..kernels.cpu_gemv import warm

        warm()      # the decode kernel's first call loads numba: here, not in the first token
    tokenizer = None
    if (root / "tokenizer.json").exists():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(root)
    return MoEModel(module, cfg, root, device, dtype, runtime, tokenizer)

