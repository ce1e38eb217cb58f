"""`fmoe bench`: batch-1 generation benchmark, on the model's own routing or on a replayed trace.

With a trace, each of the first N sequences is replayed one token per step through the KV cache
(fed the trace's token ids when it has them, random ids otherwise), and every MoE layer routes
to the experts the trace recorded for that token. Without one, the model routes by itself over a
random prompt of P tokens (one prefill step) followed by N greedy tokens. Either way, the greedy
next-token id of every step goes into `output_sha256`, so contenders can be compared for equal
output, and each sequence's first step is excluded from the steady-state `tokens_per_s`.
"""

from __future__ import annotations

import hashlib
import resource
import statistics
import sys
import time

import torch

from ..runtime.engine import NoHooks


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_bench(model, *, trace=None, sequences: int = 1, prompt_tokens: int = 32, new_tokens: int = 64,
              max_tokens: int | None = None, seed: int = 0, log=None) -> dict:
    """Run the benchmark on a loaded `MoEModel`; returns the result dict (see CONTRACT)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    hooks = model.runtime if model.runtime is not None else NoHooks()
    device = model.device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    replay = None
    if trace is not None:
        from .replay import attach_replay

        replay = attach_replay(model, trace)
        sequences = min(sequences, trace.num_sequences)
    model.reset_expert_stats()
    greedy: list[int] = []
    first_times: list[float] = []     # each sequence's first step (its time to first token)
    step_times: list[float] = []      # every later step
    prefill_rates: list[float] = []
    t_start = time.perf_counter()
    for n in range(sequences):
        cache = model.new_cache()
        if replay is not None:
            sl = trace.sequence(n)
            if max_tokens is not None:
                sl = slice(sl.start, min(sl.stop, sl.start + max_tokens))
            if trace.token_ids is not None:
                ids = (torch.as_tensor(trace.token_ids[sl].astype("int64")) % vocab).tolist()
            else:
                ids = torch.randint(0, vocab, (sl.stop - sl.start,), generator=gen).tolist()
            hooks.on_request_start(0, None, ids[:1])
            for i, t in enumerate(range(sl.start, sl.stop)):
                replay.set_token(t)
                x = torch.tensor([[ids[i]]], device=device)
                t0 = time.perf_counter()
                hooks.begin_step(x, torch.ones_like(x, dtype=torch.bool), [0])
                logits = model.module(x, positions=torch.tensor([[i]], device=device), cache=cache,
                                      last_only=True)
                hooks.on_token_end()
                greedy.append(int(logits[0, -1].argmax()))
                _sync(device)
                (first_times if i == 0 else step_times).append(time.perf_counter() - t0)
            replay.set_token(None)
        else:
            prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=gen).to(device)
            hooks.on_request_start(0, None, prompt[0].tolist())
            t0 = time.perf_counter()
            hooks.begin_step(prompt, torch.ones_like(prompt, dtype=torch.bool), [0])
            logits = model.module(prompt, cache=cache, last_only=True)
            hooks.on_token_end()
            tok = int(logits[0, -1].argmax())
            _sync(device)
            dt = time.perf_counter() - t0
            first_times.append(dt)
            prefill_rates.append(prompt_tokens / dt)
            greedy.append(tok)
            for i in range(new_tokens - 1):
                x = torch.tensor([[tok]], device=device)
                t0 = time.perf_counter()
                hooks.begin_step(x, torch.ones_like(x, dtype=torch.bool), [0])
                logits = model.module(x, positions=torch.tensor([[prompt_tokens + i]], device=device),
                                      cache=cache, last_only=True)
                hooks.on_token_end()
                tok = int(logits[0, -1].argmax())
                _sync(device)
                step_times.append(time.perf_counter() - t0)
                greedy.append(tok)
        hooks.on_request_end(0)
        done = len(step_times)
        rate = done / sum(step_times) if step_times else float("nan")
        log(f"bench: sequence {n + 1}/{sequences} done, {done} steady tokens, {rate:.3f} tokens/s "
            f"({time.perf_counter() - t_start:.0f} s)")
    stats = model.expert_stats()
    uses = stats["hits"] + stats["misses"]
    result = {
        "tokens": len(step_times),
        "tokens_per_s": len(step_times) / sum(step_times) if step_times else None,
        "ttft_s": statistics.median(first_times) if first_times else None,
        "step_ms_median": 1e3 * statistics.median(step_times) if step_times else None,
        "sequences": sequences,
        "hit_rate": stats["hits"] / uses if uses else None,
        "hits": stats["hits"], "misses": stats["misses"],
        "prefetched": stats["prefetched"], "prefetch_used": stats["prefetch_used"],
        "bytes_loaded": stats["bytes_loaded"],
        "stall_seconds": stats["stall_seconds"],
        "policy_seconds": stats["policy_seconds"],
        "host_computed": stats.get("host_computed", 0),
        "peak_rss_bytes": _peak_rss(),
        "capacity": stats["capacity"],
        "output_sha256": hashlib.sha256(",".join(map(str, greedy)).encode()).hexdigest(),
        "routing": replay.label if replay is not None else "model",
        "wall_seconds": time.perf_counter() - t_start,
    }
    if prefill_rates:
        result["prefill_tokens_per_s"] = statistics.median(prefill_rates)
    if replay is not None:
        log(f"bench: routing replayed from {trace.path.name if trace.path else 'trace'}")
    return result


def _context(root) -> int | None:
    """The checkpoint's context (`max_position_embeddings` as its family reads it, default
    included) from its config.json alone: checked before any weight is read."""
    from ..models.config import build_config, read_config_json
    from ..models.registry import family_for

    raw = read_config_json(root)
    config_cls, _ = family_for(raw.get("model_type")).load()
    n = getattr(build_config(config_cls, raw, str(root / "config.json")), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def bench_from_args(args) -> dict:
    from ..models import from_pretrained
    from ..models.loading import resolve
    from ..runtime.lm import parse_dtype

    # every check before the model is loaded: a bad flag costs no load and no measurement
    if args.sequences < 1:
        raise ValueError(f"--sequences must be >= 1, got {args.sequences}")
    if args.prompt_tokens < 1 or args.new_tokens < 1:
        raise ValueError("--prompt-tokens and --new-tokens must be >= 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_tokens is not None and not args.routing_trace:
        raise ValueError("--max-tokens caps the replayed sequences: it needs --routing-trace "
                         "(without one, --new-tokens sets the length)")
    from ..runtime.offload import cache_form

    cache = args.expert_cache           # (--threads >= 1: its parser type)
    mapped = cache is not None and cache_form(cache)[0] == "mmap"
    if cache is None and args.policy is not None:
        print(f"fmoe bench: --policy {args.policy} changes nothing without --expert-cache (every "
              "expert is resident)", file=sys.stderr)
        args.policy = None
    if cache is None or mapped:
        # every expert resident, or memory-mapped (the page cache decides what stays): no cache
        # for these flags to manage, and a policy would silently change nothing
        why = ("without it every expert is resident and there is no cache to manage" if cache is None
               else "a fraction, a count, a size or auto; with mmap the page cache decides what stays")
        for flag, given in (("--policy", args.policy is not None), ("--policy-option", bool(args.policy_option)),
                            ("--prefetch-distance", args.prefetch_distance is not None),
                            ("--hardware-profile", args.hardware_profile is not None),
                            (f"--execution {args.execution}", args.execution != "load")):
            if given:
                raise ValueError(f"{flag} needs {'a managed ' if mapped else ''}--expert-cache ({why})")
    policy = None if cache is None or mapped else (args.policy or "fmoe")
    if args.hardware_profile is not None:
        from ..sim.hardware import UnknownHardwareError, load_profile

        try:
            load_profile(args.hardware_profile)
        except UnknownHardwareError as e:
            raise ValueError(f"--hardware-profile: {e}") from None
    trace = None
    if args.routing_trace:
        from ..sim.trace import load_trace

        trace = load_trace(args.routing_trace, texts=False, gate_probs=False)
    root = resolve(args.model)
    ctx = _context(root)
    if ctx is not None and trace is None and args.prompt_tokens + args.new_tokens > ctx:
        raise ValueError(f"--prompt-tokens {args.prompt_tokens} plus --new-tokens {args.new_tokens} is "
                         f"{args.prompt_tokens + args.new_tokens} tokens, beyond the model's context of "
                         f"{ctx} (max_position_embeddings)")
    if ctx is not None and trace is not None:
        # each replayed sequence runs through one KV cache, one position per token
        n = min(args.sequences, trace.num_sequences)
        longest = max((trace.sequence(i).stop - trace.sequence(i).start for i in range(n)), default=0)
        if args.max_tokens is not None:
            longest = min(longest, args.max_tokens)
        if longest > ctx:
            raise ValueError(f"--routing-trace: a replayed sequence has {longest} tokens, beyond the "
                             f"model's context of {ctx} (max_position_embeddings); cap it with "
                             f"--max-tokens {ctx}")
    kwargs = {}
    if mapped:
        kwargs["expert_cache"] = cache
    elif cache is not None:
        kwargs.update(expert_cache=cache, policy=policy)
        if args.policy_option:
            from ..sim.cli import parse_policy_options

            kwargs["policy_options"] = parse_policy_options(args.policy_option)
        if args.prefetch_distance is not None:
            kwargs["prefetch_distance"] = args.prefetch_distance
        if args.hardware_profile is not None:
            kwargs["hardware_profile"] = args.hardware_profile      # refused where it does nothing
    if args.execution != "load":
        kwargs["execution"] = args.execution
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = from_pretrained(root, device=args.device, dtype=parse_dtype(args.dtype), **kwargs)
    load_s = time.perf_counter() - t0
    print(f"bench: loaded {args.model} in {load_s:.1f} s (expert_cache={args.expert_cache}, "
          f"policy={policy or ('page cache' if mapped else 'resident')}, "
          f"capacity {model.expert_stats()['capacity']})", file=sys.stderr, flush=True)
    try:
        result = run_bench(model, trace=trace, sequences=args.sequences, prompt_tokens=args.prompt_tokens,
                           new_tokens=args.new_tokens, max_tokens=args.max_tokens, seed=args.seed)
    finally:
        model.close()
    result.update(load_seconds=load_s, model=str(args.model), device=args.device,
                  dtype=str(model.dtype).replace("torch.", ""), expert_cache=args.expert_cache,
                  policy=policy,
                  execution=args.execution, threads=torch.get_num_threads())
    rate = result["tokens_per_s"]
    print(f"bench: {result['tokens']} tokens at {rate or 0:.3f} tokens/s, ttft {result['ttft_s']:.3f} s, "
          f"hit rate {result['hit_rate'] if result['hit_rate'] is not None else 'n/a'}, "
          f"routing {result['routing']}", file=sys.stderr, flush=True)
    return result

