"""`fmoe serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the continuous-batching
engine (`fmoe.runtime.batching`).

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``"stream": true`` gives server-sent events ending in
``data: [DONE]``), ``GET /health``, ``GET /metrics`` (Prometheus text format).

Threads: one background thread owns the model and runs the batching loop; the async handlers
submit `Sequence`s to it and receive tokens through per-request `asyncio.Queue`s fed with
``loop.call_soon_threadsafe``. Detokenization and stop strings run on the engine thread
(`TextStream`), so a sequence stops at the token that completes a stop string.

Errors follow the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: malformed
JSON, wrong types, out-of-range values, prompts beyond the context → 400; unknown model → 404;
missing or wrong API key → 401; full waiting queue → 503. A client that disconnects cancels its
sequences at the next token boundary.
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional, Union

log = logging.getLogger("fmoe.serve")

# ------------------------------------------------------------------------------------------------
# Request schemas (pydantic, strict: "5" is not an integer, true is not a number). Built on first
# use, so that `fmoe` without the serve extras (fastapi, pydantic) still starts.
# ------------------------------------------------------------------------------------------------
_SEED_MIN, _SEED_MAX = -(2 ** 63), 2 ** 64 - 1
MAX_CHOICES = 64          # prompts x n in one request
MAX_STOP = 16
MAX_BODY_BYTES = 32 << 20


@functools.lru_cache(maxsize=None)
def schemas():
    """-> namespace with CompletionRequest, ChatRequest and pydantic's ValidationError."""
    from types import SimpleNamespace

    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    class _Strict(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")

    class StreamOptions(_Strict):
        include_usage: bool = False

    class SamplingRequest(_Strict):
        model: str
        max_tokens: Optional[int] = None
        temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
        top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
        top_k: Optional[int] = Field(None, ge=-1)                 # vLLM extension; -1 or 0: off
        n: Optional[int] = Field(1, ge=1, le=16)
        stream: Optional[bool] = False
        stream_options: Optional[StreamOptions] = None
        stop: Union[str, list[str], None] = None
        seed: Optional[int] = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
        ignore_eos: Optional[bool] = False                       # vLLM extension
        presence_penalty: Optional[float] = None
        frequency_penalty: Optional[float] = None
        logit_bias: Optional[dict[str, Any]] = None
        user: Optional[str] = None

    class CompletionRequest(SamplingRequest):
        prompt: Any = None                                       # checked by hand: clearer message
        echo: Optional[bool] = False
        logprobs: Optional[int] = None
        best_of: Optional[int] = None
        suffix: Optional[str] = None

    class ContentPart(_Strict):
        type: Literal["text"]
        text: str

    class ChatMessage(_Strict):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: Union[str, list[ContentPart], None] = None
        name: Optional[str] = None

    class ChatRequest(SamplingRequest):
        messages: list[ChatMessage] = Field(min_length=1)
        max_completion_tokens: Optional[int] = None
        logprobs: Optional[bool] = None
        top_logprobs: Optional[int] = None
        tools: Optional[list[Any]] = None
        response_format: Optional[dict[str, Any]] = None

    return SimpleNamespace(CompletionRequest=CompletionRequest, ChatRequest=ChatRequest,
                           ValidationError=ValidationError)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _validation_message(e) -> tuple[str, str | None]:
    parts, param = [], None
    for err in e.errors()[:4]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        param = param or (loc or None)
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    more = len(e.errors()) - 4
    if more > 0:
        parts.append(f"... and {more} more")
    return "invalid request: " + "; ".join(parts), param


# ------------------------------------------------------------------------------------------------
# Metrics (Prometheus text exposition format 0.0.4, written by hand)
# ------------------------------------------------------------------------------------------------
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


def _labels(d: dict) -> str:
    if not d:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(d.items())) + "}"


def _num(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)


