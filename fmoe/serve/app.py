"""The OpenAI-compatible application of `fmoe serve` (FastAPI): routes, request checks, responses.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``"stream": true`` gives server-sent events ending in
``data: [DONE]``), ``GET /health``, ``GET /metrics`` (Prometheus text format).

Handlers raise `APIError`; one exception handler answers it in the OpenAI shape and counts it
under the route's endpoint. Malformed JSON, wrong types, out-of-range values, prompts beyond the
context → 400; unknown model → 404; missing or wrong API key → 401; full waiting queue → 503.
Tokenisation and chat templating run in a small thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.engine import SamplingError, SamplingParams, sampling_defaults
from . import protocol
from .jobs import Job, run_blocking, stream_events
from .metrics import CONTENT_TYPE, Metrics
from .protocol import MAX_BODY_BYTES, MAX_CHOICES, MAX_STOP, MAX_STOP_IDS, APIError

log = logging.getLogger("fmoe.serve")

# messages validated per slice, the event loop serving others between slices
MESSAGE_SLICE = 512


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: a message that repeats the client's input (a model name
    holding a lone surrogate) still encodes, as an escape."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")

# route path -> the `endpoint` label of fmoe_http_requests_total
ENDPOINTS = {"/v1/models": "models", "/v1/models/{model_id:path}": "models",
             "/v1/completions": "completions", "/v1/chat/completions": "chat"}


class ServerState:
    """What the handlers share: the model, its batcher, the served name and the limits."""

    def __init__(self, model, batcher, served_model_name: str, max_model_len: int,
                 api_key: str | None = None, generation_config: bool = True):
        self.model = model
        self.tokenizer = model.tokenizer
        self.batcher = batcher
        self.name = served_model_name
        self.max_model_len = int(max_model_len)
        self.api_key = api_key or None
        self.metrics = Metrics(batcher, model)
        self.created = int(time.time())
        cfg = getattr(model, "config", None)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or self.tokenizer.vocab_size)
        # as the Python API's generate: generation_config.json, config.json, then the tokenizer's
        eos = list(getattr(model, "eos_token_ids", None) or [])
        if not eos:
            eos = list(getattr(self.tokenizer, "eos_token_ids", []) or [])
        self.eos_ids = [int(e) for e in eos]
        # a request's unset temperature / top_p / top_k default to the checkpoint's
        # generation_config.json, as vLLM does (`--generation-config none`: OpenAI's defaults)
        self.defaults = (sampling_defaults(getattr(model, "generation_config", None) or {})
                         if generation_config else {})
        # prompts are tokenised and templated here, off the event loop (two at a time at most)
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="fmoe-tokenize")
        # a text longer than this many bytes cannot fit the context: refused before tokenising
        self.max_prompt_bytes = self.max_model_len * _max_token_bytes(self.tokenizer)
        self.shutting_down = False

    async def off_loop(self, fn, *args):
        """Run `fn(*args)` in the tokenizer pool: the event loop keeps serving meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)


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


# -- request checks (each raises APIError) -------------------------------------------------------
def check_auth(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode("utf-8", "surrogatepass"),
                                                             state.api_key.encode("utf-8", "surrogatepass"))
    if not ok:
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       "authentication_error", code="invalid_api_key")


