"""The result file (JSON, every request's raw timings plus aggregates) and its Markdown renderings."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aisandbox.bench.metrics import Aggregates, Distribution, RequestRecord

__all__ = [
    "SCHEMA_VERSION",
    "BenchResult",
    "PointResult",
    "compare_markdown",
    "latency_markdown",
    "load_result",
    "summary_markdown",
    "write_result",
]

SCHEMA_VERSION = "aisandbox.bench/1"


class PointResult(BaseModel):
    """One load point: its aggregates and every request's raw timings."""

    model_config = ConfigDict(ser_json_inf_nan="strings")

    label: str
    concurrency: int | None = None
    request_rate: float | None = None
    """Requests per second; "Infinity" in the file for all-at-once."""
    max_concurrency: int | None = None
    aggregates: Aggregates
    requests: list[RequestRecord]


class BenchResult(BaseModel):
    """A whole run: what was measured, how, on what, and the results of each point."""

    model_config = ConfigDict(ser_json_inf_nan="strings")

    schema_version: str = SCHEMA_VERSION
    label: str
    """Name of the run in tables and plots."""
    created: str
    """UTC time the run started, ISO 8601."""
    command: list[str] = Field(default_factory=list)
    """The command line that produced it."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Workload and load options."""
    environment: dict[str, Any] = Field(default_factory=dict)
    """Machine and library versions of the benchmarking process."""
    target: dict[str, Any] = Field(default_factory=dict)
    """What was measured: base URL and served models, or the local engine's settings."""
    points: list[PointResult]


def write_result(result: BenchResult, path: Path) -> None:
    """Write a result file (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.model_dump_json(indent=1) + "\n", encoding="utf-8")


def load_result(path: Path) -> BenchResult:
    """Read a result file written by `write_result`."""
    return BenchResult.model_validate_json(path.read_text(encoding="utf-8"))


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(result: BenchResult) -> str:
    """One row per load point: requests, throughput, median and p99 latencies, goodput."""
    header = [
        "Load", "OK", "Failed", "Duration s", "Req/s", "Out tok/s", "Total tok/s",
        "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "ITL p50 ms", "ITL p99 ms",
        "E2E p50 ms", "E2E p99 ms", "Goodput req/s",
    ]  # fmt: skip
    rows = []
    for p in result.points:
        a = p.aggregates
        rows.append([
            p.label, str(a.completed), str(a.failed), _num(a.duration_s, 2), _num(a.request_throughput, 2),
            _num(a.output_throughput), _num(a.total_throughput),
            _num(a.ttft_ms.median), _num(a.ttft_ms.p99), _num(a.tpot_ms.median, 2), _num(a.tpot_ms.p99, 2),
            _num(a.itl_ms.median, 2), _num(a.itl_ms.p99, 2), _num(a.e2e_ms.median), _num(a.e2e_ms.p99),
            _num(a.goodput, 2),
        ])  # fmt: skip
    text = _table(header, rows)
    errors = [f"{p.label}: " + ", ".join(f"{k} x{v}" for k, v in p.aggregates.errors.items()) for p in result.points]
    errors = [e for p, e in zip(result.points, errors, strict=True) if p.aggregates.errors]
    if errors:
        text += "\n\nErrors by status: " + "; ".join(errors)
    slo = result.points[0].aggregates.slo_ms if result.points else {}
    if slo:
        text += "\n\nGoodput SLOs: " + ", ".join(f"{k} <= {v:g} ms" for k, v in slo.items())
    return text


_LATENCIES: tuple[tuple[str, Callable[[Aggregates], Distribution]], ...] = (
    ("TTFT", lambda a: a.ttft_ms),
    ("TPOT", lambda a: a.tpot_ms),
    ("ITL", lambda a: a.itl_ms),
    ("E2E", lambda a: a.e2e_ms),
)


def latency_markdown(result: BenchResult) -> str:
    """Mean, median, p90 and p99 of each latency at each load point, milliseconds."""
    rows = []
    for p in result.points:
        for name, get in _LATENCIES:
            d = get(p.aggregates)
            rows.append([p.label, name, _num(d.mean, 2), _num(d.median, 2), _num(d.p90, 2), _num(d.p99, 2)])
    return _table(["Load", "Latency (ms)", "Mean", "Median", "P90", "P99"], rows)


_COMPARED: tuple[tuple[str, Callable[[Aggregates], float | None], int], ...] = (
    ("Req/s", lambda a: a.request_throughput, 2),
    ("Out tok/s", lambda a: a.output_throughput, 1),
    ("Total tok/s", lambda a: a.total_throughput, 1),
    ("TTFT p50 ms", lambda a: a.ttft_ms.median, 1),
    ("TTFT p99 ms", lambda a: a.ttft_ms.p99, 1),
    ("TPOT p50 ms", lambda a: a.tpot_ms.median, 2),
    ("TPOT p99 ms", lambda a: a.tpot_ms.p99, 2),
    ("ITL p50 ms", lambda a: a.itl_ms.median, 2),
    ("E2E p50 ms", lambda a: a.e2e_ms.median, 1),
    ("Failed", lambda a: float(a.failed), 0),
)


def compare_markdown(results: Sequence[BenchResult]) -> str:
    """Runs side by side at each load point they share, with each run's ratio to the first.

    Points are matched by label (`C=16`); a point some run lacks shows `-` there.
    """
    if len(results) < 2:
        raise ValueError("compare needs at least two results")
    labels = list(dict.fromkeys(p.label for r in results for p in r.points))
    header = ["Load", "Metric", *(r.label for r in results), *(f"{r.label} / {results[0].label}" for r in results[1:])]
    rows = []
    for label in labels:
        aggs = [next((p.aggregates for p in r.points if p.label == label), None) for r in results]
        for name, get, digits in _COMPARED:
            values = [get(a) if a is not None else None for a in aggs]
            base = values[0]
            comparable = name != "Failed" and base
            ratios = [_num(v / base, 3) if v is not None and base and comparable else "-" for v in values[1:]]
            rows.append([label, name, *(_num(v, digits) for v in values), *ratios])
    return _table(header, rows)
