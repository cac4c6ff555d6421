"""The torch backend on a tiny random-weight Mistral: batching changes nothing, aborts free their rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from aisandbox.errors import EngineNotReady, Overloaded
from aisandbox.runtime.textgen import stream_text
from aisandbox.runtime.torch_backend import TorchEngine, TorchEngineConfig
from aisandbox.runtime.types import EngineState, FinishReason, GenerationRequest, SamplingParams


@pytest.fixture
async def engine(tiny_mistral_dir: Path) -> AsyncIterator[TorchEngine]:
    eng = TorchEngine(
        TorchEngineConfig(model_path=tiny_mistral_dir, dtype="float32", weights_dtype="fp32", max_batch_size=8)
    )
    await eng.start()
    health = await eng.wait_ready(120)
    assert health.state is EngineState.READY, health
    yield eng
    await eng.shutdown()


def reference_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the slow, obviously right way: the whole sequence through the model each step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


async def collect(eng: TorchEngine, rid: str, prompt: list[int], sp: SamplingParams) -> tuple[list[int], str]:
    stream = eng.submit(GenerationRequest(rid, tuple(prompt), sp))
    tokens: list[int] = []
    reason = ""
    async for delta in stream:
        tokens.extend(delta.token_ids)
        if delta.finish_reason is not None:
            reason = delta.finish_reason.value
    return tokens, reason


async def test_in_flight_batching_matches_reference(engine: TorchEngine, tiny_mistral_dir: Path) -> None:
    prompts = [[1, 100 + i] + list(range(200, 200 + 7 * i)) for i in range(5)]  # 2..30 tokens
    lengths = [40, 300, 25, 60, 33]  # 300 outgrows the first KV allocation (256 columns)
    greedy = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    # Staggered arrivals: later, longer prompts join rows that are already decoding.
    tasks = []
    for i, (p, sp) in enumerate(zip(prompts, greedy, strict=True)):
        tasks.append(asyncio.create_task(collect(engine, f"r{i}", p, sp)))
        await asyncio.sleep(0.05 * i)
    results = await asyncio.gather(*tasks)
    for (tokens, reason), p, n in zip(results, prompts, lengths, strict=True):
        assert reason == "length" and len(tokens) == n
        assert tokens == reference_greedy(tiny_mistral_dir, p, n)
    assert engine.stats().running == 0


async def test_prefix_cache_matches_reference(engine: TorchEngine, tiny_mistral_dir: Path) -> None:
    shared = [1] + list(range(300, 340))  # 41 tokens: two full cache blocks and a bit
    prompts = [shared + list(range(500, 500 + k)) for k in (1, 9, 23)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    first, _ = await collect(engine, "warm", prompts[0], sp)  # caches the shared blocks
    hits_before = engine._prefix.hits
    results = await asyncio.gather(*(collect(engine, f"p{i}", p, sp) for i, p in enumerate(prompts)))
    assert engine._prefix.hits - hits_before >= 3 * 32, "every prompt should reuse the two shared blocks"
    assert results[0][0] == first
    for (tokens, _), p in zip(results, prompts, strict=True):
        assert tokens == reference_greedy(tiny_mistral_dir, p, 12)
    # A later arrival with a cached prefix joins rows that are decoding.
    long_run = asyncio.create_task(collect(engine, "bg", [1, 2, 3], SamplingParams(max_tokens=60, ignore_eos=True)))
    await asyncio.sleep(0.1)
    tokens, _ = await collect(engine, "late", prompts[2], sp)
    assert tokens == results[2][0]
    await long_run


async def test_seeded_sampling_is_reproducible(engine: TorchEngine) -> None:
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a, _ = await collect(engine, "a", [1, 5, 6], sp)
    b, _ = await collect(engine, "b", [1, 5, 6], sp)
    c, _ = await collect(
        engine, "c", [1, 5, 6], SamplingParams(max_tokens=20, temperature=1.0, seed=8, ignore_eos=True)
    )
    assert a == b and a != c


async def test_stop_token_and_min_tokens(engine: TorchEngine) -> None:
    first, _ = await collect(engine, "probe", [1, 9, 9], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    stop_at = first[2]
    tokens, reason = await collect(
        engine,
        "s",
        [1, 9, 9],
        SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=(stop_at,), ignore_eos=True),
    )
    assert reason == "stop" and tokens[-1] == stop_at and len(tokens) == first.index(stop_at) + 1
    tokens, _ = await collect(
        engine, "m", [1, 9, 9],
        SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=(stop_at,), min_tokens=5, ignore_eos=True),
    )  # fmt: skip
    assert len(tokens) == 5 and stop_at not in tokens


async def test_abort_frees_the_row(engine: TorchEngine) -> None:
    stream = engine.submit(GenerationRequest("long", (1, 2, 3), SamplingParams(max_tokens=400, ignore_eos=True)))
    got = 0
    async for delta in stream:
        got += len(delta.token_ids)
        if got >= 3:
            break
    assert engine.stats().running == 1
    await stream.aclose()
    for _ in range(100):
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().running == 0


async def test_text_layer_stop_string_aborts(engine: TorchEngine) -> None:
    tok = engine.tokenizer
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    full = "".join([d.text async for d in stream_text(engine, GenerationRequest("t0", (1, 42), sp))])
    assert len(full) > 6
    stop = full[3:6]
    sp2 = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,))
    deltas = [d async for d in stream_text(engine, GenerationRequest("t1", (1, 42), sp2))]
    text = "".join(d.text for d in deltas)
    assert text == full[: full.index(stop)]
    assert deltas[-1].finish_reason is FinishReason.STOP and deltas[-1].stop_reason == stop
    assert tok.decode(tok.encode("x"))  # the tokenizer round-trips
    for _ in range(100):
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().running == 0


async def test_queue_limit_and_not_ready(tiny_mistral_dir: Path) -> None:
    eng = TorchEngine(TorchEngineConfig(model_path=tiny_mistral_dir, dtype="float32", max_queue=1))
    with pytest.raises(EngineNotReady):
        eng.submit(GenerationRequest("x", (1,), SamplingParams(max_tokens=1)))
    await eng.start()
    await eng.wait_ready(120)
    eng._n_waiting = 1  # as if one request were queued
    with pytest.raises(Overloaded):
        eng.submit(GenerationRequest("y", (1,), SamplingParams(max_tokens=1)))
    eng._n_waiting = 0
    await eng.shutdown()
