"""Admit once, in one place, for every backend: the `Engine` that the HTTP layer talks to.

`Admission` wraps a `Backend` and owns everything a request meets before and after the model:

* the engine's state (loading, ready, draining, dead), each with a reason;
* tokenization and chat templating on a small bounded thread pool, after a cheap early refusal of prompts
  that cannot possibly fit the context (see `Admission.refuse_oversized`);
* the context-length check (one message, one `param`), the queue bound (429), duplicate request ids;
* the registry of live requests: when the backend dies, every one of them ends at once with an error;
* text: each engine step's token deltas become text deltas (detokenization, stop strings) for all sequences
  at once, in the engine's own thread (torch, null) or on a text thread when the backend emits from the event
  loop (trtllm's pumps), and reach the loop with one `call_soon_threadsafe` per step.

As TGI's router does (`validation.rs` then `infer/mod.rs` over a `Backend` trait), so the backends only turn
token ids into token deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from aisandbox.errors import (
    ContextLengthExceeded,
    EngineDead,
    EngineError,
    EngineNotReady,
    InvalidRequest,
    Overloaded,
)
from aisandbox.runtime.collector import Submission
from aisandbox.runtime.engine import Backend
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.structured.grammar_service import GrammarServiceStats
from aisandbox.runtime.structured.logprobs import LogprobFormatter
from aisandbox.runtime.structured.tools.specs import ToolRequest
from aisandbox.runtime.text.textgen import TextState, check_context
from aisandbox.runtime.text.tokenizer import ChatMessage, Tokenizer
from aisandbox.runtime.types import EngineState, EngineStats, FinishReason, Health, ModelInfo, TextDelta, TokenDelta

if TYPE_CHECKING:
    from aisandbox.runtime.structured.grammar_service import GrammarService

__all__ = ["Admission", "AdmissionLimits"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# A text's UTF-8 bytes are the sum of its tokens' bytes, and a text has at least as many bytes as characters,
# so a text of C characters needs at least C / max_token_bytes tokens. Normalization could shrink a text a
# little; this margin keeps the refusal certain.
_EARLY_REFUSAL_MARGIN = 2


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """The admission layer's settings."""

    max_queue: int = 256
    """Requests waiting beyond the backend's running capacity before new ones get 429."""
    text_workers: int = 2
    """Threads that apply chat templates and tokenize."""
    grammar_compile_timeout_s: float = 5.0
    """Deadline for compiling one client grammar (structured.grammar_service); past it a 400."""
    grammar_workers: int = 1
    """Worker processes that compile client grammars under that deadline; 0 compiles on a thread, unbounded."""


@dataclass(eq=False, slots=True)
class _Live:
    """One admitted sequence: where its text goes and how it is made."""

    request_id: str
    submission: Submission
    index: int
    text: TextState


