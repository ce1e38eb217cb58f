"""The `fmoe` command. Errors that name the problem print as one line and exit non-zero."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local checkpoint directory or hub repo id")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument("--expert-cache", default=None,
                   help="routed experts on the device: fraction (0.25), count (96), bytes (8GiB), auto "
                        "(the largest cache the memory allows) or mmap (CPU: memory-mapped, the page "
                        "cache decides); default: all resident")
    p.add_argument("--policy", default=None,
                   help="cache policy: fmoe, lru, lfu, moe-infinity (default: fmoe; needs --expert-cache)")
    p.add_argument("--link-bandwidth", default=None,
                   help="emulate a host->device link on CPU, e.g. 25GB/s (figures are emulated)")
    p.add_argument("--trace-out", default=None,
                   help="record the routing of this run as a trace (format v1) at this path; "
                        "needs --expert-cache (1.0 keeps every expert)")


def _load(args, map_store=None):
    from ..models import from_pretrained

    kwargs = {} if map_store is None else {"map_store": map_store}
    from ..runtime.offload import cache_form

    cache = args.expert_cache
    mapped = cache is not None and cache_form(cache)[0] == "mmap"
    trace_out = getattr(args, "trace_out", None)
    if cache is None and args.policy is not None:
        print(f"fmoe {args.command}: --policy {args.policy} changes nothing without --expert-cache "
              "(every expert is resident)", file=sys.stderr)
        args.policy = None
    if cache is None or mapped:
        # resident or memory-mapped experts: no cache for these flags to manage
        for flag, value in (("--policy", args.policy), ("--link-bandwidth", args.link_bandwidth),
                            ("--map-store", map_store), ("--trace-out", trace_out if mapped else None)):
            if value is not None:
                raise ValueError(f"{flag} needs --expert-cache with a managed cache (a fraction, a count, "
                                 f"a size or auto{'' if cache is None else '; not mmap'}; 1.0 keeps "
                                 f"every expert on the device)")
        if mapped:
            kwargs["expert_cache"] = cache
    else:
        kwargs.update(expert_cache=cache, policy=args.policy or "fmoe")
        if args.link_bandwidth is not None:
            kwargs["link_bandwidth"] = args.link_bandwidth
    if trace_out:
        kwargs["trace_path"] = trace_out            # without a cache: one of every expert
    return from_pretrained(args.model, device=args.device, dtype=args.dtype, **kwargs)


def check_sampling_flags(args) -> None:
    """The shared sampling checks (`fmoe.runtime.engine.validate_sampling`), worded with flags."""
    from ..runtime.engine import SamplingError, validate_sampling

    def given(value, default):
        return default if value is None else value
    try:
        validate_sampling(args.max_new_tokens, given(args.temperature, 0.0), given(args.top_p, 1.0),
                          given(args.top_k, 0), args.seed, given(args.repetition_penalty, 1.0),
                          given(args.min_p, 0.0))
    except SamplingError as e:
        flag = "--" + e.param.replace("_", "-")
        raise ValueError(str(e).replace(e.param, flag, 1)) from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags of `fmoe generate` and `fmoe chat`. One left out takes the value
    `from_pretrained(...).generate` would: generation_config.json's, else HF's default."""
    p.add_argument("--temperature", type=float, default=None,
                   help="sample at this temperature (default: greedy; 0: greedy)")
    p.add_argument("--top-p", type=float, default=None,
                   help="when sampling: nucleus mass (default: generation_config.json's, else 1)")
    p.add_argument("--top-k", type=int, default=None,
                   help="when sampling: keep the k likeliest (default: generation_config.json's, else "
                        "50, as HF; 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide the logits of tokens already in the prompt or output by this, as HF "
                        "(default: generation_config.json's, else 1, off)")
    p.add_argument("--min-p", type=float, default=None,
                   help="when sampling: drop tokens below this fraction of the likeliest one's "
                        "probability (default: generation_config.json's, else 0, off)")


