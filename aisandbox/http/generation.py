"""One API request's run on the engine, as one object with a lifetime.

`Generation` submits all its choices when it starts (admission errors are raised there, before any response
is sent), and aborts every unfinished choice on every way out: the consumer finishing or failing, the client
disconnecting (the ASGI wrapper calls back at once), or the request ending without the consumer ever having
run. Streaming and non-streaming responses are two short functions over `events()`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType

from aisandbox.runtime.engine import Engine, RequestStream
from aisandbox.runtime.request import GenerationRequest
from aisandbox.runtime.types import TextDelta

__all__ = ["ClientDisconnected", "DisconnectSignal", "Generation"]


class ClientDisconnected(Exception):
    """The client went away; the engine requests were aborted."""


class DisconnectSignal:
    """Set once when the client disconnects; runs the callbacks registered until then at once."""

    __slots__ = ("_callbacks", "fired")

    def __init__(self) -> None:
        self.fired = False
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the client disconnects (now, if it already has)."""
        if self.fired:
            callback()
        else:
            self._callbacks.append(callback)

    def fire(self) -> None:
        """The client disconnected (or the request ended): run every callback once."""
        if not self.fired:
            self.fired = True
            callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                callback()


class Generation:
    """The engine requests of one API request: one per choice (n) and prompt."""

    def __init__(
        self, engine: Engine, requests: Sequence[GenerationRequest], disconnect: DisconnectSignal | None = None
    ) -> None:
        self.engine = engine
        self.requests = tuple(requests)
        self.disconnect = disconnect
        self.started = time.perf_counter()
        self.first_text_at: float | None = None
        self.completion_tokens = [0] * len(self.requests)
        self.finish_reasons: list[str | None] = [None] * len(self.requests)
        self._stream: RequestStream | None = None

    def submit(self) -> Generation:
        """Admit every choice or none.

        Raises:
            Overloaded, EngineNotReady, EngineDead, InvalidRequest: Nothing was left running.
        """
        self._stream = stream = self.engine.submit(self.requests)
        if self.disconnect is not None:
            self.disconnect.add(lambda: stream.cancel(ClientDisconnected()))
        return self

    async def __aenter__(self) -> Generation:
        if self._stream is None:
            self.submit()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Abort every unfinished choice in the engine."""
        if self._stream is not None:
            await self._stream.aclose()

    def cancel(self, exc: BaseException) -> None:
        """End every unfinished choice in the engine; the consumer of `events()` gets `exc`."""
        if self._stream is not None:
            self._stream.cancel(exc)

    async def events(self) -> AsyncIterator[tuple[int, TextDelta]]:
        """Yield (choice index, text delta) until every choice has finished.

        Raises:
            ClientDisconnected: The client left; every choice is aborted.
            AisandboxError: The engine failed a choice or went away; the others are aborted.
        """
        assert self._stream is not None, "submit() first"
        tokens, reasons = self.completion_tokens, self.finish_reasons
        async for index, delta in self._stream:
            if self.first_text_at is None and delta.completion_tokens:
                self.first_text_at = time.perf_counter()
            tokens[index] = delta.completion_tokens
            if delta.finish_reason is not None:
                reasons[index] = delta.finish_reason.value
            yield index, delta
