"""The Falcon ASGI app: `create_app(settings, engine)`.

The engine is injected and started in the ASGI lifespan (after gunicorn forks, never in a preloaded master),
so `/health` answers 503 with a reason while the model loads. `aisandbox.http.asgi` is the only module that
creates an app at import time, for gunicorn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import falcon
import falcon.asgi
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from aisandbox.errors import EngineDead, EngineNotReady, InvalidRequest, ModelNotFound
from aisandbox.http import schemas
from aisandbox.http.errors import Unauthorized, error_response, from_validation_error, register_error_handlers
from aisandbox.http.generation import ClientDisconnected, Fanout, start_choices
from aisandbox.http.metrics import Metrics
from aisandbox.runtime.engine import Engine
from aisandbox.runtime.textgen import check_context
from aisandbox.runtime.types import EngineState, SamplingParams
from aisandbox.settings import ServerSettings

__all__ = ["DISCONNECT_KEY", "create_app"]

log = logging.getLogger(__name__)

DISCONNECT_KEY = "aisandbox.disconnected"
"""ASGI scope key of the asyncio.Event set when the client disconnects."""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


_MARKER = "\x00text\x00"


def _template(build: Callable[[str], dict[str, Any]]) -> tuple[str, str]:
    """Split the JSON of build(marker) around the marker's encoding: (head, tail)."""
    head, tail = _dumps(build(_MARKER)).split(_dumps(_MARKER))
    return head, tail


