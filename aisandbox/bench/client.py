"""What the benchmark sends and what it receives: a small client protocol and its HTTP implementation.

The runner times a request through `RequestClient.stream`, which yields one `StreamEvent` per received chunk,
stamped on arrival with `time.perf_counter()`. `HttpClient` speaks the OpenAI streaming API over a pooled
async connection; `aisandbox.bench.local_engine.LocalEngineClient` drives the runtime's engine in process
through the same protocol, so that the two can be compared in one run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx

__all__ = [
    "Endpoint",
    "GenerationOptions",
    "HttpClient",
    "HttpClientConfig",
    "Message",
    "Prompt",
    "RequestClient",
    "RequestError",
    "StreamEvent",
    "Usage",
]

Endpoint = Literal["chat", "completions"]
Message = Mapping[str, str]
"""One chat message: {"role": ..., "content": ...}."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request of a workload: a conversation ending with a user turn, and how long to answer."""

    messages: tuple[Message, ...]
    output_len: int
    """max_tokens to ask for (and min_tokens when lengths are fixed)."""
    input_len: int | None = None
    """Tokens of the prompt's text by the workload's tokenizer, when one was given."""

    @property
    def text(self) -> str:
        """The prompt for the completions endpoint: the messages' contents, one per line."""
        return "\n".join(m["content"] for m in self.messages)


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """How every request of a run asks to be generated."""

    model: str
    """The model id sent in each request."""
    endpoint: Endpoint = "chat"
    temperature: float = 0.0
    """0 is greedy."""
    fixed_length: bool = False
    """Send `ignore_eos` and `min_tokens = max_tokens` so every answer has exactly `output_len` tokens."""
    include_usage: bool = True
    """Ask for a final `usage` chunk (`stream_options.include_usage`)."""
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    """Fields merged into every request body (server-specific extensions)."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts a server reported for one request."""

    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True, slots=True)
