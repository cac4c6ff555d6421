"""The Engine protocol: what the HTTP layer (and the local benchmark) depend on.

Every backend (`torch`, `trtllm`) implements it. An engine is constructed cheaply; `start()` begins loading
the model in the background (the HTTP app calls it in the ASGI lifespan, after gunicorn forks), and
`health()` says when it is ready.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from aisandbox.runtime.tokenizer import Tokenizer
from aisandbox.runtime.types import EngineStats, GenerationRequest, Health, ModelInfo, TokenDelta

__all__ = ["Engine", "RequestStream"]


@runtime_checkable
class RequestStream(Protocol):
    """The token deltas of one submitted request.

    Iterate it to receive deltas until one carries a finish reason. `aclose()` aborts the request in the
    engine at once if it has not finished (a disconnected client, a matched stop string).
    """

    request_id: str

    def __aiter__(self) -> AsyncIterator[TokenDelta]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """An inference engine that batches submitted requests in flight."""

    async def start(self) -> None:
        """Begin loading in the background; return without waiting for the model."""

    async def wait_ready(self, timeout_s: float | None = None) -> Health:
        """Wait until the engine is ready or dead (or the timeout passes); return its health."""

    async def shutdown(self) -> None:
        """Abort what runs, stop the executor and free its memory."""

    def health(self) -> Health:
        """The current lifecycle state, with a reason when not ready."""

    def stats(self) -> EngineStats:
        """Running and waiting sequences, KV-cache usage."""

    @property
    def model_info(self) -> ModelInfo:
        """Context window and special tokens; raises EngineNotReady before the model is loaded."""

    @property
    def tokenizer(self) -> Tokenizer:
        """The shared tokenizer; raises EngineNotReady before it is loaded."""

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; raise Overloaded, EngineNotReady or EngineDead at once if it cannot be taken."""

    def abort(self, request_id: str) -> None:
        """Abort a request by id; a no-op for unknown or finished ids."""
