"""The protocols of the runtime: what the HTTP layer depends on (`Engine`) and what a backend implements
(`Backend`), with the admission layer (`aisandbox.runtime.admission.Admission`) between them.

Every backend (`torch`, `trtllm`, `null`) only loads a model and turns requests into token deltas. Everything a
request goes through before and after that is shared: state, checks, the queue bound and the registry of live
requests (admission), tokenization on a bounded thread pool, and detokenization with stop strings on a text
thread, once per engine step for all sequences.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.structured.tools.specs import ToolRequest
from aisandbox.runtime.text.tokenizer import ChatMessage, Tokenizer
from aisandbox.runtime.types import EngineStats, Health, ModelInfo, TextDelta, TokenDelta

__all__ = ["Backend", "BackendHost", "Engine", "RequestStream", "stream_text"]


@runtime_checkable
class RequestStream(Protocol):
    """The text of one submission's sequences (the n choices of one API request), merged.

    Iterate it for (sequence index, delta) until every sequence has finished; a delta that waited is merged
    with the later ones of its sequence. `aclose()` aborts every unfinished sequence in the engine at once
    (a disconnected client); `cancel(exc)` does the same and makes the iteration raise `exc`.
    """

    def __aiter__(self) -> AsyncIterator[tuple[int, TextDelta]]: ...

    async def aclose(self) -> None: ...

    def cancel(self, exc: BaseException) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """An inference engine as the HTTP layer sees it (implemented once, by the admission layer)."""

    async def start(self) -> None:
        """Begin loading in the background; return without waiting for the model."""

    async def wait_ready(self, timeout_s: float | None = None) -> Health:
        """Wait until the engine is ready or dead (or the timeout passes); return its health."""

    async def shutdown(self) -> None:
        """Stop taking requests, end the live ones, stop the backend and free its memory."""

    def health(self) -> Health:
        """The current lifecycle state, with a reason when not ready."""

    def stats(self) -> EngineStats:
        """Running and waiting sequences, KV-cache usage, backend gauges."""

    @property
    def model_info(self) -> ModelInfo:
        """Context window and special tokens; raises EngineNotReady before the model is loaded."""

    @property
    def tokenizer(self) -> Tokenizer:
        """The shared tokenizer; raises EngineNotReady before it is loaded."""

    async def encode_chat(self, messages: Sequence[ChatMessage], tools: ToolRequest | None = None) -> list[int]:
        """Apply the chat template (with the request's tools) and tokenize, off the event loop; refuse at once
        what cannot fit."""

    async def encode(self, text: str) -> list[int]:
        """Tokenize a completion prompt, off the event loop; refuse at once what cannot fit."""

    async def decode(self, token_ids: Sequence[int]) -> str:
        """Decode ids to text, off the event loop."""

    async def prepare(self, sampling: SamplingParams) -> SamplingParams:
        """Compile the sampling's grammar and ready its logprobs, off the event loop; raise InvalidRequest."""

    def check_context(self, prompt_len: int, max_tokens: int | None, param: str) -> int:
        """Resolve max_tokens (None: the rest of the context) or raise ContextLengthExceeded naming `param`."""

    def submit(self, requests: Sequence[GenerationRequest]) -> RequestStream:
        """Admit all the requests or none; raise Overloaded, EngineNotReady, EngineDead or InvalidRequest."""


class BackendHost(Protocol):
    """What a backend reports to; every method may be called from any thread."""

    def loaded(self, info: ModelInfo, tokenizer: Tokenizer) -> None:
        """The model is loaded: start taking requests."""

    def failed(self, reason: str) -> None:
        """The backend cannot serve (any more): every live request ends with an error, /health says dead."""

    def emit(self, deltas: Sequence[tuple[str, TokenDelta]]) -> None:
        """One engine step's token deltas, (request id, delta); returns at once."""


class Backend(Protocol):
    """A model executor under the admission layer: token ids in, token deltas out."""

    def start(self, host: BackendHost) -> None:
        """Begin loading (on a thread of its own); report to `host`. Called on the event loop."""

    def add(self, request: GenerationRequest) -> None:
        """Queue an admitted request (already checked). Called on the event loop."""

    def abort(self, request_id: str) -> None:
        """Stop a request; no further delta of it is needed. Any thread; a no-op for unknown ids."""

    def stats(self) -> EngineStats:
        """Sequences running in the backend (waiting is derived by the admission layer), KV usage, gauges."""

    async def shutdown(self) -> None:
        """Stop the executor and free its memory; live requests are ended by the admission layer."""


async def stream_text(engine: Engine, request: GenerationRequest) -> AsyncIterator[TextDelta]:
    """Submit one request and yield its text as it is generated; the last delta carries the finish reason.

    Leaving the iteration early aborts the engine request at once.
    """
    stream = engine.submit([request])
    try:
        async for _, delta in stream:
            yield delta
    finally:
        await stream.aclose()
