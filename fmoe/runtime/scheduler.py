"""Prefetch scheduler: runs a prefetching policy's searches on a worker thread, off the forward
path. The forward thread posts workload events and takes whatever prefetch orders the worker
has produced so far; it never waits for a search.

Cache events (hits, inserts, evictions, victim choice) stay on the forward thread: they are
cheap and must be decided synchronously. The policy reads the worker's latest predictions
(plain attribute swaps, atomic under the GIL) when it picks victims.
"""

from __future__ import annotations

import queue
import threading
import time

from .policies import Policy

_STOP = object()


class PrefetchScheduler:
    def __init__(self, policy: Policy):
        self.policy = policy
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._orders: list[tuple[int, float]] = []
        self._pending = 0
        self._idle = threading.Condition()
        self.search_seconds = 0.0      # worker time spent in policy events
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fmoe-predictor", daemon=True)
        self._thread.start()

    # -- forward thread ----------------------------------------------------------------------
    def _post(self, *event) -> None:
        with self._idle:
            self._pending += 1
        self._events.put(event)

    def layer_start(self, layer: int) -> list[tuple[int, float]]:
        """Post the event; return (and clear) the orders produced since the last call."""
        self._post("on_layer_start", layer)
        orders, self._orders = self._orders, []
        return orders

    def routed(self, layer, experts, probs) -> None:
        self._post("on_routed", layer, experts, probs)

    def token_end(self) -> None:
        self._post("on_token_end")

    def request_start(self, seq_id, prompt=None, token_ids=None) -> None:
        self._post("on_request_start", seq_id, prompt, token_ids)

    def request_end(self, seq_id) -> None:
        self._post("on_request_end", seq_id)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until the worker has handled every posted event (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)

    def close(self) -> None:
        self.drain()
        self._events.put((_STOP,))
        self._thread.join(timeout=5)

    # -- worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            event = self._events.get()
            if event[0] is _STOP:
                return
            t0 = time.perf_counter()
            try:
                out = getattr(self.policy, event[0])(*event[1:])
                if event[0] == "on_layer_start" and out:
                    self._orders = out
            except BaseException as e:  # noqa: BLE001 - a failed search only loses prefetches
                self.error = e
            self.search_seconds += time.perf_counter() - t0
            with self._idle:
                self._pending -= 1
                if not self._pending:
                    self._idle.notify_all()
