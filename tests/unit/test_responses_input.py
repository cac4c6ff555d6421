"""Responses input items become the chat messages the chat path already serves."""

import pytest

from aisandbox.errors import InvalidRequest
from aisandbox.http.responses import input_to_messages
from aisandbox.http.schemas import ChatMessageIn


def test_string_input_and_instructions():
    assert input_to_messages("be brief", "hi") == [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_function_call_round_trip_items():
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "get", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "5C"},
    ]
    messages = input_to_messages(None, items)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]
    for message in messages:
        ChatMessageIn.model_validate(message)


def test_unsupported_items_are_refused():
    with pytest.raises(InvalidRequest, match="input_image"):
        input_to_messages(None, [{"role": "user", "content": [{"type": "input_image"}]}])
    with pytest.raises(InvalidRequest, match="web_search_call"):
        input_to_messages(None, [{"type": "web_search_call"}])


def test_response_body_matches_openapi(openapi_validate):
    from aisandbox.http.responses import response_body

    body = response_body("resp_abc", 1, "m", "hello", [("c1", "get", "{}")], "stop", 3, 2, {"input": "hi"})
    openapi_validate(body, "Response")
    assert body["status"] == "completed" and body["usage"]["total_tokens"] == 5
    cut = response_body("resp_abc", 1, "m", "hel", [], "length", 3, 1, {"max_output_tokens": 1})
    openapi_validate(cut, "Response")
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}


def test_refused_fields_are_named():
    from aisandbox.errors import UnsupportedParameter
    from aisandbox.http.responses import check_refused

    check_refused({"input": "hi", "tools": [{"type": "function", "name": "f"}], "background": False})
    with pytest.raises(UnsupportedParameter) as info:
        check_refused({"input": "hi", "background": True, "tools": [{"type": "web_search"}]})
    assert "background" in str(info.value) and "web_search" in str(info.value)


def test_text_events_order_and_deltas(openapi_validate):
    from aisandbox.http.responses import response_body, text_events

    final = response_body("resp_abc", 1, "m", "hello", [], "stop", 3, 2, {"input": "hi"})
    events = text_events(final, ["hel", "lo"])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "hello"
    for event in events:
        openapi_validate(event, "ResponseStreamEvent")
