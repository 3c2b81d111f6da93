"""What the service counts, in Prometheus' text format (no client library needed), and the
recent results the dashboard lists.

The drift signal: a camera that moved or a lamp that aged shifts the scores of *good* parts
before any defect is missed. Per model we keep the last `window` scores and compare their
median with the normal validation images' median (saved with the thresholds), in units of the
distance from that median to the threshold: 0 = recent parts score like validation did, 1 =
the median recent part sits at the threshold (half of a normal stream would be flagged).
Also exported: the share of recent scores above the highest validation score. Both are
gauges that an alert rule can watch; neither changes a decision.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from defectlens.thresholds import Thresholds

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Score buckets, as fractions of the way from the validation median (0) to the threshold (1).
SCORE_FRACTIONS = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)


@dataclass
class RecentResult:
    """One scored (or refused) image, for the dashboard's live list."""

    id: int
    time: float
    model: str
    filename: str
    score: float | None
    decision: str  # "defective", "good" or "error"
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "model": self.model,
            "filename": self.filename,
            "score": self.score,
            "decision": self.decision,
            "error": self.error,
        }


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{_number(b)}"}} {c}'
            for b, c in zip(self.bounds, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        out.append(f"{name}_sum{{{labels}}} {_number(self.sum)}")
        out.append(f"{name}_count{{{labels}}} {self.total}")
        return out


class ServiceMetrics:
    """Counters, histograms, per-model recent scores and the recent-results list; every
    method is thread-safe (the batcher threads and the event loop both report here)."""

    def __init__(self, thresholds: dict[str, Thresholds], window: int = 200, recent: int = 500):
        self._lock = threading.Lock()
        self.thresholds = thresholds
        self.requests: Counter[tuple[str, int]] = Counter()
        self.errors: Counter[str] = Counter()
        self.images: Counter[str] = Counter()
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, _Histogram] = {}
        self.batches = {name: _Histogram(BATCH_BUCKETS) for name in thresholds}
        self.batch_seconds = {name: 0.0 for name in thresholds}
        self.scores = {name: _Histogram(_score_bounds(t)) for name, t in thresholds.items()}
        self.window = {name: deque(maxlen=window) for name in thresholds}
        self.recent: deque[RecentResult] = deque(maxlen=recent)
        self._next_id = 1
        self.started = time.time()

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latency.setdefault(route, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, model: str, images: int, seconds: float) -> None:
        """A batch of `images` was scored in `seconds` (by the model's worker thread)."""
        with self._lock:
            self.batches[model].observe(images)
            self.batch_seconds[model] += seconds

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def scored(self, model: str, filename: str, score: float, flagged: bool) -> None:
        decision = "defective" if flagged else "good"
        with self._lock:
            self.images[model] += 1
            self.decisions[(model, decision)] += 1
            self.scores[model].observe(score)
            self.window[model].append(score)
            self._remember(model, filename, score, decision, None)

    def failed(self, model: str, filename: str, message: str) -> None:
        with self._lock:
            self._remember(model, filename, None, "error", message)

    def _remember(self, model, filename, score, decision, error) -> None:
        self.recent.append(
            RecentResult(self._next_id, time.time(), model, filename, score, decision, error)
        )
        self._next_id += 1

    def recent_results(self, model: str | None, after: int, limit: int) -> list[dict[str, Any]]:
        """Recent results (newest last) with an id above `after`, of `model` if given."""
        with self._lock:
            rows = [r for r in self.recent if r.id > after and model in (None, r.model)]
        return [r.to_dict() for r in rows[-limit:]]

    def drift(self, model: str) -> dict[str, float | int | None]:
        """The drift signal of the module docstring for `model`'s recent scores."""
        with self._lock:
            scores = np.array(self.window[model], dtype=np.float64)
        t = self.thresholds[model]
        if scores.size == 0:
            return {"recent": 0, "drift": None, "above_validation_max": None}
        spread = t.image - t.validation_median
        median = float(np.median(scores))
        drift = (median - t.validation_median) / spread if spread > 0 else None
        above = float(np.mean(scores > t.validation_max))
        return {"recent": int(scores.size), "drift": drift, "above_validation_max": above}

    def render(self, queue_depths: dict[str, int], in_flight: int) -> str:
        """Everything, in Prometheus' text exposition format."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("defectlens_requests_total", "counter", "HTTP requests by route and status.")
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'defectlens_requests_total{{route="{route}",code="{status}"}} {n}')
            family("defectlens_request_seconds", "histogram", "Request latency by route.")
            for route, histogram in sorted(self.latency.items()):
                lines += histogram.lines("defectlens_request_seconds", f'route="{route}"')
            family("defectlens_errors_total", "counter", "Refused or failed requests by kind.")
            for kind, n in sorted(self.errors.items()):
                lines.append(f'defectlens_errors_total{{kind="{kind}"}} {n}')
            family("defectlens_images_scored_total", "counter", "Images scored by model.")
            for model in sorted(self.thresholds):
                lines.append(
                    f'defectlens_images_scored_total{{model="{model}"}} {self.images[model]}'
                )
            family("defectlens_decisions_total", "counter", "Decisions by model.")
            for model in sorted(self.thresholds):
                for decision in ("defective", "good"):
                    n = self.decisions[(model, decision)]
                    lines.append(
                        f'defectlens_decisions_total{{model="{model}",decision="{decision}"}} {n}'
                    )
            family(
                "defectlens_score",
                "histogram",
                "Image scores; buckets from the validation median to 4x past the threshold.",
            )
            for model, histogram in sorted(self.scores.items()):
                lines += histogram.lines("defectlens_score", f'model="{model}"')
            family("defectlens_batch_images", "histogram", "Images per scored batch, by model.")
            for model, histogram in sorted(self.batches.items()):
                lines += histogram.lines("defectlens_batch_images", f'model="{model}"')
            family(
                "defectlens_scoring_seconds_total",
                "counter",
                "Time the model's worker spent scoring batches (its busy time).",
            )
            for model, seconds in sorted(self.batch_seconds.items()):
                lines.append(
                    f'defectlens_scoring_seconds_total{{model="{model}"}} {_number(seconds)}'
                )
        family(
            "defectlens_score_drift",
            "gauge",
            "(median recent score - validation median) / (threshold - validation median).",
        )
        drifts = {model: self.drift(model) for model in sorted(self.thresholds)}
        for model, d in drifts.items():
            if d["drift"] is not None:
                lines.append(f'defectlens_score_drift{{model="{model}"}} {_number(d["drift"])}')
        family(
            "defectlens_recent_above_validation_max_ratio",
            "gauge",
            "Share of recent scores above the highest normal validation score.",
        )
        for model, d in drifts.items():
            if d["above_validation_max"] is not None:
                value = _number(d["above_validation_max"])
                lines.append(
                    f'defectlens_recent_above_validation_max_ratio{{model="{model}"}} {value}'
                )
        family("defectlens_queue_depth", "gauge", "Requests waiting to be scored, by model.")
        for model, depth in sorted(queue_depths.items()):
            lines.append(f'defectlens_queue_depth{{model="{model}"}} {depth}')
        family("defectlens_in_flight_requests", "gauge", "Requests being handled.")
        lines.append(f"defectlens_in_flight_requests {in_flight}")
        family("defectlens_uptime_seconds", "gauge", "Seconds since the service started.")
        lines.append(f"defectlens_uptime_seconds {_number(time.time() - self.started)}")
        return "\n".join(lines) + "\n"


def _score_bounds(t: Thresholds) -> tuple[float, ...]:
    spread = t.image - t.validation_median
    if not spread > 0:
        spread = abs(t.image) or 1.0
    return tuple(sorted({t.validation_median + f * spread for f in SCORE_FRACTIONS}))


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