async def read_body(state: ServerState, request: Request, schema):
    """The body as a validated `schema` instance; bodies of 1 MiB and more are parsed off the
    loop, and sizes that cannot be served are refused before validation (`precheck`)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
    chunks, size = [], 0
    async for c in request.stream():
        size += len(c)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(c)
    raw = b"".join(chunks)
    del chunks
    try:
        data = protocol.parse_json(raw) if size < (1 << 20) else await state.off_loop(protocol.parse_json, raw)
    finally:
        del raw
    precheck(state, data)
    ignored = protocol.ignored_fields(data, schema)
    if ignored:
        # as vLLM: served without them, and said so
        names = ", ".join(repr(k[:40]) for k in ignored[:8]) + (" ..." if len(ignored) > 8 else "")
        log.warning("request fields ignored (not part of the API): %s", names)
    messages = data.get("messages") if isinstance(data, dict) else None
    if schema is protocol.ChatRequest and isinstance(messages, list) and len(messages) > MESSAGE_SLICE:
        # a long list validated in one call would hold the event loop (and /health) for
        # seconds: the rest of the body first, then the messages slice by slice
        req = protocol.validate({**data, "messages": messages[:1]}, schema)
        checked = []
        for i in range(0, len(messages), MESSAGE_SLICE):
            await asyncio.sleep(0)
            checked += protocol.validate_messages(messages[i:i + MESSAGE_SLICE], i)
        req.messages = checked
        return req
    return protocol.validate(data, schema)


def precheck(state: ServerState, data) -> None:
    """Refuse, by their lengths alone, bodies that cannot be served: more chat messages than
    the context has tokens (each message takes at least one), more completions prompts than a
    request may hold, a token list as long as the context. Cheap, before any per-item work."""
    if not isinstance(data, dict):
        return
    L = state.max_model_len
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > L:
        raise APIError(400, f"This model's maximum context length is {L} tokens. However, your "
                            f"messages are {len(messages)} messages, more than fit in {L} tokens. "
                            "Please reduce the length of the messages.",
                       param="messages", code="context_length_exceeded")
    prompt = data.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        return
    if isinstance(prompt[0], int) and not isinstance(prompt[0], bool):
        lists = [prompt]                        # one prompt of token ids
    else:
        if len(prompt) > MAX_CHOICES:
            raise APIError(400, f"prompt: at most {MAX_CHOICES} prompts per request", param="prompt")
        lists = [p for p in prompt if isinstance(p, list)]
    for p in lists:
        if len(p) >= L:
            raise APIError(400, f"This model's maximum context length is {L} tokens. However, your "
                                f"prompt has {len(p)} tokens. Please reduce the length of the prompt.",
                           param="prompt", code="context_length_exceeded")


def check_model(state: ServerState, name: str) -> None:
    if name != state.name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{state.name}'",
                       "not_found_error", param="model", code="model_not_found")


def check_common(req: protocol.SamplingRequest) -> None:
    bad = req.unsupported()
    if bad:
        raise APIError(400, f"{bad} is not supported by this server", param=bad)
    for field in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, field)
        if v not in (None, 0, 0.0):
            raise APIError(400, f"{field} is not supported (must be 0 or absent)", param=field)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if len(req.stops) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(req.stops)}", param="stop")
    if req.stop_token_ids and len(req.stop_token_ids) > MAX_STOP_IDS:
        raise APIError(400, f"stop_token_ids: at most {MAX_STOP_IDS} ids, got {len(req.stop_token_ids)}",
                       param="stop_token_ids")


def check_text(state: ServerState, text: str, param: str) -> None:
    """Refuse text that cannot be encoded, or whose byte length alone proves it is over the
    context, before any tokenisation."""
    cap = state.max_prompt_bytes
    if len(text) > cap:         # every character is at least one byte
        raise too_long_text(state, len(text), "characters", param)
    try:
        n = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param}: not valid Unicode text (a lone surrogate "
                            f"{text[e.start]!r} at character {e.start})", param=param) from None
    if n > cap:
        raise too_long_text(state, n, "bytes", param)


def too_long_text(state: ServerState, n: int, unit: str, param: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. "
                         f"However, your {param} is {n} {unit} long, more than any text of "
                         f"{state.max_model_len} tokens can be ({state.max_prompt_bytes} bytes). "
                         "Please reduce the length of the prompt.",
                    param=param, code="context_length_exceeded")


def _is_token_list(p) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in p)


async def encode_prompts(state: ServerState, prompt) -> list[tuple[list[int], str | None]]:
    """A completions `prompt` -> [(token ids, text or None)]."""
    err = APIError(400, "prompt must be a string, a list of strings, a list of token ids or a "
                        "list of lists of token ids", param="prompt")
    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            items = prompt
        elif _is_token_list(prompt):
            items = [prompt]
        elif all(isinstance(p, list) and p and _is_token_list(p) for p in prompt):
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
        check_text(state, t, "prompt")
    tok = state.tokenizer
    encoded = iter(await state.off_loop(lambda: [tok.encode(t) for t in texts]) if texts else [])
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


def resolve_max_tokens(state: ServerState, req_max: int | None, prompt_len: int, default: int | None,
                       param: str) -> int:
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


def sampling(state: ServerState, req: protocol.SamplingRequest, max_tokens: int, j: int) -> SamplingParams:
    """The sampling parameters of choice `j` (seeds differ per choice, so n > 1 gives n samples);
    a value the request leaves unset comes from `state.defaults`, else OpenAI's default."""
    d = state.defaults

    def pick(name, default):
        v = getattr(req, name)
        return d.get(name, default) if v is None else v

    temperature = float(pick("temperature", 1.0))
    seed = req.seed
    if seed is not None and j:
        seed = (seed + j) % (2 ** 63)
    min_tokens = req.min_tokens or 0
    if min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({min_tokens}) must not exceed the tokens to generate "
                            f"({max_tokens})", param="min_tokens")
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                              top_p=float(pick("top_p", 1.0)),
                              top_k=max(int(pick("top_k", 0) or 0), 0),
                              eos_token_id=stop_ids(state, req), seed=seed,
                              repetition_penalty=float(pick("repetition_penalty", 1.0)),
                              min_p=float(pick("min_p", 0.0)), min_new_tokens=min_tokens)
    except SamplingError as e:        # the checks the CLI and the Python API share
        raise APIError(400, str(e), param=e.param) from None


