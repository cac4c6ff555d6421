"""The worker's lifecycle: start the engine, drain on SIGTERM, and leave when the engine dies.

Drain (`Lifecycle.drain`), as the gunicorn worker (`aisandbox.gunicorn_hooks.Worker`) runs it on SIGTERM,
before uvicorn stops serving:

1. stop taking work: /health answers 503 "draining" (readiness), every other route but /metrics a 503
   `server_shutting_down`;
2. let the running requests finish, up to `drain_timeout_s`;
3. end what is left: a stream gets an SSE error event in OpenAI's envelope (code `server_shutting_down`) and
   `data: [DONE]`, a non-streamed request a 503;
4. then uvicorn closes the connections and the ASGI lifespan shuts the engine down, all before gunicorn's
   graceful timeout (`drain_timeout_s` + 15 by default) runs out.

uvicorn alone waits for every connection to close before the lifespan shutdown, so without the worker's drain
a long stream would be cut by gunicorn's SIGKILL with no final event.

An engine that dies while it serves (it was ready once) makes the worker exit with a non-zero status, so
gunicorn starts a fresh one instead of keeping a worker that answers 503 to its share of connections. An
engine that fails to load stays up, answering /health with the reason: a fresh worker would fail the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable

from aisandbox.errors import ServerShuttingDown
from aisandbox.http.generation import DisconnectSignal, Generation
from aisandbox.runtime.engine import Engine
from aisandbox.runtime.types import EngineState

__all__ = ["Lifecycle"]

log = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 0.5
_FLUSH_S = 5.0
"""After the drain deadline: how long the ended requests get to send their last event."""


def _ended() -> ServerShuttingDown:
    return ServerShuttingDown("The server is shutting down; the request was ended.")


class Lifecycle:
    """The app's running requests, its drain, and the engine watch."""

    def __init__(self, engine: Engine, drain_timeout_s: float) -> None:
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self.engine_failed = False
        """The engine died after it had served: the worker should exit non-zero."""
        self.on_fatal: Callable[[], None] | None = None
        """Set by the gunicorn worker: asks the server to stop (the worker then exits non-zero)."""
        self._ended = False
        """The drain deadline has passed: a request that submits now (it was tokenizing) ends at once."""
        self._active: set[Generation] = set()
        self._idle: asyncio.Event | None = None
        self._drained: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def active(self) -> int:
        """Requests running in the engine."""
        return len(self._active)

    async def startup(self) -> None:
        """Start the engine, and watch it."""
        self._idle = asyncio.Event()
        self._idle.set()
        await self.engine.start()
        self._watch = asyncio.create_task(self._watch_engine())

    async def shutdown(self) -> None:
        """Drain (at once, if SIGTERM did not already), then shut the engine down."""
        if self._watch is not None:
            self._watch.cancel()
        await self.drain(0.0)
        await self.engine.shutdown()

    def track(self, gen: Generation, disconnect: DisconnectSignal | None) -> None:
        """Count `gen` as running until its request ends (the ASGI wrapper fires `disconnect` then)."""
        self._active.add(gen)
        if self._idle is not None:
            self._idle.clear()
        if disconnect is not None:
            disconnect.add(lambda: self.untrack(gen))
        if self._ended:
            gen.cancel(_ended())

    def untrack(self, gen: Generation) -> None:
        """`gen`'s request has ended."""
        self._active.discard(gen)
        if not self._active and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop taking work, let running requests finish up to the timeout, then end the rest (once)."""
        if self._drained is None:
            self.draining = True
            self._drained = asyncio.ensure_future(self._drain(self.drain_timeout_s if timeout_s is None else timeout_s))
        await asyncio.shield(self._drained)

    async def _drain(self, timeout_s: float) -> None:
        started = time.monotonic()
        log.info("draining: %d requests running, waiting up to %.1f s", len(self._active), timeout_s)
        if self._active and self._idle is not None and timeout_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        self._ended = True
        left = list(self._active)
        if left:
            log.warning("drain deadline: ending %d requests with server_shutting_down", len(left))
            for gen in left:
                gen.cancel(_ended())
            if self._idle is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), _FLUSH_S)
        log.info("drained in %.1f s", time.monotonic() - started)

    async def _watch_engine(self) -> None:
        """Ask the worker to exit when the engine dies after it was ready."""
        served = False
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            state = self.engine.health().state
            if state is EngineState.READY:
                if not served:
                    # The model's objects live as long as the worker: keep the cyclic GC from scanning them on
                    # every collection (fewer, shorter pauses on the event loop).
                    gc.freeze()
                served = True
            elif state is EngineState.DEAD and served and not self.draining:
                log.error("the engine died while serving: this worker exits so that a fresh one starts")
                self.engine_failed = True
                if self.on_fatal is not None:
                    self.on_fatal()
                return