class Admission:
    """The `Engine` protocol over any backend."""

    def __init__(self, backend: Backend, limits: AdmissionLimits | None = None) -> None:
        self.backend = backend
        self.limits = limits or AdmissionLimits()
        self._state = EngineState.LOADING
        self._reason: str | None = "loading the model"
        self._info: ModelInfo | None = None
        self._tokenizer: Tokenizer | None = None
        self._max_chars: int | None = None
        self._formatter: LogprobFormatter | None = None
        self._live: dict[str, _Live] = {}  # written on the loop only; read by the text thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._settled: asyncio.Event | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._grammar_thread: ThreadPoolExecutor | None = None
        """Compiles grammars in this process (after the service checked them): never the tokenizer threads."""
        self._grammars: GrammarService | None = None
        self._grammars_ready: asyncio.Task[GrammarService | None] | None = None
        self._waiting_for_grammar = 0
        self._text_inbox: queue.SimpleQueue[Sequence[tuple[str, TokenDelta]] | None] = queue.SimpleQueue()
        self._text_thread: threading.Thread | None = None

    # ---- lifecycle ----

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._settled = asyncio.Event()
        self._pool = ThreadPoolExecutor(self.limits.text_workers, thread_name_prefix="aisandbox-text")
        self._grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="aisandbox-grammar")
        self._text_thread = threading.Thread(target=self._text_main, name="aisandbox-detokenize", daemon=True)
        self._text_thread.start()
        self.backend.start(self)

    async def wait_ready(self, timeout_s: float | None = None) -> Health:
        if self._settled is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), timeout_s)
        return self.health()

    async def shutdown(self) -> None:
        if self._state in (EngineState.READY, EngineState.LOADING):
            self._set_state(EngineState.DRAINING, "shutting down")
        self._end_all(EngineNotReady("The request was aborted: the server is shutting down."))
        await self.backend.shutdown()
        if self._state is not EngineState.DEAD:
            self._set_state(EngineState.DEAD, "shut down")
        self._text_inbox.put(None)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._grammar_thread is not None:
            self._grammar_thread.shutdown(wait=False, cancel_futures=True)
        if self._grammars_ready is not None:
            self._grammars_ready.cancel()
            with contextlib.suppress(BaseException):
                await self._grammars_ready
        if self._grammars is not None:
            await self._grammars.close()
            self._grammars = None

    def health(self) -> Health:
        return Health(self._state, self._reason)

    def stats(self) -> EngineStats:
        inner = self.backend.stats()
        running = min(inner.running, len(self._live))
        extra = dict(inner.extra)
        if self.limits.grammar_workers >= 1:
            g = self._grammars.stats() if self._grammars is not None else GrammarServiceStats(0, 0, 0, 0, 0)
            extra.update(
                requests_waiting_for_grammar=float(self._waiting_for_grammar),
                grammar_compiled_total=float(g.compiled),
                grammar_timeouts_total=float(g.timeouts),
                grammar_compiles_cancelled_total=float(g.cancelled),
            )
        return EngineStats(running, len(self._live) - running, inner.kv_cache_usage, extra)

    @property
    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise EngineNotReady(self._reason or "The engine is not ready.")
        return self._info

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise EngineNotReady(self._reason or "The engine is not ready.")
        return self._tokenizer

    # ---- BackendHost: called from the backend's threads ----

    def loaded(self, info: ModelInfo, tokenizer: Tokenizer) -> None:
        self._call(self._on_loaded, info, tokenizer)

    def failed(self, reason: str) -> None:
        self._call(self._on_failed, reason)

    def emit(self, deltas: Sequence[tuple[str, TokenDelta]]) -> None:
        if threading.get_ident() == self._loop_thread:
            self._text_inbox.put(deltas)  # from the event loop (trtllm's pumps): the text thread does the work
            return
        out: list[tuple[_Live, TextDelta | BaseException]] = []  # from the engine's own thread: do it here
        self._to_text(deltas, out)
        if out:
            self._call(self._deliver, out)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback` on the event loop: now when already there, else at its next turn."""
        assert self._loop is not None, "start() sets the loop before the backend starts"
        if threading.get_ident() == self._loop_thread:
            callback(*args)
            return
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the worker is exiting
            log.debug("event loop closed; dropped %s", getattr(callback, "__name__", callback))

    def _on_loaded(self, info: ModelInfo, tokenizer: Tokenizer) -> None:
        if self._state is not EngineState.LOADING:
            return  # shutting down or failed meanwhile
        self._info, self._tokenizer = info, tokenizer
        table = tokenizer.byte_table()
        # Without a byte table, the longest token is bounded by the longest vocabulary entry: 4 bytes a char.
        per_token = table.max_token_bytes if table is not None else 64
        self._max_chars = info.max_model_len * per_token * _EARLY_REFUSAL_MARGIN
        self._set_state(EngineState.READY, None)
        if self.limits.grammar_workers >= 1 and self._loop is not None:  # ready before the first grammar arrives
            self._grammars_ready = self._loop.create_task(self._start_grammars(info))

    def _on_failed(self, reason: str) -> None:
        log.error("engine dead: %s", reason)
        self._set_state(EngineState.DEAD, reason)
        self._end_all(EngineDead(f"The engine is unavailable: {reason}"))

    def _set_state(self, state: EngineState, reason: str | None) -> None:
        self._state, self._reason = state, reason
        if state is not EngineState.LOADING and self._settled is not None:
            self._settled.set()

    def _end_all(self, exc: BaseException) -> None:
        """End every live request with `exc` and abort them in the backend."""
        live, self._live = self._live, {}
        for request_id, entry in live.items():
            entry.submission.fail(exc)
            self.backend.abort(request_id)

    # ---- admission (on the loop) ----

    def _check_state(self) -> ModelInfo:
        if self._state is EngineState.DEAD:
            raise EngineDead(f"The engine is unavailable: {self._reason}")
        if self._state is not EngineState.READY or self._info is None:
            raise EngineNotReady(f"The engine is not ready: {self._reason}. Retry when GET /health returns 200.")
        return self._info

    def refuse_oversized(self, chars: int, param: str) -> None:
        """Refuse, before any tokenization, a prompt of `chars` characters that cannot fit the context.

        Every token stands for at most `max_token_bytes` bytes of text (read from the vocabulary), and a text
        has at least as many bytes as characters, so a prompt needs at least chars / max_token_bytes tokens.
        Prompts beyond twice that bound are refused at once.
        """
        info = self._check_state()
        if self._max_chars is not None and chars > self._max_chars:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {info.max_model_len} tokens. However, your prompt has "
                f"{chars} characters, more than {self._max_chars} characters cannot fit in that many tokens. "
                "Please reduce the length of the prompt.",
                param=param,
            )

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def encode_chat(self, messages: Sequence[ChatMessage], tools: ToolRequest | None = None) -> list[int]:
        chars = sum(len(m.get("content") or "") for m in messages)
        if tools is not None:
            chars += sum(len(json.dumps(t.to_openai())) for t in tools.prompt_tools)
        self.refuse_oversized(chars, "messages")
        ids = await self._off_loop(self.tokenizer.encode_chat, messages, tools)
        self._check_prompt(ids, "messages")
        return ids

    async def encode(self, text: str) -> list[int]:
        self.refuse_oversized(len(text), "prompt")
        ids = await self._off_loop(self.tokenizer.encode, text)
        self._check_prompt(ids, "prompt")
        return ids

    async def decode(self, token_ids: Sequence[int]) -> str:
        """Decode ids to text, off the event loop (a completion's `echo`)."""
        return await self._off_loop(self.tokenizer.decode, token_ids)

    async def prepare(self, sampling: SamplingParams) -> SamplingParams:
        """Compile the request's grammar (cached) and build what its logprobs need, off the event loop.

        Raises:
            InvalidRequest: An invalid or unsupported schema, regex, grammar or tool schema (a 400 naming it).
        """
        if sampling.logprobs or sampling.prompt_logprobs is not None:
            await self._off_loop(self._logprob_formatter)
        if sampling.guided is not None and sampling.grammar is None:
            from aisandbox.runtime.structured.grammar import ERROR_PARAMS, grammar_compiler

            info = self._check_state()
            compiler = grammar_compiler(self.tokenizer, info.vocab_size, info.eos_token_ids)
            spec = sampling.guided
            if not compiler.is_cached(spec):
                self._waiting_for_grammar += 1
                try:
                    service = await self._grammar_service(info)
                    if service is not None:  # bounded: a worker process, a deadline, killed if the client leaves
                        await service.check(spec, ERROR_PARAMS.get(spec.kind, "response_format"))
                finally:
                    self._waiting_for_grammar -= 1
            loop = asyncio.get_running_loop()
            grammar = await loop.run_in_executor(self._grammar_thread, compiler.compile, spec)
            sampling = replace(sampling, grammar=grammar)
        return sampling

    async def _grammar_service(self, info: ModelInfo) -> GrammarService | None:
        """The grammar workers, started on the first guided request (None: `grammar_workers` is 0)."""
        if self.limits.grammar_workers < 1:
            return None
        if self._grammars_ready is None:
            self._grammars_ready = asyncio.get_running_loop().create_task(self._start_grammars(info))
        return await asyncio.shield(self._grammars_ready)

    async def _start_grammars(self, info: ModelInfo) -> GrammarService:
        from aisandbox.runtime.structured.grammar_service import GrammarService

        vocab = await self._off_loop(self.tokenizer.vocab_for_grammar)
        service = GrammarService(
            vocab,
            info.vocab_size,
            tuple(info.eos_token_ids),
            self.limits.grammar_compile_timeout_s,
            self.limits.grammar_workers,
        )
        await service.start()
        self._grammars = service
        return service

    def _logprob_formatter(self) -> LogprobFormatter:
        """The engine's logprob formatter, built on first use (reading the vocabulary takes a moment)."""
        if self._formatter is None:
            self._formatter = LogprobFormatter(self.tokenizer)
        return self._formatter

    def _check_prompt(self, ids: Sequence[int], param: str | None) -> None:
        info = self._check_state()
        if not ids:
            raise InvalidRequest("The prompt is empty.", param=param, code="invalid_value")
        limit = info.max_prompt_len if info.max_prompt_len is not None else info.max_model_len - 1
        if len(ids) > limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {info.max_model_len} tokens and it accepts prompts of at "
                f"most {limit} tokens. However, your prompt has {len(ids)} tokens. "
                "Please reduce the length of the prompt.",
                param=param,
            )

    def check_context(self, prompt_len: int, max_tokens: int | None, param: str | None) -> int:
        info = self._check_state()
        resolved = check_context(prompt_len, max_tokens, info.max_model_len, param)
        if max_tokens is None and info.default_max_tokens is not None:
            # A backend whose scheduler reserves KV for prompt + max_tokens up front (TensorRT-LLM's
            # GUARANTEED_NO_EVICT) caps the default, or a few requests would reserve the whole cache.
            resolved = min(resolved, info.default_max_tokens)
        return resolved

    def submit(self, requests: Sequence[GenerationRequest]) -> Submission:
        info = self._check_state()
        seen: set[str] = set()
        for request in requests:
            rid = request.request_id
            if rid in self._live or rid in seen:
                raise InvalidRequest(f"Duplicate request id {rid}.", param=None)
            seen.add(rid)
            self._check_prompt(request.prompt_token_ids, None)
            check_context(len(request.prompt_token_ids), request.sampling.max_tokens, info.max_model_len, None)
        if len(self._live) + len(requests) > info.max_running + self.limits.max_queue:
            waiting = max(0, len(self._live) - info.max_running)
            raise Overloaded(f"{waiting} requests are waiting; retry later.")
        tokenizer = self.tokenizer
        submission = Submission([r.request_id for r in requests], self._abort_many)
        try:
            for index, request in enumerate(requests):
                rid = request.request_id
                sp = request.sampling
                wants = sp.logprobs or sp.prompt_logprobs is not None
                fmt = self._logprob_formatter() if wants else None  # built by prepare(), off the loop
                self._live[rid] = _Live(rid, submission, index, TextState(tokenizer, request, fmt))
                self.backend.add(request)
        except BaseException:
            self._abort_many([r.request_id for r in requests])  # all or none
            raise
        return submission

    def abort(self, request_id: str) -> None:
        """Abort one live request by id; a no-op for unknown or finished ids."""
        if self._live.pop(request_id, None) is not None:
            self.backend.abort(request_id)

    def _abort_many(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self.abort(request_id)

    # ---- the text thread ----

    def _text_main(self) -> None:
        """Detokenize and match stop strings for each engine step's deltas; deliver each batch at once."""
        inbox = self._text_inbox
        while True:
            batch = inbox.get()
            if batch is None:
                return
            out: list[tuple[_Live, TextDelta | BaseException]] = []
            while batch is not None:
                self._to_text(batch, out)
                try:
                    batch = inbox.get_nowait()
                except queue.Empty:
                    break
            if out:
                self._call(self._deliver, out)
            if batch is None:
                return

    def _to_text(
        self, batch: Sequence[tuple[str, TokenDelta]], out: list[tuple[_Live, TextDelta | BaseException]]
    ) -> None:
        live = self._live
        for request_id, delta in batch:
            entry = live.get(request_id)
            if entry is None or entry.text.finished:
                continue  # aborted, or already ended by a stop string
            if delta.error is not None:
                entry.text.finished = True
                out.append((entry, EngineError(f"The engine failed this request: {delta.error}")))
                continue
            if delta.finish_reason is FinishReason.ABORT:
                entry.text.finished = True
                out.append((entry, EngineNotReady("The request was aborted: the server is shutting down.")))
                continue
            try:
                text = entry.text.feed(delta)
            except Exception as exc:  # a bug in the text layer fails this request, not the thread
                log.exception("text processing failed for %s", request_id)
                entry.text.finished = True
                out.append((entry, EngineError(f"Text processing failed: {exc}")))
                continue
            if text is None:
                continue
            out.append((entry, text))
            if text.finish_reason is not None and delta.finish_reason is None:
                self.backend.abort(request_id)  # a stop string matched: the backend may stop at once

    def _deliver(self, out: list[tuple[_Live, TextDelta | BaseException]]) -> None:
        """On the loop: hand each result to its submission; forget finished requests."""
        live = self._live
        for entry, item in out:
            request_id = entry.request_id
            if live.get(request_id) is not entry:
                continue  # aborted or ended meanwhile
            if isinstance(item, BaseException):
                del live[request_id]
                entry.submission.cancel(item)  # the other choices of this request end too
                continue
            entry.submission.put(entry.index, item)
            if item.finish_reason is not None:
                del live[request_id]
