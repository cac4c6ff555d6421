"""Metric arithmetic on synthetic timelines: TTFT, ITL, TPOT, percentiles, throughput, goodput."""

from __future__ import annotations

import pytest

from aisandbox.bench.metrics import RequestRecord, compute_aggregates, distribution, meets_slo, parse_slo


def _record(index: int = 0, offsets: tuple[float, ...] = (0.1, 0.15, 0.2, 0.3), **kw: object) -> RequestRecord:
    fields: dict[str, object] = {
        "index": index,
        "start_s": 0.0,
        "ttft_s": offsets[0] if offsets else None,
        "chunk_offsets_s": list(offsets),
        "e2e_s": 0.31,
        "input_tokens": 10,
        "output_tokens": len(offsets),
        "token_source": "usage",
    }
    fields.update(kw)
    return RequestRecord.model_validate(fields)


def test_per_request_latencies() -> None:
    r = _record()
    assert r.ttft_s == pytest.approx(0.1)
    assert r.itl_s == pytest.approx([0.05, 0.05, 0.1])
    # TPOT: time after the first token over the tokens after the first.
    assert r.tpot_s == pytest.approx((0.31 - 0.1) / 3)


def test_tpot_uses_reported_tokens_not_chunks() -> None:
    # Two chunks that carried 5 tokens (a server that batches tokens into chunks).
    r = _record(offsets=(0.2, 0.4), e2e_s=0.6, output_tokens=5)
    assert r.tpot_s == pytest.approx((0.6 - 0.2) / 4)


def test_tpot_undefined_for_one_token() -> None:
    assert _record(offsets=(0.2,), output_tokens=1).tpot_s is None


def test_distribution_percentiles_in_ms() -> None:
    d = distribution([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert d.count == 100
    assert d.mean == pytest.approx(50.5)
    assert d.median == pytest.approx(50.5)
    assert d.p90 == pytest.approx(90.1)  # linear interpolation, as numpy and vLLM
    assert d.p99 == pytest.approx(99.01)
    assert (d.min, d.max) == (pytest.approx(1.0), pytest.approx(100.0))


def test_distribution_empty() -> None:
    d = distribution([])
    assert d.count == 0 and d.median is None


def test_aggregates_throughput_and_errors() -> None:
    records = [
        _record(0),
        _record(1, offsets=(0.2, 0.3), e2e_s=0.5, input_tokens=20),
        _record(2, offsets=(), status="429", error="busy", output_tokens=None),
        _record(3, offsets=(), status="timeout", output_tokens=None),
        _record(4, offsets=(), status="429", output_tokens=None),
    ]
    a = compute_aggregates(records, duration_s=2.0)
    assert (a.completed, a.failed) == (2, 3)
    assert a.errors == {"429": 2, "timeout": 1}
    assert a.request_throughput == pytest.approx(1.0)
    assert a.total_output_tokens == 6
    assert a.output_throughput == pytest.approx(3.0)
    assert a.total_throughput == pytest.approx((30 + 6) / 2)
    assert a.ttft_ms.median == pytest.approx(150.0)
    # ITLs are pooled over requests: 50, 50, 100 and 100 ms.
    assert a.itl_ms.count == 4 and a.itl_ms.mean == pytest.approx(75.0)
    assert a.e2e_ms.median == pytest.approx(405.0)
    assert a.goodput is None and a.good_requests is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ttft=500ms,tpot=50ms", {"ttft": 500.0, "tpot": 50.0}),
        ("e2el=2s", {"e2e": 2000.0}),
        ("itl=800us, ttft=250", {"itl": 0.8, "ttft": 250.0}),
    ],
)
def test_parse_slo(text: str, expected: dict[str, float]) -> None:
    assert parse_slo(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["ttft", "foo=1ms", "ttft=fast", "ttft=5 min"])
def test_parse_slo_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_slo(text)


def test_goodput_counts_requests_meeting_every_slo() -> None:
    fast = _record(0)  # ttft 100 ms, tpot 70 ms, largest gap 100 ms
    slow_start = _record(1, offsets=(0.6, 0.65), e2e_s=0.7, output_tokens=2)  # ttft 600 ms
    slow_tokens = _record(2, offsets=(0.1, 0.4), e2e_s=0.4, output_tokens=2)  # tpot 300 ms
    failed = _record(3, status="500")
    slo = {"ttft": 500.0, "tpot": 100.0}
    assert [meets_slo(r, slo) for r in (fast, slow_start, slow_tokens, failed)] == [True, False, False, False]
    assert meets_slo(fast, {"itl": 99.0}) is False
    a = compute_aggregates([fast, slow_start, slow_tokens, failed], duration_s=0.5, slo_ms=slo)
    assert a.good_requests == 1
    assert a.goodput == pytest.approx(2.0)
    assert a.slo_ms == slo


def test_one_token_request_is_not_held_to_tpot() -> None:
    assert meets_slo(_record(offsets=(0.1,), output_tokens=1), {"tpot": 1.0})
