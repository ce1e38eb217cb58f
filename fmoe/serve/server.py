"""`fmoe serve`: the command that runs the OpenAI-compatible server (`fmoe.serve.app`) on uvicorn
over the continuous-batching engine (`fmoe.runtime.batching`).

Threads: one background thread owns the model and runs the batching loop (`Batcher.start`); the
async handlers submit sequences to it (`fmoe.serve.jobs`). The port is bound before the model
loads, so a taken port fails at once; SIGTERM and SIGINT drain the running requests
(`GracefulServer`) before the map store and the trace are written.
"""

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("fmoe.serve")


def load_model(args):
    """Load MODEL with the shared model flags (and --map-store when given, after checking that
    whatever is at that path is an expert-map store of this model: fmoe never overwrites a
    file it did not write)."""
    from .cli import _load

    map_store = getattr(args, "map_store", None)
    if map_store is not None:
        check_map_store(map_store)
    model = _load(args, map_store=map_store)
    shp = getattr(getattr(model, "config", None), "experts", None)
    if map_store is not None and shp is not None:
        try:
            check_map_store(map_store, (shp.num_layers, shp.num_experts))
        except BaseException:
            rt = getattr(model, "runtime", None)
            if rt is not None:
                rt.map_store = None          # close without writing over the user's file
            model.close()
            raise
    return model


def check_map_store(path, shape: tuple[int, int] | None = None) -> None:
    """Refuse (ValueError) a `--map-store` path holding anything but an fmoe expert-map store
    (of a model with `shape` = (MoE layers, experts) when given). A missing file is fine.
    The check is the runtime's (`fmoe.runtime.offload.check_map_store`), shared with the API."""
    from ..runtime.offload import check_map_store as check

    check(path, shape, flag="--map-store", parent_must_exist=True)


