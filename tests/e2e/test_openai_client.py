"""End to end: the official OpenAI SDK against a real server on the default model."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow
Validate = Callable[[Any, str], None]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_models(client: openai.OpenAI, server: Server, openapi_validate: Validate) -> None:
    raw = client.models.with_raw_response.list()
    openapi_validate(raw.http_response.json(), "ListModelsResponse")
    assert [m.id for m in raw.parse().data] == [server.model]
    openapi_validate(client.models.with_raw_response.retrieve(server.model).http_response.json(), "Model")


def test_chat_answers_paris(client: openai.OpenAI, server: Server, openapi_validate: Validate) -> None:
    raw = client.chat.completions.with_raw_response.create(model=server.model, messages=QUESTION, temperature=0)
    openapi_validate(raw.http_response.json(), "CreateChatCompletionResponse")
    completion = raw.parse()
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens > 0


def test_chat_stream(client: openai.OpenAI, server: Server, openapi_validate: Validate) -> None:
    stream = client.chat.completions.create(
        model=server.model, messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    # The raw events, validated one by one.
    body = {"model": server.model, "messages": QUESTION, "temperature": 0, "stream": True, "max_tokens": 16}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=120) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        openapi_validate(json.loads(line.removeprefix("data: ")), "CreateChatCompletionStreamResponse")


def test_completions(client: openai.OpenAI, server: Server, openapi_validate: Validate) -> None:
    raw = client.completions.with_raw_response.create(
        model=server.model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    openapi_validate(raw.http_response.json(), "CreateCompletionResponse")
    assert raw.parse().choices[0].text
    streamed = list(client.completions.create(model=server.model, prompt="One, two,", max_tokens=8, stream=True))
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


def test_errors(client: openai.OpenAI, server: Server, openapi_validate: Validate) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert not_found.value.code == "model_not_found"
    openapi_validate(not_found.value.response.json(), "ErrorResponse")
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model=server.model, messages=QUESTION, extra_body={"bogus": 1})
    assert unknown.value.code == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=server.model, messages=QUESTION, max_tokens=10**6)
    assert too_long.value.code == "context_length_exceeded"
    openapi_validate(too_long.value.response.json(), "ErrorResponse")


def test_disconnect_mid_stream_frees_the_engine(server: Server) -> None:
    body = {"model": server.model, "messages": QUESTION, "stream": True, "max_tokens": 2000, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as resp:
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data:")
            if seen >= 5:
                # Still reading (leaving iter_lines closes the connection, and the abort is immediate).
                assert server.metric("aisandbox_requests_running") == 1
                break
    deadline = time.monotonic() + 10
    while server.metric("aisandbox_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("aisandbox_requests_running") == 0
