"""The admission layer and the shared text layer on a scripted backend: one set of checks for every
backend, stop strings abort, EOS is counted but never shown, a dead backend ends every live request."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from aisandbox.errors import ContextLengthExceeded, EngineDead, EngineError, EngineNotReady, InvalidRequest, Overloaded
from aisandbox.runtime.admission import Admission, AdmissionLimits
from aisandbox.runtime.engine import BackendHost, stream_text
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.text.textgen import check_context
from aisandbox.runtime.types import EngineState, EngineStats, FinishReason, ModelInfo, TokenDelta

EOS = 0


class CharTokenizer:
    """One token per character: id = code point; 0 is EOS and decodes to nothing."""

    eos_token_ids = (EOS,)
    vocab_size = 0x110000

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids if t != EOS)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))

    def byte_table(self) -> None:
        return None


class ScriptedBackend:
    """Emits the given text one token per step (from the event loop), then EOS; or holds requests open."""

    def __init__(self, text: str = "hello", finish: FinishReason = FinishReason.STOP, *, hold: bool = False) -> None:
        ids = [ord(c) for c in text]
        self.deltas = [TokenDelta((t,)) for t in ids]
        if finish is FinishReason.STOP:
            self.deltas.append(TokenDelta((EOS,), FinishReason.STOP, stop_token_id=EOS))
        else:
            self.deltas[-1] = TokenDelta((ids[-1],), finish)
        self.hold = hold
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.host: BackendHost | None = None

    def start(self, host: BackendHost) -> None:
        self.host = host
        info = ModelInfo(max_model_len=64, eos_token_ids=(EOS,), vocab_size=0x110000, max_running=2)
        host.loaded(info, CharTokenizer())  # type: ignore[arg-type]

    def add(self, request: GenerationRequest) -> None:
        self.added.append(request.request_id)
        if not self.hold:
            asyncio.get_running_loop().create_task(self._play(request.request_id))

    async def _play(self, request_id: str) -> None:
        assert self.host is not None
        for delta in self.deltas:
            if request_id in self.aborted:
                return
            self.host.emit([(request_id, delta)])
            await asyncio.sleep(0)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(running=min(2, len(self.added) - len(self.aborted)), waiting=0)

    async def shutdown(self) -> None:
        pass


async def ready(backend: ScriptedBackend, **limits: int) -> Admission:
    engine = Admission(backend, AdmissionLimits(**limits))  # type: ignore[arg-type]
    await engine.start()
    assert (await engine.wait_ready(5)).ready
    return engine


def req(rid: str = "r", prompt: tuple[int, ...] = (1, 2), **sampling: object) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(**{"max_tokens": 30, **sampling}))  # type: ignore[arg-type]


async def run(backend: ScriptedBackend, **sampling: object) -> tuple[str, list[object]]:
    engine = await ready(backend)
    deltas = [d async for d in stream_text(engine, req(**sampling))]
    await engine.shutdown()
    return "".join(d.text for d in deltas), deltas


async def test_eos_is_counted_not_shown() -> None:
    text, deltas = await run(ScriptedBackend("hello"))
    assert text == "hello"
    last = deltas[-1]
    assert last.finish_reason is FinishReason.STOP and last.completion_tokens == 6 and last.stop_reason == EOS


async def test_stop_string_ends_and_aborts() -> None:
    backend = ScriptedBackend("hello world, more text")
    text, deltas = await run(backend, stop=("world",))
    assert text == "hello "
    assert deltas[-1].finish_reason is FinishReason.STOP and deltas[-1].stop_reason == "world"
    assert backend.aborted == ["r"]


async def test_min_tokens_defers_stop_strings() -> None:
    text, _ = await run(ScriptedBackend("ab STOP cd STOP ef"), stop=("STOP",), min_tokens=6)
    assert text == "ab STOP cd "


async def test_length_finish_flushes_held_text() -> None:
    text, deltas = await run(ScriptedBackend("abcST", finish=FinishReason.LENGTH), stop=("STOP",))
    assert text == "abcST" and deltas[-1].finish_reason is FinishReason.LENGTH


def test_check_context_defaults_and_refuses() -> None:
    assert check_context(10, None, 100, "messages") == 90
    assert check_context(10, 90, 100, "messages") == 90
    with pytest.raises(ContextLengthExceeded) as exc:
        check_context(10, 91, 100, "prompt")
    assert exc.value.param == "prompt" and "maximum context length is 100 tokens" in exc.value.message
    with pytest.raises(ContextLengthExceeded):
        check_context(100, None, 100, "messages")


async def test_not_ready_before_start_and_checks_after() -> None:
    backend = ScriptedBackend(hold=True)
    engine = Admission(backend)  # type: ignore[arg-type]
    with pytest.raises(EngineNotReady):
        engine.submit([req()])
    await engine.start()
    await engine.wait_ready(5)
    with pytest.raises(InvalidRequest, match="empty"):
        engine.submit([req(prompt=())])
    with pytest.raises(ContextLengthExceeded):
        engine.submit([req(prompt=(1,) * 40, max_tokens=30)])
    assert engine.check_context(10, None, "messages") == 54
    with pytest.raises(ContextLengthExceeded) as exc:
        await engine.encode("x" * 64)
    assert exc.value.param == "prompt"
    assert backend.added == []
    await engine.shutdown()


async def test_early_refusal_needs_no_tokenization() -> None:
    engine = await ready(ScriptedBackend(hold=True))
    # No byte table: 64 bytes a token at most, twice over: 64 tokens * 64 * 2 characters always fit the bound.
    called = []
    engine.tokenizer.encode_chat = lambda messages: called.append(1) or []  # type: ignore[method-assign]
    with pytest.raises(ContextLengthExceeded) as exc:
        await engine.encode_chat([{"role": "user", "content": "x" * (64 * 64 * 2 + 1)}])
    assert exc.value.param == "messages" and "characters" in exc.value.message and not called
    await engine.shutdown()


async def test_duplicate_ids_and_queue_bound_are_all_or_none() -> None:
    backend = ScriptedBackend(hold=True)
    engine = await ready(backend, max_queue=2)  # 2 running + 2 waiting
    first = engine.submit([req("a"), req("b")])
    with pytest.raises(InvalidRequest, match="Duplicate"):
        engine.submit([req("a")])
    with pytest.raises(InvalidRequest, match="Duplicate"):
        engine.submit([req("c"), req("c")])
    with pytest.raises(Overloaded):
        engine.submit([req("d"), req("e"), req("g")])  # would be 3 waiting
    assert backend.added == ["a", "b"]
    engine.submit([req("f")])
    assert engine.stats().waiting == 1
    await first.aclose()
    assert sorted(backend.aborted) == ["a", "b"]
    await engine.shutdown()


async def test_a_dead_backend_ends_every_live_request_at_once() -> None:
    backend = ScriptedBackend(hold=True)
    engine = await ready(backend)
    streams = [engine.submit([req(f"r{i}"), req(f"s{i}")]) for i in range(3)]

    async def drain(stream: object) -> BaseException | None:
        try:
            async for _ in stream:  # type: ignore[attr-defined]
                pass
        except Exception as exc:
            return exc
        return None

    tasks = [asyncio.create_task(drain(s)) for s in streams]
    await asyncio.sleep(0.01)
    assert backend.host is not None
    backend.host.failed("the executor died")
    errors = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert all(isinstance(e, EngineDead) and "the executor died" in e.message for e in errors)
    assert engine.health().state is EngineState.DEAD and engine.health().reason == "the executor died"
    assert engine.stats().waiting == 0 and engine.stats().running == 0
    with pytest.raises(EngineDead):
        engine.submit([req("late")])
    await engine.shutdown()


async def test_a_failed_choice_fails_the_request_and_aborts_its_siblings() -> None:
    backend = ScriptedBackend(hold=True)
    engine = await ready(backend)
    stream = engine.submit([req("x0"), req("x1")])
    assert backend.host is not None
    backend.host.emit([("x0", TokenDelta((), FinishReason.ABORT, error="out of memory"))])
    with pytest.raises(EngineError, match="out of memory"):
        async for _ in stream:
            pass
    assert "x1" in backend.aborted
    await engine.shutdown()


async def test_a_backend_default_max_tokens_caps_only_an_omitted_max_tokens() -> None:
    backend = ScriptedBackend(hold=True)
    engine = await ready(backend)
    assert engine._info is not None
    from dataclasses import replace

    engine._info = replace(engine._info, default_max_tokens=16)
    assert engine.check_context(10, None, "messages") == 16
    assert engine.check_context(10, 40, "messages") == 40
    assert engine.check_context(60, None, "messages") == 4
    await engine.shutdown()
