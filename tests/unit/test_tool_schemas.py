"""Function calling at the HTTP schema layer: request validation (a 400 naming the param), conversion to the
runtime's types, and response bodies / stream deltas that OpenAI's spec, the SDK and LangChain accept."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from aisandbox.errors import InvalidRequest, UnsupportedParameter
from aisandbox.http.errors import error_response
from aisandbox.http.schemas import (
    ChatCompletionRequest,
    chat_chunk,
    chat_deltas,
    chat_response,
    usage,
)
from aisandbox.runtime.structured.tools.parsers import HermesToolParser, ToolEvent
from aisandbox.runtime.structured.tools.specs import ToolCall, ToolChoice, ToolRequest, ToolSpec

Validate = Callable[[Any, str], None]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
CALL = {"id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ROUND_TRIP = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_abc123", "content": [{"type": "text", "text": "21C"}]},
]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, ADD], **fields}


def error_of(body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises((ValidationError, InvalidRequest)) as info:
        ChatCompletionRequest.model_validate(body)
    status, envelope, _ = error_response(info.value)
    assert status == 400 and envelope["error"]["type"] == "invalid_request_error"
    return dict(envelope["error"])


# ---- requests ----


def test_tools_convert_to_runtime_types() -> None:
    body = ChatCompletionRequest.model_validate(chat(tool_choice="required", parallel_tool_calls=False))
    request = body.tool_request()
    assert request == ToolRequest(
        (
            ToolSpec("get_weather", "Current weather", WEATHER["function"]["parameters"], strict=True),
            ToolSpec("add", "", {"type": "object", "properties": {}}, strict=False),
        ),
        ToolChoice("required"),
        parallel=False,
    )
    assert request.forced and request.active and [t.name for t in request.callable_tools] == ["get_weather", "add"]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, ToolChoice("auto")),
        ("auto", ToolChoice("auto")),
        ("none", ToolChoice("none")),
        ({"type": "function", "function": {"name": "add"}}, ToolChoice("named", "add")),
    ],
)
def test_tool_choice_forms(choice: Any, expected: ToolChoice) -> None:
    fields = {} if choice is None else {"tool_choice": choice}
    request = ChatCompletionRequest.model_validate(chat(**fields)).tool_request()
    assert request is not None and request.choice == expected and request.parallel
    if expected.mode == "named":
        assert [t.name for t in request.callable_tools] == ["add"]
    if expected.mode == "none":
        assert not request.active and request.prompt_tools == () and request.callable_tools == ()


def test_no_tools_no_tool_request() -> None:
    body = ChatCompletionRequest.model_validate({**chat(), "tools": None, "tool_choice": "auto"})
    assert body.tool_request() is None


def test_parameters_may_be_omitted() -> None:
    body = ChatCompletionRequest.model_validate(chat(tools=[{"type": "function", "function": {"name": "now"}}]))
    request = body.tool_request()
    assert request is not None and request.tools[0].parameters == {"type": "object", "properties": {}}


def test_conversation_with_calls_and_results() -> None:
    body = ChatCompletionRequest.model_validate({**chat(), "messages": ROUND_TRIP})
    assert body.conversation(with_tools=True) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": (ToolCall("call_abc123", "get_weather", '{"city": "Paris"}'),),
        },
        {"role": "tool", "content": "21C", "tool_call_id": "call_abc123", "name": "get_weather"},
    ]


def test_assistant_text_next_to_calls_and_object_arguments() -> None:
    call = {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Nice"}}}
    messages = [ROUND_TRIP[1], {"role": "assistant", "content": "Checking.", "tool_calls": [call]}, ROUND_TRIP[3]]
    body = ChatCompletionRequest.model_validate({**chat(), "messages": messages})
    assistant = body.conversation(with_tools=True)[1]
    assert assistant["content"] == "Checking."
    assert assistant["tool_calls"] == (ToolCall("call_abc123", "get_weather", '{"city": "Nice"}'),)


def test_conversation_refuses_active_tools_until_the_path_handles_them() -> None:
    body = ChatCompletionRequest.model_validate(chat())
    with pytest.raises(UnsupportedParameter) as info:
        body.conversation()
    assert info.value.param == "tools"
    # tool_choice none, or no tools at all: nothing would be ignored.
    ChatCompletionRequest.model_validate(chat(tool_choice="none")).conversation()
    ChatCompletionRequest.model_validate({**chat(), "tools": None, "messages": ROUND_TRIP}).conversation()


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "invalid_value"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "invalid_value"),
        ({"tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
        ({"tools": [WEATHER, ADD, WEATHER]}, "tools[2].function.name", "invalid_value"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
            "invalid_value",
        ),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type", "invalid_value"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strnig"}}}]},
            "tools[0].function.parameters",
            "invalid_value",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"properties": {"a": {"minimum": "0"}}}},
                    }
                ]
            },
            "tools[0].function.parameters",
            "invalid_value",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters",
            "invalid_value",
        ),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "invalid_type"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "call_x", "content": "1"},
                ]
            },
            "messages[1].tool_call_id",
            "invalid_value",
        ),
        (
            {"messages": [*ROUND_TRIP[:3], {"role": "tool", "content": "1"}]},
            "messages[3].tool_call_id",
            "missing_required_parameter",
        ),
        (
            {"messages": [ROUND_TRIP[3], *ROUND_TRIP[:3]]},  # the result comes before its call
            "messages[0].tool_call_id",
            "invalid_value",
        ),
        (
            {"messages": [{"role": "user", "content": "hi", "tool_calls": [CALL]}]},
            "messages[0].tool_calls",
            "invalid_value",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}]},
            "messages[0].tool_calls[0].id",
            "missing_required_parameter",
        ),
    ],
)
def test_invalid_tool_requests_name_their_param(fields: dict[str, Any], param: str, code: str) -> None:
    err = error_of(chat(**fields))
    assert (err["param"], err["code"]) == (param, code), err["message"]


# ---- responses ----

CALLS = (
    ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
    ToolCall("call_2", "add", '{"a": 1, "b": 2}'),
)


def test_non_stream_tool_calls_validate(openapi_validate: Validate) -> None:
    body = chat_response("chatcmpl-1", 1, "m", [(None, "tool_calls"), ("Hi", "stop")], usage(3, 4), [CALLS, ()])
    openapi_validate(body, "CreateChatCompletionResponse")
    first, second = (c["message"] for c in body["choices"])
    assert first["content"] is None and first["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
    ]
    assert second == {"role": "assistant", "content": "Hi", "refusal": None}
    # Text next to calls stays; no calls: the old shape exactly.
    with_text = chat_response("chatcmpl-1", 1, "m", [("Sure.", "tool_calls")], usage(1, 1), [CALLS[:1]])
    assert with_text["choices"][0]["message"]["content"] == "Sure."
    assert chat_response("c", 1, "m", [("", "stop")], usage(1, 1))["choices"][0]["message"]["content"] == ""


def stream_events(seed: int) -> list[ToolEvent]:
    text = (
        'Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    )
    counter = iter(range(100))
    parser = HermesToolParser({"get_weather", "add"}, id_factory=lambda: f"call_{next(counter) + 1}")
    rng, events, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        events += parser.feed([0], text[i : i + n])
        i += n
    result = parser.finish()
    assert result.tool_calls == CALLS
    return events + list(result.events)


def stream_chunks(seed: int) -> list[dict[str, Any]]:
    chunks = [chat_chunk("chatcmpl-1", 1, "m", 0, {"role": "assistant", "content": ""}, None)]
    chunks += [chat_chunk("chatcmpl-1", 1, "m", 0, delta, None) for delta in chat_deltas(stream_events(seed))]
    chunks.append(chat_chunk("chatcmpl-1", 1, "m", 0, {}, "tool_calls"))
    return chunks


@pytest.mark.parametrize("seed", range(4))
def test_stream_deltas_validate_and_are_shaped_like_openai(openapi_validate: Validate, seed: int) -> None:
    chunks = stream_chunks(seed)
    for chunk in chunks:
        openapi_validate(chunk, "CreateChatCompletionStreamResponse")
    deltas = [c["choices"][0]["delta"] for c in chunks]
    starts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert starts == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "id": "call_2", "type": "function", "function": {"name": "add", "arguments": ""}},
    ]
    for d in deltas:
        if "tool_calls" in d and "id" not in d["tool_calls"][0]:
            assert set(d["tool_calls"][0]) == {"index", "function"} and set(d["tool_calls"][0]["function"]) == {
                "arguments"
            }
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."


@pytest.mark.parametrize("seed", range(4))
def test_openai_sdk_assembles_the_stream(seed: int) -> None:
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState()
    for chunk in stream_chunks(seed):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    message = state.get_final_completion().choices[0].message
    assert message.content == "Sure."
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []] == [
        ("call_1", "get_weather", {"city": "Paris"}),
        ("call_2", "add", {"a": 1, "b": 2}),
    ]


def test_langchain_assembles_the_stream() -> None:
    base = pytest.importorskip("langchain_openai.chat_models.base")
    from langchain_core.messages import AIMessageChunk

    convert = getattr(base, "_convert_delta_to_message_chunk", None)
    if convert is None:
        pytest.skip("langchain_openai changed its private delta converter")
    total = None
    for chunk in stream_chunks(1):
        piece = convert(chunk["choices"][0]["delta"], AIMessageChunk)
        total = piece if total is None else total + piece
    assert total is not None
    assert [(c["id"], c["name"], c["args"]) for c in total.tool_calls] == [
        ("call_1", "get_weather", {"city": "Paris"}),
        ("call_2", "add", {"a": 1, "b": 2}),
    ]


@pytest.mark.parametrize(("choice", "expected"), [(None, "auto"), ("any", "required"), ("get_weather", "named")])
def test_langchain_bind_tools_requests_validate(choice: str | None, expected: str) -> None:
    """What `ChatOpenAI(...).bind_tools(...)` sends, a round trip included, passes validation and converts."""
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str = "c") -> str:
        """Current weather in a city."""
        return "21"

    llm = ChatOpenAI(model="m", base_url="http://127.0.0.1:9/v1", api_key="unused")
    bound = llm.bind_tools([get_weather], tool_choice=choice) if choice else llm.bind_tools([get_weather])
    messages = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[{"id": "call_1", "name": "get_weather", "args": {"city": "Paris"}}]),
        ToolMessage("21", tool_call_id="call_1"),
    ]
    payload_of = getattr(bound.bound, "_get_request_payload", None)  # type: ignore[attr-defined]
    if payload_of is None:
        pytest.skip("langchain_openai changed its private payload builder")
    body = ChatCompletionRequest.model_validate(payload_of(messages, **bound.kwargs))  # type: ignore[attr-defined]
    request = body.tool_request()
    assert request is not None and request.choice.mode == expected
    assert body.conversation(with_tools=True)[2] == {
        "role": "tool",
        "content": "21",
        "tool_call_id": "call_1",
        "name": "get_weather",
    }
