"""`GET /metrics` of `fmoe serve`: Prometheus series through `prometheus_client`.

Each server has its own `CollectorRegistry`, so two apps in one process never mix their counts.
Request figures (HTTP codes, finished sequences, token counts, latency histograms) are counted
as they happen; the engine's figures (running and waiting sequences, forwards) and the expert
cache's (`model.expert_stats()`, since load) are read at each scrape. The exposition is the text
format 0.0.4 without the ``*_created`` series prometheus_client adds to counters and histograms.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """The series of one server. `batcher` and `model` (either may be None) are read at scrape
    time; `count_http`, `count_rejected` and `observe_sequence` are safe from any thread."""

    def __init__(self, batcher=None, model=None):
        self.registry = r = CollectorRegistry()
        self.http = Counter("fmoe_http_requests_total", "HTTP requests by endpoint and status code.",
                            ["code", "endpoint"], registry=r)
        self.finished = Counter("fmoe_request_success_total",
                                "Finished sequences by finish reason (stop, length, cancelled, error).",
                                ["finished_reason"], registry=r)
        self.rejected = Counter("fmoe_requests_rejected_total",
                                "Requests answered 503: the waiting queue was full.", registry=r)
        self.prompt_tokens = Counter("fmoe_prompt_tokens_total", "Prompt tokens of finished sequences.",
                                     registry=r)
        self.generation_tokens = Counter("fmoe_generation_tokens_total",
                                         "Generated tokens of finished sequences.", registry=r)
        self.ttft = Histogram("fmoe_time_to_first_token_seconds",
                              "Time from request arrival to its first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("fmoe_time_per_output_token_seconds",
                              "Mean time between consecutive generated tokens of a request.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fmoe_e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_LiveFigures(batcher, model))

    def count_http(self, endpoint: str, status: int) -> None:
        self.http.labels(code=str(status), endpoint=endpoint).inc()

    def count_rejected(self) -> None:
        self.rejected.inc()

    def observe_sequence(self, seq) -> None:
        """Count a finished `fmoe.runtime.batching.Sequence` (its arrival, first and last token
        times in seconds)."""
        self.finished.labels(finished_reason=seq.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(seq.prompt))
        self.generation_tokens.inc(len(seq.output))
        if seq.first_token_time is not None:
            self.ttft.observe(seq.first_token_time - seq.arrival)
            if seq.finish_time is not None:
                self.e2e.observe(seq.finish_time - seq.arrival)
                if len(seq.output) > 1:
                    self.tpot.observe((seq.finish_time - seq.first_token_time) / (len(seq.output) - 1))

    def render(self) -> str:
        """The exposition (text format 0.0.4)."""
        return generate_latest(_WithoutCreated(self.registry)).decode("utf-8")


class _WithoutCreated:
    """A view of a registry without the ``*_created`` samples (creation timestamps)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():       # fresh objects on every collect
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class _LiveFigures:
    """The engine's and the expert cache's figures, read when scraped."""

    def __init__(self, batcher, model):
        self.batcher, self.model = batcher, model

    def collect(self):
        b = self.batcher
        if b is not None:
            yield _gauge("fmoe_num_requests_running", "Sequences in the running batch.", b.num_running)
            yield _gauge("fmoe_num_requests_waiting", "Sequences in the waiting queue.", b.num_waiting)
            yield CounterMetricFamily("fmoe_engine_decode_steps_total", "Decode forwards of the running batch.",
                                      value=b.steps)
            yield CounterMetricFamily("fmoe_engine_prefills_total", "Prefill forwards (admissions).",
                                      value=b.prefills)
            yield CounterMetricFamily("fmoe_engine_preemptions_total",
                                      "Rows preempted to keep the KV cache within its budget.",
                                      value=b.preemptions)
        if self.model is None:
            return
        try:
            st = self.model.expert_stats()
        except Exception:           # the runtime is busy or closed: leave the figures out
            return
        if not st:
            return
        uses = st["hits"] + st["misses"]
        yield _gauge("fmoe_expert_cache_capacity", "Routed-expert slots on the device.", st["capacity"])
        yield _gauge("fmoe_expert_resident_peak", "Most routed experts resident at once.", st["resident_peak"])
        for key, name, help_ in (
                ("hits", "fmoe_expert_hits_total", "Routed-expert uses whose weights were ready."),
                ("misses", "fmoe_expert_misses_total", "Routed-expert uses that waited for a load.")):
            yield CounterMetricFamily(name, help_, value=st[key])
        yield _gauge("fmoe_expert_hit_rate", "hits / (hits + misses) since load (1 when fully resident).",
                     float(st["hits"] / uses) if uses else 1.0)
        for key, name, help_ in (
                ("prefetched", "fmoe_expert_prefetched_total", "Experts loaded ahead of need."),
                ("prefetch_used", "fmoe_expert_prefetch_used_total", "Prefetched experts used before eviction."),
                ("bytes_loaded", "fmoe_expert_bytes_loaded_total", "Bytes copied into the device expert cache."),
                ("stall_seconds", "fmoe_expert_stall_seconds_total", "Time the forward pass waited on expert loads.")):
            yield CounterMetricFamily(name, help_, value=st[key])


def _gauge(name: str, help_: str, value) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)
