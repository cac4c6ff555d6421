"""Function calling end to end: the official SDK and LangChain against a real server on the default model
(SmolLM2-135M-Instruct, whose template has no tools: the documented `<tool_call>` fallback, with the call
forced through guided decoding)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow
Validate = Callable[[Any, str], None]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _args(call: Any) -> dict[str, Any]:
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict)
    return args


def test_required_forces_a_valid_call(client: openai.OpenAI, server: Server, openapi_validate: Validate) -> None:
    # parallel_tool_calls false: with more calls allowed, the 135M default model (never trained on tools) keeps
    # writing calls after the first until max_tokens, which the grammar allows (README, "Function calling").
    raw = client.chat.completions.with_raw_response.create(
        model=server.model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=80,
        temperature=0, parallel_tool_calls=False,
    )  # fmt: skip
    openapi_validate(raw.http_response.json(), "CreateChatCompletionResponse")
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None  # a forced call ends at the call: no text after it
    calls = choice.message.tool_calls or []
    assert calls and calls[0].function.name in ("get_weather", "get_time")
    args = _args(calls[0])
    if calls[0].function.name == "get_weather":
        assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    assert all(c.id.startswith("call_") for c in calls)


def test_named_function_and_a_full_round_trip(client: openai.OpenAI, server: Server) -> None:
    first = client.chat.completions.create(
        model=server.model, messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )  # fmt: skip
    call = (first.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "get_time" and isinstance(_args(call)["city"], str)
    messages: list[Any] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"time": "14:05"})},
    ]
    final = client.chat.completions.create(
        model=server.model, messages=messages, tools=[WEATHER, TIME], tool_choice="none", max_tokens=30
    )
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content


def test_streamed_calls_are_assembled_by_the_sdk(client: openai.OpenAI, server: Server) -> None:
    with client.chat.completions.stream(
        model=server.model, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0,
        parallel_tool_calls=False,
    ) as stream:  # fmt: skip
        contents = [e.delta for e in stream if e.type == "content.delta"]
        done = stream.get_final_completion()
    assert not "".join(contents) and not done.choices[0].message.content  # nothing streamed after the call
    call = (done.choices[0].message.tool_calls or [])[0]
    assert done.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and set(_args(call)) == {"city", "unit"}


def test_langchain_bind_tools_returns_tool_calls(server: Server) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.base_url, api_key="unused", model=server.model, temperature=0, max_tokens=80)
    reply = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Rome?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    assert set(reply.tool_calls[0]["args"]) == {"city", "unit"}
