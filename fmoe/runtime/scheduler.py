"""Runs a map predictor (`fmoe.runtime.predictor.MapPredictor`) for the fmoe policy, either on
the caller's thread (`SyncRunner`: the simulator, tests, prefetch off) or on a worker thread
(`PredictorWorker`: live prefetch, searches off the forward path).

The worker owns the predictor outright. The forward thread posts events to it and reads back the
latest `Prediction`, an immutable value stamped with its iteration and layer; the policy applies
it at the start of a layer, on the forward thread. Nothing else crosses threads, and both
directions go through one condition variable. Stale work is dropped: of several layer starts
waiting in the queue only the newest is searched. An exception raised on the worker is re-raised
on the forward thread by the next call (`post` or `latest`), as `PredictorError`.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from ..errors import FmoeError


class PredictorError(FmoeError, RuntimeError):
    """The predictor failed on its worker thread (the original exception is the cause)."""


class SyncRunner:
    """Drives the predictor at once, on the caller's thread: what is predicted, and when, is a
    deterministic function of the events."""

    threaded = False

    def __init__(self, predictor):
        self.predictor = predictor
        self._latest = None

    def post(self, method: str, *args) -> None:
        out = getattr(self.predictor, method)(*args)
        if method == "layer_start":
            self._latest = out

    def latest(self):
        return self._latest

    def drain(self, timeout: float = 30.0) -> None:
        pass

    def close(self) -> None:
        pass


class PredictorWorker:
    """The predictor on a worker thread, fed through one condition variable."""

    threaded = True

    def __init__(self, predictor, name: str = "fmoe-predictor"):
        self.predictor = predictor
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._busy = False
        self._closed = False
        self._latest = None
        self._error: BaseException | None = None
        self.dropped = 0               # stale layer starts not searched
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- forward thread ----------------------------------------------------------------------
    def _raise(self) -> None:
        # called with the lock held
        e = self._error
        if e is not None:
            self._error = None
            raise PredictorError(f"the expert-map predictor failed: {type(e).__name__}: {e}") from e

    def post(self, method: str, *args) -> None:
        with self._cond:
            self._raise()
            if self._closed:
                return
            self._queue.append((method, args))
            self._cond.notify()

    def latest(self):
        """The newest prediction the worker has made (None before the first)."""
        with self._cond:
            self._raise()
            return self._latest

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until the worker has handled every posted event (tests, shutdown); re-raises a
        worker error."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._busy) and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._raise()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # -- worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        pred = self.predictor
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._busy = True
            newest = max((i for i, (m, _) in enumerate(batch) if m == "layer_start"), default=-1)
            out, made, err = None, False, None
            try:
                for i, (method, args) in enumerate(batch):
                    if method == "layer_start":
                        if i != newest:          # stale: a later layer has started since
                            self.dropped += 1
                            continue
                        out, made = pred.layer_start(*args), True
                    else:
                        getattr(pred, method)(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised on the forward thread
                err = e
            with self._cond:
                if made:
                    self._latest = out
                if err is not None and self._error is None:
                    self._error = err
                self._busy = False
                self._cond.notify_all()
