"""Per-request output collectors: where results cross from an engine thread into asyncio.

The engine thread never touches asyncio objects directly: it hands each step's deltas to the event loop with
one `loop.call_soon_threadsafe`, and the loop puts them into each request's collector. A collector merges
deltas that arrive faster than its consumer reads them, as vLLM's `RequestOutputCollector` does, so a slow
client never makes the engine wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aisandbox.runtime.types import TokenDelta

__all__ = ["DeltaCollector", "RequestHandle"]


class DeltaCollector:
    """Holds the not-yet-read deltas of one request."""

    __slots__ = ("_event", "_pending")

    def __init__(self) -> None:
        self._pending: TokenDelta | None = None
        self._event = asyncio.Event()

    def put(self, delta: TokenDelta) -> None:
        """Add a delta (on the event loop), merging it with any unread one."""
        prev = self._pending
        if prev is None or prev.finish_reason is not None:
            self._pending = delta
        else:
            self._pending = prev.merge(delta)
        self._event.set()

    async def get(self) -> TokenDelta:
        """Wait for and take everything unread, merged into one delta."""
        while self._pending is None:
            self._event.clear()
            await self._event.wait()
        delta, self._pending = self._pending, None
        return delta


class RequestHandle:
    """A submitted request's stream (the `RequestStream` protocol) for thread-owned engines."""

    def __init__(self, request_id: str, abort: Callable[[str], Any]) -> None:
        self.request_id = request_id
        self.collector = DeltaCollector()
        self._abort = abort
        self._finished = False

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._finished:
            raise StopAsyncIteration
        delta = await self.collector.get()
        if delta.finish_reason is not None:
            self._finished = True
        return delta

    async def aclose(self) -> None:
        """Abort the request in the engine unless it already finished."""
        if not self._finished:
            self._finished = True
            self._abort(self.request_id)
