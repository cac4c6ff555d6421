"""The torch backend on a tiny random-weight Mistral under the admission layer: batching changes nothing,
aborts free their rows, a failing engine loop ends every live request."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from aisandbox.errors import EngineDead, EngineNotReady, Overloaded
from aisandbox.runtime.admission import Admission, AdmissionLimits
from aisandbox.runtime.engine import stream_text
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.torch.backend import TorchBackend, TorchEngineConfig
from aisandbox.runtime.types import EngineState, FinishReason, TokenDelta


class Tapped(Admission):
    """The admission layer, also recording each request's raw token deltas (to compare token ids)."""

    def __init__(self, backend: TorchBackend, limits: AdmissionLimits | None = None) -> None:
        super().__init__(backend, limits)
        self.raw: dict[str, asyncio.Queue[TokenDelta]] = {}

    def emit(self, deltas: Sequence[tuple[str, TokenDelta]]) -> None:
        loop = self._loop
        assert loop is not None
        for rid, delta in deltas:
            queue = self.raw.get(rid)
            if queue is not None:
                loop.call_soon_threadsafe(queue.put_nowait, delta)
        super().emit(deltas)

    @property
    def torch(self) -> TorchBackend:
        assert isinstance(self.backend, TorchBackend)
        return self.backend


def make_engine(model_dir: Path, max_batch_size: int = 8, max_queue: int = 256) -> Tapped:
    config = TorchEngineConfig(
        model_path=model_dir, dtype="float32", weights_dtype="fp32", max_batch_size=max_batch_size
    )
    return Tapped(TorchBackend(config), AdmissionLimits(max_queue=max_queue))


@pytest.fixture
async def engine(tiny_mistral_dir: Path) -> AsyncIterator[Tapped]:
    eng = make_engine(tiny_mistral_dir)
    await eng.start()
    health = await eng.wait_ready(120)
    assert health.state is EngineState.READY, health
    yield eng
    await eng.shutdown()


@pytest.fixture(params=["pytorch ops", "C kernels"])
async def engine_both(request, tiny_mistral_dir: Path, monkeypatch) -> AsyncIterator[Tapped]:  # type: ignore[no-untyped-def]
    """The engine with the lean forward's PyTorch ops, and with the C kernels between its multiplies."""
    from aisandbox.runtime.torch import cpu_kernels

    if request.param == "C kernels":
        monkeypatch.setenv("AISANDBOX_CPU_KERNELS", "always")
        cpu_kernels.load.cache_clear()
        if cpu_kernels.load() is None and os.environ.get("CI") != "true":
            pytest.skip("no C compiler here: the CPU kernels are not built")
    eng = make_engine(tiny_mistral_dir)
    await eng.start()
    health = await eng.wait_ready(120)
    assert health.state is EngineState.READY, health
    if request.param == "C kernels":
        assert eng.torch._fast is not None and eng.torch._fast.kernels is not None
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


async def collect(eng: Tapped, rid: str, prompt: list[int], sp: SamplingParams) -> tuple[list[int], str]:
    """Submit through the admission layer; return the raw token ids and the finish reason."""
    raw = eng.raw[rid] = asyncio.Queue()
    stream = eng.submit([GenerationRequest(rid, tuple(prompt), sp)])
    tokens: list[int] = []
    while True:
        delta = await raw.get()
        tokens.extend(delta.token_ids)
        if delta.finish_reason is not None:
            break
    texts = [d async for _, d in stream]
    assert texts[-1].finish_reason is delta.finish_reason and texts[-1].completion_tokens == len(tokens)
    return tokens, delta.finish_reason.value


async def test_in_flight_batching_matches_reference(engine_both: Tapped, tiny_mistral_dir: Path) -> None:
    engine = engine_both
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


