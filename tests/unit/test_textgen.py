"""The shared text layer on a scripted fake engine: stop strings abort, EOS is counted but never shown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from aisandbox.errors import ContextLengthExceeded
from aisandbox.runtime.textgen import check_context, stream_text
from aisandbox.runtime.types import (
    EngineState,
    FinishReason,
    GenerationRequest,
    Health,
    SamplingParams,
    TokenDelta,
)

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


class ScriptedStream:
    def __init__(self, request_id: str, deltas: list[TokenDelta], aborted: list[str]) -> None:
        self.request_id, self._deltas, self._aborted = request_id, deltas, aborted
        self.closed = False

    def __aiter__(self) -> AsyncIterator[TokenDelta]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[TokenDelta]:
        for delta in self._deltas:
            yield delta

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._aborted.append(self.request_id)


class ScriptedEngine:
    """Streams the given text one token per delta, then EOS."""

    def __init__(self, text: str, finish: FinishReason = FinishReason.STOP) -> None:
        self.tokenizer = CharTokenizer()
        ids = [ord(c) for c in text]
        self.deltas = [TokenDelta((t,)) for t in ids]
        if finish is FinishReason.STOP:
            self.deltas.append(TokenDelta((EOS,), FinishReason.STOP, stop_token_id=EOS))
        else:
            self.deltas[-1] = TokenDelta((ids[-1],), finish)
        self.aborted: list[str] = []

    def submit(self, request: GenerationRequest) -> ScriptedStream:
        return ScriptedStream(request.request_id, self.deltas, self.aborted)

    def health(self) -> Health:
        return Health(EngineState.READY)


async def run(engine: ScriptedEngine, **sampling: object) -> tuple[str, list[object]]:
    request = GenerationRequest("r", (1, 2), SamplingParams(max_tokens=100, **sampling))  # type: ignore[arg-type]
    deltas = [d async for d in stream_text(engine, request)]  # type: ignore[arg-type]
    return "".join(d.text for d in deltas), deltas


async def test_eos_is_counted_not_shown() -> None:
    text, deltas = await run(ScriptedEngine("hello"))
    assert text == "hello"
    last = deltas[-1]
    assert last.finish_reason is FinishReason.STOP and last.completion_tokens == 6 and last.stop_reason == EOS


async def test_stop_string_ends_and_aborts() -> None:
    engine = ScriptedEngine("hello world, more text")
    text, deltas = await run(engine, stop=("world",))
    assert text == "hello "
    assert deltas[-1].finish_reason is FinishReason.STOP and deltas[-1].stop_reason == "world"
    assert engine.aborted == ["r"]


async def test_min_tokens_defers_stop_strings() -> None:
    text, _ = await run(ScriptedEngine("ab STOP cd STOP ef"), stop=("STOP",), min_tokens=6)
    assert text == "ab STOP cd "


async def test_length_finish_flushes_held_text() -> None:
    text, deltas = await run(ScriptedEngine("abcST", finish=FinishReason.LENGTH), stop=("STOP",))
    assert text == "abcST" and deltas[-1].finish_reason is FinishReason.LENGTH


def test_check_context_defaults_and_refuses() -> None:
    assert check_context(10, None, 100, "messages") == 90
    assert check_context(10, 90, 100, "messages") == 90
    with pytest.raises(ContextLengthExceeded) as too_long:
        check_context(10, 91, 100, "prompt")
    assert too_long.value.param == "prompt" and "100 tokens" in too_long.value.message
    with pytest.raises(ContextLengthExceeded):
        check_context(100, None, 100, "messages")
