"""The Falcon ASGI app: `create_app(settings, engine)`.

The engine is injected and started in the ASGI lifespan (after gunicorn forks, never in a preloaded master),
so `/health` answers 503 with a reason while the model loads. `aisandbox.http.asgi` is the only module that
creates an app at import time, for gunicorn.

The event loop only moves bytes: bodies are read within a size limit and parsed off the loop when large,
prompts are templated and tokenized on the engine's text pool, and text comes back already detokenized.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

import falcon
import falcon.asgi
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from aisandbox.errors import InvalidRequest, ModelNotFound, NotFound, UnsupportedParameter
from aisandbox.http import responses, schemas
from aisandbox.http.errors import (
    InvalidJson,
    RequestTooLarge,
    error_response,
    from_validation_error,
    register_error_handlers,
)
from aisandbox.http.generation import ClientDisconnected, DisconnectSignal, Generation
from aisandbox.http.lifecycle import Lifecycle
from aisandbox.http.metrics import Metrics
from aisandbox.http.policy import AuthPolicy, Limits, check_json, check_prompt_tokens, check_request, refusal_reason
from aisandbox.runtime.engine import Engine
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.structured.logprobs import ShownLogprob
from aisandbox.runtime.structured.tools.plan import ToolPlan, plan_tools
from aisandbox.runtime.structured.tools.specs import ToolCall
from aisandbox.runtime.types import TextDelta
from aisandbox.settings import ServerSettings
from aisandbox.store.base import ResponseStore, StoredResponse

__all__ = ["DISCONNECT_KEY", "create_app"]

log = logging.getLogger(__name__)

DISCONNECT_KEY = "aisandbox.disconnect"
"""ASGI scope key of the request's DisconnectSignal."""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# Bodies up to this size are parsed on the event loop (well under a millisecond); larger ones on a thread.
_PARSE_INLINE_BYTES = 64 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


# One encoder for every chunk: json.dumps with non-default options builds a new encoder per call.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


_MARKER = "\x00text\x00"


def _template(build: Callable[[str], dict[str, Any]]) -> tuple[str, str]:
    """Split the JSON of build(marker) around the marker's encoding: (head, tail)."""
    head, tail = _dumps(build(_MARKER)).split(_dumps(_MARKER))
    return head, tail


class DisconnectWatch:
    """ASGI wrapper that notices a client's disconnect at once, and bounds what a body may buffer.

    Falcon's SSE loop only sees a disconnect after it sends the next event, and a non-streaming handler never
    sees one. This wrapper reads `receive` in a task of its own for the whole request, hands the messages on,
    and fires the request's DisconnectSignal when `http.disconnect` arrives (and when the request ends, so a
    generation that never ran is aborted too). Body chunks past `max_body_bytes` are dropped, not buffered:
    the handler has already seen enough to answer 413.
    """

    def __init__(self, app: falcon.asgi.App, max_body_bytes: int, lifecycle: Lifecycle) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.lifecycle = lifecycle
        """The worker drains through it on SIGTERM (`aisandbox.gunicorn_hooks.Worker`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        signal = DisconnectSignal()
        scope[DISCONNECT_KEY] = signal
        inbox: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
        limit = self.max_body_bytes

        async def pump() -> None:
            seen = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    inbox.put_nowait(message)
                    signal.fire()
                    return
                if seen <= limit:  # beyond the limit, chunks are dropped: the handler answers 413
                    seen += len(message.get("body", b""))
                    inbox.put_nowait(message)

        task = asyncio.create_task(pump())
        try:
            await self.app(scope, inbox.get, send)
        finally:
            task.cancel()
            signal.fire()


class _Lifespan:
    """Starts the engine when the worker starts; drains and stops it when the worker stops."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle

    async def process_startup(self, scope: Scope, event: Any) -> None:
        await self._lifecycle.startup()

    async def process_shutdown(self, scope: Scope, event: Any) -> None:
        await self._lifecycle.shutdown()


