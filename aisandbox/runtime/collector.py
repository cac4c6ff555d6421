"""Where results cross into asyncio: the merged output of one submission.

The text thread hands each batch of text deltas to the event loop with one `loop.call_soon_threadsafe`; there
each delta goes into its submission. A submission merges deltas that arrive faster than its consumer reads
them, as vLLM's `RequestOutputCollector` does, so a slow client never makes the engine wait and a busy
consumer sends several tokens in one event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from aisandbox.runtime.types import TextDelta

__all__ = ["Submission"]


class Submission:
    """The text deltas of one submission's sequences (the `RequestStream` protocol). Loop-side only."""

    __slots__ = ("_abort", "_error", "_event", "_open", "_pending", "request_ids")

    def __init__(self, request_ids: Sequence[str], abort: Callable[[Sequence[str]], None]) -> None:
        self.request_ids = tuple(request_ids)
        self._abort = abort
        self._pending: dict[int, TextDelta] = {}
        self._open = set(range(len(request_ids)))  # sequences not finished (or not yet read as finished)
        self._error: BaseException | None = None
        self._event = asyncio.Event()

    # ---- producer side (the admission layer, on the loop) ----

    def put(self, index: int, delta: TextDelta) -> None:
        """Add a delta of sequence `index`, merging it with any unread one."""
        prev = self._pending.get(index)
        self._pending[index] = delta if prev is None else prev.merge(delta)
        self._event.set()

    def fail(self, exc: BaseException) -> None:
        """End the whole submission with an error, raised by the iteration after what was already put."""
        if self._error is None:
            self._error = exc
        self._event.set()

    # ---- consumer side ----

    def __aiter__(self) -> AsyncIterator[tuple[int, TextDelta]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, TextDelta]]:
        while True:
            while not self._pending and self._error is None:
                if not self._open:
                    return
                self._event.clear()
                await self._event.wait()
            ready, self._pending = self._pending, {}
            for index, delta in ready.items():
                if delta.finish_reason is not None:
                    self._open.discard(index)
                yield index, delta
            if self._error is not None:
                raise self._error

    def cancel(self, exc: BaseException) -> None:
        """Abort every unfinished sequence now and make the iteration raise `exc` (a client that left)."""
        self.fail(exc)
        self._abort_open()

    async def aclose(self) -> None:
        """Abort every unfinished sequence in the engine."""
        self._abort_open()

    def _abort_open(self) -> None:
        if self._open:
            ids = [self.request_ids[i] for i in sorted(self._open)]
            self._open.clear()
            self._abort(ids)
