"""A worker whose engine dies while it serves asks to exit; one that never loaded stays, with the reason."""

from __future__ import annotations

import asyncio
from typing import Any

from aisandbox.http import lifecycle as lifecycle_module
from aisandbox.http.lifecycle import Lifecycle
from aisandbox.runtime.types import EngineState, Health


class FakeEngine:
    def __init__(self, states: list[EngineState]) -> None:
        self.states = states
        self.shut = False

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        self.shut = True

    def health(self) -> Health:
        return Health(self.states.pop(0) if len(self.states) > 1 else self.states[0], "why")


async def _watch(states: list[EngineState], monkeypatch: Any) -> tuple[Lifecycle, list[int]]:
    monkeypatch.setattr(lifecycle_module, "_WATCH_INTERVAL_S", 0.01)
    engine: Any = FakeEngine(states)
    life = Lifecycle(engine, drain_timeout_s=0.0)
    calls: list[int] = []
    life.on_fatal = lambda: calls.append(1)
    await life.startup()
    await asyncio.sleep(0.2)
    await life.shutdown()
    assert engine.shut
    return life, calls


async def test_engine_dead_after_serving_asks_the_worker_to_exit(monkeypatch: Any) -> None:
    life, calls = await _watch([EngineState.LOADING, EngineState.READY, EngineState.DEAD], monkeypatch)
    assert life.engine_failed and calls == [1]


async def test_engine_that_never_loaded_keeps_the_worker(monkeypatch: Any) -> None:
    life, calls = await _watch([EngineState.LOADING, EngineState.DEAD], monkeypatch)
    assert not life.engine_failed and calls == []


async def test_a_request_that_submits_after_the_drain_deadline_ends_at_once() -> None:
    from aisandbox.errors import ServerShuttingDown

    engine: Any = FakeEngine([EngineState.READY])
    life = Lifecycle(engine, drain_timeout_s=0.0)

    class Gen:
        ended: BaseException | None = None

        def cancel(self, exc: BaseException) -> None:
            self.ended = exc
            life.untrack(self)  # type: ignore[arg-type]  # its request ends

    await life.startup()
    early: Any = Gen()
    life.track(early, None)
    await life.drain()
    assert isinstance(early.ended, ServerShuttingDown)
    late: Any = Gen()  # it was tokenizing while the drain ran
    life.track(late, None)
    assert isinstance(late.ended, ServerShuttingDown)
    await life.shutdown()