class _RequestContext:
    """Request ids, one status count per response, and one refusal count per refused request."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        given = req.get_header("X-Request-Id")
        req.context.request_id = given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        resp.set_header("X-Request-Id", req.context.request_id)

    async def process_response(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object, req_succeeded: bool
    ) -> None:
        route = req.uri_template or "unmatched"
        self._metrics.requests.labels(route, str(resp.status_code)).inc()
        error = getattr(req.context, "error", None)
        reason = refusal_reason(error) if error is not None else None
        if reason is not None:
            self._metrics.refused.labels(reason).inc()


class _Base:
    def __init__(self, settings: ServerSettings, engine: Engine, metrics: Metrics, lifecycle: Lifecycle) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.limits = Limits.from_settings(settings)
        self.created = schemas.now()


class HealthResource(_Base):
    """GET /health (liveness and readiness: 503 while loading, draining or dead)."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if self.lifecycle.draining:
            resp.status = 503
            resp.media = {"status": "draining", "reason": "the server is shutting down"}
            return
        health = self.engine.health()
        resp.status = 200 if health.ready else 503
        resp.media = {"status": health.state.value, "reason": health.reason}


class MetricsResource(_Base):
    """GET /metrics."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.data = generate_latest(self.metrics.registry)
        resp.content_type = CONTENT_TYPE_LATEST


class ModelsResource(_Base):
    """GET /v1/models and /v1/models/{model_id}."""

    def _card(self) -> dict[str, Any]:
        max_len = self.engine.model_info.max_model_len if self.engine.health().ready else None
        return schemas.model_card(self.settings.model_name, self.created, max_len)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = {"object": "list", "data": [self._card()]}

    async def on_get_one(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, model_id: str) -> None:
        if model_id != self.settings.model_name:
            raise ModelNotFound(model_id)
        resp.media = self._card()


def _depth_ok(value: Any, limit: int) -> bool:
    """Whether no array or object in `value` is nested deeper than `limit` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return True


def _parse_json(data: bytes, max_depth: int) -> Any:
    try:
        value = json.loads(data)
    except RecursionError:
        raise InvalidJson(f"The JSON is nested more than {max_depth} levels deep.") from None
    except ValueError:  # malformed JSON or bad UTF-8
        raise InvalidJson() from None
    if not _depth_ok(value, max_depth):
        raise InvalidJson(f"The JSON is nested more than {max_depth} levels deep.")
    return value


def _parse_request(data: bytes, max_depth: int, schema: type[schemas._SamplingFields], limits: Limits) -> Any:
    """Parse and validate a request body (JSON, depth, the policy's size caps, then the OpenAI schema)."""
    body = _parse_json(data, max_depth)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    check_json(body, limits)  # 300,000 prompts are refused before the schema validates each of them
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def read_request(
    req: falcon.asgi.Request,
    max_bytes: int,
    max_depth: int,
    schema: type[schemas._SamplingFields],
    limits: Limits | None = None,
) -> Any:
    """The request's body, read within `max_bytes`, parsed and validated; off the loop when it is large."""
    if req.content_length is not None and req.content_length > max_bytes:
        raise RequestTooLarge(max_bytes)
    data = await req.stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RequestTooLarge(max_bytes)
    if not data:
        raise InvalidJson("The body is empty.")
    limits = limits or Limits()
    if len(data) <= _PARSE_INLINE_BYTES:
        return _parse_request(data, max_depth, schema, limits)
    return await asyncio.get_running_loop().run_in_executor(None, _parse_request, data, max_depth, schema, limits)


@dataclass(eq=False, slots=True)
class _Choice:
    """What one choice has produced so far (for the whole response, or what streaming still owes)."""

    echo: str = ""
    """Completions with `echo`: the prompt text, sent before the first generated text."""
    text: str = ""
    calls: tuple[ToolCall, ...] = ()
    steps: list[ShownLogprob] = field(default_factory=list)
    """Logprobs of the generated tokens (and, with echo, the prompt's first)."""
    sent: int = 0
    """Characters of this choice's text already streamed: the `text_offset` of the next tokens."""


