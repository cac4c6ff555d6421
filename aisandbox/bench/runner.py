"""Drive a workload through a `RequestClient` at one load point: closed-loop concurrency or open-loop Poisson.

Every request is timed from the moment it is handed to the client to the end of its stream; chunk arrival
times are stamped by the client itself. Warm-up requests run before each point and are not recorded.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from tqdm import tqdm

from aisandbox.bench.client import Prompt, RequestClient, RequestError, Usage
from aisandbox.bench.metrics import RequestRecord, TokenSource

__all__ = ["LoadPoint", "PointRun", "RunLimits", "measure_request", "poisson_arrivals", "run_point"]

TokenCounter = Callable[[str], int]
"""Counts the tokens of an output text, for servers that report no usage."""


@dataclass(frozen=True, slots=True)
class LoadPoint:
    """One load level: a fixed concurrency (closed loop), or a Poisson request rate (open loop)."""

    concurrency: int | None = None
    """Requests kept in flight; each finished request is replaced at once."""
    request_rate: float | None = None
    """Mean arrivals per second; `math.inf` sends every request at once."""
    max_concurrency: int | None = None
    """Cap on requests in flight under a request rate (arrivals beyond it wait)."""

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("a load point has either a concurrency or a request rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError("request rate must be positive")

    @property
    def label(self) -> str:
        """A short name: `C=4`, `rate=2/s`, `rate=inf, C<=8`."""
        if self.concurrency is not None:
            return f"C={self.concurrency}"
        rate = "inf" if math.isinf(self.request_rate or 0.0) else f"{self.request_rate:g}/s"
        cap = f", C<={self.max_concurrency}" if self.max_concurrency else ""
        return f"rate={rate}{cap}"


@dataclass(frozen=True, slots=True)
class RunLimits:
    """Bounds and knobs shared by every point of a run."""

    warmup: int | None = None
    """Requests sent (and not recorded) before each point; None sends as many as the point keeps in flight,
    so that the engine has already run batches of the point's size."""
    duration_s: float | None = None
    """Stop sending new requests this long after a point began; those in flight finish."""
    request_timeout_s: float = 300.0
    """Longest one request may take end to end."""
    seed: int = 0
    """Seed of the Poisson arrivals."""
    progress: bool = True
    """Show a progress bar on stderr."""


@dataclass(slots=True)
class PointRun:
    """What one point measured."""

    point: LoadPoint
    records: list[RequestRecord]
    duration_s: float
    """First send to last stream end, seconds."""


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process of `rate` per second; all 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(rate)
        offsets.append(t)
    return offsets


@dataclass(slots=True)
class _Timeline:
    """What arrived for one request, while it streams."""

    sent: float
    offsets: list[float]
    pieces: list[str]
    usage: Usage | None = None
    engine_tokens: int | None = None
    error: RequestError | None = None


async def _stream_into(client: RequestClient, prompt: Prompt, timeline: _Timeline) -> None:
    async with aclosing(client.stream(prompt)) as events:
        async for event in events:
            if event.text:
                timeline.pieces.append(event.text)
                timeline.offsets.append(round(event.t - timeline.sent, 6))  # microseconds keep the file small
            if event.completion_tokens is not None:
                timeline.engine_tokens = event.completion_tokens
            if event.usage is not None:
                timeline.usage = event.usage
            if event.error is not None:
                timeline.error = event.error
                return


def _output_tokens(timeline: _Timeline) -> tuple[int, TokenSource]:
    """The best count at hand: the server's usage, the engine's running count, else one token per chunk."""
    if timeline.usage is not None and timeline.usage.completion_tokens is not None:
        return timeline.usage.completion_tokens, "usage"
    if timeline.engine_tokens is not None:
        return timeline.engine_tokens, "engine"
    return len(timeline.offsets), "chunks"


async def measure_request(
    client: RequestClient, prompt: Prompt, index: int, origin: float, timeout_s: float
) -> tuple[RequestRecord, str]:
    """Send one request and time it; never raises for a failed request.

    Args:
        client: Where to send it.
        prompt: What to send.
        index: Its position in the workload.
        origin: The point's start, `time.perf_counter()` seconds.
        timeout_s: Longest it may take end to end.

    Returns:
        The record and the output text (which `run_point` may re-count with a tokenizer).
    """
    timeline = _Timeline(sent=time.perf_counter(), offsets=[], pieces=[])
    try:
        async with asyncio.timeout(timeout_s):
            await _stream_into(client, prompt, timeline)
    except TimeoutError:
        timeline.error = RequestError("timeout", f"no end of stream after {timeout_s:g} s")
    except Exception as exc:  # a client bug must fail one request, not the whole benchmark
        timeline.error = RequestError(type(exc).__name__, str(exc)[:500])
    end = time.perf_counter()
    text = "".join(timeline.pieces)
    usage_in = timeline.usage.prompt_tokens if timeline.usage is not None else None
    output_tokens, source = _output_tokens(timeline)
    record = RequestRecord(
        index=index,
        start_s=round(timeline.sent - origin, 6),
        ttft_s=timeline.offsets[0] if timeline.offsets else None,
        chunk_offsets_s=timeline.offsets,
        e2e_s=round(end - timeline.sent, 6),
        input_tokens=usage_in if usage_in is not None else prompt.input_len,
        output_tokens=output_tokens,
        token_source=source,
        output_chars=len(text),
        status="ok" if timeline.error is None else timeline.error.status,
        error=None if timeline.error is None else timeline.error.message,
    )
    return record, text


