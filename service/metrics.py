"""The service's Prometheus metrics, on ``prometheus_client``.

Each app owns its own ``CollectorRegistry`` (tests and benchmarks start several apps in one process, and the
global default registry would refuse the second set of names). The registry also carries the library's
process and platform collectors. Gauges that describe live state (queue depth, resident adapters) are read
from callbacks at scrape time, so they can never disagree with the state they describe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client import Counter as _PromCounter
from prometheus_client import Histogram as _PromHistogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024)

Labels = tuple[str, ...]
GaugeReader = Callable[[], Iterable[tuple[dict[str, str], float]]]


class Counter:
    """A labelled counter; labels are passed by name so a call site cannot swap two of them."""

    def __init__(self, name: str, help_text: str, labels: Labels, registry: CollectorRegistry) -> None:
        self.labels = labels
        self._metric = _PromCounter(name, help_text, labels, registry=registry)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._metric.labels(**_checked(self.labels, labels)).inc(amount)

    def get(self, **labels: str) -> float:
        return float(self._metric.labels(**_checked(self.labels, labels))._value.get())


class Histogram:
    def __init__(self, name: str, help_text: str, labels: Labels, registry: CollectorRegistry, *,
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.labels = labels
        self._metric = _PromHistogram(name, help_text, labels, registry=registry, buckets=tuple(buckets))

    def observe(self, value: float, **labels: str) -> None:
        self._metric.labels(**_checked(self.labels, labels)).observe(value)

    def count(self, **labels: str) -> float:
        wanted = _checked(self.labels, labels)
        for family in self._metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_count") and sample.labels == wanted:
                    return float(sample.value)
        return 0.0


class _CallbackGauges(Collector):
    """Gauges read from callbacks at scrape time."""

    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, Labels, GaugeReader]] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, help_text, labels, read in self.gauges:
            family = GaugeMetricFamily(name, help_text, labels=list(labels))
            for values, value in read():
                family.add_metric([str(values[n]) for n in _checked(labels, values)], value)
            yield family


def _checked(names: Labels, values: dict[str, Any]) -> dict[str, Any]:
    if set(values) != set(names):
        raise ValueError(f"takes labels {names}, got {sorted(values)}")
    return values


class ServiceMetrics:
    """The service's metrics; ``persona`` and ``adapter_version`` label everything about answers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        answer = ("endpoint", "persona", "adapter_version")
        r = self.registry
        self.requests = Counter("persona_router_requests_total",
                                "Answer requests by endpoint, persona, adapter version and status code.",
                                (*answer, "status"), r)
        self.latency = Histogram("persona_router_request_latency_seconds",
                                 "End-to-end latency of answer requests.", answer, r)
        self.first_token = Histogram("persona_router_time_to_first_token_seconds",
                                     "Time from request arrival to the first generated token.", answer, r)
        self.tokens = Counter("persona_router_tokens_total", "Prompt and completion tokens.",
                              ("kind", "persona", "adapter_version"), r)
        self.completion_tokens = Histogram("persona_router_completion_tokens", "Completion length per request.",
                                           ("persona", "adapter_version"), r,
                                           buckets=tuple(float(b) for b in TOKEN_BUCKETS))
        self.decisions = Counter("persona_router_routing_decisions_total",
                                 "Routing decisions by source (explicit, inferred, fallback) and persona.",
                                 ("source", "persona"), r)
        self.ab = Counter("persona_router_ab_assignments_total", "Live A/B assignments by persona and arm.",
                          ("persona", "arm", "adapter_version"), r)
        self.errors = Counter("persona_router_errors_total", "Failed requests by endpoint and error type.",
                              ("endpoint", "type"), r)
        self.adapter_events = Counter("persona_router_adapter_events_total",
                                      "Adapter loads, unloads and refusals.", ("event", "persona", "adapter_version"),
                                      r)
        self._gauges = _CallbackGauges()
        self.registry.register(self._gauges)

    def add_gauge(self, name: str, help_text: str, labels: Labels, read: GaugeReader) -> None:
        self._gauges.gauges.append((name, help_text, labels, read))

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition the scraper asked for (Prometheus text, or OpenMetrics by ``Accept``) and its
        content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
