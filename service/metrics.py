"""Prometheus metrics in the text exposition format (version 0.0.4), without extra dependencies.

Counters, gauges and histograms with labels; all updates happen on the event loop thread, and rendering
takes a lock so a scrape never sees a half-updated histogram.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024)

Labels = tuple[str, ...]
_INF_LE = 'le="+Inf"'


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


@dataclass
class _Metric:
    name: str
    help: str
    labels: Labels
    kind: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _key(self, values: dict[str, str]) -> Labels:
        if set(values) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {sorted(values)}")
        return tuple(str(values[n]) for n in self.labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


@dataclass
class Counter(_Metric):
    values: dict[Labels, float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self.lock:
            return [*self.header(), *(f"{self.name}{_label_text(self.labels, k)} {_fmt(v)}"
                                     for k, v in sorted(self.values.items()))]


@dataclass
class Gauge(_Metric):
    """A gauge read from a callback at scrape time (queue depth, resident adapters)."""

    read: Callable[[], Iterable[tuple[dict[str, str], float]]] = lambda: ()

    def render(self) -> list[str]:
        lines = self.header()
        for labels, value in self.read():
            lines.append(f"{self.name}{_label_text(self.labels, self._key(labels))} {_fmt(value)}")
        return lines


@dataclass
class Histogram(_Metric):
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    series: dict[Labels, list[float]] = field(default_factory=dict)  # bucket counts..., sum, count

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self.lock:
            row = self.series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    row[i] += 1
            row[-2] += value
            row[-1] += 1

    def count(self, **labels: str) -> float:
        row = self.series.get(self._key(labels))
        return row[-1] if row else 0.0

    def render(self) -> list[str]:
        lines = self.header()
        with self.lock:
            for key, row in sorted(self.series.items()):
                for bound, cumulative in zip(self.buckets, row, strict=False):
                    le = f'le="{_fmt(bound)}"'
                    lines.append(f"{self.name}_bucket{_label_text(self.labels, key, le)} {_fmt(cumulative)}")
                lines.append(f"{self.name}_bucket{_label_text(self.labels, key, _INF_LE)} {_fmt(row[-1])}")
                lines.append(f"{self.name}_sum{_label_text(self.labels, key)} {_fmt(row[-2])}")
                lines.append(f"{self.name}_count{_label_text(self.labels, key)} {_fmt(row[-1])}")
        return lines


class ServiceMetrics:
    """The service's metrics; ``persona`` and ``adapter_version`` label everything about answers."""

    def __init__(self) -> None:
        answer = ("endpoint", "persona", "adapter_version")
        self.requests = Counter("persona_router_requests_total",
                                "Answer requests by endpoint, persona, adapter version and status code.",
                                (*answer, "status"), "counter")
        self.latency = Histogram("persona_router_request_latency_seconds",
                                 "End-to-end latency of answer requests.", answer, "histogram")
        self.first_token = Histogram("persona_router_time_to_first_token_seconds",
                                     "Time from request arrival to the first generated token.", answer, "histogram")
        self.tokens = Counter("persona_router_tokens_total", "Prompt and completion tokens.",
                              ("kind", "persona", "adapter_version"), "counter")
        self.completion_tokens = Histogram("persona_router_completion_tokens",
                                           "Completion length per request.", ("persona", "adapter_version"),
                                           "histogram", buckets=tuple(float(b) for b in TOKEN_BUCKETS))
        self.decisions = Counter("persona_router_routing_decisions_total",
                                 "Routing decisions by source (explicit, inferred, fallback) and persona.",
                                 ("source", "persona"), "counter")
        self.ab = Counter("persona_router_ab_assignments_total", "Live A/B assignments by persona and arm.",
                          ("persona", "arm", "adapter_version"), "counter")
        self.errors = Counter("persona_router_errors_total", "Failed requests by endpoint and error type.",
                              ("endpoint", "type"), "counter")
        self.adapter_events = Counter("persona_router_adapter_events_total",
                                      "Adapter loads, unloads and refusals.", ("event", "persona", "adapter_version"),
                                      "counter")
        self.gauges: list[Gauge] = []

    def add_gauge(self, name: str, help_text: str, labels: Labels,
                  read: Callable[[], Iterable[tuple[dict[str, str], float]]]) -> None:
        self.gauges.append(Gauge(name, help_text, labels, "gauge", read=read))

    def render(self) -> str:
        metrics: list[Counter | Histogram | Gauge] = [
            self.requests, self.latency, self.first_token, self.tokens, self.completion_tokens, self.decisions,
            self.ab, self.errors, self.adapter_events, *self.gauges,
        ]
        lines: list[str] = []
        for metric in metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
