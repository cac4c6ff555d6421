"""The Responses API through a real server on the default model, with the official SDK (issue 20, partly): create,
stream (events in order, deltas concatenate), a function call round trip through previous_response_id, and the
stored response's retrieve / input_items / delete. Bodies and events are validated against OpenAI's spec."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

Validate = Callable[[Any, str], None]

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_create_retrieve_items_delete(client: openai.OpenAI, server: Server, openapi_validate: Validate) -> None:
    raw = client.responses.with_raw_response.create(
        model=server.model, input="Say hello.", instructions="Be brief.", max_output_tokens=16, temperature=0
    )
    body = raw.http_response.json()
    openapi_validate(body, "Response")
    response = raw.parse()
    assert response.id.startswith("resp_") and response.output_text
    assert response.status in ("completed", "incomplete") and response.usage is not None
    again = client.responses.retrieve(response.id)
    assert again.output_text == response.output_text
    openapi_validate(httpx.get(f"{server.base_url}/responses/{response.id}").json(), "Response")
    openapi_validate(httpx.get(f"{server.base_url}/responses/{response.id}/input_items").json(), "ResponseItemList")
    items = client.responses.input_items.list(response.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].role == "user"  # type: ignore[union-attr]
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_stream_events_in_order(client: openai.OpenAI, server: Server, openapi_validate: Validate) -> None:
    with httpx.stream(
        "POST",
        f"{server.base_url}/responses",
        json={"model": server.model, "input": "Count to five.", "stream": True, "max_output_tokens": 24},
        timeout=120,
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names == [e["type"] for e in events] and "[DONE]" not in lines
    for e in events:
        openapi_validate(e, "ResponseStreamEvent")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == events[-1]["response"]["output"][0]["content"][0]["text"]
    with client.responses.stream(model=server.model, input="Say hi.", max_output_tokens=8) as stream:
        seen = [event.type for event in stream]  # the SDK parses every event
    assert seen[0] == "response.created" and seen[-1] in ("response.completed", "response.incomplete")


def test_a_streamed_function_call(server: Server, openapi_validate: Validate) -> None:
    body = {
        "model": server.model, "input": "What is the weather in Paris?", "tools": [WEATHER], "tool_choice": "required",
        "parallel_tool_calls": False, "max_output_tokens": 60, "temperature": 0, "stream": True,
    }  # fmt: skip
    with httpx.stream("POST", f"{server.base_url}/responses", json=body, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    for e in events:
        openapi_validate(e, "ResponseStreamEvent")
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    args = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert args == done["arguments"] and json.loads(args)["city"]
    (call,) = [i for i in events[-1]["response"]["output"] if i["type"] == "function_call"]
    assert call["arguments"] == args and call["name"] == "get_weather"


def test_a_function_call_round_trip(client: openai.OpenAI, server: Server) -> None:
    first = client.responses.create(
        model=server.model, input="What is the weather in Paris?", tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required", parallel_tool_calls=False, max_output_tokens=60, temperature=0,
    )  # fmt: skip
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)
    second = client.responses.create(
        model=server.model, previous_response_id=first.id, tools=[WEATHER],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 21}'}],
        max_output_tokens=20, temperature=0,
    )  # fmt: skip
    assert second.output_text and second.previous_response_id == first.id
    items = client.responses.input_items.list(second.id).data
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]


def test_refused_and_unknown(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=server.model, input="hi", tools=[{"type": "web_search"}])  # type: ignore[list-item]
    assert "tools[0]" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=server.model, input="hi", previous_response_id="resp_nope")
    assert info.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_missing")


def test_parse_into_a_pydantic_model(client: openai.OpenAI, server: Server) -> None:
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    parsed = client.responses.parse(
        model=server.model, input="Name a city in France.", text_format=City, max_output_tokens=60, temperature=0
    )
    assert isinstance(parsed.output_parsed, City)


def test_a_stored_response_survives_a_restart(
    tiny_mistral_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.e2e.conftest import start_server

    monkeypatch.setenv("AISANDBOX_DATA_DIR", str(tmp_path / "data"))
    args = ("--model", str(tiny_mistral_dir), "--null-engine", "--served-model-name", "tiny")
    first = start_server(tmp_path, *args, ready_timeout_s=180)
    try:
        made = openai.OpenAI(base_url=first.base_url, api_key="x", max_retries=0).responses.create(
            model="tiny", input="hello", max_output_tokens=4
        )
    finally:
        assert first.stop() == 0
    second = start_server(tmp_path, *args, ready_timeout_s=180)
    try:
        again = openai.OpenAI(base_url=second.base_url, api_key="x", max_retries=0).responses.retrieve(made.id)
        assert again.id == made.id and again.output_text == made.output_text
    finally:
        assert second.stop() == 0
    assert (tmp_path / "data" / "responses.db").is_file()


def test_the_openai_agents_sdk_calls_a_function_tool(server: Server) -> None:
    """The openai-agents SDK with its default model class (OpenAIResponsesModel) runs a function tool."""
    import asyncio

    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"Sunny in {city}"

    client = AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the weather tool.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model=server.model, openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=60),
        tool_use_behavior="stop_on_first_tool",
    )
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?"))
    assert str(result.final_output).startswith("Sunny in")
