"""Isolation in the torch engine: chunked prefill keeps running streams flowing, and a fault in one sequence
ends that sequence only (issue 17 items 3 and 4). Tiny random Mistral, real code paths."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aisandbox.runtime.admission import AdmissionLimits
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.torch.backend import TorchBackend, TorchEngineConfig
from aisandbox.runtime.types import EngineState, FinishReason
from tests.integration.test_torch_engine import Tapped, collect, reference_greedy

CHUNK = 16


@pytest.fixture
async def engine(tiny_mistral_dir: Path) -> AsyncIterator[Tapped]:
    config = TorchEngineConfig(
        model_path=tiny_mistral_dir,
        dtype="float32",
        weights_dtype="fp32",
        max_batch_size=8,
        max_prefill_tokens=CHUNK,
    )
    eng = Tapped(TorchBackend(config), AdmissionLimits(max_queue=64))
    await eng.start()
    assert (await eng.wait_ready(120)).state is EngineState.READY
    yield eng
    await eng.shutdown()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


async def test_a_chunked_prompt_matches_the_reference(engine: Tapped, tiny_mistral_dir: Path) -> None:
    prompt = [1] + [(37 * i) % 3000 + 10 for i in range(1, 100)]  # 100 tokens: 6 chunks of 16 + the rest
    chunks = 0
    stage = engine.torch._stage_chunk

    def counting(*args: Any) -> None:
        nonlocal chunks
        chunks += 1
        stage(*args)

    engine.torch._stage_chunk = counting  # type: ignore[method-assign]
    tokens, reason = await collect(engine, "long", prompt, greedy(12))
    assert reason == "length" and chunks >= (len(prompt) - CHUNK) // CHUNK
    assert tokens == reference_greedy(tiny_mistral_dir, prompt, 12)


async def test_a_long_prompt_interleaves_with_a_running_stream(engine: Tapped, tiny_mistral_dir: Path) -> None:
    """While a long prompt prefills chunk by chunk, the running stream gets a token between chunks."""
    events: list[str] = []
    stage = engine.torch._stage_chunk
    decode = engine.torch._decode

    def staging(*args: Any) -> None:
        events.append("chunk")
        stage(*args)
        if background.done():
            events.append("stream ended")  # the check below would then mean nothing

    def decoding(*args: Any) -> None:
        events.append("decode")
        decode(*args)

    engine.torch._stage_chunk = staging  # type: ignore[method-assign]
    engine.torch._decode = decoding  # type: ignore[method-assign]
    # A stream long enough to outlast the staging however fast the forward is (400 of the model's 512 positions).
    background = asyncio.create_task(collect(engine, "bg", [1, 5, 6, 7], greedy(400)))
    await asyncio.sleep(0.05)
    prompt = [1] + [(11 * i) % 3000 + 10 for i in range(1, 120)]
    tokens, _ = await collect(engine, "long", prompt, greedy(4))
    bg_tokens, _ = await background
    assert tokens == reference_greedy(tiny_mistral_dir, prompt, 4)
    assert bg_tokens == reference_greedy(tiny_mistral_dir, [1, 5, 6, 7], 400)
    assert "stream ended" not in events, "the stream ended before the prompt's chunks did: make it longer"
    first, last = events.index("chunk"), len(events) - 1 - events[::-1].index("chunk")
    between = events[first : last + 1]
    assert between.count("chunk") >= 6
    # No two chunks in a row: the running stream decodes after every chunk.
    assert all(not (a == b == "chunk") for a, b in zip(between, between[1:], strict=False)), between


async def test_the_prefill_budget_counts_only_what_the_prefix_cache_does_not_hold(
    engine: Tapped, tiny_mistral_dir: Path
) -> None:
    """Prompts longer than the budget whose prefix the cache holds are prefilled whole, in groups: only their
    uncached tokens count (16 cached + 8 new of 24, against a budget of 16), not chunked one at a time."""
    shared = [1] + [(7 * i) % 3000 + 10 for i in range(1, 16)]  # 16 tokens: two blocks of 8
    await collect(engine, "warm", shared, greedy(2))  # within the budget: prefilled whole, its blocks cached
    chunks = 0
    stage = engine.torch._stage_chunk

    def counting(*args: Any) -> None:
        nonlocal chunks
        chunks += 1
        stage(*args)

    engine.torch._stage_chunk = counting  # type: ignore[method-assign]
    prompts = [[*shared, *(100 + 10 * k + j for j in range(8))] for k in range(4)]
    results = await asyncio.gather(*(collect(engine, f"p{k}", p, greedy(3)) for k, p in enumerate(prompts)))
    assert chunks == 0
    for p, (tokens, _) in zip(prompts, results, strict=True):
        assert tokens == reference_greedy(tiny_mistral_dir, p, 3)


async def test_short_prompts_are_admitted_while_a_long_one_stages(engine: Tapped) -> None:
    long_prompt = [1] + [(13 * i) % 3000 + 10 for i in range(1, 200)]
    stage = engine.torch._stage_chunk

    def slow_stage(*args: Any) -> None:
        time.sleep(0.02)
        stage(*args)

    engine.torch._stage_chunk = slow_stage  # type: ignore[method-assign]
    long_task = asyncio.create_task(collect(engine, "long", long_prompt, greedy(2)))
    await asyncio.sleep(0.05)
    assert engine.torch._staging is not None
    short, _ = await collect(engine, "short", [1, 9, 10], greedy(3))
    assert len(short) == 3 and not long_task.done()  # the short one finished while the long one still staged
    await long_task


async def test_a_fault_in_one_staged_prompt_ends_only_that_request(engine: Tapped) -> None:
    forward = engine.torch._forward

    def failing(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("kv") is not None:  # only the staged prompt's chunks
            raise RuntimeError("simulated fault in one sequence")
        return forward(*args, **kwargs)

    engine.torch._forward = failing  # type: ignore[method-assign]
    background = asyncio.create_task(collect(engine, "bg", [1, 5, 6], greedy(40)))
    await asyncio.sleep(0.1)
    stream = engine.submit([GenerationRequest("bad", tuple([1] + list(range(10, 80))), greedy(4))])
    with pytest.raises(Exception, match="simulated fault"):
        async for _ in stream:
            pass
    tokens, reason = await background
    assert len(tokens) == 40 and reason == "length"
    assert engine.health().state is EngineState.READY
    ok, _ = await collect(engine, "after", [1, 2, 3], greedy(3))
    assert len(ok) == 3


async def test_a_fault_in_one_sequences_sampling_ends_only_that_request(engine: Tapped) -> None:
    """A per-sequence error at sampling (its sampler state) ends it; the batch and the engine go on."""
    new_row = engine.torch._sampler.new_row

    def failing_row(params: SamplingParams, *args: Any) -> Any:
        if params.seed == 666:
            raise ValueError("simulated bad sampler settings")
        return new_row(params, *args)

    engine.torch._sampler.new_row = failing_row  # type: ignore[method-assign]
    background = asyncio.create_task(collect(engine, "bg", [1, 5, 6], greedy(30)))
    await asyncio.sleep(0.05)
    stream = engine.submit([GenerationRequest("bad", (1, 7, 8), SamplingParams(max_tokens=5, seed=666))])
    with pytest.raises(Exception, match="simulated bad sampler settings"):
        async for _ in stream:
            pass
    tokens, _ = await background
    assert len(tokens) == 30 and engine.health().state is EngineState.READY
    assert engine.stats().running == 0
    assert FinishReason.ABORT  # the failed request ended with an error delta, not a dead engine


async def test_a_row_that_fails_the_batched_sampling_pass_ends_alone(engine: Tapped) -> None:
    """A failure inside the batched pass (one row's grammar matcher, say): rows are retried one by one."""
    sample = engine.torch._sampler.sample

    def failing_sample(rows: Any, logits: Any) -> Any:
        if any(r.params.seed == 777 for r in rows):
            raise RuntimeError("simulated matcher failure")
        return sample(rows, logits)

    engine.torch._sampler.sample = failing_sample  # type: ignore[method-assign]
    background = asyncio.create_task(collect(engine, "bg", [1, 5, 6], greedy(30)))
    await asyncio.sleep(0.05)
    stream = engine.submit([GenerationRequest("bad", (1, 7, 8), SamplingParams(max_tokens=5, seed=777))])
    with pytest.raises(Exception, match="simulated matcher failure"):
        async for _ in stream:
            pass
    tokens, _ = await background
    assert len(tokens) == 30 and engine.health().state is EngineState.READY


async def test_the_kv_budget_bounds_the_batch_and_refuses_what_never_fits(tiny_mistral_dir: Path) -> None:
    """KV sized from a memory budget: a request that can never fit is a 400 at admission; two that do not fit
    together run one after the other instead of growing the buffers past the budget."""
    from aisandbox.errors import ContextLengthExceeded

    config = TorchEngineConfig(model_path=tiny_mistral_dir, dtype="float32", weights_dtype="fp32", kv_cache_mb=0.1)
    eng = Tapped(TorchBackend(config), AdmissionLimits(max_queue=64))
    await eng.start()
    assert (await eng.wait_ready(120)).state is EngineState.READY
    try:
        cells = eng.torch._kv_cells
        assert 100 < cells < 400, cells  # 0.1 MiB of a 2-layer, 2-KV-head, 16-dim float32 model
        assert eng.torch._info is not None and eng.torch._info.max_model_len == cells
        with pytest.raises(ContextLengthExceeded):
            eng.check_context(10, cells, "max_tokens")
        peak = 0
        decode = eng.torch._decode

        def watching(running: Any, *args: Any) -> None:
            nonlocal peak
            peak = max(peak, len(running))
            decode(running, *args)

        eng.torch._decode = watching  # type: ignore[method-assign]
        each = cells // 2 + 10 - 5  # two of these cannot run together
        results = await asyncio.gather(*(collect(eng, f"k{i}", [1, 2, 3, 4, 5], greedy(each)) for i in range(2)))
        assert all(len(tokens) == each for tokens, _ in results)
        assert peak == 1, "the second waited for the first instead of exceeding the budget"
        assert eng.torch._kv.rows_cap * eng.torch._kv.cols_cap <= cells
    finally:
        await eng.shutdown()


async def test_a_chunk_prefilled_prompt_feeds_the_prefix_cache(engine: Tapped, tiny_mistral_dir: Path) -> None:
    """A long prompt prefilled in chunks leaves its blocks in the prefix cache, as a short one does: the same long
    system prompt in the next request is then read from the cache instead of prefilled again (one step, not four
    chunks), and gives the reference's tokens."""
    system = [1] + [(11 * i) % 3000 + 10 for i in range(1, 64)]  # 64 tokens, four times the budget of 16
    stage = engine.torch._stage_chunk
    chunks = 0

    def counting(*args: Any) -> None:
        nonlocal chunks
        chunks += 1
        stage(*args)

    engine.torch._stage_chunk = counting  # type: ignore[method-assign]
    first = [*system, 5, 6, 7]
    tokens, _ = await collect(engine, "first", first, greedy(4))
    assert chunks >= 3 and tokens == reference_greedy(tiny_mistral_dir, first, 4)
    chunks = 0
    hits = engine.torch._prefix.hits
    second = [*system, 8, 9, 10, 11]
    tokens, _ = await collect(engine, "second", second, greedy(4))
    assert engine.torch._prefix.hits - hits == 64  # every block of the system prompt (8 of 8 tokens each)
    assert chunks == 0  # its 4 uncached tokens fit the budget: one prefill step
    assert tokens == reference_greedy(tiny_mistral_dir, second, 4)