def sampling_kwargs(args) -> dict:
    """The sampling flags given, as `generate` keywords (the others are left to it)."""
    names = ("temperature", "top_p", "top_k", "repetition_penalty", "min_p")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def cmd_demo(args) -> int:
    from .demo import run

    return run(prompt=args.prompt, max_new_tokens=args.max_new_tokens, expert_cache=args.expert_cache,
               policy=args.policy)


def cmd_generate(args) -> int:
    import torch

    from ..runtime.engine import check_generate_inputs
    from ..runtime.text_stream import TextStream

    # the checks the Python API and the server share, before anything is loaded
    check_sampling_flags(args)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"--prompt is not valid text (undecodable {args.prompt[e.start]!r} at "
                         f"character {e.start})") from None
    model = _load(args)
    try:                # closed on any exit: a trace or a map store is written either way
        tok = model.tokenizer
        if tok is None:
            raise ValueError(f"{args.model}: no tokenizer.json beside the checkpoint")
        text = args.prompt
        if args.chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}])
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(text)
        check_generate_inputs(model.module, torch.tensor([ids]), args.max_new_tokens)
        # the text as it becomes final (a character split across tokens waits for its last
        # byte), and the rest once generation ends
        out = TextStream(tok, prompt_ids=ids, eos_token_ids=model.eos_token_ids)

        def stream(t: torch.Tensor) -> None:
            delta, _ = out.push(int(t[0]))
            if delta:
                sys.stdout.write(delta)
                sys.stdout.flush()

        sys.stdout.write(args.prompt if not args.chat else "")
        model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, seed=args.seed,
                       on_token=stream, **sampling_kwargs(args))
        sys.stdout.write(out.flush() + "\n")
        sys.stdout.flush()
        if args.stats:
            print(model.expert_stats(), file=sys.stderr)
    finally:
        model.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmoe", description="Serve MoE models with offloaded experts.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate with a small random model, offloaded, and check it is lossless")
    p.add_argument("--prompt", default="Offloading keeps attention on the device and")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--expert-cache", default="0.25")
    p.add_argument("--policy", default="fmoe", help="cache policy (default: fmoe)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate text from a prompt, streaming to the terminal")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_sampling_args(p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--stats", action="store_true", help="print expert cache figures to stderr")
    p.set_defaults(func=cmd_generate)

    # sub-commands that live in their own packages register themselves when present
    for mod in ("fmoe.sim.cli", "fmoe.serve.server", "fmoe.models.convert_cli", "fmoe.bench.cli"):
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            if e.name and e.name.startswith(mod):
                continue
            raise
        m.register(sub)
    # --debug after the sub-command too; SUPPRESS keeps a sub-command's default from overwriting
    # a --debug given before it (dict.fromkeys: an alias names the same parser twice)
    for p in dict.fromkeys(sub.choices.values()):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs (partial outputs removed, models
    closed) as for Ctrl-C; Python's default action ends the process at once."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # only over the default action (an ignored SIGTERM stays ignored; a caller's handler stays);
    # `fmoe serve` drains on its own
    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if ours:
        signal.signal(signal.SIGTERM, _terminate)
    terminated = False
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Terminated:
        print(f"fmoe {args.command}: terminated", file=sys.stderr)
        terminated = True
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, as other command-line tools do; what
        # is still buffered for stdout goes nowhere instead of raising again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # one line naming the problem; --debug for the traceback
        if args.debug:
            raise
        from ..errors import FmoeError

        kind = "" if isinstance(e, (FmoeError, ValueError)) else f"{type(e).__name__}: "
        print(f"fmoe {args.command}: error: {kind}{e}", file=sys.stderr)
        return 1
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if terminated:
                # cleaned up: now end as the signal's default action would (the exit status a
                # supervisor expects, and an in-process caller is not left running)
                signal.raise_signal(signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