class RequestError:
    """Why a request failed."""

    status: str
    """The HTTP status code ("429"), or `stream_error`, `timeout`, `connection`, or an exception's name."""
    message: str = ""


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One chunk of a streamed answer, stamped when it arrived."""

    t: float
    """`time.perf_counter()` at arrival, seconds."""
    text: str = ""
    """New output text; empty for role-only, usage-only or held-back chunks."""
    completion_tokens: int | None = None
    """Tokens generated so far (cumulative), where the source knows it per chunk."""
    usage: Usage | None = None
    error: RequestError | None = None
    """Set on the last event of a failed request."""


class RequestClient(Protocol):
    """Sends one request and streams its timed chunks; implemented over HTTP and in process."""

    options: GenerationOptions
    """How requests are generated, as settled when the client connected (model id, fixed lengths)."""

    def stream(self, prompt: Prompt) -> AsyncGenerator[StreamEvent, None]:
        """Send one request; yield its chunks as they arrive, ending with an error event if it fails."""
        ...

    async def describe(self) -> dict[str, Any]:
        """What is being measured (server, versions, settings), for the result file."""
        ...

    async def aclose(self) -> None:
        """Release connections (or the engine)."""
        ...


@dataclass(frozen=True, slots=True)
class HttpClientConfig:
    """Where and how `HttpClient` connects."""

    base_url: str
    """The OpenAI base URL, ending in /v1."""
    api_key: str | None = None
    max_connections: int = 64
    """Size of the connection pool: at least the highest concurrency of the run."""
    request_timeout_s: float = 300.0
    """Longest silence allowed while connecting or reading a stream."""


class HttpClient:
    """An OpenAI-compatible streaming client on one pooled `httpx.AsyncClient`."""

    def __init__(self, config: HttpClientConfig, options: GenerationOptions) -> None:
        self.config = config
        self.options = options
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        limits = httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=config.max_connections)
        # trust_env=False: a proxy variable must never reroute a loopback benchmark.
        self._http = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/",
            headers=headers,
            limits=limits,
            timeout=httpx.Timeout(config.request_timeout_s),
            trust_env=False,
        )

    @property
    def _path(self) -> str:
        return "chat/completions" if self.options.endpoint == "chat" else "completions"

    def request_body(self, prompt: Prompt, options: GenerationOptions | None = None) -> dict[str, Any]:
        """The JSON body that asks for `prompt` under `options` (default: this client's)."""
        opts = options or self.options
        body: dict[str, Any] = {
            "model": opts.model,
            "max_tokens": prompt.output_len,
            "temperature": opts.temperature,
            "stream": True,
        }
        if opts.endpoint == "chat":
            body["messages"] = [dict(m) for m in prompt.messages]
        else:
            body["prompt"] = prompt.text
        if opts.include_usage:
            body["stream_options"] = {"include_usage": True}
        if opts.fixed_length:
            body["ignore_eos"] = True
            body["min_tokens"] = prompt.output_len
        body.update(opts.extra_body)
        return body

    async def stream(self, prompt: Prompt) -> AsyncGenerator[StreamEvent, None]:
        """Send one streaming request; yield each SSE chunk as a `StreamEvent`."""
        try:
            async with self._http.stream("POST", self._path, json=self.request_body(prompt)) as response:
                if response.status_code != httpx.codes.OK:
                    body = await response.aread()
                    yield _error_event(str(response.status_code), _error_message(body))
                    return
                async for line in response.aiter_lines():
                    t = time.perf_counter()
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    event = parse_chunk(payload, t, self.options.endpoint)
                    yield event
                    if event.error is not None:
                        return
        except httpx.TimeoutException as exc:
            yield _error_event("timeout", repr(exc))
        except httpx.HTTPError as exc:
            yield _error_event("connection", repr(exc))

    async def probe(self, options: GenerationOptions) -> RequestError | None:
        """Send one tiny non-streaming request under `options`; return why the server refused it, if it did."""
        body = self.request_body(Prompt(messages=({"role": "user", "content": "Hi"},), output_len=1), options)
        body["stream"] = False
        body.pop("stream_options", None)
        try:
            response = await self._http.post(self._path, json=body)
        except httpx.HTTPError as exc:
            return RequestError("connection", repr(exc))
        if response.status_code != httpx.codes.OK:
            return RequestError(str(response.status_code), _error_message(response.content))
        return None

    async def list_models(self) -> list[str]:
        """The model ids of GET /models; raises httpx.HTTPError when the server does not answer 200."""
        response = await self._http.get("models")
        response.raise_for_status()
        return [str(m["id"]) for m in response.json().get("data", [])]

    async def wait_ready(self, timeout_s: float) -> list[str]:
        """Poll GET /models until it answers 200 or `timeout_s` passes; return the served model ids."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return await self.list_models()
            except (httpx.HTTPError, ValueError):
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.5)

    async def describe(self) -> dict[str, Any]:
        """The base URL, the served models and the `Server` header of GET /models."""
        info: dict[str, Any] = {"kind": "http", "base_url": self.config.base_url, "endpoint": self.options.endpoint}
        try:
            response = await self._http.get("models")
            info["server_header"] = response.headers.get("server")
            info["models"] = response.json().get("data", []) if response.status_code == httpx.codes.OK else None
        except (httpx.HTTPError, ValueError) as exc:
            info["models_error"] = repr(exc)
        return info

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()


def _error_event(status: str, message: str) -> StreamEvent:
    return StreamEvent(t=time.perf_counter(), error=RequestError(status, message))


def _error_message(body: bytes) -> str:
    """The message of an OpenAI error envelope, or the raw body cut short."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500].decode("utf-8", "replace")
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)[:500]
    return str(error)[:500]


def parse_chunk(payload: str, t: float, endpoint: Endpoint) -> StreamEvent:
    """Turn one SSE `data:` payload of a chat or completions stream into a `StreamEvent`.

    Args:
        payload: The JSON text after `data:`.
        t: Its arrival time, `time.perf_counter()` seconds.
        endpoint: Which stream format to read the text from.
    """
    try:
        data = json.loads(payload)
    except ValueError:
        return StreamEvent(t=t, error=RequestError("stream_error", f"not JSON: {payload[:200]}"))
    if not isinstance(data, dict):
        return StreamEvent(t=t, error=RequestError("stream_error", f"not an object: {payload[:200]}"))
    if data.get("error") is not None:
        error = data["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        return StreamEvent(t=t, error=RequestError("stream_error", str(message)[:500]))
    text = ""
    choices = data.get("choices") or []
    if choices:
        choice = choices[0]
        piece = (choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")
        text = piece or ""
    usage = None
    raw_usage = data.get("usage")
    if isinstance(raw_usage, dict):
        usage = Usage(raw_usage.get("prompt_tokens"), raw_usage.get("completion_tokens"))
    return StreamEvent(t=t, text=text, usage=usage)