@dataclass(slots=True)
class _PointState:
    """Shared by the tasks of one point."""

    client: RequestClient
    limits: RunLimits
    origin: float
    deadline: float
    on_done: Callable[[], None]
    results: list[tuple[RequestRecord, str]]

    def expired(self) -> bool:
        return time.perf_counter() >= self.deadline

    async def send(self, index: int, prompt: Prompt) -> None:
        self.results.append(
            await measure_request(self.client, prompt, index, self.origin, self.limits.request_timeout_s)
        )
        self.on_done()


async def _closed_loop(state: _PointState, prompts: Sequence[Prompt], concurrency: int) -> None:
    queue: Iterator[tuple[int, Prompt]] = iter(enumerate(prompts))

    async def worker() -> None:
        # One shared iterator: asyncio switches tasks only at awaits, so each item is taken once.
        for index, prompt in queue:
            if state.expired():
                return
            await state.send(index, prompt)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(state: _PointState, prompts: Sequence[Prompt], point: LoadPoint) -> None:
    if point.request_rate is None:
        raise ValueError("an open-loop point needs a request rate")
    gate = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None

    async def gated(index: int, prompt: Prompt) -> None:
        if gate is None:
            await state.send(index, prompt)
            return
        async with gate:
            await state.send(index, prompt)

    tasks = []
    for (index, prompt), offset in zip(
        enumerate(prompts), poisson_arrivals(len(prompts), point.request_rate, state.limits.seed), strict=True
    ):
        delay = state.origin + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if state.expired():
            break
        tasks.append(asyncio.create_task(gated(index, prompt)))
    await asyncio.gather(*tasks)


def _width(point: LoadPoint) -> int:
    """Requests a point keeps in flight at most (1 for an uncapped request rate: unknown)."""
    return point.concurrency or point.max_concurrency or 1


async def _warm_up(client: RequestClient, prompts: Sequence[Prompt], point: LoadPoint, limits: RunLimits) -> None:
    count = _width(point) if limits.warmup is None else limits.warmup
    if count <= 0:
        return
    batch = [prompts[i % len(prompts)] for i in range(count)]
    state = _PointState(client, limits, time.perf_counter(), math.inf, lambda: None, [])
    await _closed_loop(state, batch, min(count, _width(point)))


async def run_point(
    client: RequestClient,
    prompts: Sequence[Prompt],
    point: LoadPoint,
    limits: RunLimits,
    count_tokens: TokenCounter | None = None,
    warmup_prompts: Sequence[Prompt] = (),
) -> PointRun:
    """Warm up, then send `prompts` at `point`'s load and record every request.

    Args:
        client: Where to send.
        prompts: The workload; each is sent once, in order of arrival.
        point: Concurrency or request rate.
        limits: Warm-up, duration bound, timeout, seed, progress bar.
        count_tokens: Counts output tokens where the server reports no usage (else chunks are counted).
        warmup_prompts: What the warm-up sends (distinct prompts, so no server caches the measured ones);
            default: `prompts`, cycled.
    """
    if not prompts:
        raise ValueError("no prompts to send")
    await _warm_up(client, warmup_prompts or prompts, point, limits)
    bar = tqdm(total=len(prompts), desc=point.label, unit="req", disable=not limits.progress, leave=False)
    origin = time.perf_counter()
    deadline = origin + limits.duration_s if limits.duration_s else math.inf
    state = _PointState(client, limits, origin, deadline, bar.update, [])
    try:
        if point.concurrency is not None:
            await _closed_loop(state, prompts, point.concurrency)
        else:
            await _open_loop(state, prompts, point)
    finally:
        bar.close()
    records = []
    for record, text in sorted(state.results, key=lambda item: item[0].index):
        # Tokenizing after the point keeps the client's CPU out of the measured window.
        if record.ok and record.token_source == "chunks" and count_tokens is not None:
            record.output_tokens, record.token_source = count_tokens(text), "tokenizer"
        records.append(record)
    ends = [r.start_s + (r.e2e_s or 0.0) for r in records]
    return PointRun(point=point, records=records, duration_s=max(ends, default=0.0))
