"""The null backend: the real tokenizer, canned tokens at no cost.

It measures what the rest of the server costs per token (admission, the text thread, the HTTP tier, SSE):
`aisandbox serve --null-engine` behind the real app, driven by `aisandbox bench --null-engine`. Each step gives
every running sequence one token of a canned text, until its max_tokens; EOS never ends a sequence.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path
from typing import Any

from aisandbox.runtime.engine import BackendHost
from aisandbox.runtime.request import GenerationRequest
from aisandbox.runtime.text.tokenizer import load_tokenizer
from aisandbox.runtime.types import EngineStats, FinishReason, ModelInfo, TokenDelta
from aisandbox.settings import ServerSettings

__all__ = ["NullBackend"]

_CANNED = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "Über naïve café — 東京タワー and 😀 emoji keep the detokenizer honest. "
)


class NullBackend:
    """A `Backend` whose steps cost nothing but the Python that emits them."""

    def __init__(
        self, model_path: Path | None, cache_dir: Path, *, max_batch_size: int = 256, step_s: float = 0.0
    ) -> None:
        self._model_path = model_path
        self._cache_dir = cache_dir
        self._max_batch = max_batch_size
        self._step_s = step_s
        self._host: BackendHost | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._running = 0

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> NullBackend:
        """The backend for `aisandbox serve --null-engine`."""
        return cls(
            settings.model,
            settings.cache_dir,
            max_batch_size=settings.max_batch_size,
            step_s=settings.null_engine_step_ms / 1000,
        )

    def start(self, host: BackendHost) -> None:
        self._host = host
        self._thread = threading.Thread(target=self._main, name="aisandbox-null-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None))
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
            self._thread = None

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running, waiting=0)

    def add(self, request: GenerationRequest) -> None:
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def _main(self) -> None:
        assert self._host is not None
        host = self._host
        try:
            from aisandbox.runtime.torch.default_model import resolve_model_path

            tokenizer = load_tokenizer(resolve_model_path(self._model_path, self._cache_dir))
            canned = tokenizer.encode(_CANNED)[1:] or [0]
            info = ModelInfo(
                max_model_len=1 << 20,
                eos_token_ids=tokenizer.eos_token_ids,
                vocab_size=tokenizer.vocab_size,
                max_running=self._max_batch,
            )
        except Exception as exc:
            host.failed(f"failed to load the tokenizer: {exc}")
            return
        host.loaded(info, tokenizer)
        # request id -> [tokens left, position in the canned text]
        running: dict[str, list[int]] = {}
        waiting: list[GenerationRequest] = []
        while True:
            block = not running and not waiting
            while True:
                try:
                    kind, payload = self._inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if kind == "stop":
                    return
                if kind == "add":
                    waiting.append(payload)
                else:
                    running.pop(payload, None)
                    waiting = [r for r in waiting if r.request_id != payload]
            while waiting and len(running) < self._max_batch:
                request = waiting.pop(0)
                running[request.request_id] = [request.sampling.max_tokens, 0]
            out: list[tuple[str, TokenDelta]] = []
            n = len(canned)
            for request_id, state in list(running.items()):
                left, pos = state
                token = canned[pos % n]
                if left <= 1:
                    out.append((request_id, TokenDelta((token,), FinishReason.LENGTH)))
                    del running[request_id]
                else:
                    out.append((request_id, TokenDelta((token,))))
                    state[0], state[1] = left - 1, pos + 1
            self._running = len(running)
            if out:
                host.emit(out)
            time.sleep(self._step_s)  # 0 still yields the GIL to the event loop and the text thread