class _GenerateResource(_Base):
    """What chat and legacy completions share: parse, tokenize, admit, then respond or stream."""

    schema: type[schemas._SamplingFields]
    id_prefix: str
    prompt_param: str
    chunk_object: str

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await self._parse(req)
        if body.model != self.settings.model_name:
            raise ModelNotFound(body.model)
        if body.n > self.settings.max_n:
            raise InvalidRequest(f"n must be at most {self.settings.max_n}.", param="n", code="invalid_value")
        check_request(body, self.limits, self.engine.model_info.vocab_size)  # before any per-request work
        prompts, tools = await self._prompts(body)
        check_prompt_tokens(sum(len(ids) for ids in prompts), self.limits, self.prompt_param)
        echoes = await self._echoes(body, prompts)
        asked = body.requested_max_tokens()
        rid = schemas.new_id(self.id_prefix)
        requests: list[GenerationRequest] = []
        choices: list[_Choice] = []
        prepared: SamplingParams | None = None
        for ids, echo in zip(prompts, echoes, strict=True):
            max_tokens = self.engine.check_context(len(ids), asked, self.prompt_param)
            for j in range(body.n):
                sampling = self._sampling(body.to_sampling_params(max_tokens, j), tools)
                if prepared is None:  # the grammar is compiled once, off the loop; choices differ in seed only
                    prepared = sampling = await self.engine.prepare(sampling)
                else:
                    sampling = replace(sampling, grammar=prepared.grammar)
                requests.append(GenerationRequest(f"{rid}-{len(requests)}", ids, sampling, tools))
                choices.append(_Choice(echo=echo))
        disconnect = req.scope.get(DISCONNECT_KEY)
        gen = Generation(self.engine, requests, disconnect).submit()
        self.lifecycle.track(gen, disconnect)
        prompt_tokens = sum(len(ids) for ids in prompts)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        created = schemas.now()
        logprobs = bool(prepared and prepared.logprobs)
        if body.stream:
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-cache")
            use = (prompt_tokens, body.include_usage)
            resp.sse = self._stream(gen, rid, created, choices, use, req.context.request_id)
            return
        try:
            async with gen:
                async for index, delta in gen.events():
                    choice = choices[index]
                    choice.text += delta.text
                    choice.calls = delta.tool_calls or choice.calls
                    if delta.prompt_logprobs:
                        choice.steps[:0] = delta.prompt_logprobs
                    choice.steps.extend(delta.logprobs)
        except ClientDisconnected:
            log.info("%s: client disconnected; aborted", rid)
            resp.status = 499  # nginx's "client closed request": nobody receives it, /metrics counts it
            return
        self._observe(gen)
        use = schemas.usage(prompt_tokens, sum(gen.completion_tokens))
        reasons = [reason or "stop" for reason in gen.finish_reasons]
        resp.media = self._response(rid, created, choices, reasons, use, logprobs)

    async def _parse(self, req: falcon.asgi.Request) -> Any:
        settings = self.settings
        return await read_request(req, settings.max_body_bytes, settings.max_json_depth, self.schema, self.limits)

    async def _prompts(self, body: Any) -> tuple[list[tuple[int, ...]], ToolPlan | None]:
        """The prompts' token ids (off the loop), and how the request calls tools, if it does."""
        raise NotImplementedError

    async def _echoes(self, body: Any, prompts: list[tuple[int, ...]]) -> list[str]:
        """Per prompt, the text echoed before the completion (legacy completions' `echo`)."""
        return [""] * len(prompts)

    def _sampling(self, sampling: SamplingParams, tools: ToolPlan | None) -> SamplingParams:
        """The choice's sampling, with what the resource adds (a forced tool call's grammar)."""
        return sampling

    def _observe(self, gen: Generation) -> None:
        if gen.first_text_at is not None:
            self.metrics.ttft.observe(gen.first_text_at - gen.started)
        self.metrics.e2e.observe(time.perf_counter() - gen.started)
        self.metrics.generation_tokens.inc(sum(gen.completion_tokens))
        for reason in gen.finish_reasons:
            self.metrics.finished.labels(reason or "abort").inc()

    def _response(
        self, rid: str, created: int, choices: list[_Choice], reasons: list[str], use: dict[str, int], logprobs: bool
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _first_chunks(self, rid: str, created: int, count: int) -> list[dict[str, Any]]:
        return []

    def _chunk(self, rid: str, created: int, index: int, text: str, reason: str | None) -> dict[str, Any]:
        """A text chunk (reason None) or a choice's last chunk."""
        raise NotImplementedError

    def _delta_chunks(
        self, rid: str, created: int, index: int, delta: TextDelta, choice: _Choice
    ) -> list[dict[str, Any]]:
        """The chunks of a delta that is more than text: a finish, logprobs, an echo or tool-call events."""
        raise NotImplementedError

    async def _stream(
        self,
        gen: Generation,
        rid: str,
        created: int,
        choices: list[_Choice],
        usage: tuple[int, bool],
        request_id: str,
    ) -> AsyncIterator[falcon.asgi.SSEvent]:
        """The SSE events of a streamed response; usage is (prompt tokens, whether to send a usage chunk)."""
        count = len(gen.requests)
        # Text chunks differ only in their text: encode each choice's chunk once around a marker, then splice.
        templates = [_template(lambda text, i=i: self._chunk(rid, created, i, text, None)) for i in range(count)]
        SSEvent = falcon.asgi.SSEvent
        try:
            async with gen:
                for chunk in self._first_chunks(rid, created, count):
                    yield SSEvent(text=_dumps(chunk))
                async for index, delta in gen.events():
                    choice = choices[index]
                    if delta.finish_reason is None and not (delta.tool_events or delta.logprobs or choice.echo):
                        head, tail = templates[index]
                        choice.sent += len(delta.text)
                        yield SSEvent(text=head + _dumps(delta.text) + tail)
                    else:
                        for chunk in self._delta_chunks(rid, created, index, delta, choice):
                            yield SSEvent(text=_dumps(chunk))
            prompt_tokens, include_usage = usage
            if include_usage:
                use = schemas.usage(prompt_tokens, sum(gen.completion_tokens))
                chunk = schemas.usage_chunk(rid, created, self.settings.model_name, self.chunk_object, use)
                yield SSEvent(text=_dumps(chunk))
            self._observe(gen)
        except ClientDisconnected:
            log.info("%s: client disconnected mid-stream; aborted", rid)
            return
        except Exception as exc:
            # The stream has started: the error goes out as a last event in the same envelope.
            reason = refusal_reason(exc)
            if reason is not None:
                self.metrics.refused.labels(reason).inc()
            yield SSEvent(text=_dumps(error_response(exc, request_id)[1]))
        yield SSEvent(text="[DONE]")


class ChatCompletionsResource(_GenerateResource):
    """POST /v1/chat/completions."""

    schema = schemas.ChatCompletionRequest
    id_prefix = "chatcmpl"
    prompt_param = "messages"
    chunk_object = "chat.completion.chunk"

    async def _prompts(self, body: Any) -> tuple[list[tuple[int, ...]], ToolPlan | None]:
        tools = body.tool_request()
        ids = await self.engine.encode_chat(body.conversation(with_tools=True), tools)
        plan = plan_tools(self.engine.tokenizer, tools)
        if plan is not None and body.grammar_spec() is not None:
            raise UnsupportedParameter(
                "response_format", "response_format (or a guided_* grammar) cannot be combined with active tools."
            )
        return [(*ids, *plan.prompt_suffix) if plan is not None else tuple(ids)], plan

    def _sampling(self, sampling: SamplingParams, tools: ToolPlan | None) -> SamplingParams:
        if tools is None or tools.grammar is None:
            return sampling
        # Calls are constrained by guided decoding: the arguments follow each function's schema, and with
        # `required` or a named function the answer is the call and ends there.
        return replace(sampling, guided=tools.grammar)

    def _response(
        self, rid: str, created: int, choices: list[_Choice], reasons: list[str], use: dict[str, int], logprobs: bool
    ) -> dict[str, Any]:
        contents = [(c.text or None if c.calls else c.text, r) for c, r in zip(choices, reasons, strict=True)]
        calls = [c.calls for c in choices]
        return schemas.chat_response(
            rid,
            created,
            self.settings.model_name,
            contents,
            use,
            calls if any(calls) else None,
            [schemas.chat_logprobs(c.steps) for c in choices] if logprobs else None,
        )

    def _first_chunks(self, rid: str, created: int, count: int) -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": ""}
        return [schemas.chat_chunk(rid, created, self.settings.model_name, i, role, None) for i in range(count)]

    def _chunk(self, rid: str, created: int, index: int, text: str, reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text or reason is None else {}
        return schemas.chat_chunk(rid, created, self.settings.model_name, index, delta, reason)

    def _delta_chunks(
        self, rid: str, created: int, index: int, delta: TextDelta, choice: _Choice
    ) -> list[dict[str, Any]]:
        model = self.settings.model_name
        parts = ([{"content": delta.text}] if delta.text else []) + schemas.chat_deltas(delta.tool_events)
        logprobs = schemas.chat_logprobs(delta.logprobs) if delta.logprobs else None
        if not parts and logprobs is not None:
            parts = [{"content": ""}]  # tokens that show no text yet still carry their logprobs
        chunks = [
            schemas.chat_chunk(rid, created, model, index, part, None, logprobs if i == 0 else None)
            for i, part in enumerate(parts)
        ]
        if delta.finish_reason is not None:
            chunks.append(schemas.chat_chunk(rid, created, model, index, {}, delta.finish_reason.value))
        return chunks


class CompletionsResource(_GenerateResource):
    """POST /v1/completions."""

    schema = schemas.CompletionRequest
    id_prefix = "cmpl"
    prompt_param = "prompt"
    chunk_object = "text_completion"

    async def _prompts(self, body: Any) -> tuple[list[tuple[int, ...]], ToolPlan | None]:
        vocab = self.engine.model_info.vocab_size
        out = []
        for p in body.prompts():
            if isinstance(p, str):
                out.append(tuple(await self.engine.encode(p)))
            else:
                if any(t < 0 or t >= vocab for t in p):
                    raise InvalidRequest(
                        f"Token ids in 'prompt' must be in [0, {vocab}).", param="prompt", code="invalid_value"
                    )
                out.append(tuple(p))
        return out, None

    async def _echoes(self, body: Any, prompts: list[tuple[int, ...]]) -> list[str]:
        if not body.echo:
            return [""] * len(prompts)
        return [await self.engine.decode(ids) for ids in prompts]

    def _response(
        self, rid: str, created: int, choices: list[_Choice], reasons: list[str], use: dict[str, int], logprobs: bool
    ) -> dict[str, Any]:
        texts = [(c.echo + c.text, r) for c, r in zip(choices, reasons, strict=True)]
        shown = [schemas.completion_logprobs(c.steps) for c in choices] if logprobs else None
        return schemas.completion_response(rid, created, self.settings.model_name, texts, use, shown)

    def _chunk(self, rid: str, created: int, index: int, text: str, reason: str | None) -> dict[str, Any]:
        return schemas.completion_chunk(rid, created, self.settings.model_name, index, text, reason)

    def _delta_chunks(
        self, rid: str, created: int, index: int, delta: TextDelta, choice: _Choice
    ) -> list[dict[str, Any]]:
        text, steps = delta.text, list(delta.logprobs)
        if choice.echo:  # the first chunk of an echo carries the prompt (and the prompt's logprobs)
            text, choice.echo = choice.echo + text, ""
            steps[:0] = delta.prompt_logprobs or ()
        logprobs = schemas.completion_logprobs(steps, choice.sent) if steps else None
        choice.sent += len(text)
        reason = delta.finish_reason.value if delta.finish_reason is not None else None
        return [schemas.completion_chunk(rid, created, self.settings.model_name, index, text, reason, logprobs)]


class _RawJson:
    """A "schema" that keeps the parsed JSON object as it is (the Responses body converts itself later)."""

    @classmethod
    def model_validate(cls, body: dict[str, Any]) -> dict[str, Any]:
        return body


class ResponsesResource(ChatCompletionsResource):
    """POST /v1/responses: the Responses API as one more front end over the chat path (same admission, same
    Generation), converting the request in and the answer or the stream's chunks out; stored when `store`."""

    def __init__(self, *deps: Any, store: Callable[[], ResponseStore]) -> None:
        super().__init__(*deps)
        self._store = store

    async def _parse(self, req: falcon.asgi.Request) -> Any:
        settings = self.settings
        raw = await read_request(req, settings.max_body_bytes, settings.max_json_depth, _RawJson, self.limits)  # type: ignore[arg-type]
        responses.check_refused(raw)
        items = responses.input_items(raw)
        history: list[dict[str, Any]] = []
        previous = raw.get("previous_response_id")
        if previous is not None:
            stored = await asyncio.get_running_loop().run_in_executor(None, self._store().get, str(previous))
            if stored is None:
                raise InvalidRequest(
                    f"Previous response with id '{previous}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = [*stored.input_items, *responses.output_to_input_items(stored.response)]
        req.context.responses = (raw, [*history, *items])
        try:
            return schemas.ChatCompletionRequest.model_validate(responses.to_chat_body(raw, [*history, *items]))
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        await super().on_post(req, resp)
        raw, items = req.context.responses
        if resp.sse is not None:
            resp.sse = self._events(resp.sse, raw, items)
        elif isinstance(resp.media, dict) and "choices" in resp.media:
            body = responses.chat_to_response(resp.media, raw)
            await self._keep(body, raw, items)
            resp.media = body

    async def _keep(self, body: dict[str, Any], raw: dict[str, Any], items: list[dict[str, Any]]) -> None:
        if raw.get("store", True) is False:
            return
        stored = StoredResponse(body["id"], body["created_at"], body, items)
        await asyncio.get_running_loop().run_in_executor(None, self._store().put, stored)

    async def _events(
        self, chunks: AsyncIterator[falcon.asgi.SSEvent], raw: dict[str, Any], items: list[dict[str, Any]]
    ) -> AsyncIterator[falcon.asgi.SSEvent]:
        adapter = responses.StreamAdapter(raw)
        async for sse in chunks:
            text = sse.text if sse.text is not None else ""
            if not text or text == "[DONE]":  # OpenAI's Responses stream has no [DONE]
                continue
            for event in adapter.chunk(json.loads(text)):
                yield falcon.asgi.SSEvent(event=event["type"], text=_dumps(event))
        if adapter.final is not None:
            await self._keep(adapter.final, raw, items)


class StoredResponsesResource(_Base):
    """GET/DELETE /v1/responses/{response_id}, GET /v1/responses/{response_id}/input_items."""

    def __init__(self, *deps: Any, store: Callable[[], ResponseStore]) -> None:
        super().__init__(*deps)
        self._store = store

    async def _get(self, response_id: str) -> StoredResponse:
        stored = await asyncio.get_running_loop().run_in_executor(None, self._store().get, response_id)
        if stored is None:
            raise NotFound(f"No response found with id '{response_id}'.", param="response_id")
        return stored

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, response_id: str) -> None:
        resp.media = (await self._get(response_id)).response

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, response_id: str) -> None:
        deleted = await asyncio.get_running_loop().run_in_executor(None, self._store().delete, response_id)
        if not deleted:
            raise NotFound(f"No response found with id '{response_id}'.", param="response_id")
        resp.media = {"id": response_id, "object": "response", "deleted": True}

    async def on_get_items(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, response_id: str) -> None:
        stored = await self._get(response_id)
        data = []
        for n, item in enumerate(stored.input_items):
            shown = dict(item)
            if shown.get("type", "message") == "message":
                content = shown.get("content")
                if isinstance(content, str):
                    content = [{"type": "input_text", "text": content}]
                shown = {"type": "message", "role": shown.get("role"), "content": content, "status": "completed"}
            shown.setdefault("id", f"item_{response_id[5:]}_{n}")
            data.append(shown)
        resp.media = {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }


def _store_opener(settings: ServerSettings) -> Callable[[], ResponseStore]:
    """Open the response store on first use (per worker), then keep it."""
    opened: list[ResponseStore] = []
    lock = threading.Lock()

    def get() -> ResponseStore:
        with lock:
            if not opened:
                from aisandbox.store import open_store

                opened.append(
                    open_store(settings.response_store_url, settings.data_dir, settings.response_retention_days)
                )
            return opened[0]

    return get


def create_app(settings: ServerSettings, engine: Engine) -> DisconnectWatch:
    """Build the ASGI app around an engine (not yet started: the lifespan starts it)."""
    metrics = Metrics(engine)
    lifecycle = Lifecycle(engine, settings.drain_timeout_s)
    policy = AuthPolicy(settings, lambda: lifecycle.draining)
    app = falcon.asgi.App(middleware=[_Lifespan(lifecycle), _RequestContext(metrics), policy], cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    deps = (settings, engine, metrics, lifecycle)
    models = ModelsResource(*deps)
    app.add_route("/health", HealthResource(*deps))
    app.add_route("/metrics", MetricsResource(*deps))
    app.add_route("/v1/models", models)
    app.add_route("/v1/models/{model_id:path}", models, suffix="one")
    app.add_route("/v1/chat/completions", ChatCompletionsResource(*deps))
    app.add_route("/v1/completions", CompletionsResource(*deps))
    store = _store_opener(settings)
    app.add_route("/v1/responses", ResponsesResource(*deps, store=store))
    stored = StoredResponsesResource(*deps, store=store)
    app.add_route("/v1/responses/{response_id}", stored)
    app.add_route("/v1/responses/{response_id}/input_items", stored, suffix="items")
    app.add_sink(policy.unrouted)  # deny by default: an unknown path needs the key before it gets its 404
    register_error_handlers(app)
    return DisconnectWatch(app, settings.max_body_bytes, lifecycle)
