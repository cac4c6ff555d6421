"""Run one OpenAI request on the engine: fan out its n choices and merge their text streams.

Each choice is its own engine request. One task per choice pumps its text into a shared queue; a watcher
puts a marker there when the client disconnects; the consumer (an SSE generator or a non-streaming handler)
reads the queue. Whoever stops reading first, the consumer closing or the client leaving, cancels the
tasks, which aborts every engine request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from aisandbox.errors import EngineNotReady
from aisandbox.runtime.engine import Engine
from aisandbox.runtime.textgen import stream_text
from aisandbox.runtime.types import FinishReason, GenerationRequest, SamplingParams, TextDelta

__all__ = ["ClientDisconnected", "Fanout", "start_choices"]


class ClientDisconnected(Exception):
    """The client went away; the engine requests were aborted."""


_DISCONNECTED = object()


@dataclass
class Fanout:
    """The merged text stream of all choices of one request."""

    streams: list[AsyncIterator[TextDelta]]
    disconnected: asyncio.Event | None = None
    started: float = field(default_factory=time.perf_counter)
    first_text_at: float | None = None
    completion_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self.completion_tokens = [0] * len(self.streams)
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self.streams)]
        if self.disconnected is not None:
            self._tasks.append(asyncio.create_task(self._watch(self.disconnected)))

    async def _pump(self, index: int, stream: AsyncIterator[TextDelta]) -> None:
        try:
            async for delta in stream:
                self._queue.put_nowait((index, delta))
        except Exception as exc:  # handed to the consumer, who maps it once
            self._queue.put_nowait((index, exc))
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    async def _watch(self, event: asyncio.Event) -> None:
        await event.wait()
        self._queue.put_nowait((-1, _DISCONNECTED))

    async def events(self) -> AsyncIterator[tuple[int, TextDelta]]:
        """Yield (choice index, delta) until every choice finished.

        Raises:
            ClientDisconnected: The client left; the engine requests are aborted.
            AisandboxError: A choice failed; the others are aborted.
        """
        remaining = len(self.streams)
        try:
            while remaining:
                index, item = await self._queue.get()
                if item is _DISCONNECTED:
                    raise ClientDisconnected()
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, TextDelta)
                if self.first_text_at is None and item.completion_tokens:
                    self.first_text_at = time.perf_counter()
                self.completion_tokens[index] = item.completion_tokens
                if item.finish_reason is not None:
                    remaining -= 1
                    if item.finish_reason is FinishReason.ABORT:
                        raise EngineNotReady("The request was aborted: the server is shutting down.")
                yield index, item
        finally:
            await self.close()

    async def close(self) -> None:
        """Cancel every pump (aborting unfinished engine requests) and wait for them."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def start_choices(
    engine: Engine,
    request_id: str,
    choices: Sequence[tuple[tuple[int, ...], SamplingParams]],
    disconnected: asyncio.Event | None,
) -> Fanout:
    """Submit one engine request per choice (prompt ids, sampling), all or none.

    Raises:
        Overloaded, EngineNotReady, EngineDead: Nothing was left running.
    """
    streams: list[AsyncIterator[TextDelta]] = []
    try:
        for i, (prompt_ids, params) in enumerate(choices):
            streams.append(stream_text(engine, GenerationRequest(f"{request_id}-{i}", prompt_ids, params)))
    except BaseException:
        for submitted in range(len(streams)):
            engine.abort(f"{request_id}-{submitted}")
        raise
    return Fanout(streams, disconnected)
