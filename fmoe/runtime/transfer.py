"""Copy engine: moves experts from the store into device-cache slots off the forward path.

One worker thread serves one priority queue: demand loads first (the forward is waiting), then
prefetch orders by priority; prefetch orders can be cancelled until they start. Each slot has a
generation number: re-assigning a slot bumps it, so an order issued for the slot's previous
occupant is dropped instead of overwriting the new one, and readiness is tracked per
(slot, generation).

On CUDA the worker reads into pinned staging buffers and copies on a side stream, recording one
event per slot; the forward waits only for the slots it needs. An FP8 store's experts cross the
link as FP8 plus scales and are dequantised into the slot on that stream. On CPU the worker
reads straight into the slot (the "device" is host memory; FP8 is dequantised at read).
`bytes_loaded` counts the bytes one load moves (`ExpertStore.expert_bytes`: FP8 plus scales
for an FP8 store). An optional emulated link makes each copy take at
least `nbytes / link_bandwidth` seconds, so CPU runs show transfer/compute overlap as a PCIe
link would (figures made with it are labelled emulated).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field

import torch

from ..errors import ExpertReadError
from .store import ExpertStore

log = logging.getLogger("fmoe.transfer")

DEMAND = 0
PREFETCH = 1

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bandwidth(text: str | float | None) -> float | None:
    """'25GB/s' -> 25e9 bytes/s; numbers (bytes/s) pass through; None stays None. A rate must
    be positive and finite: ValueError naming `link_bandwidth` (--link-bandwidth) otherwise."""
    if text is None:
        return None
    what = f"link_bandwidth (--link-bandwidth) {text!r}"
    if isinstance(text, bool):
        raise ValueError(f"{what}: not a rate (expected e.g. '25GB/s')")
    if isinstance(text, (int, float)):
        rate = float(text)
    else:
        m = re.fullmatch(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*([kmgt]i?)?b(?:ps|/s)?\s*",
                         str(text).lower())
        if not m:
            raise ValueError(f"{what}: cannot parse (expected e.g. '25GB/s')")
        rate = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"{what}: must be a positive rate (no --link-bandwidth: no emulated link)")
    return rate


@dataclass(order=True)
class _Order:
    rank: tuple
    key: int = field(compare=False)
    slot: int = field(compare=False)
    gen: int = field(compare=False)
    kind: int = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class CopyEngine:
    cpu_readers = 2          # reader threads on CPU (disk reads); CUDA runs one (see __init__)

    def __init__(self, store: ExpertStore, w13: torch.Tensor, w2: torch.Tensor,
                 link_bandwidth: float | None = None, readers: int | None = None):
        self.store = store
        self.w13, self.w2 = w13, w2           # device cache buffers [S, 2I, H], [S, H, I]
        self.cuda = w13.device.type == "cuda"
        self.link_bandwidth = link_bandwidth
        S = w13.shape[0]
        self.gen = [0] * S
        self.done_gen = [-1] * S              # generation whose bytes the slot holds
        self._cv = threading.Condition()
        self._queue: list[_Order] = []
        self._pending: dict[int, _Order] = {}  # slot -> newest queued order
        self._count = itertools.count()
        self._stop = False
        self.bytes_loaded = 0
        self.busy_seconds = 0.0
        self.error: BaseException | None = None   # the worker thread died (not a read error)
        # read errors: the failed order of a slot (generation, error) until the next need retries
        # it; `last_error` is the latest failure not yet followed by a successful read
        self._failed: dict[int, tuple[int, BaseException]] = {}
        self.last_error: BaseException | None = None
        self.last_error_key: int | None = None
        self.read_errors = 0
        if self.cuda:
            self.stream = torch.cuda.Stream(device=w13.device)
            # the slots were zero-filled on the compute stream: copies into them come after
            self.stream.wait_stream(torch.cuda.current_stream(w13.device))
            self.events = [None] * S
            self.use_events = [None] * S   # compute-stream event after the last read of a slot
            if getattr(store, "quantized", False):
                # FP8 + scales cross the link; one device copy of the raw buffers per staging
                # pair, dequantised into the slot on the copy stream
                self._staging = [store.new_raw_staging() for _ in range(2)]
                self._device_raw = [store.new_raw_staging(device=w13.device) for _ in range(2)]
            else:
                self._staging = [store.new_staging() for _ in range(2)]
            self._staging_events = [None, None]
            self._turn = 0
        # On CPU the "copy" is a disk read straight into the slot, and an SSD serves two reads
        # at once faster than one after the other; on CUDA one worker keeps the staging pair
        # and the copy stream in order, and an emulated link is one link.
        if readers is None:
            readers = 1 if (self.cuda or link_bandwidth) else self.cpu_readers
        if self.cuda and readers != 1:
            raise ValueError("the CUDA copy engine runs one reader")
        self._busy: set[int] = set()           # slots a worker is writing right now
        self._workers = [threading.Thread(target=self._run, name=f"fmoe-copy-{i}", daemon=True)
                         for i in range(max(1, int(readers)))]
        for w in self._workers:
            w.start()

    # -- orders ----------------------------------------------------------------------------
    def assign(self, slot: int) -> int:
        """The slot gets a new occupant: returns its new generation; queued orders for the old
        occupant become stale."""
        with self._cv:
            self.gen[slot] += 1
            old = self._pending.pop(slot, None)
            if old is not None:
                old.cancelled = True
            return self.gen[slot]

    def load(self, key: int, slot: int, kind: int = DEMAND, priority: float = 0.0) -> None:
        """Queue expert `key` into `slot` (after `assign`). Demand orders go first; prefetch
        orders by falling `priority`."""
        with self._cv:
            rank = (kind, -priority, next(self._count))
            order = _Order(rank, key, slot, self.gen[slot], kind)
            self._pending[slot] = order
            heapq.heappush(self._queue, order)
            self._cv.notify()

    def demand(self, key: int, slot: int) -> None:
        """`key` (already assigned to `slot`) is needed now: promote its queued prefetch, or
        queue a demand load if its order was cancelled; nothing if it is loaded."""
        with self._cv:
            if self.done_gen[slot] == self.gen[slot]:
                return
            self._failed.pop(slot, None)         # a failed read is retried on the next need
            if slot in self._pending:
                self._promote_locked(slot)
            else:
                order = _Order((DEMAND, 0.0, next(self._count)), key, slot, self.gen[slot], DEMAND)
                self._pending[slot] = order
                heapq.heappush(self._queue, order)
                self._cv.notify()

    def cancel_prefetches(self) -> list[int]:
        """Drop every queued prefetch order; returns their slots (still assigned, not loaded)."""
        with self._cv:
            slots = []
            for order in self._queue:
                if order.kind == PREFETCH and not order.cancelled:
                    order.cancelled = True
                    self._pending.pop(order.slot, None)
                    slots.append(order.slot)
            return slots

    def is_ready(self, slot: int) -> bool:
        ready = self.done_gen[slot] == self.gen[slot]
        if ready and self.cuda and self.events[slot] is not None:
            return self.events[slot].query()
        return ready

    def wait(self, slot: int) -> float:
        """Block until `slot` holds its current occupant. Returns seconds waited."""
        t0 = time.perf_counter()
        with self._cv:
            self._raise_failed(slot)
            if self.done_gen[slot] != self.gen[slot] and slot not in self._pending:
                raise RuntimeError(f"slot {slot} has no load queued; call demand() first")
            self._promote_locked(slot)
            while self.done_gen[slot] != self.gen[slot]:
                self._raise_failed(slot)
                if self._stop:
                    raise RuntimeError("the copy engine is closed (the model was closed)")
                if self.error is not None:
                    raise ExpertReadError(f"the copy engine stopped: {type(self.error).__name__}: "
                                          f"{self.error}") from self.error
                self._cv.wait(0.05)
        if self.cuda and self.events[slot] is not None:
            self.events[slot].synchronize()
        return time.perf_counter() - t0

    def _raise_failed(self, slot: int) -> None:
        failed = self._failed.get(slot)
        if failed is not None and failed[0] == self.gen[slot]:
            del self._failed[slot]               # the next need queues the read again
            raise failed[1]

    def _promote_locked(self, slot: int) -> None:
        order = self._pending.get(slot)
        if order is not None and order.kind == PREFETCH and not order.cancelled:
            order.cancelled = True
            new = _Order((DEMAND, 0.0, next(self._count)), order.key, slot, order.gen, DEMAND)
            self._pending[slot] = new
            heapq.heappush(self._queue, new)
            self._cv.notify()

    def mark_used(self, slots) -> None:
        """CUDA: the compute stream has queued reads of `slots`; a later copy into one of them
        must wait for those reads."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.w13.device))
            for s in slots:
                self.use_events[s] = ev

    def queued_prefetches(self) -> int:
        with self._cv:
            return sum(1 for o in self._pending.values() if o.kind == PREFETCH)

    def drain(self) -> None:
        """Wait until no order is queued or running."""
        with self._cv:
            while self._pending and self.error is None and not self._stop:
                self._cv.wait(0.05)

    def describe(self, key: int) -> str:
        E = getattr(self.store, "num_experts", 0) or 0
        return f"expert {key // E}/{key % E} (layer/expert)" if E else f"expert key {key}"

    @property
    def healthy(self) -> bool:
        """False after a read error until that expert is read successfully (on its next need,
        or by `probe`), and when the worker died."""
        return self.error is None and self.last_error is None

    def probe(self) -> bool:
        """Re-read the expert whose read failed last into scratch buffers (off the worker);
        a success clears `last_error`. Returns `healthy`."""
        with self._cv:
            key, err = self.last_error_key, self.last_error
        if err is None or key is None:
            return self.healthy
        w13, w2 = self.store.new_staging()
        try:
            self.store.read_into(key, w13, w2)
        except Exception:
            return False
        with self._cv:
            if self.last_error is err:
                self.last_error = None
                self.last_error_key = None
        return self.healthy

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for w in self._workers:
            w.join(timeout=5)
        if self.cuda:
            # copies still in flight write into slots (and read staging buffers) that may be
            # freed once the engine is gone
            self.stream.synchronize()

    def _next_locked(self) -> _Order | None:
        """The most urgent live order whose slot no other worker is writing (a stale write
        still in flight must finish before the slot's next occupant is read in)."""
        held = []
        found = None
        while self._queue:
            order = heapq.heappop(self._queue)
            if order.cancelled or order.gen != self.gen[order.slot]:
                continue
            if self.done_gen[order.slot] == order.gen:
                # already read in (a prefetch promoted to demand while in flight): no second read
                if self._pending.get(order.slot) is order:
                    del self._pending[order.slot]
                self._cv.notify_all()
                continue
            if order.slot in self._busy:
                held.append(order)
                continue
            found = order
            break
        for order in held:
            heapq.heappush(self._queue, order)
        return found

    # -- worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    order = None
                    while not self._stop:
                        order = self._next_locked()
                        if order is not None:
                            break
                        self._cv.wait()
                    if self._stop:
                        return
                    self._busy.add(order.slot)
                t0 = time.perf_counter()
                try:
                    self._copy(order)
                except Exception as e:       # this read fails; the worker serves the next order
                    with self._cv:
                        self._busy.discard(order.slot)
                    err = ExpertReadError(f"cannot load {self.describe(order.key)}: "
                                          f"{type(e).__name__}: {e}")
                    err.__cause__ = e
                    log.error("%s", err)
                    with self._cv:
                        self.read_errors += 1
                        self.last_error, self.last_error_key = err, order.key
                        if self._pending.get(order.slot) is order:
                            del self._pending[order.slot]
                        if order.gen == self.gen[order.slot]:
                            self._failed[order.slot] = (order.gen, err)
                        self._cv.notify_all()
                    continue
                nbytes = self.store.expert_bytes
                if self.link_bandwidth:
                    # an emulated link: the copy takes at least what the link would need
                    rest = nbytes / self.link_bandwidth - (time.perf_counter() - t0)
                    if rest > 0:
                        time.sleep(rest)
                with self._cv:
                    self._busy.discard(order.slot)
                    self.busy_seconds += time.perf_counter() - t0
                    self.bytes_loaded += nbytes
                    if self._pending.get(order.slot) is order:
                        del self._pending[order.slot]
                    if order.gen == self.gen[order.slot]:
                        self.done_gen[order.slot] = order.gen
                    if order.key == self.last_error_key:             # the failed read works again
                        self.last_error = self.last_error_key = None
                    self._cv.notify_all()
        except BaseException as e:  # surfaced to the forward by wait()
            with self._cv:
                self.error = e
                self._cv.notify_all()

    def _copy(self, order: _Order) -> None:
        s = order.slot
        if not self.cuda:
            self.store.read_into(order.key, self.w13[s], self.w2[s])
            return
        i = self._turn
        self._turn ^= 1
        if self._staging_events[i] is not None:
            self._staging_events[i].synchronize()   # the staging pair is free again
        if getattr(self.store, "quantized", False):
            raw = self._staging[i]
            self.store.read_raw_into(order.key, raw)
            with torch.cuda.stream(self.stream):
                if self.use_events[s] is not None:
                    self.stream.wait_event(self.use_events[s])
                dev = self._device_raw[i]
                for d, h in zip(dev, raw):
                    d.copy_(h, non_blocking=True)
                self.store.dequantize_into(dev, self.w13[s], self.w2[s])
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self.events[s] = ev
            self._staging_events[i] = ev
            return
        s13, s2 = self._staging[i]
        self.store.read_into(order.key, s13, s2)
        with torch.cuda.stream(self.stream):
            if self.use_events[s] is not None:
                self.stream.wait_event(self.use_events[s])
            self.w13[s].copy_(s13, non_blocking=True)
            self.w2[s].copy_(s2, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[s] = ev
        self._staging_events[i] = ev
