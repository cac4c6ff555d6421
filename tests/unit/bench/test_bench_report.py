"""The result file round trip and its Markdown tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

from aisandbox.bench.metrics import RequestRecord, compute_aggregates
from aisandbox.bench.report import (
    SCHEMA_VERSION,
    BenchResult,
    PointResult,
    compare_markdown,
    latency_markdown,
    load_result,
    summary_markdown,
    write_result,
)


def _point(label: str, scale: float = 1.0, **kw: object) -> PointResult:
    records = [
        RequestRecord(
            index=i,
            start_s=0.01 * i,
            ttft_s=0.1 * scale,
            chunk_offsets_s=[0.1 * scale, 0.12 * scale, 0.15 * scale],
            e2e_s=0.2 * scale,
            input_tokens=10,
            output_tokens=3,
            token_source="usage",
        )
        for i in range(4)
    ]
    records.append(RequestRecord(index=4, start_s=0.0, status="429", error="busy"))
    return PointResult(
        label=label, aggregates=compute_aggregates(records, 1.0 * scale, {"ttft": 150.0}), requests=records, **kw
    )  # type: ignore[arg-type]


def _result(label: str, scale: float = 1.0) -> BenchResult:
    return BenchResult(
        label=label,
        created="2026-01-01T00:00:00+00:00",
        points=[_point("C=1", scale, concurrency=1), _point("rate=inf", scale, request_rate=math.inf)],
    )


def test_json_round_trip_keeps_raw_timings(tmp_path: Path) -> None:
    result = _result("ours")
    path = tmp_path / "sub" / "ours.json"
    write_result(result, path)
    raw = json.loads(path.read_text())  # strict JSON: an infinite rate is written as a string
    assert raw["schema_version"] == SCHEMA_VERSION
    assert raw["points"][1]["request_rate"] == "Infinity"
    assert raw["points"][0]["requests"][0]["chunk_offsets_s"] == [0.1, 0.12, 0.15]
    loaded = load_result(path)
    assert loaded == result
    assert math.isinf(loaded.points[1].request_rate or 0.0)


def test_summary_markdown() -> None:
    text = summary_markdown(_result("ours"))
    lines = text.splitlines()
    assert lines[0].startswith("| Load | OK | Failed |")
    assert lines[2].startswith("| C=1 | 4 | 1 | 1.00 | 4.00 | 12.0 | 52.0 | 100.0 |")
    assert "Errors by status: C=1: 429 x1; rate=inf: 429 x1" in text
    assert "Goodput SLOs: ttft <= 150 ms" in text


def test_latency_markdown() -> None:
    text = latency_markdown(_result("ours"))
    assert "| C=1 | TTFT | 100.00 | 100.00 | 100.00 | 100.00 |" in text
    assert "| rate=inf | ITL |" in text


def test_compare_markdown_ratios() -> None:
    text = compare_markdown([_result("ours"), _result("theirs", scale=2.0)])
    assert text.splitlines()[0] == "| Load | Metric | ours | theirs | theirs / ours |"
    assert "| C=1 | Out tok/s | 12.0 | 6.0 | 0.500 |" in text
    assert "| C=1 | TTFT p50 ms | 100.0 | 200.0 | 2.000 |" in text
    assert "| C=1 | Failed | 1 | 1 | - |" in text