async def test_prefix_cache_matches_reference(engine_both: Tapped, tiny_mistral_dir: Path) -> None:
    engine = engine_both
    shared = [1] + list(range(300, 340))  # 41 tokens: two full cache blocks and a bit
    prompts = [shared + list(range(500, 500 + k)) for k in (1, 9, 23)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    first, _ = await collect(engine, "warm", prompts[0], sp)  # caches the shared blocks
    hits_before = engine.torch._prefix.hits
    results = await asyncio.gather(*(collect(engine, f"p{i}", p, sp) for i, p in enumerate(prompts)))
    assert engine.torch._prefix.hits - hits_before >= 3 * 32, "every prompt should reuse the two shared blocks"
    assert results[0][0] == first
    for (tokens, _), p in zip(results, prompts, strict=True):
        assert tokens == reference_greedy(tiny_mistral_dir, p, 12)
    # A later arrival with a cached prefix joins rows that are decoding.
    long_run = asyncio.create_task(collect(engine, "bg", [1, 2, 3], SamplingParams(max_tokens=60, ignore_eos=True)))
    await asyncio.sleep(0.1)
    tokens, _ = await collect(engine, "late", prompts[2], sp)
    assert tokens == results[2][0]
    await long_run


async def test_seeded_sampling_is_reproducible(engine: Tapped) -> None:
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a, _ = await collect(engine, "a", [1, 5, 6], sp)
    b, _ = await collect(engine, "b", [1, 5, 6], sp)
    c, _ = await collect(
        engine, "c", [1, 5, 6], SamplingParams(max_tokens=20, temperature=1.0, seed=8, ignore_eos=True)
    )
    assert a == b and a != c


async def test_stop_token_and_min_tokens(engine: Tapped) -> None:
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


async def wait_idle(engine: Tapped) -> None:
    for _ in range(200):
        if engine.stats().running == 0 and engine.torch.stats().running == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still running: {engine.stats()}")


async def test_abort_frees_the_row(engine: Tapped) -> None:
    stream = engine.submit([GenerationRequest("long", (1, 2, 3), SamplingParams(max_tokens=400, ignore_eos=True))])
    got = 0
    async for _, delta in stream:
        got = delta.completion_tokens
        if got >= 3:
            break
    assert engine.stats().running == 1
    await stream.aclose()
    await wait_idle(engine)


async def test_text_layer_stop_string_aborts(engine: Tapped) -> None:
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


async def test_ignore_eos_never_ends_the_sequence(engine: Tapped) -> None:
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    probe, _ = await collect(engine, "probe-eos", [1, 7], greedy)
    # Make the third greedy token the model's EOS: it ends a normal request there, and never an ignore_eos one.
    backend = engine.torch
    assert backend._info is not None
    backend._info = replace(backend._info, eos_token_ids=(probe[2],))
    backend._eos = torch.tensor([probe[2]])
    tokens, reason = await collect(engine, "eos", [1, 7], replace(greedy, ignore_eos=False))
    assert reason == "stop" and tokens == probe[:3]
    for min_tokens in (0, 2, 6):
        tokens, reason = await collect(engine, f"ie{min_tokens}", [1, 7], replace(greedy, min_tokens=min_tokens))
        assert reason == "length" and len(tokens) == 8


async def test_queue_limit_and_not_ready(tiny_mistral_dir: Path) -> None:
    eng = make_engine(tiny_mistral_dir, max_batch_size=1, max_queue=1)
    sp = SamplingParams(max_tokens=200, ignore_eos=True)
    with pytest.raises(EngineNotReady):
        eng.submit([GenerationRequest("x", (1,), sp)])
    await eng.start()
    await eng.wait_ready(120)
    streams = [eng.submit([GenerationRequest(f"q{i}", (1, 2), sp)]) for i in range(2)]  # 1 running + 1 waiting
    with pytest.raises(Overloaded):
        eng.submit([GenerationRequest("over", (1,), sp)])
    assert eng.stats().waiting >= 1
    for stream in streams:
        await stream.aclose()
    await wait_idle(eng)
    await eng.shutdown()


async def test_a_failing_engine_loop_ends_every_live_request(tiny_mistral_dir: Path) -> None:
    eng = make_engine(tiny_mistral_dir)
    await eng.start()
    await eng.wait_ready(120)
    calls = 0
    decode = eng.torch._decode

    def failing_decode(*args: object) -> None:
        nonlocal calls
        calls += 1
        if calls > 5:
            raise RuntimeError("simulated kernel failure")
        decode(*args)  # type: ignore[arg-type]

    eng.torch._decode = failing_decode  # type: ignore[method-assign]
    sp = SamplingParams(max_tokens=300, ignore_eos=True)
    streams = [eng.submit([GenerationRequest(f"d{i}", (1, 3 + i), sp)]) for i in range(4)]

    async def drain(stream: object) -> BaseException | None:
        try:
            async for _ in stream:  # type: ignore[attr-defined]
                pass
        except Exception as exc:
            return exc
        return None

    errors = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 30)
    assert all(isinstance(e, EngineDead) for e in errors), errors
    health = eng.health()
    assert health.state is EngineState.DEAD and "simulated kernel failure" in (health.reason or "")
    assert eng.stats().running == 0 and eng.stats().waiting == 0
    with pytest.raises(EngineDead):
        eng.submit([GenerationRequest("late", (1,), sp)])
    await eng.shutdown()
