"""Per-request timings and their aggregates: TTFT, ITL, TPOT, end-to-end latency, throughput, goodput.

Definitions follow vLLM's `bench serve` and NVIDIA's genai-perf:

- TTFT: from sending the request to the first chunk carrying output text.
- ITL: the gaps between successive chunks carrying text (pooled over all requests when aggregated).
- TPOT: per request, (end-to-end - TTFT) / (output tokens - 1), for requests with more than one token.
- End-to-end: from sending the request to the end of its stream.
- Throughput: completed requests, output tokens and input + output tokens per second of the point's
  duration (first send to last stream end).
- Goodput: completed requests per second that met every SLO given.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

__all__ = [
    "SLO_METRICS",
    "Aggregates",
    "Distribution",
    "RequestRecord",
    "compute_aggregates",
    "distribution",
    "meets_slo",
    "parse_slo",
]

TokenSource = Literal["usage", "engine", "tokenizer", "chunks"]

SLO_METRICS = ("ttft", "tpot", "itl", "e2e")
"""Metrics an SLO may bound: `itl` bounds a request's largest gap, the others its value."""


class RequestRecord(BaseModel):
    """One request's raw timings (seconds) and token counts."""

    index: int
    """Position in the workload."""
    start_s: float
    """When it was sent, seconds after the point began."""
    ttft_s: float | None = None
    chunk_offsets_s: list[float] = Field(default_factory=list)
    """Arrival of each chunk with text, seconds after sending."""
    e2e_s: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    token_source: TokenSource = "chunks"
    """Where output_tokens came from: the server's usage, the engine, the workload's tokenizer, or a chunk count."""
    output_chars: int = 0
    status: str = "ok"
    """`ok`, or why it failed: an HTTP status code, `stream_error`, `timeout`, `connection`, an exception."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the request completed."""
        return self.status == "ok"

    @property
    def itl_s(self) -> list[float]:
        """Gaps between successive text chunks, seconds."""
        offsets = self.chunk_offsets_s
        return [b - a for a, b in zip(offsets, offsets[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first, seconds; None with fewer than two tokens."""
        if self.e2e_s is None or self.ttft_s is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


class Distribution(BaseModel):
    """Summary statistics of one latency, milliseconds."""

    count: int = 0
    mean: float | None = None
    median: float | None = None
    p90: float | None = None
    p99: float | None = None
    min: float | None = None
    max: float | None = None
    std: float | None = None


class Aggregates(BaseModel):
    """What one load point achieved."""

    completed: int
    failed: int
    errors: dict[str, int]
    """Failed requests by status."""
    duration_s: float
    request_throughput: float
    """Completed requests per second."""
    output_throughput: float
    """Output tokens per second."""
    total_throughput: float
    """Input plus output tokens per second."""
    total_input_tokens: int
    total_output_tokens: int
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    slo_ms: dict[str, float] = Field(default_factory=dict)
    good_requests: int | None = None
    """Completed requests that met every SLO; None without SLOs."""
    goodput: float | None = None
    """good_requests per second; None without SLOs."""


def distribution(values_s: Sequence[float]) -> Distribution:
    """Summarize values given in seconds as milliseconds (linear-interpolated percentiles)."""
    if not values_s:
        return Distribution()
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return Distribution(
        count=int(ms.size),
        mean=float(ms.mean()),
        median=float(p50),
        p90=float(p90),
        p99=float(p99),
        min=float(ms.min()),
        max=float(ms.max()),
        std=float(ms.std()),
    )


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)?\s*$")
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, None: 1.0}


def parse_slo(text: str) -> dict[str, float]:
    """Parse `ttft=500ms,tpot=50ms` into milliseconds by metric (a bare number is milliseconds).

    Raises:
        ValueError: On an unknown metric or an unreadable duration.
    """
    slo: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = {"e2el": "e2e"}.get(name.strip().lower(), name.strip().lower())
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {item!r}: expected METRIC=DURATION with METRIC one of {', '.join(SLO_METRICS)}")
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"bad SLO duration {value!r}: expected e.g. 500ms, 0.5s or 800us")
        slo[name] = float(match.group(1)) * _UNIT_MS[match.group(2)]
    return slo


def meets_slo(record: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """Whether a completed request met every SLO; a metric it lacks (TPOT of one token) is not held against it."""
    if not record.ok:
        return False
    itl = record.itl_s
    values_s: dict[str, float | None] = {
        "ttft": record.ttft_s,
        "tpot": record.tpot_s,
        "itl": max(itl) if itl else None,
        "e2e": record.e2e_s,
    }
    for name, bound_ms in slo_ms.items():
        value = values_s[name]
        if value is not None and value * 1000.0 > bound_ms:
            return False
    return True


def compute_aggregates(
    records: Sequence[RequestRecord], duration_s: float, slo_ms: dict[str, float] | None = None
) -> Aggregates:
    """Aggregate one point's requests.

    Args:
        records: Every measured request, failed ones included.
        duration_s: The point's wall time, first send to last stream end.
        slo_ms: Optional bounds by metric (see `parse_slo`); enables goodput.
    """
    ok = [r for r in records if r.ok]
    errors = Counter(r.status for r in records if not r.ok)
    input_tokens = sum(r.input_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    good = sum(meets_slo(r, slo_ms) for r in ok) if slo_ms else None
    return Aggregates(
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=dict(sorted(errors.items())),
        duration_s=duration_s,
        request_throughput=len(ok) * per_s,
        output_throughput=output_tokens * per_s,
        total_throughput=(input_tokens + output_tokens) * per_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        ttft_ms=distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=distribution([t for r in ok if (t := r.tpot_s) is not None]),
        itl_ms=distribution([gap for r in ok for gap in r.itl_s]),
        e2e_ms=distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
        slo_ms=dict(slo_ms or {}),
        good_requests=good,
        goodput=None if good is None else good * per_s,
    )