class DisconnectWatch:
    """ASGI wrapper that notices a client's disconnect at once.

    Falcon's SSE loop only sees a disconnect after it sends the next event, and a non-streaming handler never
    sees one. This wrapper reads `receive` in a task of its own for the whole request, hands the messages on,
    and sets an event in the scope when `http.disconnect` arrives, so the handler can abort the engine request.
    """

    def __init__(self, app: falcon.asgi.App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        disconnected = asyncio.Event()
        scope[DISCONNECT_KEY] = disconnected
        inbox: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()

        async def pump() -> None:
            while True:
                message = await receive()
                inbox.put_nowait(message)
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    return

        task = asyncio.create_task(pump())
        try:
            await self.app(scope, inbox.get, send)
        finally:
            task.cancel()


class _Lifespan:
    """Starts the engine when the worker starts, stops it when the worker stops."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def process_startup(self, scope: Scope, event: Any) -> None:
        await self._engine.start()

    async def process_shutdown(self, scope: Scope, event: Any) -> None:
        await self._engine.shutdown()


class _Auth:
    """Checks the bearer token on /v1 routes when an API key is configured."""

    def __init__(self, api_key: str | None) -> None:
        self._expected = f"Bearer {api_key}" if api_key else None

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if self._expected and req.path.startswith("/v1") and req.get_header("Authorization") != self._expected:
            raise Unauthorized()


class _Base:
    def __init__(self, settings: ServerSettings, engine: Engine, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.created = schemas.now()


class HealthResource(_Base):
    """GET /health."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
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


class _GenerateResource(_Base):
    """What chat and legacy completions share: parse, check, fan out, respond or stream."""

    schema: type[schemas._SamplingFields]
    route: str
    id_prefix: str
    prompt_param: str

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        status = 200
        try:
            await self._handle(req, resp)
        except Exception as exc:
            status = error_response(exc)[0]
            raise
        finally:
            self.metrics.requests.labels(self.route, str(status)).inc()

    async def _parse(self, req: falcon.asgi.Request) -> Any:
        body = await req.get_media()
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
        try:
            return self.schema.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    def _check_ready(self) -> None:
        health = self.engine.health()
        if health.state is EngineState.DEAD:
            raise EngineDead(f"The engine is unavailable: {health.reason}")
        if not health.ready:
            raise EngineNotReady(f"The engine is not ready: {health.reason}. Retry when GET /health returns 200.")

    def _prompts(self, body: Any) -> list[tuple[int, ...]]:
        raise NotImplementedError

    async def _handle(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await self._parse(req)
        if body.model != self.settings.model_name:
            raise ModelNotFound(body.model)
        if body.n > self.settings.max_n:
            raise InvalidRequest(f"n must be at most {self.settings.max_n}.", param="n", code="invalid_value")
        self._check_ready()
        prompts = self._prompts(body)
        max_len = self.engine.model_info.max_model_len
        asked = body.requested_max_tokens()
        choices: list[tuple[tuple[int, ...], SamplingParams]] = []
        for ids in prompts:
            max_tokens = check_context(len(ids), asked, max_len, self.prompt_param)
            choices.extend((ids, body.to_sampling_params(max_tokens, j)) for j in range(body.n))
        rid = schemas.new_id(self.id_prefix)
        fan = start_choices(self.engine, rid, choices, req.scope.get(DISCONNECT_KEY))
        prompt_tokens = sum(len(ids) for ids in prompts)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        created = schemas.now()
        if body.stream:
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-cache")
            resp.sse = self._stream(fan, rid, created, body, prompt_tokens)
            return
        texts = [""] * len(choices)
        reasons = [""] * len(choices)
        try:
            async for index, delta in fan.events():
                texts[index] += delta.text
                if delta.finish_reason is not None:
                    reasons[index] = delta.finish_reason.value
        except ClientDisconnected:
            log.info("%s: client disconnected; aborted", rid)
            return
        self._observe(fan, reasons)
        use = schemas.usage(prompt_tokens, sum(fan.completion_tokens))
        resp.media = self._response(rid, created, list(zip(texts, reasons, strict=True)), use)

    def _observe(self, fan: Fanout, reasons: list[str]) -> None:
        end = time.perf_counter()
        if fan.first_text_at is not None:
            self.metrics.ttft.observe(fan.first_text_at - fan.started)
        self.metrics.e2e.observe(end - fan.started)
        self.metrics.generation_tokens.inc(sum(fan.completion_tokens))
        for reason in reasons:
            self.metrics.finished.labels(reason or "abort").inc()

    def _response(self, rid: str, created: int, choices: list[tuple[str, str]], use: dict[str, int]) -> dict[str, Any]:
        raise NotImplementedError

    def _first_chunks(self, rid: str, created: int, count: int) -> list[dict[str, Any]]:
        return []

    def _chunk(self, rid: str, created: int, index: int, text: str, reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    async def _stream(
        self, fan: Fanout, rid: str, created: int, body: Any, prompt_tokens: int
    ) -> AsyncIterator[falcon.asgi.SSEvent]:
        reasons = [""] * len(fan.streams)
        # Text chunks differ only in their text: encode each choice's chunk once around a marker, then splice.
        templates = [_template(lambda text, i=i: self._chunk(rid, created, i, text, None)) for i in range(len(reasons))]
        try:
            for chunk in self._first_chunks(rid, created, len(fan.streams)):
                yield falcon.asgi.SSEvent(text=_dumps(chunk))
            async for index, delta in fan.events():
                if delta.finish_reason is None:
                    head, tail = templates[index]
                    yield falcon.asgi.SSEvent(text=head + _dumps(delta.text) + tail)
                    continue
                reasons[index] = reason = delta.finish_reason.value
                yield falcon.asgi.SSEvent(text=_dumps(self._chunk(rid, created, index, delta.text, reason)))
            if body.include_usage:
                use = schemas.usage(prompt_tokens, sum(fan.completion_tokens))
                chunk = schemas.usage_chunk(rid, created, self.settings.model_name, self._chunk_object, use)
                yield falcon.asgi.SSEvent(text=_dumps(chunk))
            self._observe(fan, reasons)
        except ClientDisconnected:
            log.info("%s: client disconnected mid-stream; aborted", rid)
            return
        except Exception as exc:
            # The stream has started: the error goes out as a last event in the same envelope.
            yield falcon.asgi.SSEvent(text=_dumps(error_response(exc)[1]))
        finally:
            await fan.close()
        yield falcon.asgi.SSEvent(text="[DONE]")

    _chunk_object = ""


class ChatCompletionsResource(_GenerateResource):
    """POST /v1/chat/completions."""

    schema = schemas.ChatCompletionRequest
    route = "/v1/chat/completions"
    id_prefix = "chatcmpl"
    prompt_param = "messages"
    _chunk_object = "chat.completion.chunk"

    def _prompts(self, body: Any) -> list[tuple[int, ...]]:
        return [tuple(self.engine.tokenizer.encode_chat(body.conversation()))]

    def _response(self, rid: str, created: int, choices: list[tuple[str, str]], use: dict[str, int]) -> dict[str, Any]:
        return schemas.chat_response(rid, created, self.settings.model_name, choices, use)

    def _first_chunks(self, rid: str, created: int, count: int) -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": ""}
        return [schemas.chat_chunk(rid, created, self.settings.model_name, i, role, None) for i in range(count)]

    def _chunk(self, rid: str, created: int, index: int, text: str, reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text or reason is None else {}
        return schemas.chat_chunk(rid, created, self.settings.model_name, index, delta, reason)


class CompletionsResource(_GenerateResource):
    """POST /v1/completions."""

    schema = schemas.CompletionRequest
    route = "/v1/completions"
    id_prefix = "cmpl"
    prompt_param = "prompt"
    _chunk_object = "text_completion"

    def _prompts(self, body: Any) -> list[tuple[int, ...]]:
        tok = self.engine.tokenizer
        vocab = self.engine.model_info.vocab_size
        out = []
        for p in body.prompts():
            if isinstance(p, str):
                out.append(tuple(tok.encode(p)))
            else:
                if any(t < 0 or t >= vocab for t in p):
                    raise InvalidRequest(
                        f"Token ids in 'prompt' must be in [0, {vocab}).", param="prompt", code="invalid_value"
                    )
                out.append(tuple(p))
        return out

    def _response(self, rid: str, created: int, choices: list[tuple[str, str]], use: dict[str, int]) -> dict[str, Any]:
        return schemas.completion_response(rid, created, self.settings.model_name, choices, use)

    def _chunk(self, rid: str, created: int, index: int, text: str, reason: str | None) -> dict[str, Any]:
        return schemas.completion_chunk(rid, created, self.settings.model_name, index, text, reason)


def create_app(settings: ServerSettings, engine: Engine) -> DisconnectWatch:
    """Build the ASGI app around an engine (not yet started: the lifespan starts it)."""
    app = falcon.asgi.App(middleware=[_Lifespan(engine), _Auth(settings.api_key)], cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    metrics = Metrics(engine)
    deps = (settings, engine, metrics)
    models = ModelsResource(*deps)
    app.add_route("/health", HealthResource(*deps))
    app.add_route("/metrics", MetricsResource(*deps))
    app.add_route("/v1/models", models)
    app.add_route("/v1/models/{model_id:path}", models, suffix="one")
    app.add_route("/v1/chat/completions", ChatCompletionsResource(*deps))
    app.add_route("/v1/completions", CompletionsResource(*deps))
    register_error_handlers(app)
    return DisconnectWatch(app)
