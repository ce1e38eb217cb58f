"""`fmoe chat`: an interactive chat in the terminal over the serving engine (the same batching
loop, sampling and stop handling as `fmoe serve`, run synchronously in this process).

Each line read from stdin is a user turn; the reply streams to stdout. ``/reset`` clears the
conversation, ``/exit`` (or end of input) quits. The conversation is rendered with the
checkpoint's chat template.
"""

from __future__ import annotations

import sys


def cmd_chat(args) -> int:
    from ..runtime.batching import Batcher, Sequence
    from ..runtime.engine import SamplingParams
    from ..runtime.text_stream import TextStream
    from .cli import check_sampling_flags, sampling_kwargs
    from .server import load_model

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_sampling_flags(args)
    model = load_model(args)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{args.model}: no tokenizer.json beside the checkpoint")
    if not tok.chat_template:
        raise ValueError(f"{args.model}: the tokenizer has no chat_template; use `fmoe generate`")
    from ..runtime.engine import context_length

    ctx = context_length(model) or 4096
    # the values `generate` would take (generation_config.json's for the flags left out)
    temperature, top_p, top_k, min_p, penalty = model.resolve_sampling(**sampling_kwargs(args))
    eos = list(getattr(model, "eos_token_ids", None) or tok.eos_token_ids)     # as generate's
    batcher = Batcher(model, max_batch=1)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):
        # undecodable bytes arrive as lone surrogates (checked per line below) instead of a
        # UnicodeDecodeError that would lose the rest of the buffered input
        sys.stdin.reconfigure(errors="surrogateescape")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    turn = 0
    try:
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:   # the tokenizer takes text only: skip the line, not the session
                c = ord(line[e.start])
                what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else repr(line[e.start])
                print(f"fmoe chat: skipped a line that is not valid text (undecodable {what} at "
                      f"character {e.start})", file=sys.stderr)
                continue
            if not line.strip():
                continue
            if line.strip() == "/exit":
                break
            if line.strip() == "/reset":
                history = history[:1] if args.system else []
                continue
            # the oldest exchanges go (the system message stays) until a reply has room: up to
            # --max-new-tokens, or half the context (llama.cpp's context shift, turn by turn)
            keep, dropped = (1 if args.system else 0), 0
            want = min(args.max_new_tokens, ctx // 2)
            while True:
                messages = history + [{"role": "user", "content": line}]
                ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
                room = ctx - len(ids)
                if room >= want or len(history) <= keep:
                    break
                history = history[:keep] + history[keep + 2:]
                dropped += 1
            if dropped:
                print(f"fmoe chat: dropped the {dropped} oldest exchange(s) to fit the context ({ctx} "
                      "tokens)", file=sys.stderr)
            if room < 1:
                print(f"fmoe chat: the message ({len(ids)} tokens with the template) fills the context "
                      f"({ctx}) by itself", file=sys.stderr)
                continue
            seed = None if args.seed is None else args.seed + turn
            params = SamplingParams(min(args.max_new_tokens, room), temperature, top_p, top_k, eos,
                                    seed, penalty, min_p)
            stream = TextStream(tok, args.stop or (), prompt_ids=ids, eos_token_ids=eos)
            gone = []               # the reader of stdout went away (`| head`)

            def on_token(seq, t, stream=stream, gone=gone):
                delta, stop = stream.push(t)
                try:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                except BrokenPipeError:
                    gone.append(True)
                    return True     # stop this reply; the session ends quietly below
                return stop

            seq = Sequence(ids, params, on_token=on_token)
            batcher.submit(seq)
            try:
                batcher.run_until_idle()
            except KeyboardInterrupt:
                if not interactive:
                    raise
                # Ctrl-C stops the reply, not the session (as llama.cpp's interactive mode):
                # the turn is dropped and a fresh batcher takes the next one
                batcher.close()
                batcher = Batcher(model, max_batch=1)
                sys.stdout.write(stream.flush() + "\n")
                print("fmoe chat: reply interrupted (not kept); Ctrl-C at the prompt or Ctrl-D ends "
                      "the session", file=sys.stderr)
                continue
            if gone:
                raise BrokenPipeError
            sys.stdout.write(stream.flush() + "\n")
            sys.stdout.flush()
            if seq.finish_reason == "error":
                raise RuntimeError(seq.error)
            history = messages + [{"role": "assistant", "content": stream.text}]
            turn += 1
            if args.stats:
                print(model.expert_stats(), file=sys.stderr)
    finally:
        batcher.close()
        model.close()
    return 0


def register(subparsers) -> None:
    from .cli import _add_model_args, add_sampling_args

    p = subparsers.add_parser("chat", help="chat with a model in the terminal (one line = one turn)")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    add_sampling_args(p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--map-store", default=None, help="expert-map store file kept across restarts")
    p.add_argument("--stats", action="store_true", help="print expert cache figures after each reply")
    p.set_defaults(func=cmd_chat)