def stop_ids(state: ServerState, req: protocol.SamplingRequest) -> list[int]:
    """The token ids that end a choice: EOS (unless `ignore_eos`) and `stop_token_ids`."""
    extra = list(req.stop_token_ids or [])
    bad = [t for t in extra if not 0 <= t < state.vocab_size]
    if bad:
        raise APIError(400, f"stop_token_ids: token id {bad[0]} is outside the vocabulary "
                            f"[0, {state.vocab_size})", param="stop_token_ids")
    base = [] if req.ignore_eos else list(state.eos_ids)
    return base + [t for t in dict.fromkeys(extra) if t not in base]


def check_completion(req: protocol.CompletionRequest) -> None:
    if req.prompt is None:
        raise APIError(400, "prompt: field required", param="prompt")
    if req.logprobs is not None:
        raise APIError(400, "logprobs is not supported", param="logprobs")
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.best_of not in (None, 1):
        raise APIError(400, "best_of is not supported (must be 1 or absent)", param="best_of")


def check_chat(req: protocol.ChatRequest) -> None:
    if req.logprobs:
        raise APIError(400, "logprobs is not supported", param="logprobs")
    if req.top_logprobs is not None:
        raise APIError(400, "top_logprobs is not supported", param="top_logprobs")
    if req.tools:
        raise APIError(400, "tools are not supported", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "response_format: only {\"type\": \"text\"} is supported",
                       param="response_format")


