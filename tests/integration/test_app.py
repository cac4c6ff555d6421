"""The ASGI app in process, on the torch engine with a tiny random-weight Mistral and mistral-common."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from falcon.testing import ASGIConductor

from aisandbox.http.app import create_app
from aisandbox.runtime.loader import create_engine
from aisandbox.settings import ServerSettings

MODEL = "tiny-mistral"
Validate = Callable[[Any, str], None]


@pytest.fixture
async def client(tiny_mistral_dir: Path) -> AsyncIterator[ASGIConductor]:
    settings = ServerSettings(model=tiny_mistral_dir, served_model_name=MODEL, dtype="float32", max_n=4)
    app = create_app(settings, create_engine(settings))
    async with ASGIConductor(app) as conductor:
        for _ in range(600):
            if (await conductor.simulate_get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        yield conductor


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, **extra}


class Reply:
    """A whole response read through a stream, so the client stays connected until the app is done.

    (Falcon's `simulate_post` signals `http.disconnect` as soon as the body is sent, which our app rightly
    treats as a client that went away.)
    """

    def __init__(self, status_code: int, headers: Any, raw: bytes) -> None:
        self.status_code, self.headers, self.text = status_code, headers, raw.decode()
        self.json = json.loads(self.text) if self.text and not self.text.startswith("data:") else None


async def post(client: ASGIConductor, path: str, **kwargs: Any) -> Reply:
    """POST and wait for the app to finish the response while the simulated client stays connected."""
    result = await client.simulate_request("POST", path, _stream_result=True, **kwargs)
    await asyncio.wait_for(asyncio.shield(result._task), 60)
    raw = await result.stream.read()
    await result.finalize()
    return Reply(result.status_code, result.headers, raw)


def validate_completion_chunk(validate: Validate, chunk: dict[str, Any]) -> None:
    """Streamed legacy completions have no schema of their own in OpenAI's spec: they reuse
    CreateCompletionResponse, whose finish_reason is not nullable, yet OpenAI (and vLLM) send null until the
    last chunk. We check everything else against the schema and that null exactly."""
    validate({**chunk, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]},
             "CreateCompletionResponse")  # fmt: skip
    assert all(c["finish_reason"] in (None, "stop", "length") for c in chunk["choices"])


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_health_models_metrics(client: ASGIConductor, openapi_validate: Validate) -> None:
    health = await client.simulate_get("/health")
    assert health.status_code == 200 and health.json["status"] == "ready"
    models = await client.simulate_get("/v1/models")
    openapi_validate(models.json, "ListModelsResponse")
    assert [m["id"] for m in models.json["data"]] == [MODEL]
    one = await client.simulate_get(f"/v1/models/{MODEL}")
    openapi_validate(one.json, "Model")
    missing = await client.simulate_get("/v1/models/nope/with-slash")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "model_not_found"
    openapi_validate(missing.json, "ErrorResponse")
    metrics = await client.simulate_get("/metrics")
    assert "aisandbox_requests_running" in metrics.text


async def test_chat_non_stream(client: ASGIConductor, openapi_validate: Validate) -> None:
    resp = await post(client, "/v1/chat/completions", json=chat(temperature=0, n=2))
    assert resp.status_code == 200, resp.text
    body = resp.json
    openapi_validate(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"]["content"] == body["choices"][1]["message"]["content"]  # greedy
    assert body["usage"]["completion_tokens"] == 16


async def test_usage_counts_the_chat_template(client: ASGIConductor, tiny_mistral_dir: Path) -> None:
    from aisandbox.runtime.text.tokenizer import load_tokenizer

    expected = len(load_tokenizer(tiny_mistral_dir).encode_chat([{"role": "user", "content": "Hello"}]))
    body = (await post(client, "/v1/chat/completions", json=chat(temperature=0))).json
    assert body["usage"]["prompt_tokens"] == expected  # [INST] Hello [/INST] with BOS, by mistral-common
    assert body["usage"]["total_tokens"] == expected + body["usage"]["completion_tokens"]


async def test_disconnect_mid_stream_frees_the_engine(tiny_mistral_dir: Path) -> None:
    settings = ServerSettings(model=tiny_mistral_dir, served_model_name=MODEL, dtype="float32")
    engine = create_engine(settings)
    async with ASGIConductor(create_app(settings, engine)) as conductor:
        await engine.wait_ready(120)
        body = chat(stream=True, max_tokens=400, ignore_eos=True)
        result = await conductor.simulate_request("POST", "/v1/chat/completions", _stream_result=True, json=body)
        seen = b""
        for _ in range(500):
            seen += await result.stream.read()
            if seen.count(b"data:") >= 4:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().running == 1
        await result.finalize()  # the client goes away
        for _ in range(200):
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().running == 0
        assert b"[DONE]" not in seen


async def test_chat_stream_with_usage(client: ASGIConductor, openapi_validate: Validate) -> None:
    body = chat(stream=True, stream_options={"include_usage": True}, n=2, temperature=0.7, seed=1)
    reply = await post(client, "/v1/chat/completions", json=body)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        openapi_validate(chunk, "CreateChatCompletionStreamResponse")
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["finish_reason"] in ("stop", "length")
        assert all(c["finish_reason"] is None for c in mine[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


async def test_completions(client: ASGIConductor, openapi_validate: Validate) -> None:
    resp = await post(
        client,
        "/v1/completions",
        json={"model": MODEL, "prompt": ["one", "two"], "max_tokens": 5, "n": 2, "temperature": 0},
    )
    assert resp.status_code == 200, resp.text
    openapi_validate(resp.json, "CreateCompletionResponse")
    assert len(resp.json["choices"]) == 4
    body = {"model": MODEL, "prompt": "one", "max_tokens": 5, "stream": True, "ignore_eos": True}
    events = sse_events((await post(client, "/v1/completions", json=body)).text)
    for chunk in events[:-1]:
        validate_completion_chunk(openapi_validate, chunk)
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_stop_string_never_streamed(client: ASGIConductor) -> None:
    full = await post(client, "/v1/completions", json={
        "model": MODEL, "prompt": "abc", "max_tokens": 20, "temperature": 0, "ignore_eos": True})  # fmt: skip
    text = full.json["choices"][0]["text"]
    stop = text[4:7]
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 20, "temperature": 0, "ignore_eos": True,
            "stop": [stop], "stream": True}  # fmt: skip
    events = sse_events((await post(client, "/v1/completions", json=body)).text)
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed == text[: text.index(stop)]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    [
        ("/v1/chat/completions", chat(model="gpt-4"), 404, "model_not_found", "model"),
        ("/v1/chat/completions", chat(bogus=1), 400, "unknown_parameter", "bogus"),
        ("/v1/chat/completions", chat(temperature=-1), 400, "invalid_value", "temperature"),
        ("/v1/chat/completions", chat(max_tokens=10**6), 400, "context_length_exceeded", "messages"),
        ("/v1/chat/completions", chat(n=5), 400, "invalid_value", "n"),
        (
            "/v1/chat/completions",
            chat(
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function", "function": {"name": "g"}},
            ),
            400,
            "invalid_value",
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            chat(tools=[{"type": "function"}]),
            400,
            "missing_required_parameter",
            "tools[0].function",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "x " * 600}, 400, "context_length_exceeded", "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [10**7]}, 400, "invalid_value", "prompt"),
        ("/v1/completions", [1, 2], 400, "invalid_type", None),
    ],
)
async def test_errors(
    client: ASGIConductor, openapi_validate: Validate, path: str, body: Any, status: int, code: str, param: str | None
) -> None:
    resp = await post(client, path, json=body)
    assert resp.status_code == status, resp.text
    openapi_validate(resp.json, "ErrorResponse")
    assert resp.json["error"]["code"] == code and resp.json["error"]["param"] == param


async def test_malformed_json_and_unknown_route(client: ASGIConductor, openapi_validate: Validate) -> None:
    resp = await post(client, "/v1/chat/completions", body=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json["error"]["type"] == "invalid_request_error"
    openapi_validate(resp.json, "ErrorResponse")
    resp = await client.simulate_get("/v1/nothing")
    assert resp.status_code == 404
    openapi_validate(resp.json, "ErrorResponse")
    resp = await client.simulate_get("/v1/chat/completions")
    assert resp.status_code == 405
    openapi_validate(resp.json, "ErrorResponse")


async def test_api_key(tiny_mistral_dir: Path) -> None:
    settings = ServerSettings(model=tiny_mistral_dir, served_model_name=MODEL, dtype="float32", api_key="s3cret")
    async with ASGIConductor(create_app(settings, create_engine(settings))) as conductor:
        resp = await conductor.simulate_get("/v1/models")
        assert resp.status_code == 401 and resp.json["error"]["code"] == "invalid_api_key"
        ok = await conductor.simulate_get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert (await conductor.simulate_get("/health")).status_code in (200, 503)  # health needs no key


async def test_health_is_503_while_loading(tiny_mistral_dir: Path) -> None:
    settings = ServerSettings(model=tiny_mistral_dir, served_model_name=MODEL, dtype="float32")
    async with ASGIConductor(create_app(settings, create_engine(settings))) as conductor:
        first = await conductor.simulate_get("/health")
        assert first.status_code == 503 and first.json["status"] == "loading" and first.json["reason"]
        resp = await post(conductor, "/v1/chat/completions", json=chat())
        assert resp.status_code == 503 and resp.json["error"]["code"] == "engine_unavailable"


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return 0.0


async def test_hostile_bodies_get_clear_client_errors_logged_as_such(
    tiny_mistral_dir: Path, openapi_validate: Validate, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ServerSettings(model=tiny_mistral_dir, served_model_name=MODEL, dtype="float32", max_body_bytes=4096)
    async with ASGIConductor(create_app(settings, create_engine(settings))) as conductor:
        cases = [
            (json.dumps(chat(messages=[{"role": "user", "content": "x" * 5000}])).encode(), 413, "request_too_large"),
            (b"[" * 2000 + b"]" * 2000, 400, "invalid_json"),  # past the parser's recursion limit
            (b'{"a":' * 65 + b"1" + b"}" * 65, 400, "invalid_json"),  # past max_json_depth, parses fine
            (b'{"model": "\xff\xfe"}', 400, "invalid_json"),  # not UTF-8
            (b"{not json", 400, "invalid_json"),
        ]
        for body, status, code in cases:
            resp = await post(
                conductor, "/v1/chat/completions", body=body, headers={"content-type": "application/json"}
            )
            assert resp.status_code == status, (body[:20], resp.text)
            openapi_validate(resp.json, "ErrorResponse")
            assert resp.json["error"]["code"] == code and resp.headers.get("x-request-id")
        text = (await conductor.simulate_get("/metrics")).text
        route = "/v1/chat/completions"
        assert metric_value(text, "aisandbox_http_requests_total", route=route, status="413") == 1
        assert metric_value(text, "aisandbox_http_requests_total", route=route, status="400") == 4
        assert metric_value(text, "aisandbox_http_requests_total", route=route, status="500") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


async def test_an_unexpected_error_is_one_500_logged_once_with_the_request_id(
    client: ASGIConductor, openapi_validate: Validate, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = client.app
    resource_engine = app.app._router.find("/v1/chat/completions")[0].engine  # type: ignore[attr-defined]

    async def broken(messages: object) -> list[int]:
        raise RuntimeError("template bug")

    monkeypatch.setattr(resource_engine, "encode_chat", broken)
    resp = await post(client, "/v1/chat/completions", json=chat(), headers={"X-Request-Id": "req-42"})
    assert resp.status_code == 500 and resp.json["error"]["type"] == "server_error"
    assert "template bug" not in resp.text  # the traceback goes to the log, not the client
    openapi_validate(resp.json, "ErrorResponse")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "req-42" in errors[0].getMessage() and errors[0].exc_info
    text = (await client.simulate_get("/metrics")).text
    assert metric_value(text, "aisandbox_http_requests_total", route="/v1/chat/completions", status="500") == 1


async def test_a_failing_engine_loop_ends_every_live_stream_with_an_error_event(
    tiny_mistral_dir: Path, openapi_validate: Validate
) -> None:
    settings = ServerSettings(model=tiny_mistral_dir, served_model_name=MODEL, dtype="float32")
    engine = create_engine(settings)
    async with ASGIConductor(create_app(settings, engine)) as conductor:
        assert (await engine.wait_ready(120)).ready
        backend: Any = engine.backend
        decode, calls = backend._decode, []

        def failing_decode(*args: Any) -> None:
            calls.append(1)
            if len(calls) > 4:
                raise RuntimeError("simulated device failure")
            decode(*args)

        backend._decode = failing_decode
        body = chat(max_tokens=200, ignore_eos=True, stream=True)
        replies = await asyncio.gather(*(post(conductor, "/v1/chat/completions", json=body) for _ in range(3)))
        for reply in replies:
            events = sse_events(reply.text)
            assert reply.status_code == 200 and events[-1] == "[DONE]"
            error = events[-2]
            openapi_validate(error, "ErrorResponse")
            assert (
                error["error"]["code"] == "engine_unavailable"
                and "simulated device failure" in error["error"]["message"]
            )
        health = await conductor.simulate_get("/health")
        assert health.status_code == 503 and health.json["status"] == "dead"
        assert "simulated device failure" in health.json["reason"]
        text = (await conductor.simulate_get("/metrics")).text
        assert metric_value(text, "aisandbox_requests_running") == 0
