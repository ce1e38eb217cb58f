"""The bridge between the async HTTP handlers and the engine thread of `fmoe serve`.

A `Job` is the sequences of one request. The engine thread (the `Batcher`) detokenizes each new
token (`TextStream`, stop strings included) and posts ``(index, "text" | "done", text)`` events
to the job's `asyncio.Queue` with ``loop.call_soon_threadsafe``; the handler either waits for
every sequence (`run_blocking`) or streams the events as server-sent events (`stream_events`).
A client that disconnects cancels its sequences at the next token boundary.
"""

from __future__ import annotations

import asyncio

from ..runtime.batching import QueueFull, Sequence
from ..runtime.engine import SamplingParams
from ..runtime.text_stream import TextStream
from .protocol import APIError, error_body, sse


class Job:
    """The sequences of one HTTP request and the queue their events arrive on.

    `state` is the app's `fmoe.serve.app.ServerState`; `n` the choices per prompt (usage counts
    each prompt once)."""

    def __init__(self, state, loop: asyncio.AbstractEventLoop, n: int = 1):
        self.state = state
        self.loop = loop
        self.n = n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs: list[Sequence] = []
        self.streams: list[TextStream] = []

    def post(self, ev) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:        # the event loop has closed (shutdown)
            pass

    def add(self, ids: list[int], text: str | None, params: SamplingParams, req) -> None:
        """One more sequence: prompt token `ids` (and its `text` when the client sent text),
        with the text options of `req` (a `SamplingRequest`: stop strings, stop token ids,
        min_tokens, include_stop_str_in_output, skip_special_tokens)."""
        idx = len(self.seqs)
        # the tokens that end a choice (`params.eos_ids`: EOS unless ignore_eos, and
        # stop_token_ids) add no text, unless include_stop_str_in_output asks for it (vLLM; a
        # special token's text also needs skip_special_tokens false)
        quiet = [] if req.include_stop_str_in_output else list(params.eos_ids)
        ts = TextStream(self.state.tokenizer, req.stops, prompt_ids=ids, eos_token_ids=quiet,
                        include_stop=bool(req.include_stop_str_in_output),
                        skip_special_tokens=req.skip_special_tokens is not False)
        min_tokens = params.min_new_tokens

        def on_token(seq, t, idx=idx, ts=ts):
            # as vLLM: stop strings count only once min_tokens tokens are out
            delta, stopped = ts.push(t, check_stop=len(seq.output) >= min_tokens)
            if delta:
                self.post((idx, "text", delta))
            return stopped

        def on_finish(seq, idx=idx, ts=ts):
            rest = ts.flush() if seq.finish_reason in ("stop", "length") else ""
            self.state.metrics.observe_sequence(seq)
            self.post((idx, "done", rest))

        self.seqs.append(Sequence(ids, params, prompt_text=text, on_token=on_token, on_finish=on_finish))
        self.streams.append(ts)

    def submit(self) -> None:
        """Queue every sequence (all or none): APIError 400 when they outnumber the whole
        waiting queue (no retry can help), 503 when the queue is full or the server is shutting
        down."""
        limit = self.state.batcher.max_queue
        if len(self.seqs) > limit:
            raise APIError(400, f"the request asks for {len(self.seqs)} sequences (prompts x n); "
                                f"this server queues at most {limit}", param="n")
        try:
            self.state.batcher.submit(self.seqs)
        except QueueFull as e:
            self.state.metrics.count_rejected()
            raise APIError(503, f"the server is busy: {e}; retry later", "server_overloaded",
                           code="queue_full") from None
        except RuntimeError as e:
            raise APIError(503, str(e), "server_unavailable", code="shutting_down") from None

    def cancel(self) -> None:
        for s in self.seqs:
            if not s.finished:
                self.state.batcher.cancel(s)

    @property
    def usage(self) -> dict:
        p = sum(len(s.prompt) for s in self.seqs[:: self.n])
        c = sum(len(s.output) for s in self.seqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def first_error(self) -> str | None:
        """The message of the first sequence that failed, or None."""
        for s in self.seqs:
            if s.finish_reason == "error":
                return s.error or "generation failed"
        return None


async def _wait_disconnect(request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def run_blocking(job: Job, request) -> list[str] | None:
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


async def stream_events(job: Job, request, make_chunk, prefix_chunks, include_usage: bool):
    """SSE generator: `prefix_chunks`, then chunks from ``make_chunk(idx, text, finish_reason)``
    (``make_chunk(None, None, None, usage=...)`` for the usage chunk), then ``data: [DONE]``."""
    pending = len(job.seqs)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        for c in prefix_chunks:
            yield sse(c)
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
                yield sse(make_chunk(idx, payload, None))
            else:
                pending -= 1
                if s.finish_reason == "error":
                    yield sse(error_body(s.error or "generation failed", "internal_error"))
                    continue
                if s.finish_reason == "cancelled":
                    continue
                if payload:
                    yield sse(make_chunk(idx, payload, None))
                yield sse(make_chunk(idx, "", s.finish_reason))
        if include_usage:
            yield sse(make_chunk(None, None, None, usage=job.usage))
        yield "data: [DONE]\n\n"
    finally:
        watch.cancel()
        job.cancel()
