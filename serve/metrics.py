"""Prometheus metrics of one app: engine gauges and counters plus per-request latency histograms.

Each app owns its CollectorRegistry (no global registry), so several apps can live in one
process (tests, replicas).
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tokenmill.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class _EngineCollector(Collector):
    """Reads the async engine's latest stats at scrape time."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        stats = self._engine.get_stats()

        def stat(name: str) -> float:
            return float(getattr(stats, name, 0) or 0)

        gauges = (
            ("tokenmill_num_requests_running", "Requests in the running batch.", "num_running"),
            ("tokenmill_num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
            ("tokenmill_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).", "kv_cache_usage"),
            ("tokenmill_kv_cache_free_blocks", "Free KV cache blocks.", "num_free_blocks"),
            ("tokenmill_kv_cache_total_blocks", "KV cache blocks in all.", "num_total_blocks"),
        )
        for name, doc, field in gauges:
            yield GaugeMetricFamily(name, doc, value=stat(field))
        yield GaugeMetricFamily("tokenmill_engine_healthy", "1 while the engine loop runs.",
                                value=1.0 if self._engine.is_healthy else 0.0)
        counters = (
            ("tokenmill_num_preemptions", "Sequences preempted for lack of KV blocks.", "num_preemptions_total"),
            ("tokenmill_prompt_tokens", "Prompt tokens processed.", "prompt_tokens_total"),
            ("tokenmill_generation_tokens", "Tokens generated.", "generation_tokens_total"),
        )
        for name, doc, field in counters:
            yield CounterMetricFamily(name, doc, value=stat(field))


class _BatchHistogram(Collector):
    """A Prometheus histogram that takes n equal observations in one call: an output carrying n
    tokens records n inter-token gaps at the cost of one (prometheus_client's Histogram pays a
    lock and a bucket search per observation, per token)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += count
            self.sum += value * count

    def collect(self) -> Iterator[Any]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        cumulative, buckets = 0, []
        for bound, n in zip([*map(str, self.bounds), "+Inf"], counts):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class RequestTimer:
    """Latency bookkeeping of one engine request; feed it every output."""

    def __init__(self, metrics: "ServerMetrics") -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._last: float | None = None
        self._num_tokens = 0
        self._done = False

    def on_output(self, output: RequestOutput) -> None:
        num_tokens = max((len(o.token_ids) for o in output.outputs), default=0)
        if num_tokens <= self._num_tokens:
            return
        now = time.perf_counter()
        if self._last is None:
            self._metrics.ttft.observe(now - self._start)
        else:
            new = num_tokens - self._num_tokens
            self._metrics.itl.observe((now - self._last) / new, new)
        self._last = now
        self._num_tokens = num_tokens

    def finish(self, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self._metrics.e2e.observe(time.perf_counter() - self._start)
        self._metrics.requests.labels(finish_reason=reason).inc()


class ServerMetrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram("tokenmill_time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = _BatchHistogram("tokenmill_inter_token_latency_seconds", "Time between generated tokens.",
                                   _LATENCY_BUCKETS, self.registry)
        self.e2e = Histogram("tokenmill_e2e_request_latency_seconds", "Request latency, end to end.",
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.requests = Counter("tokenmill_requests", "Requests ended, by finish reason.", ["finish_reason"],
                                registry=self.registry)

    def start_request(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)