def template_message(m: protocol.ChatMessage, content: str | None) -> dict:
    """What the chat template sees of a message: role and content (left out when None, as
    transformers does), and where given its name, tool calls and the id of the call it
    answers. A call's JSON arguments reach the template as an object, as transformers'
    tool-use templates expect (vLLM does the same)."""
    out = {"role": m.role} if content is None else {"role": m.role, "content": content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args = json.loads(c.function.arguments)
            except ValueError:
                args = c.function.arguments          # not JSON: passed on as the text it is
            call = {"type": c.type, "function": {"name": c.function.name, "arguments": args}}
            if c.id is not None:
                call["id"] = c.id
            calls.append(call)
        out["tool_calls"] = calls
    return out


async def chat_prompt(state: ServerState, req: protocol.ChatRequest) -> tuple[str, list[int]]:
    """The chat template applied to the messages -> (text, token ids); the per-message checks
    and the template run off the event loop."""
    tok = state.tokenizer

    def render():
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if content is None and m.role != "assistant":    # an assistant turn may hold tool calls only
                raise APIError(400, f"messages[{i}].content is required for role '{m.role}'",
                               param=f"messages[{i}].content")
            if isinstance(content, list):
                content = "\n".join(p.text for p in content)
            messages.append(template_message(m, content))
        total = 0
        for i, m in enumerate(messages):
            check_text(state, m.get("content", ""), f"messages[{i}].content")
            total += len(m.get("content", "")) + len(json.dumps(m.get("tool_calls", ""), ensure_ascii=False))
        if total > state.max_prompt_bytes:
            raise too_long_text(state, total, "characters", "messages")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:     # jinja TemplateError, a checkpoint without a template
            raise APIError(400, f"messages: cannot apply the chat template: {e}", param="messages") from None
        check_text(state, text, "messages")
        return text, tok.encode(text, add_special_tokens=False)

    return await state.off_loop(render)


# -- the app -------------------------------------------------------------------------------------
def create_app(state: ServerState, allowed_origins: list[str] | None = None) -> FastAPI:
    """The app over `state`; `allowed_origins` (e.g. ``["*"]``): the origins whose browser
    scripts may call it (CORS; none by default)."""
    app = FastAPI(title="fmoe", version=_version(), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fmoe = state
    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)

    def error_response(status: int, message: str, type_: str = "invalid_request_error",
                       param: str | None = None, code: str | None = None,
                       headers: dict | None = None) -> JSONResponse:
        return ErrorResponse(protocol.error_body(message, type_, param, code), status_code=status,
                             headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        route = request.scope.get("route")        # the route FastAPI matched: its path template
        endpoint = ENDPOINTS.get(getattr(route, "path", None))
        if endpoint is not None:
            state.metrics.count_http(endpoint, exc.status)
        return ErrorResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        # a 405 names the allowed methods (`Allow`), as HTTP requires
        return error_response(exc.status_code, str(exc.detail), type_,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log.exception("internal error")
        return error_response(500, "internal server error (the server log has the details)", "internal_error")

    async def respond(request: Request, job: Job, endpoint: str, req: protocol.SamplingRequest,
                      obj: dict, chunk, prefix: list, choice):
        """The ending completions and chat share: stream `chunk`s (after `prefix`), or wait and
        answer ``obj`` with ``choices`` from ``choice(i, text, seq)``; the request is counted
        under the status it is answered with (a stream's is 200 once it starts)."""
        if req.stream:
            state.metrics.count_http(endpoint, 200)
            return StreamingResponse(stream_events(job, request, chunk, prefix, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = await run_blocking(job, request)
        if texts is None:
            state.metrics.count_http(endpoint, 499)
            return Response(status_code=499)      # the client has gone: nobody reads this
        err = job.first_error()
        if err:           # the sequences failed: 503 while shutting down, else 500
            if state.shutting_down:
                state.metrics.count_http(endpoint, 503)
                return error_response(503, err, "server_unavailable", code="shutting_down")
            state.metrics.count_http(endpoint, 500)
            return error_response(500, err, "internal_error")
        state.metrics.count_http(endpoint, 200)
        choices = [choice(i, t, s) for i, (t, s) in enumerate(zip(texts, job.seqs))]
        return {**obj, "choices": choices, "usage": job.usage}

    def chunk_maker(obj: dict, include_usage: bool, choice):
        """A stream's chunks: ``obj`` with the one choice ``choice(idx, text, finish)``, or (idx None)
        the final usage chunk."""
        def chunk(idx, text, finish, usage=None, **kw):
            out = dict(obj)
            if idx is None:
                out["choices"] = []
                out["usage"] = usage
                return out
            out["choices"] = [choice(idx, text, finish, **kw)]
            if include_usage:
                out["usage"] = None
            return out
        return chunk

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
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": state.name, "object": "model", "created": state.created, "owned_by": "fmoe",
                "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(state, request)
        state.metrics.count_http("models", 200)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_auth(state, request)
        check_model(state, model_id)
        state.metrics.count_http("models", 200)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(state, request)
        req = await read_body(state, request, protocol.CompletionRequest)
        check_model(state, req.model)
        check_common(req)
        check_completion(req)
        prompts = await encode_prompts(state, req.prompt)
        n = req.n or 1
        if len(prompts) * n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
        job = Job(state, asyncio.get_running_loop(), n)
        default = min(16, state.defaults.get("max_tokens", 16))
        for ids, text in prompts:
            m = resolve_max_tokens(state, req.max_tokens, len(ids), default, "max_tokens")
            for j in range(n):
                job.add(ids, text, sampling(state, req, m, j), req)
        job.submit()

        obj = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
               "model": state.name}
        tok = state.tokenizer
        echo = [(text if text is not None else tok.decode(ids, skip_special_tokens=False)) if req.echo else ""
                for ids, text in prompts for _ in range(n)]
        chunk = chunk_maker(obj, req.include_usage,
                            lambda i, t, f: {"index": i, "text": t, "logprobs": None, "finish_reason": f})
        prefix = [chunk(i, e, None) for i, e in enumerate(echo) if e]
        return await respond(request, job, "completions", req, obj, chunk, prefix,
                             lambda i, t, s: {"index": i, "text": echo[i] + t, "logprobs": None,
                                              "finish_reason": s.finish_reason})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(state, request)
        req = await read_body(state, request, protocol.ChatRequest)
        check_model(state, req.model)
        check_common(req)
        check_chat(req)
        n = req.n or 1
        text, ids = await chat_prompt(state, req)
        max_req = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        m = resolve_max_tokens(state, max_req, len(ids), state.defaults.get("max_tokens"), param)
        job = Job(state, asyncio.get_running_loop(), n)
        for j in range(n):
            job.add(ids, text, sampling(state, req, m, j), req)
        job.submit()

        obj = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
               "created": int(time.time()), "model": state.name}

        def delta(i, t, finish, role=False):
            d = {"role": "assistant", "content": ""} if role else ({"content": t} if t else {})
            return {"index": i, "delta": d, "logprobs": None, "finish_reason": finish}

        chunk = chunk_maker(obj, req.include_usage, delta)
        prefix = [chunk(i, None, None, role=True) for i in range(n)]
        return await respond(request, job, "chat", req, {**obj, "object": "chat.completion"}, chunk, prefix,
                             lambda i, t, s: {"index": i, "message": {"role": "assistant", "content": t},
                                              "logprobs": None, "finish_reason": s.finish_reason})

    return app


def _version() -> str:
    try:
        from .. import __version__
        return str(__version__)
    except Exception:
        return "0"
