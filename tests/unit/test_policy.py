"""The admission policy: caps with their settings, vocabulary checks, greedy temperatures, refusal reasons."""

from __future__ import annotations

from typing import Any

import pytest

from aisandbox.errors import InvalidRequest, Overloaded, ServerShuttingDown
from aisandbox.http.errors import Unauthorized
from aisandbox.http.policy import LimitExceeded, Limits, check_json, check_request, refusal_reason
from aisandbox.http.schemas import ChatCompletionRequest, CompletionRequest
from aisandbox.runtime.request import SamplingParams
from aisandbox.settings import ServerSettings

VOCAB = 1000
LIMITS = Limits()


def chat(**fields: Any) -> ChatCompletionRequest:
    messages = [{"role": "user", "content": "hi"}]
    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", **fields})


def refused(body: Any, limits: Limits = LIMITS) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        check_request(body, limits, VOCAB)
    return info.value


def test_limits_come_from_settings() -> None:
    settings = ServerSettings(
        max_sequences_per_request=3,
        max_request_prompt_tokens=100,
        max_stop_strings=1,
        max_stop_token_ids=2,
        max_logit_bias=5,
        max_grammar_bytes=50,
    )
    assert Limits.from_settings(settings) == Limits(3, 100, 1, 2, 5, 50)
    assert Limits.from_settings(ServerSettings()) == Limits(256, 262_144, 4, 64, 300, 100_000)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (completion(prompt=["a"] * 200, n=2), "prompt"),
        (completion(prompt=[[1, 2]] * 257), "prompt"),
        (completion(prompt=[[1] * 1000] * 200), "prompt"),  # 200k tokens > 100k below
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(stop_token_ids=list(range(65))), "stop_token_ids"),
        (chat(logit_bias={str(i): 1 for i in range(301)}), "logit_bias"),
        (chat(guided_regex="a" * 60), "guided_regex"),
        (chat(guided_grammar="root ::= " + "x" * 60), "guided_grammar"),
        (
            chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"d": "x" * 60}}}),
            "response_format.json_schema.schema",
        ),
    ],
)
def test_caps_name_their_field(body: Any, param: str) -> None:
    err = refused(body, Limits(max_prompt_tokens=100_000, max_grammar_bytes=50))
    assert isinstance(err, LimitExceeded) and err.param == param and err.code == "limit_exceeded"


def test_within_the_caps_passes() -> None:
    check_request(completion(prompt=[[1, 2]] * 128, n=2, stop=["a"] * 4, logit_bias={"1": 2}), LIMITS, VOCAB)
    check_request(chat(n=16, stop_token_ids=[0, 999], guided_regex="[a-z]+"), LIMITS, VOCAB)


@pytest.mark.parametrize("param", ["stop_token_ids", "logit_bias"])
def test_token_ids_inside_the_vocabulary(param: str) -> None:
    body = chat(stop_token_ids=[1_000_000_000]) if param == "stop_token_ids" else chat(logit_bias={"1000": 1})
    err = refused(body)
    assert err.param == param and err.code == "invalid_value"
    assert refusal_reason(err) == f"vocab_{param}"


def test_huge_prompt_lists_are_refused_before_the_schema() -> None:
    with pytest.raises(LimitExceeded) as info:
        check_json({"model": "m", "prompt": [[1, 2]] * 300_000}, LIMITS)
    assert info.value.param == "prompt"
    with pytest.raises(LimitExceeded):
        check_json({"model": "m", "prompt": [7] * 300_000}, LIMITS)  # one token-id prompt over the token cap
    check_json({"model": "m", "prompt": [[1, 2]] * 256}, LIMITS)
    check_json({"model": "m", "prompt": "text", "n": "junk"}, LIMITS)  # types are the schema's to refuse


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 9.9e-6])
def test_tiny_temperatures_are_greedy(temperature: float) -> None:
    sampling = chat(temperature=temperature).to_sampling_params(8)
    assert sampling.temperature == 0.0 and sampling.greedy
    assert SamplingParams(max_tokens=8, temperature=temperature).greedy  # the runtime's own conversion too
    assert not SamplingParams(max_tokens=8, temperature=1e-5).greedy


def test_refusal_reasons() -> None:
    assert refusal_reason(Unauthorized()) == "unauthorized"
    assert refusal_reason(Overloaded()) == "overloaded"
    assert refusal_reason(ServerShuttingDown()) == "draining"
    assert refusal_reason(LimitExceeded("x", "response_format.json_schema.schema")) == (
        "limit_response_format_json_schema_schema"
    )
    assert refusal_reason(InvalidRequest("bad")) is None


def test_tiny_temperatures_are_greedy_on_trtllm_too() -> None:
    from aisandbox.runtime.trtllm.backend import sampling_kwargs

    kwargs = sampling_kwargs(SamplingParams(max_tokens=8, temperature=1e-40), (2,), seed=1)
    assert kwargs["top_k"] == 1 and "temperature" not in kwargs
