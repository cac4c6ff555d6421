"""Request schemas and the one error mapping: status, type, code and param as OpenAI sends them."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from aisandbox.errors import (
    ContextLengthExceeded,
    EngineDead,
    EngineError,
    EngineNotReady,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    UnsupportedParameter,
)
from aisandbox.http.errors import Unauthorized, error_response
from aisandbox.http.schemas import ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def chat_error(**fields: Any) -> dict[str, Any]:
    with pytest.raises((ValidationError, InvalidRequest)) as info:
        ChatCompletionRequest.model_validate({**CHAT, **fields})
    status, body, _ = error_response(info.value)
    assert status == 400
    return dict(body["error"])


def test_unknown_field_is_unknown_parameter() -> None:
    err = chat_error(frobnicate=1)
    assert err == {
        "message": "Unrecognized request argument supplied: frobnicate",
        "type": "invalid_request_error",
        "param": "frobnicate",
        "code": "unknown_parameter",
    }


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": "10"}, "max_tokens", "invalid_type"),
        ({"n": 0}, "n", "invalid_value"),
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"stream": "yes"}, "stream", "invalid_type"),
    ],
)
def test_bad_values_name_their_param(fields: dict[str, Any], param: str, code: str) -> None:
    err = chat_error(**fields)
    assert err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error"


def test_missing_model() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": CHAT["messages"]})
    assert error_response(info.value)[1]["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"audio": {"voice": "x"}}, "audio"),
    ],
)
def test_known_but_unsupported_is_refused(fields: dict[str, Any], param: str) -> None:
    err = chat_error(**fields)
    assert err["code"] == "unsupported_parameter" and err["param"] == param


def test_non_text_content_part_is_unsupported() -> None:
    body = ChatCompletionRequest.model_validate(
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    )
    with pytest.raises(UnsupportedParameter) as info:
        body.conversation()
    assert info.value.param == "messages[0].content[0]"


def test_harmless_fields_are_accepted() -> None:
    body = ChatCompletionRequest.model_validate(
        {**CHAT, "user": "u", "metadata": {"a": "b"}, "store": False, "service_tier": "auto", "frequency_penalty": 0}
    )
    assert body.user == "u"


def test_stream_options_need_stream() -> None:
    assert chat_error(stream_options={"include_usage": True})["param"] is None


def test_max_completion_tokens_wins_and_sampling_conversion() -> None:
    body = ChatCompletionRequest.model_validate(
        {**CHAT, "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "stop": "x", "seed": 3,
         "top_k": -1, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 2,
         "stop_token_ids": [9]}
    )  # fmt: skip
    assert body.requested_max_tokens() == 7
    sp = body.to_sampling_params(7, choice_index=1)
    assert (sp.max_tokens, sp.temperature, sp.greedy, sp.stop, sp.seed, sp.top_k) == (7, 0.0, True, ("x",), 4, 0)
    assert (sp.min_p, sp.repetition_penalty, sp.ignore_eos, sp.min_tokens, sp.stop_token_ids) == (
        0.1, 1.1, True, 2, (9,)
    )  # fmt: skip


def test_min_tokens_above_max_tokens() -> None:
    body = ChatCompletionRequest.model_validate({**CHAT, "min_tokens": 10})
    with pytest.raises(InvalidRequest) as info:
        body.to_sampling_params(5)
    assert info.value.param == "min_tokens"


def test_developer_role_becomes_system() -> None:
    body = ChatCompletionRequest.model_validate(
        {**CHAT, "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )  # fmt: skip
    assert body.conversation() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_completion_prompt_forms(prompt: Any, expected: list[Any]) -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompts() == expected


@pytest.mark.parametrize("prompt", ["", [], [""] * 0, [1, "a"]])
def test_completion_bad_prompts(prompt: Any) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})


@pytest.mark.parametrize(
    ("exc", "status", "type_", "code"),
    [
        (ModelNotFound("x"), 404, "invalid_request_error", "model_not_found"),
        (ContextLengthExceeded("too long"), 400, "invalid_request_error", "context_length_exceeded"),
        (Overloaded(), 429, "rate_limit_error", "rate_limit_exceeded"),
        (EngineNotReady(), 503, "server_error", "engine_unavailable"),
        (EngineDead(), 503, "server_error", "engine_unavailable"),
        (EngineError("boom"), 500, "server_error", None),
        (Unauthorized(), 401, "invalid_request_error", "invalid_api_key"),
        (RuntimeError("secret internals"), 500, "server_error", None),
    ],
)
def test_error_mapping(exc: Exception, status: int, type_: str, code: str | None) -> None:
    got_status, body, headers = error_response(exc)
    assert got_status == status
    assert body["error"]["type"] == type_ and body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "secret internals" not in body["error"]["message"]
    if status == 429:
        assert headers["Retry-After"] == "1"
