"""Tool calls through the whole request path (app, admission, text layer), on a scripted backend that writes
a Mistral `[TOOL_CALLS]` answer with mistral-common's v3 tokenizer: the official SDK's stream helper and the
spec see OpenAI's shapes, and the client's own tool-call ids come back unchanged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from falcon.testing import ASGIConductor

from aisandbox.http.app import create_app
from aisandbox.runtime.admission import Admission
from aisandbox.runtime.engine import BackendHost
from aisandbox.runtime.request import GenerationRequest
from aisandbox.runtime.text.tokenizer import load_tokenizer
from aisandbox.runtime.types import EngineStats, FinishReason, ModelInfo, TokenDelta
from aisandbox.settings import ServerSettings
from tests.integration.test_app import post, sse_events

Validate = Callable[[Any, str], None]
MODEL = "scripted-mistral"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ANSWER = (
    ' [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]'
)


class ScriptedMistral:
    """Answers every request with `[TOOL_CALLS]` + ANSWER, a few tokens per step, then EOS."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.host: BackendHost | None = None
        self.prompts: list[tuple[int, ...]] = []

    def start(self, host: BackendHost) -> None:
        self.host = host
        self.tok = load_tokenizer(self.folder)
        assert self.tok.tool_call_token_id is not None
        info = ModelInfo(max_model_len=4096, eos_token_ids=self.tok.eos_token_ids, vocab_size=32768, max_running=8)
        host.loaded(info, self.tok)

    def add(self, request: GenerationRequest) -> None:
        self.prompts.append(request.prompt_token_ids)
        asyncio.get_running_loop().create_task(self._play(request.request_id))

    async def _play(self, rid: str) -> None:
        assert self.host is not None
        ids = [self.tok.tool_call_token_id, *self.tok.encode_fragment(ANSWER)]
        for i in range(0, len(ids), 3):
            self.host.emit([(rid, TokenDelta(tuple(ids[i : i + 3])))])
            await asyncio.sleep(0)
        eos = self.tok.eos_token_ids[0]
        self.host.emit([(rid, TokenDelta((eos,), FinishReason.STOP, stop_token_id=eos))])

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(running=0, waiting=0)

    async def shutdown(self) -> None:
        pass


@pytest.fixture
async def app(tiny_mistral_dir: Path) -> Any:
    backend = ScriptedMistral(tiny_mistral_dir)
    settings = ServerSettings(model=tiny_mistral_dir, served_model_name=MODEL)
    async with ASGIConductor(create_app(settings, Admission(backend))) as conductor:
        for _ in range(100):
            if (await conductor.simulate_get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        yield conductor, backend


def request(**extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    return {"model": MODEL, "messages": messages, "tools": [WEATHER], **extra}


async def test_calls_come_back_as_tool_calls(app: Any, openapi_validate: Validate) -> None:
    conductor, backend = app
    resp = await post(conductor, "/v1/chat/completions", json=request())
    assert resp.status_code == 200, resp.text
    openapi_validate(resp.json, "CreateChatCompletionResponse")
    choice = resp.json["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert "[TOOL_CALLS]" not in resp.text
    tok = load_tokenizer(backend.folder)
    prompt = backend.prompts[0]
    available_tools = tok._inner.get_control_token("[AVAILABLE_TOOLS]")  # type: ignore[attr-defined]
    assert available_tools in prompt and tok.tool_call_token_id not in prompt  # the tools are in the prompt


async def test_streamed_calls_assemble_with_the_sdk(app: Any, openapi_validate: Validate) -> None:
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    conductor, _ = app
    resp = await post(conductor, "/v1/chat/completions", json=request(stream=True))
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    state = ChatCompletionStreamState()
    for event in events[:-1]:
        openapi_validate(event, "CreateChatCompletionStreamResponse")
        assert "[TOOL_CALLS]" not in json.dumps(event)
        state.handle_chunk(ChatCompletionChunk.model_validate(event))
    done = state.get_final_completion()
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments)["city"] for c in message.tool_calls or []] == ["Paris", "Rome"]


async def test_the_clients_own_ids_round_trip_into_the_prompt(app: Any) -> None:
    conductor, backend = app
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_abcdefghijklmnop", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_abcdefghijklmnop", "content": '{"temp_c": 21}'},
    ]  # fmt: skip
    resp = await post(conductor, "/v1/chat/completions", json=request(messages=messages))
    assert resp.status_code == 200, resp.text
    tok = load_tokenizer(backend.folder)
    text = tok.decode(list(backend.prompts[-1]))
    assert "temp_c" in text  # the tool result went into the prompt
    bad = [*messages[:2], {"role": "tool", "tool_call_id": "call_unknown", "content": "x"}]
    resp = await post(conductor, "/v1/chat/completions", json=request(messages=bad))
    assert resp.status_code == 400 and resp.json["error"]["param"] == "messages[2].tool_call_id"


async def test_tool_choice_none_answers_in_text(app: Any) -> None:
    conductor, _ = app
    resp = await post(conductor, "/v1/chat/completions", json=request(tool_choice="none"))
    assert resp.status_code == 200 and resp.json["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in resp.json["choices"][0]["message"]