class Histogram:
    def __init__(self, name: str, help_: str, buckets=_LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_, tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} histogram")
        for b, c in zip(self.buckets, self.counts):
            out.append(f'{self.name}_bucket{{le="{_num(float(b))}"}} {c}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum {_num(float(self.sum))}")
        out.append(f"{self.name}_count {self.count}")


class Metrics:
    """Server counters and histograms; `render` adds live gauges and the expert-cache figures."""

    def __init__(self):
        self.lock = threading.Lock()
        self.http: dict[tuple[str, int], int] = {}
        self.finished: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.rejected = 0
        self.ttft = Histogram("fmoe_time_to_first_token_seconds",
                              "Time from request arrival to its first generated token.")
        self.tpot = Histogram("fmoe_time_per_output_token_seconds",
                              "Mean time between consecutive generated tokens of a request.")
        self.e2e = Histogram("fmoe_e2e_request_latency_seconds",
                             "Time from request arrival to its last token.")

    def count_http(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.http[(endpoint, status)] = self.http.get((endpoint, status), 0) + 1

    def observe_sequence(self, seq) -> None:
        with self.lock:
            r = seq.finish_reason or "unknown"
            self.finished[r] = self.finished.get(r, 0) + 1
            self.prompt_tokens += len(seq.prompt)
            self.generation_tokens += len(seq.output)
            if seq.first_token_time is not None:
                self.ttft.observe(seq.first_token_time - seq.arrival)
                if seq.finish_time is not None:
                    self.e2e.observe(seq.finish_time - seq.arrival)
                    if len(seq.output) > 1:
                        self.tpot.observe((seq.finish_time - seq.first_token_time) / (len(seq.output) - 1))

    def render(self, batcher=None, model=None) -> str:
        out: list[str] = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, v in samples:
                out.append(f"{name}{_labels(labels)} {_num(v)}")

        with self.lock:
            metric("fmoe_http_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [({"endpoint": e, "code": c}, n) for (e, c), n in sorted(self.http.items())])
            metric("fmoe_request_success_total", "counter",
                   "Finished sequences by finish reason (stop, length, cancelled, error).",
                   [({"finished_reason": r}, n) for r, n in sorted(self.finished.items())])
            metric("fmoe_requests_rejected_total", "counter", "Requests answered 503: the waiting queue was full.",
                   [({}, self.rejected)])
            metric("fmoe_prompt_tokens_total", "counter", "Prompt tokens of finished sequences.",
                   [({}, self.prompt_tokens)])
            metric("fmoe_generation_tokens_total", "counter", "Generated tokens of finished sequences.",
                   [({}, self.generation_tokens)])
            for h in (self.ttft, self.tpot, self.e2e):
                h.render(out)
        if batcher is not None:
            metric("fmoe_num_requests_running", "gauge", "Sequences in the running batch.",
                   [({}, batcher.num_running)])
            metric("fmoe_num_requests_waiting", "gauge", "Sequences in the waiting queue.",
                   [({}, batcher.num_waiting)])
            metric("fmoe_engine_decode_steps_total", "counter", "Decode forwards of the running batch.",
                   [({}, batcher.steps)])
            metric("fmoe_engine_prefills_total", "counter", "Prefill forwards (admissions).",
                   [({}, batcher.prefills)])
        if model is not None:
            try:
                st = model.expert_stats()
            except Exception:           # the runtime is busy or closed: leave the figures out
                st = None
            if st:
                uses = st["hits"] + st["misses"]
                metric("fmoe_expert_cache_capacity", "gauge", "Routed-expert slots on the device.",
                       [({}, st["capacity"])])
                metric("fmoe_expert_resident_peak", "gauge", "Most routed experts resident at once.",
                       [({}, st["resident_peak"])])
                metric("fmoe_expert_hits_total", "counter", "Routed-expert uses whose weights were ready.",
                       [({}, st["hits"])])
                metric("fmoe_expert_misses_total", "counter", "Routed-expert uses that waited for a load.",
                       [({}, st["misses"])])
                metric("fmoe_expert_hit_rate", "gauge", "hits / (hits + misses) since load (1 when fully resident).",
                       [({}, float(st["hits"] / uses) if uses else 1.0)])
                metric("fmoe_expert_prefetched_total", "counter", "Experts loaded ahead of need.",
                       [({}, st["prefetched"])])
                metric("fmoe_expert_prefetch_used_total", "counter", "Prefetched experts used before eviction.",
                       [({}, st["prefetch_used"])])
                metric("fmoe_expert_bytes_loaded_total", "counter", "Bytes copied into the device expert cache.",
                       [({}, st["bytes_loaded"])])
                metric("fmoe_expert_stall_seconds_total", "counter", "Time the forward pass waited on expert loads.",
                       [({}, float(st["stall_seconds"]))])
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# The application
# ------------------------------------------------------------------------------------------------
class ServerState:
    def __init__(self, model, batcher, served_model_name: str, max_model_len: int,
                 api_key: str | None = None):
        self.model = model
        self.tokenizer = model.tokenizer
        self.batcher = batcher
        self.name = served_model_name
        self.max_model_len = int(max_model_len)
        self.api_key = api_key or None
        self.metrics = Metrics()
        self.created = int(time.time())
        cfg = getattr(model, "config", None)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or self.tokenizer.vocab_size)
        eos = list(getattr(self.tokenizer, "eos_token_ids", []) or [])
        if not eos:
            e = getattr(cfg, "eos_token_id", None)
            eos = [] if e is None else ([e] if isinstance(e, int) else list(e))
        self.eos_ids = [int(e) for e in eos]
        # prompts are tokenised and templated here, off the event loop (two at a time at most)
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="fmoe-tokenize")
        # a text longer than this many bytes cannot fit the context: refused before tokenising
        self.max_prompt_bytes = self.max_model_len * _max_token_bytes(self.tokenizer)
        self.shutting_down = False


def _max_token_bytes(tok) -> int:
    """An upper bound on the bytes of text one token stands for: its longest vocabulary entry in
    UTF-8 (byte-level and SentencePiece symbols take at least as many bytes as the text they
    stand for), at least 16."""
    inner = getattr(tok, "tok", None)
    try:
        vocab = inner.get_vocab(with_added_tokens=True) if inner is not None else {}
    except Exception:
        vocab = {}
    longest = max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=0)
    return max(16, longest)


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def create_app(state: ServerState):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ..runtime.batching import QueueFull, Sequence
    from ..runtime.text_stream import TextStream
    from ..runtime.engine import SamplingError, SamplingParams

    S = schemas()
    app = FastAPI(title="fmoe", version=_version(), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fmoe = state
    tok = state.tokenizer

    def error_response(status: int, message: str, type_: str = "invalid_request_error",
                       param: str | None = None, code: str | None = None, endpoint: str | None = None):
        if endpoint is not None:
            state.metrics.count_http(endpoint, status)
        return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                            status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log.exception("internal error")
        return error_response(500, "internal server error (the server log has the details)", "internal_error")

    def check_auth(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode("utf-8", "surrogatepass"),
                                                                 state.api_key.encode("utf-8", "surrogatepass"))
        if not ok:
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    async def read_body(request: Request, schema):
        chunks, size = [], 0
        async for c in request.stream():
            size += len(c)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
            chunks.append(c)
        raw = b"".join(chunks)
        del chunks
        parse = functools.partial(json.loads, raw, parse_constant=_reject_constant)
        try:
            data = parse() if size < (1 << 20) else await off_loop(parse)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"malformed JSON body: {e}")
        finally:
            del raw
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
        try:
            return schema.model_validate(data)
        except S.ValidationError as e:
            msg, param = _validation_message(e)
            raise APIError(400, msg, param=param)
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply")

    def check_model(name: str) -> None:
        if name != state.name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{state.name}'",
                           "not_found_error", param="model", code="model_not_found")

    def check_common(req) -> None:
        for field in ("presence_penalty", "frequency_penalty"):
            v = getattr(req, field)
            if v not in (None, 0, 0.0):
                raise APIError(400, f"{field} is not supported (must be 0 or absent)", param=field)
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")

    async def off_loop(fn, *args):
        """Run `fn(*args)` in the tokenizer pool: the event loop keeps serving meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(state.tokenize_pool, fn, *args)

    def check_text(text: str, param: str) -> None:
        """Refuse text that cannot be encoded, or whose byte length alone proves it is over the
        context, before any tokenisation."""
        cap = state.max_prompt_bytes
        if len(text) > cap:         # every character is at least one byte
            raise too_long_text(len(text), "characters", param)
        try:
            n = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise APIError(400, f"{param}: not valid Unicode text (a lone surrogate "
                                f"{text[e.start]!r} at character {e.start})", param=param) from None
        if n > cap:
            raise too_long_text(n, "bytes", param)

    def too_long_text(n: int, unit: str, param: str) -> APIError:
        return APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. "
                             f"However, your {param} is {n} {unit} long, more than any text of "
                             f"{state.max_model_len} tokens can be ({state.max_prompt_bytes} bytes). "
                             "Please reduce the length of the prompt.",
                        param=param, code="context_length_exceeded")

    async def encode_prompts(prompt) -> list[tuple[list[int], str | None]]:
        """A completions `prompt` -> [(token ids, text or None)]."""
        err = APIError(400, "prompt must be a string, a list of strings, a list of token ids or a "
                            "list of lists of token ids", param="prompt")
        if isinstance(prompt, str):
            items = [prompt]
        elif isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                items = prompt
            elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                items = [prompt]
            elif all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                     for p in prompt):
                items = prompt
            else:
                raise err
        else:
            raise err
        if len(items) > MAX_CHOICES:
            raise APIError(400, f"prompt: at most {MAX_CHOICES} prompts per request", param="prompt")
        out = []
        texts = [it for it in items if isinstance(it, str)]
        for t in texts:
            if not t:
                raise APIError(400, "prompt: the prompt is empty", param="prompt")
            check_text(t, "prompt")
        encoded = iter(await off_loop(lambda: [tok.encode(t) for t in texts]) if texts else [])
        for it in items:
            if isinstance(it, str):
                out.append((next(encoded), it))
            else:
                bad = [t for t in it if not 0 <= t < state.vocab_size]
                if bad:
                    raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                                        f"[0, {state.vocab_size})", param="prompt")
                out.append((list(it), None))
        return out

    def resolve_max_tokens(req_max: int | None, prompt_len: int, default: int | None, param: str) -> int:
        """The number of tokens to generate, or a 400 naming the limit that was crossed."""
        L = state.max_model_len
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty (no tokens)")
        if req_max is not None and req_max < 1:
            raise APIError(400, f"{param} must be at least 1, got {req_max}", param=param)
        if prompt_len >= L:
            raise APIError(400, f"This model's maximum context length is {L} tokens. However, your prompt "
                                f"has {prompt_len} tokens. Please reduce the length of the prompt.",
                           code="context_length_exceeded")
        if req_max is None:
            return L - prompt_len if default is None else min(default, L - prompt_len)
        if prompt_len + req_max > L:
            raise APIError(400, f"This model's maximum context length is {L} tokens. However, you requested "
                                f"{prompt_len + req_max} tokens ({prompt_len} in the prompt, {req_max} in the "
                                f"completion). Please reduce the length of the prompt or completion.",
                           param=param, code="context_length_exceeded")
        return req_max

    def sampling(req, max_tokens: int, j: int) -> SamplingParams:
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        seed = req.seed
        if seed is not None and j:
            seed = (seed + j) % (2 ** 63)
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                  top_p=1.0 if req.top_p is None else float(req.top_p),
                                  top_k=max(int(req.top_k or 0), 0),
                                  eos_token_id=[] if req.ignore_eos else state.eos_ids, seed=seed)
        except SamplingError as e:        # the checks the CLI and the Python API share
            raise APIError(400, str(e), param=e.param) from None

    # -- the generation bridge ----------------------------------------------------------------
    class Job:
        """The sequences of one HTTP request and the queue their events arrive on."""

        def __init__(self, loop: asyncio.AbstractEventLoop, n: int = 1):
            self.loop = loop
            self.n = n                     # choices per prompt (usage counts each prompt once)
            self.queue: asyncio.Queue = asyncio.Queue()
            self.seqs: list[Sequence] = []
            self.streams: list[TextStream] = []

        def post(self, ev) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
            except RuntimeError:        # the event loop has closed (shutdown)
                pass

        def add(self, ids: list[int], text: str | None, params: SamplingParams, stop: list[str]) -> None:
            idx = len(self.seqs)
            ts = TextStream(tok, stop, prompt_ids=ids, eos_token_ids=state.eos_ids)

            def on_token(seq, t, idx=idx, ts=ts):
                delta, stopped = ts.push(t)
                if delta:
                    self.post((idx, "text", delta))
                return stopped

            def on_finish(seq, idx=idx, ts=ts):
                rest = ts.flush() if seq.finish_reason in ("stop", "length") else ""
                state.metrics.observe_sequence(seq)
                self.post((idx, "done", rest))

            self.seqs.append(Sequence(ids, params, prompt_text=text, on_token=on_token, on_finish=on_finish))
            self.streams.append(ts)

        def submit(self) -> None:
            try:
                state.batcher.submit(self.seqs)
            except QueueFull as e:
                with state.metrics.lock:
                    state.metrics.rejected += 1
                raise APIError(503, f"the server is busy: {e}; retry later", "server_overloaded",
                               code="queue_full")
            except RuntimeError as e:
                raise APIError(503, str(e), "server_unavailable")

        def cancel(self) -> None:
            for s in self.seqs:
                if not s.finished:
                    state.batcher.cancel(s)

        @property
        def usage(self) -> dict:
            p = sum(len(s.prompt) for s in self.seqs[:: self.n])
            c = sum(len(s.output) for s in self.seqs)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def _wait_disconnect(request: Request) -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    async def run_blocking(job: Job, request: Request) -> list[str] | None:
        """Wait for every sequence; returns the texts, or None (after cancelling the sequences)
        when the client went away."""
        texts = [""] * len(job.seqs)
        pending = len(job.seqs)
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while pending:
                get = asyncio.ensure_future(job.queue.get())
                done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    job.cancel()
                    return None
                idx, kind, payload = get.result()
                texts[idx] += payload
                if kind == "done":
                    pending -= 1
        except BaseException:
            job.cancel()
            raise
        finally:
            watch.cancel()
        return texts

    def first_error(job: Job) -> str | None:
        for s in job.seqs:
            if s.finish_reason == "error":
                return s.error or "generation failed"
        return None

    def failed_response(job: Job, err: str, endpoint: str):
        """A blocking request whose sequences failed: 503 while shutting down, else 500."""
        if state.shutting_down:
            return error_response(503, err, "server_unavailable", code="shutting_down")
        return error_response(500, err, "internal_error")

    async def stream_events(job: Job, request: Request, make_chunk, prefix_chunks, include_usage: bool):
        """SSE generator: chunks from `make_chunk(idx, text, finish_reason)`."""
        pending = len(job.seqs)
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            for c in prefix_chunks:
                yield _sse(c)
            while pending:
                get = asyncio.ensure_future(job.queue.get())
                done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    job.cancel()
                    return
                idx, kind, payload = get.result()
                s = job.seqs[idx]
                if kind == "text":
                    yield _sse(make_chunk(idx, payload, None))
                else:
                    pending -= 1
                    if s.finish_reason == "error":
                        yield _sse({"error": {"message": s.error or "generation failed",
                                              "type": "internal_error", "param": None, "code": None}})
                        continue
                    if s.finish_reason == "cancelled":
                        continue
                    if payload:
                        yield _sse(make_chunk(idx, payload, None))
                    yield _sse(make_chunk(idx, "", s.finish_reason))
            if include_usage:
                yield _sse(make_chunk(None, None, None, usage=job.usage))
            yield "data: [DONE]\n\n"
        finally:
            watch.cancel()
            job.cancel()

    # -- routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        """200 {"status": "ok"} while requests can be served; 503 with a message while the
        server shuts down, after its engine thread stopped, or while expert reads fail (each
        call re-reads the failed expert off the event loop: a success restores 200)."""
        def unhealthy(status, message):
            return JSONResponse({"status": status, "message": message}, status_code=503)

        if state.shutting_down:
            return unhealthy("shutting_down", "the server is shutting down")
        if not state.batcher.is_alive():
            return unhealthy("error", "the engine thread has stopped")
        engine = getattr(getattr(state.model, "runtime", None), "engine", None)
        if engine is not None and not engine.healthy:
            if engine.error is not None or not await asyncio.to_thread(engine.probe):
                err = engine.error or engine.last_error
                return unhealthy("error", f"expert reads are failing: {err}")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.batcher, state.model),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": state.name, "object": "model", "created": state.created, "owned_by": "fmoe",
                "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        try:
            check_auth(request)
        except APIError as e:
            return error_response(e.status, e.message, e.type, e.param, e.code, endpoint="models")
        state.metrics.count_http("models", 200)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        try:
            check_auth(request)
            check_model(model_id)
        except APIError as e:
            return error_response(e.status, e.message, e.type, e.param, e.code, endpoint="models")
        state.metrics.count_http("models", 200)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            check_auth(request)
            req = await read_body(request, S.CompletionRequest)
            check_model(req.model)
            check_common(req)
            if req.prompt is None:
                raise APIError(400, "prompt: field required", param="prompt")
            if req.logprobs is not None:
                raise APIError(400, "logprobs is not supported", param="logprobs")
            if req.suffix:
                raise APIError(400, "suffix is not supported", param="suffix")
            if req.best_of not in (None, 1):
                raise APIError(400, "best_of is not supported (must be 1 or absent)", param="best_of")
            prompts = await encode_prompts(req.prompt)
            n = req.n or 1
            if len(prompts) * n > MAX_CHOICES:
                raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
            stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
            job = Job(asyncio.get_running_loop(), n)
            for ids, text in prompts:
                m = resolve_max_tokens(req.max_tokens, len(ids), 16, "max_tokens")
                for j in range(n):
                    job.add(ids, text, sampling(req, m, j), stops)
            job.submit()
        except APIError as e:
            return error_response(e.status, e.message, e.type, e.param, e.code, endpoint="completions")

        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        echo = [(text if text is not None else tok.decode(ids, skip_special_tokens=False)) if req.echo else ""
                for ids, text in prompts for _ in range(n)]

        def chunk(idx, text, finish, usage=None):
            obj = {"id": rid, "object": "text_completion", "created": created, "model": state.name}
            if idx is None:
                obj["choices"] = []
                obj["usage"] = usage
            else:
                obj["choices"] = [{"index": idx, "text": text, "logprobs": None, "finish_reason": finish}]
                if include_usage:
                    obj["usage"] = None
            return obj

        state.metrics.count_http("completions", 200)
        if req.stream:
            prefix = [chunk(i, e, None) for i, e in enumerate(echo) if e]
            return StreamingResponse(stream_events(job, request, chunk, prefix, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = await run_blocking(job, request)
        if texts is None:
            return Response(status_code=499)      # the client has gone: nobody reads this
        err = first_error(job)
        if err:
            return failed_response(job, err, "completions")
        choices = [{"index": i, "text": echo[i] + t, "logprobs": None, "finish_reason": s.finish_reason}
                   for i, (t, s) in enumerate(zip(texts, job.seqs))]
        return {"id": rid, "object": "text_completion", "created": created, "model": state.name,
                "choices": choices, "usage": job.usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_auth(request)
            req = await read_body(request, S.ChatRequest)
            check_model(req.model)
            check_common(req)
            if req.logprobs:
                raise APIError(400, "logprobs is not supported", param="logprobs")
            if req.top_logprobs is not None:
                raise APIError(400, "top_logprobs is not supported", param="top_logprobs")
            if req.tools:
                raise APIError(400, "tools are not supported", param="tools")
            if req.response_format and req.response_format.get("type", "text") != "text":
                raise APIError(400, "response_format: only {\"type\": \"text\"} is supported",
                               param="response_format")
            n = req.n or 1
            messages = []
            for m in req.messages:
                content = m.content
                if isinstance(content, list):
                    content = "\n".join(p.text for p in content)
                messages.append({"role": m.role, "content": content if content is not None else ""})
            total = 0
            for i, m in enumerate(messages):
                check_text(m["content"], f"messages[{i}].content")
                total += len(m["content"])
            if total > state.max_prompt_bytes:
                raise too_long_text(total, "characters", "messages")

            def render():
                try:
                    text = tok.apply_chat_template(messages, add_generation_prompt=True)
                except Exception as e:     # jinja TemplateError, a checkpoint without a template
                    raise APIError(400, f"messages: cannot apply the chat template: {e}", param="messages")
                check_text(text, "messages")
                return text, tok.encode(text, add_special_tokens=False)

            text, ids = await off_loop(render)
            max_req = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            m = resolve_max_tokens(max_req, len(ids), None, param)
            stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
            job = Job(asyncio.get_running_loop(), n)
            for j in range(n):
                job.add(ids, text, sampling(req, m, j), stops)
            job.submit()
        except APIError as e:
            return error_response(e.status, e.message, e.type, e.param, e.code, endpoint="chat")

        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)

        def chunk(idx, text, finish, usage=None, role=False):
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.name}
            if idx is None:
                obj["choices"] = []
                obj["usage"] = usage
                return obj
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            obj["choices"] = [{"index": idx, "delta": delta, "logprobs": None, "finish_reason": finish}]
            if include_usage:
                obj["usage"] = None
            return obj

        state.metrics.count_http("chat", 200)
        if req.stream:
            prefix = [chunk(i, None, None, role=True) for i in range(n)]
            return StreamingResponse(stream_events(job, request, chunk, prefix, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = await run_blocking(job, request)
        if texts is None:
            return Response(status_code=499)      # the client has gone: nobody reads this
        err = first_error(job)
        if err:
            return failed_response(job, err, "chat")
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": s.finish_reason} for i, (t, s) in enumerate(zip(texts, job.seqs))]
        return {"id": rid, "object": "chat.completion", "created": created, "model": state.name,
                "choices": choices, "usage": job.usage}

    return app


def _version() -> str:
    try:
        from .. import __version__
        return str(__version__)
    except Exception:
        return "0"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
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
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}")
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def _seconds(name):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number of seconds, got {text!r}")
        if not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0 seconds, got {text}")
        return v
    return parse


def cmd_serve(args) -> int:
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    sock = _bind(args.host, args.port)        # fail fast, before importing torch and loading the model
    try:
        try:
            import fastapi  # noqa: F401
            import uvicorn
        except ImportError as e:
            raise ValueError(f"fmoe serve needs the serve extras ({e.name} is missing): "
                             "pip install 'fmoe[serve]'") from None
        import torch

        from ..runtime.batching import Batcher

        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_model(args)
        if model.tokenizer is None:
            raise ValueError(f"{args.model}: no tokenizer.json beside the checkpoint; the server needs one")
        ctx = args.max_model_len or getattr(model.config, "max_position_embeddings", None) or 4096
        batcher = Batcher(model, max_batch=args.max_batch, max_queue=args.max_queue,
                          max_prefill_tokens=args.max_prefill_tokens)
    except BaseException:
        sock.close()
        raise
    state = ServerState(model, batcher, served_name(args), ctx, args.api_key)
    app = create_app(state)
    batcher.start()
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                            access_log=args.log_level in ("debug", "trace"))
    server = GracefulServer(config, state, grace=args.shutdown_grace)
    host, port = sock.getsockname()[:2]
    print(f"fmoe serve: '{state.name}' on http://{host}:{port}/v1 (max batch {args.max_batch}, "
          f"context {ctx}, expert cache {args.expert_cache or 'all resident'})", file=sys.stderr, flush=True)
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
                   help="most waiting sequences before answering 503 (default: 256)")
    p.add_argument("--max-prefill-tokens", type=_positive("--max-prefill-tokens"), default=8192,
                   help="padded prompt tokens per admission forward (default: 8192)")
    p.add_argument("--max-model-len", type=_positive("--max-model-len"), default=None,
                   help="context length (default: the config's max_position_embeddings)")
    p.add_argument("--api-key", default=os.environ.get("FMOE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $FMOE_API_KEY, else none)")
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


# ------------------------------------------------------------------------------------------------
# A server in a child process (tests and benchmarks)
# ------------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`fmoe serve MODEL *args` in a child process on a free loopback port; waits for /health.

        with ServerProcess(path, "--max-batch", "8") as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="x")
    """

    def __init__(self, model, *args: str, env: dict | None = None, timeout: float = 180.0,
                 host: str = "127.0.0.1", log_path: str | os.PathLike | None = None):
        self.model, self.args, self.host, self.timeout = str(model), list(args), host, timeout
        self.env = dict(os.environ, **(env or {}))
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> "ServerProcess":
        import tempfile
        import urllib.request

        for attempt in range(3):
            self.port = free_port(self.host)
            self._log = (open(self.log_path, "w+") if self.log_path
                         else tempfile.TemporaryFile("w+"))
            cmd = [sys.executable, "-m", "fmoe.serve.cli", "serve", self.model, "--host", self.host,
                   "--port", str(self.port), *self.args]
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
                time.sleep(0.2)
            out = self.output()
            self.stop()
            if "cannot listen" in out and attempt < 2:
                continue              # someone took the port in between: try another
            raise RuntimeError(f"fmoe serve did not become healthy:\n{out[-4000:]}")
        raise RuntimeError("fmoe serve: no free port")

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
