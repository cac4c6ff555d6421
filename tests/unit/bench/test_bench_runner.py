"""The load generator: Poisson schedule, closed-loop concurrency, warm-up, duration bound, failures."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aisandbox.bench.client import GenerationOptions, Prompt, RequestError, StreamEvent, Usage
from aisandbox.bench.runner import LoadPoint, RunLimits, poisson_arrivals, run_point


def test_poisson_schedule_has_the_asked_rate() -> None:
    rate = 5.0
    offsets = poisson_arrivals(20_000, rate, seed=1)
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean.
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert offsets == sorted(offsets)


def test_poisson_schedule_is_seeded() -> None:
    assert poisson_arrivals(10, 2.0, seed=3) == poisson_arrivals(10, 2.0, seed=3)
    assert poisson_arrivals(10, 2.0, seed=3) != poisson_arrivals(10, 2.0, seed=4)
    assert poisson_arrivals(4, math.inf, seed=0) == [0.0] * 4


def test_load_point_validation_and_labels() -> None:
    assert LoadPoint(concurrency=4).label == "C=4"
    assert LoadPoint(request_rate=2.0).label == "rate=2/s"
    assert LoadPoint(request_rate=math.inf, max_concurrency=8).label == "rate=inf, C<=8"
    with pytest.raises(ValueError):
        LoadPoint()
    with pytest.raises(ValueError):
        LoadPoint(concurrency=2, request_rate=1.0)
    with pytest.raises(ValueError):
        LoadPoint(concurrency=0)


class ScriptedClient:
    """Streams `tokens` chunks `delay_s` apart; counts requests in flight."""

    def __init__(self, tokens: int = 3, delay_s: float = 0.005, usage: bool = True) -> None:
        self.options = GenerationOptions(model="scripted")
        self.tokens, self.delay_s, self.usage = tokens, delay_s, usage
        self.in_flight = 0
        self.peak = 0
        self.sent: list[str] = []

    async def stream(self, prompt: Prompt) -> AsyncIterator[StreamEvent]:
        self.sent.append(prompt.text)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if "fail" in prompt.text:
                yield StreamEvent(t=time.perf_counter(), error=RequestError("503", "unavailable"))
                return
            if "raise" in prompt.text:
                raise RuntimeError("client bug")
            for i in range(self.tokens):
                await asyncio.sleep(self.delay_s)
                yield StreamEvent(t=time.perf_counter(), text=f"w{i} ")
            if self.usage:
                yield StreamEvent(t=time.perf_counter(), usage=Usage(11, self.tokens))
        finally:
            self.in_flight -= 1

    async def describe(self) -> dict[str, Any]:
        return {}

    async def aclose(self) -> None:
        pass


def _prompts(*texts: str) -> list[Prompt]:
    return [Prompt(messages=({"role": "user", "content": t},), output_len=3, input_len=5) for t in texts]


def test_closed_loop_keeps_concurrency_and_records_each_request() -> None:
    client = ScriptedClient()
    prompts = _prompts(*(f"p{i}" for i in range(10)))
    run = asyncio.run(run_point(client, prompts, LoadPoint(concurrency=4), RunLimits(warmup=2, progress=False)))
    assert client.peak == 4
    assert client.sent[:2] == ["p0", "p1"]  # warm-up, not recorded
    assert len(client.sent) == 12
    assert [r.index for r in run.records] == list(range(10))
    r = run.records[0]
    assert r.ok and r.output_tokens == 3 and r.token_source == "usage" and r.input_tokens == 11
    assert len(r.chunk_offsets_s) == 3 and r.ttft_s == r.chunk_offsets_s[0]
    assert r.e2e_s is not None and r.e2e_s >= r.chunk_offsets_s[-1]
    assert run.duration_s >= max(x.start_s + (x.e2e_s or 0) for x in run.records) - 1e-9


def test_failures_are_recorded_not_raised() -> None:
    client = ScriptedClient()
    run = asyncio.run(
        run_point(client, _prompts("ok", "fail", "raise"), LoadPoint(concurrency=1), RunLimits(0, progress=False))
    )
    assert [r.status for r in run.records] == ["ok", "503", "RuntimeError"]
    assert run.records[1].error == "unavailable"


def test_tokens_counted_by_tokenizer_without_usage() -> None:
    client = ScriptedClient(tokens=4, usage=False)
    run = asyncio.run(
        run_point(
            client, _prompts("a"), LoadPoint(concurrency=1), RunLimits(0, progress=False), lambda s: 2 * len(s.split())
        )
    )
    assert (run.records[0].output_tokens, run.records[0].token_source) == (8, "tokenizer")
    run = asyncio.run(run_point(client, _prompts("a"), LoadPoint(concurrency=1), RunLimits(0, progress=False)))
    assert (run.records[0].output_tokens, run.records[0].token_source) == (4, "chunks")
    assert run.records[0].input_tokens == 5  # the workload's count, without usage


def test_request_timeout() -> None:
    client = ScriptedClient(tokens=50, delay_s=0.01)
    limits = RunLimits(0, request_timeout_s=0.05, progress=False)
    run = asyncio.run(run_point(client, _prompts("slow"), LoadPoint(concurrency=1), limits))
    assert run.records[0].status == "timeout"


def test_duration_bounds_the_point() -> None:
    client = ScriptedClient(tokens=2, delay_s=0.02)
    limits = RunLimits(0, duration_s=0.1, progress=False)
    run = asyncio.run(run_point(client, _prompts(*(f"p{i}" for i in range(100))), LoadPoint(concurrency=1), limits))
    assert 1 <= len(run.records) < 10


def test_open_loop_follows_the_schedule_and_cap() -> None:
    client = ScriptedClient(tokens=2, delay_s=0.02)
    prompts = _prompts(*(f"p{i}" for i in range(8)))
    point = LoadPoint(request_rate=math.inf, max_concurrency=3)
    run = asyncio.run(run_point(client, prompts, point, RunLimits(0, progress=False)))
    assert client.peak == 3 and len(run.records) == 8 and all(r.ok for r in run.records)

    client = ScriptedClient(tokens=1, delay_s=0.001)
    run = asyncio.run(run_point(client, prompts, LoadPoint(request_rate=40.0), RunLimits(0, seed=7, progress=False)))
    expected = poisson_arrivals(8, 40.0, seed=7)
    starts = [r.start_s for r in run.records]
    assert starts == pytest.approx(expected, abs=0.03)


def test_default_warm_up_fills_the_point_with_its_own_prompts() -> None:
    client = ScriptedClient()
    warm = _prompts("w0", "w1")
    run = asyncio.run(
        run_point(client, _prompts("p0", "p1"), LoadPoint(concurrency=3), RunLimits(progress=False), None, warm)
    )
    assert client.sent[:3] == ["w0", "w1", "w0"] and client.peak == 3
    assert sorted(client.sent[3:]) == ["p0", "p1"] and len(run.records) == 2