def served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    p = Path(args.model)
    return p.resolve().name if p.is_dir() else str(args.model)


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _positive(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def _seconds(name):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number of seconds, got {text!r}") from None
        if not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0 seconds, got {text}")
        return v
    return parse


def cmd_serve(args) -> int:
    if args.max_queue < 1:      # 0 would refuse every request while /health says ok
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    sock = _bind(args.host, args.port)        # fail fast, before importing torch and loading the model
    try:
        for extra in ("fastapi", "uvicorn", "prometheus_client"):
            if importlib.util.find_spec(extra) is None:
                raise ValueError(f"fmoe serve needs the serve extras ({extra} is missing): "
                                 "pip install 'fmoe[serve]'")
        import torch
        import uvicorn

        from ..runtime.batching import Batcher
        from ..runtime.offload import parse_bytes
        from .app import ServerState, create_app

        if args.kv_cache_memory.strip().lower() not in ("auto", "none"):
            try:       # before the model loads
                parse_bytes(args.kv_cache_memory)
            except ValueError as e:
                raise ValueError(f"--kv-cache-memory: {e} or 'auto' or 'none'") from None

        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_model(args)
        if model.tokenizer is None:
            raise ValueError(f"{args.model}: no tokenizer.json beside the checkpoint; the server needs one")
        try:
            ctx, budget, kv_line = context_and_budget(model, args.max_model_len, args.kv_cache_memory)
        except BaseException:
            model.close()
            raise
        batcher = Batcher(model, max_batch=args.max_batch, max_queue=args.max_queue,
                          max_prefill_tokens=args.max_prefill_tokens, kv_budget=budget)
    except BaseException:
        sock.close()
        raise
    state = ServerState(model, batcher, served_name(args), ctx, args.api_key,
                        generation_config=args.generation_config == "auto")
    app = create_app(state, args.allowed_origins)
    batcher.start()
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                            access_log=args.log_level in ("debug", "trace"))
    server = GracefulServer(config, state, grace=args.shutdown_grace)
    host, port = sock.getsockname()[:2]
    print(f"fmoe serve: '{state.name}' on http://{host}:{port}/v1 (max batch {args.max_batch}, "
          f"context {ctx}, expert cache {args.expert_cache or 'all resident'})", file=sys.stderr, flush=True)
    print(f"fmoe serve: {kv_line}", file=sys.stderr, flush=True)
    if state.defaults:
        print("fmoe serve: sampling defaults from generation_config.json: "
              + ", ".join(f"{k}={v}" for k, v in state.defaults.items())
              + " (--generation-config none for OpenAI's)", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        state.shutting_down = True
        batcher.close()
        state.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        model.close()            # writes the map store and the trace (atomically)
        sock.close()
    if server.signalled is not None:
        print(f"fmoe serve: stopped on {signal.Signals(server.signalled).name}"
              + (f"; the map store is in {args.map_store}" if args.map_store else "")
              + (f"; the trace is in {args.trace_out}" if getattr(args, "trace_out", None) else ""),
              file=sys.stderr, flush=True)
    return 0


def context_and_budget(model, max_model_len: int | None, kv_memory: str) -> tuple[int, int | None, str]:
    """(context length, KV budget in positions or None, a line saying what was chosen) from
    `--max-model-len` and `--kv-cache-memory`. Without --max-model-len the context is the
    model's, or what the budget holds for one sequence where that is less (as llama.cpp sizes
    its context); a --max-model-len the budget cannot hold is refused."""
    from ..runtime.engine import context_length

    positions = context_length(model)
    if max_model_len and positions and max_model_len > positions:
        raise ValueError(f"--max-model-len {max_model_len} is more than the model's context "
                         f"({positions}: max_position_embeddings, or YaRN's extended length)")
    ctx = max_model_len or positions or 4096
    budget, line = kv_budget(model, kv_memory)
    if budget is not None and budget < ctx:
        if max_model_len:
            raise ValueError(f"--max-model-len {ctx} needs {ctx} KV cache positions; --kv-cache-memory "
                             f"{kv_memory} holds {budget}: raise --kv-cache-memory or lower --max-model-len")
        line += f"; context {budget} (the model's {ctx} would not fit)"
        ctx = budget
    return ctx, budget, line


def kv_budget(model, spec: str) -> tuple[int | None, str]:
    """The KV cache's bound in positions (rows x columns of the padded batch; None: no bound) for
    `--kv-cache-memory` `spec` (a size such as '4GiB', 'auto' or 'none'), and a line saying so.
    auto: half of what the device has free once the model is loaded (on CPU, the memory cgroup's
    room or MemAvailable: `fmoe.runtime.memory`), the rest kept for activations and the
    allocator."""
    from ..runtime.memory import device_memory
    from ..runtime.offload import parse_bytes

    per = model.module.kv_bytes_per_position()
    word = spec.strip().lower()
    if word == "none":
        return None, "KV cache: no bound (--kv-cache-memory none)"
    if word == "auto":
        # the expert cache's slots not yet touched are not in RSS but are spoken for
        rt = getattr(model, "runtime", None)
        free = max(0, device_memory(model.device).available - (rt.uncommitted_bytes() if rt else 0))
        size, how = free // 2, f"auto: half of the {free / 2**30:.2f} GiB free after loading and the expert cache"
    else:
        size, how = parse_bytes(spec), f"--kv-cache-memory {spec}"
    budget = size // per
    if budget < 2:
        raise ValueError(f"--kv-cache-memory {spec}: {size} bytes hold no KV cache positions of this "
                         f"model ({per} bytes each)" + ("; the device has too little memory free"
                                                        if word == "auto" else ""))
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    return budget, f"KV cache {shown}, {budget} positions of {per} bytes ({how})"


def _uvicorn_server_class():
    import uvicorn

    return uvicorn.Server


class GracefulServer:
    """uvicorn's server with fmoe's shutdown on SIGTERM and SIGINT alike.

    First signal: /health answers 503, new requests get 503, accepted requests run on for up to
    `grace` seconds; then whatever still runs is finished with an error (streams get an error
    event and ``data: [DONE]``), uvicorn closes the connections and `cmd_serve` saves the map
    store and the trace. A second signal skips what is left of the grace period. The signal is
    not re-raised, so the process exits 0 after a clean shutdown."""

    def __new__(cls, config, state, grace: float = 20.0):
        base = _uvicorn_server_class()

        class _Server(base):
            def __init__(self):
                super().__init__(config)
                self.state, self.grace = state, float(grace)
                self.signalled: int | None = None
                self._drainer: threading.Thread | None = None

            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                sigs = (signal.SIGINT, signal.SIGTERM)
                old = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
                try:
                    yield
                finally:
                    for sig, h in old.items():
                        signal.signal(sig, h)

            def handle_exit(self, sig, frame) -> None:
                if self._drainer is not None:          # a second signal: stop waiting now
                    self.grace = 0.0
                    self.state.batcher.abort(f"the server is shutting down ({signal.Signals(sig).name})")
                    return
                self.signalled = sig
                self.state.shutting_down = True
                self._drainer = threading.Thread(target=self._drain, args=(sig,), name="fmoe-shutdown",
                                                 daemon=True)
                self._drainer.start()

            def _drain(self, sig) -> None:
                name = signal.Signals(sig).name
                b = self.state.batcher
                b.stop_admitting()
                running = b.num_running + b.num_waiting
                log.warning("%s: shutting down; %d request(s) in flight get up to %.0f s to finish",
                            name, running, self.grace)
                t0 = time.monotonic()
                while not b.wait_idle(0.1):
                    if time.monotonic() - t0 >= self.grace:
                        log.warning("%s: grace period over; failing the requests still running", name)
                        b.abort(f"the server is shutting down ({name}); the request did not finish "
                                f"within the {self.grace:g} s grace period")
                        b.wait_idle(10.0)
                        break
                self.should_exit = True

        return _Server()


def register(subparsers) -> None:
    from .cli import _add_model_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None,
                   help="model name in the API (default: the checkpoint directory name)")
    p.add_argument("--max-batch", type=_positive("--max-batch"), default=32,
                   help="most sequences decoded together (default: 32; 1 disables continuous batching)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="most waiting sequences before answering 503 (default: 256; at least 1; a request "
                        "with more sequences than this is refused with 400)")
    p.add_argument("--max-prefill-tokens", type=_positive("--max-prefill-tokens"), default=2048,
                   help="padded prompt tokens per prefill forward; its temporary memory grows with "
                        "it (default: 2048, as vLLM's online default; a longer prompt is prefilled "
                        "in chunks of this many)")
    p.add_argument("--max-model-len", type=_positive("--max-model-len"), default=None,
                   help="context length (default: the model's: max_position_embeddings, or YaRN's "
                        "original_max_position_embeddings x factor where that is more)")
    p.add_argument("--kv-cache-memory", default="auto",
                   help="memory for the KV cache of the running batch, e.g. 4GiB; rows wait or are "
                        "preempted (and later resumed) to stay within it. auto: half of what is free "
                        "after loading; none: no bound (default: auto)")
    p.add_argument("--api-key", default=os.environ.get("FMOE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $FMOE_API_KEY, else none)")
    p.add_argument("--generation-config", choices=["auto", "none"], default="auto",
                   help="auto: a request's unset temperature, top_p, top_k, repetition_penalty, "
                        "min_p and max_tokens default to the checkpoint's generation_config.json "
                        "(as vLLM); none: OpenAI's defaults (temperature 1, top_p 1, no top_k)")
    p.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="origins whose browser scripts may call the API (CORS), e.g. '*' or "
                        "'http://localhost:3000' (default: none)")
    p.add_argument("--map-store", default=None,
                   help="file that keeps the predictor's expert-map store across restarts")
    p.add_argument("--threads", type=_positive("--threads"), default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--shutdown-grace", type=_seconds("--shutdown-grace"), default=20.0,
                   help="on SIGTERM or SIGINT, seconds running requests get to finish before they are "
                        "ended with an error (default: 20)")
    p.set_defaults(func=cmd_serve)

    from .chat import register as register_chat

    register_chat(subparsers)
