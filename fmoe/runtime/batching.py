"""Continuous batching: many sequences share one running batch and one KV cache, join at token
boundaries and finish independently.

The running batch keeps the engine's left-padding layout (see `fmoe.runtime.engine`): every
row's newest cached position sits at column ``S - 1`` of every cache tensor, `key_valid` [B, S]
is False on padding, and each row carries its own rotary position. One iteration of the loop

1. admits waiting sequences (up to `max_batch` rows and `max_prefill_tokens` padded prompt
   tokens), prefills them together in one left-padded forward on a fresh cache, samples their
   first tokens and merges their cache rows into the running batch, left-padding whichever side
   is shorter along the sequence dimension (every tensor of every layer: K/V for grouped-query
   attention, latent and rope key for multi-head latent attention);
2. runs one decode forward for all running rows and samples one token per row, each with the
   row's own `SamplingParams` and seeded generator;
3. drops finished and cancelled rows and trims leading columns that are padding in every row.

With a KV budget (`kv_budget`, in cached positions: rows x columns of the padded cache), a
sequence is admitted only when the batch's next decode step still fits; when the running rows
outgrow it, the most recently admitted row is preempted (its cache dropped, the sequence put
back at the head of the queue) and later resumes by prefilling its prompt and the tokens it has
produced, as vLLM's recompute preemption does. The oldest row always runs, so every sequence
finishes.

The forwards and the row operations (keep, merge) are the engine's (`fmoe.runtime.engine`:
`prefill`, `decode_step`, `DecodeBatch`), shared with `generate`. Nothing here depends on a model
family: a family module only needs ``new_cache()`` returning a `KVCache` and
``forward(input_ids, positions=, cache=, key_valid=, last_only=)``. A row computes what it would
compute alone: padding keys are masked, positions count real tokens only.

`Batcher` is driven either by its own background thread (`start`; the server) or synchronously
(`run_until_idle`, `step`; tests and `fmoe chat`). Only that one thread touches the model;
`submit` and `cancel` are thread-safe. The offload runtime (``model.runtime``) receives the
engine's hooks: ``on_request_start(seq_id, prompt, token_ids)`` / ``on_request_end(seq_id)``
per sequence and ``begin_step(input_ids, valid, seq_ids)`` / ``on_token_end()`` per forward, so the
policy sees the whole batch (the MoE layers route all rows together: union of selections).
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import traceback
from collections import deque
from typing import Callable, Iterable
from typing import Sequence as Seq

import torch

from .engine import DecodeBatch, NoHooks, SamplingParams, decode_step, left_pad, prefill, sample, seen_tokens

log = logging.getLogger("fmoe.batching")

_ids = itertools.count(1)

# finish reasons
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


class QueueFull(Exception):
    """The waiting queue is full; try again later (the server answers 503)."""


class Sequence:
    """One generation request: a prompt, its sampling parameters and what it has produced.

    `on_token(seq, token_id) -> bool` runs on the engine thread after each new token has been
    appended to `output`; returning True finishes the sequence with reason "stop" (stop strings).
    `on_finish(seq)` runs exactly once, on the engine thread, when the sequence finishes for any
    reason (`finish_reason` is "stop", "length", "cancelled" or "error"; `error` holds the message).
    """

    def __init__(self, prompt_ids: Seq[int], params: SamplingParams | None = None, *,
                 prompt_text: str | None = None,
                 on_token: Callable[["Sequence", int], bool | None] | None = None,
                 on_finish: Callable[["Sequence"], None] | None = None):
        self.id = next(_ids)
        self.prompt = [int(t) for t in prompt_ids]
        self.prompt_text = prompt_text
        self.params = params if params is not None else SamplingParams()
        self.on_token = on_token
        self.on_finish = on_finish
        self.output: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self._eos = frozenset(self.params.eos_ids)
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor | None = None       # [1, V] bool: the repetition penalty's tokens
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.done = threading.Event()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def context(self) -> list[int]:
        """The tokens a prefill of this sequence takes: the prompt, and the output so far of a
        sequence that was preempted."""
        return self.prompt + self.output if self.output else self.prompt

    def is_eos(self, token: int) -> bool:
        return token in self._eos

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, prompt={len(self.prompt)} tokens, "
                f"output={len(self.output)} tokens, finish_reason={self.finish_reason!r})")


class Batcher:
    """The continuous-batching loop over one model.

    model: a `fmoe.runtime.lm.MoEModel` (its `module` runs, its `runtime` gets the hooks) or a
    bare family module. max_batch: most running rows (1 disables batching: one request at a
    time). max_queue: most waiting sequences; `submit` raises `QueueFull` beyond it.
    max_prefill_tokens: padded prompt tokens one prefill forward may take (at least one
    sequence is always admitted; one longer than this is prefilled in chunks of this many).
    kv_budget: most cached positions, rows x columns of the padded KV cache (None: no bound);
    the server derives it from ``--kv-cache-memory``.
    """

    def __init__(self, model, *, max_batch: int = 32, max_queue: int = 256,
                 max_prefill_tokens: int = 8192, pad_token_id: int | None = None, hooks=None,
                 kv_budget: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        if kv_budget is not None and kv_budget < 2:
            raise ValueError(f"kv_budget must be >= 2 positions, got {kv_budget}")
        self.model = model          # kept: a dropped MoEModel would close the runtime used here
        self.module = getattr(model, "module", model)
        if hooks is None:
            hooks = getattr(model, "runtime", None)
        self.hooks = hooks if hooks is not None else NoHooks()
        self.device = _device_of(model, self.module)
        if pad_token_id is None:
            tok = getattr(model, "tokenizer", None)
            pad_token_id = getattr(tok, "pad_token_id", None)
        self.pad_id = int(pad_token_id) if pad_token_id is not None else 0
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.kv_budget = kv_budget

        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._refusing = False                        # `stop_admitting`: submit refuses
        self._abort: str | None = None                # `abort`: the loop fails everything

        # the running batch (engine thread only): `rows[i]` owns row i of `_batch`
        self.rows: list[Sequence] = []
        self._batch: DecodeBatch | None = None
        self._last: list[int] = []                    # each row's newest token, not yet in the cache

        self._admitting: list[Sequence] = []           # admitted, not yet in `rows`
        # preempted sequences waiting to resume: still open for the hooks (no on_request_end),
        # and their resume prefill records only its new position
        self._preempted: set[Sequence] = set()
        self.last_error: str | None = None            # the last step-level failure
        self.last_step_ok: bool | None = None         # False after a failed step, True once one succeeds
        self.failed_steps = 0

        # counters (read from other threads; ints are updated atomically under the GIL)
        self.steps = 0
        self.prefills = 0
        self.tokens_generated = 0
        self.preemptions = 0

    # -- submission (any thread) ---------------------------------------------------------------
    def submit(self, seqs: Sequence | Iterable[Sequence]) -> None:
        """Queue one sequence or several (all or none: `QueueFull` when they do not fit)."""
        seqs = [seqs] if isinstance(seqs, Sequence) else list(seqs)
        with self._cond:
            if self._stopping or self._refusing:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"the waiting queue is full ({self.max_queue} requests)")
            for s in seqs:
                s.arrival = time.perf_counter()
            self._waiting.extend(seqs)
            self._cond.notify_all()

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` at the next token boundary (a client went away). Safe from any thread."""
        seq.cancelled = True
        waiting = False
        with self._cond:
            try:
                if seq not in self._preempted:     # a preempted one ends on the engine thread
                    self._waiting.remove(seq)      # not started: leave the queue now
                    waiting = True
            except ValueError:
                pass
            self._cond.notify_all()
        if waiting:
            self._finish(seq, CANCELLED, started=False)

    def is_alive(self) -> bool:
        """False once a started loop thread has stopped."""
        t = self._thread
        return t is None or t.is_alive()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def _cache(self):
        """The running batch's KV cache (None while idle)."""
        return self._batch.cache if self._batch is not None else None

    @property
    def _key_valid(self) -> torch.Tensor | None:
        """The running batch's key_valid [B, S] (None while idle)."""
        return self._batch.key_valid if self._batch is not None else None

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> "Batcher":
        """Run the loop in a background thread that owns the model from now on."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fmoe-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop; running and waiting sequences finish as "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._abort_all(CANCELLED, None)

    def stop_admitting(self) -> None:
        """From now on `submit` refuses (graceful shutdown); what was accepted still runs."""
        with self._cond:
            self._refusing = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every accepted sequence to finish; True if they did."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self._waiting or self.rows or self._admitting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def abort(self, error: str) -> None:
        """Finish every waiting and running sequence with "error" and `error` at the next step
        boundary (the engine thread does it; safe from any thread)."""
        with self._cond:
            self._abort = error
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self.rows:
                    self._cond.wait()
                if self._stopping:
                    return
                abort, self._abort = self._abort, None
            if abort is not None:
                self._abort_all(ERROR, abort)
                continue
            self.step()

    def run_until_idle(self) -> None:
        """Step synchronously until nothing is waiting or running (no background thread)."""
        while self._waiting or self.rows:
            self.step()

    def step(self) -> None:
        """One iteration: admit and prefill newcomers, then one decode step for every row.

        Never raises: a failure of one row (its sampling, its callbacks) finishes that row with
        "error"; a failure of the step itself (the forward, a read error) finishes every
        sequence the step touched (the running rows and the newcomers being admitted) with
        "error" and the cause, and leaves the waiting queue for the next step."""
        self._admitting = []
        try:
            self._step()
        except BaseException as e:
            recover = getattr(self.hooks, "recover", None)
            if recover is not None:
                try:
                    recover()         # the offload runtime's cache as if nothing were cached
                except Exception:
                    log.error("recovering the runtime failed:\n%s", traceback.format_exc())
            if not isinstance(e, Exception):
                raise                 # Ctrl-C, exit: the caller's
            log.error("engine step failed:\n%s", traceback.format_exc())
            self.last_error = _public_error(e)
            self.last_step_ok = False
            self.failed_steps += 1
            touched, self._admitting = self.rows + self._admitting, []
            self.rows = []
            self._reset()
            for s in touched:
                self._finish(s, ERROR, error=_public_error(e))
            # the runtime started over: a preempted sequence resumes as a new request there
            for s in list(self._preempted):
                self._end_preempted(s)
        else:
            self.last_step_ok = True

    @torch.inference_mode()
    def _step(self) -> None:
        self._drop_finished()
        for s in [s for s in self._preempted if s.cancelled]:
            with self._cond:
                self._waiting.remove(s)
            self._end_preempted(s)
            self._finish(s, CANCELLED, started=False)
        new = self._admit()
        if new:
            self._prefill(new)
        self._admitting = []
        if self.rows:
            self._fit_budget()
        if self.rows:
            self._decode()
        self._drop_finished()

    # -- admission and prefill -----------------------------------------------------------------
    def _admit(self) -> list[Sequence]:
        room = self.max_batch - len(self.rows)
        # filled under the lock: `wait_idle` never sees a sequence neither waiting nor admitted
        out: list[Sequence] = []
        self._admitting = out
        longest = 0
        columns = self._batch.cache.seen if self._batch is not None else 0
        with self._cond:
            while self._waiting and len(out) < room:
                s = self._waiting[0]
                if s.cancelled or s.params.max_new_tokens == 0:
                    self._waiting.popleft()
                    self._finish(s, CANCELLED if s.cancelled else LENGTH, started=False)
                    continue
                n = max(longest, len(s.context))
                if out and n * (len(out) + 1) > self.max_prefill_tokens:
                    break
                if self.kv_budget is not None:
                    # the next decode step after this admission: every row, one column more
                    need = (len(self.rows) + len(out) + 1) * (max(columns, n) + 1)
                    if need > self.kv_budget:
                        if self.rows or out:
                            break         # waits for rows to finish
                        self._waiting.popleft()     # cannot run even alone
                        self._end_preempted(s)
                        self._finish(s, ERROR, started=False,
                                     error=f"the sequence needs {len(s.context) + 1} KV cache positions; "
                                           f"the budget holds {self.kv_budget}")
                        continue
                longest = n
                out.append(self._waiting.popleft())
        return out

    def _fit_budget(self) -> None:
        """Before a decode step: preempt the most recently admitted rows until rows x (columns
        + 1) fits the KV budget; a lone row that outgrows it finishes with "length"."""
        if self.kv_budget is None:
            return
        while self.rows and len(self.rows) * (self._batch.cache.seen + 1) > self.kv_budget:
            if len(self.rows) == 1:
                log.warning("sequence %d outgrew the KV budget (%d positions); finished with 'length'",
                            self.rows[0].id, self.kv_budget)
                self._finish(self.rows[0], LENGTH)
                self._reset()
                return
            s = self.rows[-1]
            with self._cond:           # queued first: a failure below leaves it waiting
                self._waiting.appendleft(s)
            self._preempted.add(s)
            self.rows.pop()
            self._last.pop()
            self.preemptions += 1
            log.info("sequence %d preempted (KV budget %d positions); it resumes from its %d tokens",
                     s.id, self.kv_budget, len(s.context))
            self._batch.keep(torch.arange(len(self.rows), device=self.device))
        self._batch.cache.max_len = self.kv_budget // len(self.rows)

    def _prefill(self, seqs: list[Sequence]) -> None:
        resumed = [s in self._preempted for s in seqs]
        for s, again in zip(seqs, resumed):
            if not again:
                self.hooks.on_request_start(s.id, s.prompt_text, list(s.context))
        self._preempted.difference_update(seqs)
        ids, valid = left_pad([s.context for s in seqs], self.pad_id, self.device)
        record = None
        if any(resumed):
            # a resumed row's positions but its last were seen by the hooks before it was
            # preempted: a recorded trace keeps each token once
            record = valid.clone()
            record[torch.tensor(resumed, device=self.device), :-1] = False
        logits, batch = prefill(self.module, ids, valid, self.hooks, [s.id for s in seqs],
                                max_len=None if self.kv_budget is None else self.kv_budget // len(seqs),
                                record=record, chunk=self.max_prefill_tokens)
        self.prefills += 1
        toks = self._sample(logits, seqs)
        keep = [i for i, (s, t) in enumerate(zip(seqs, toks)) if t is not None and not self._emit(s, t)]
        if not keep:
            return
        if len(keep) < len(seqs):
            batch.keep(torch.tensor(keep, device=self.device))
        # rows join the running batch
        if self.rows and self.kv_budget is not None:
            self._batch.cache.max_len = self.kv_budget // (len(self.rows) + len(keep))
        if not self.rows:
            self._batch = batch
        else:
            self._batch.merge(batch)
        self.rows.extend(seqs[i] for i in keep)
        self._last.extend(toks[i] for i in keep)

    # -- decode --------------------------------------------------------------------------------
    def _decode(self) -> None:
        ids = torch.tensor(self._last, dtype=torch.long, device=self.device)
        logits = decode_step(self.module, self._batch, ids, self.hooks, [s.id for s in self.rows])
        self.steps += 1
        toks = self._sample(logits, self.rows)
        for i, (s, t) in enumerate(zip(self.rows, toks)):
            if t is None:            # its sampling failed: the row is finished with "error"
                continue
            self._emit(s, t)
            self._last[i] = t

    # -- sampling and finishing ----------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
        """logits [B, V] -> one token per row, each row with its own params and generator.
        A row whose sampling fails gets None and is finished with "error": the others go on."""
        greedy = None
        out: list[int | None] = []
        for i, s in enumerate(seqs):
            p = s.params
            try:
                if p.temperature == 0 and not p.processes:
                    if greedy is None:
                        greedy = logits.argmax(dim=-1).tolist()
                    out.append(int(greedy[i]))
                    continue
                if p.temperature != 0 and s.generator is None:
                    seed = p.seed if p.seed is not None else random.getrandbits(63)
                    s.generator = torch.Generator(device=logits.device).manual_seed(int(seed))
                if p.repetition_penalty != 1.0 and s.seen is None:
                    ids = torch.tensor([s.prompt + s.output], dtype=torch.long, device=logits.device)
                    s.seen = seen_tokens(ids, None, logits.shape[-1])
                tok = int(sample(logits[i:i + 1], p, s.generator, s.seen, len(s.output))[0])
                if s.seen is not None:
                    s.seen[0, tok] = True
                out.append(tok)
            except Exception as e:
                log.error("sampling failed for sequence %d:\n%s", s.id, traceback.format_exc())
                self._finish(s, ERROR, error=f"sampling failed: {_public_error(e)}")
                out.append(None)
        return out

    def _emit(self, s: Sequence, tok: int) -> bool:
        """Record a new token of `s`; returns True when `s` finished."""
        if s.cancelled:
            self._finish(s, CANCELLED)
            return True
        s.output.append(tok)
        self.tokens_generated += 1
        if s.first_token_time is None:
            s.first_token_time = time.perf_counter()
        stop = False
        if s.on_token is not None:
            try:
                stop = bool(s.on_token(s, tok))
            except Exception as e:
                log.error("on_token callback failed:\n%s", traceback.format_exc())
                self._finish(s, ERROR, error=f"{type(e).__name__}: {e}")
                return True
        if stop or s.is_eos(tok):
            self._finish(s, STOP)
        elif len(s.output) >= s.params.max_new_tokens:
            self._finish(s, LENGTH)
        return s.finished

    def _finish(self, s: Sequence, reason: str, error: str | None = None, started: bool = True) -> None:
        if s.finished:
            return
        s.finish_reason = reason
        s.error = error
        s.finish_time = time.perf_counter()
        if started:
            try:
                self.hooks.on_request_end(s.id)
            except Exception:
                log.error("on_request_end failed:\n%s", traceback.format_exc())
        if s.on_finish is not None:
            try:
                s.on_finish(s)
            except Exception:
                log.error("on_finish callback failed:\n%s", traceback.format_exc())
        s.done.set()

    def _drop_finished(self) -> None:
        for s in self.rows:
            if s.cancelled and not s.finished:
                self._finish(s, CANCELLED)
        keep = [i for i, s in enumerate(self.rows) if not s.finished]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset()
            return
        self._batch.keep(torch.tensor(keep, device=self.device))
        self.rows = [self.rows[i] for i in keep]
        self._last = [self._last[i] for i in keep]

    def _end_preempted(self, s: Sequence) -> None:
        """`s` leaves the preempted set; the hooks' request ends (it was left open)."""
        if s in self._preempted:
            self._preempted.discard(s)
            try:
                self.hooks.on_request_end(s.id)
            except Exception:
                log.error("on_request_end failed:\n%s", traceback.format_exc())

    def _reset(self) -> None:
        self.rows, self._last = [], []
        self._batch = None

    def _abort_all(self, reason: str, error: str | None) -> None:
        rows, self.rows = self.rows, []
        for s in rows:
            self._finish(s, reason, error=error)
        self._reset()
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for s in waiting:
            self._end_preempted(s)
            self._finish(s, reason, error=error, started=False)


# -- helpers -------------------------------------------------------------------------------------
def _public_error(e: BaseException) -> str:
    """The message a client sees: the error and its causes, one line (no traceback)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen and len(parts) < 4:
        seen.add(id(e))
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if not parts or msg not in parts[-1]:        # a cause already quoted is not repeated
            parts.append(f"{type(e).__name__}: {msg}" if msg else type(e).__name__)
        e = e.__cause__ or e.__context__
    return "; caused by ".join(parts)


def _device_of(model, module) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
