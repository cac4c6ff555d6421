"""Structured outputs, logprobs and the OpenAI sampling set, end to end with the official SDK on the default
model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow
Validate = Callable[[Any, str], None]


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    is_capital: bool
    continent: Literal["Europe", "Asia", "Africa", "Americas", "Oceania"]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_parse_returns_a_pydantic_object(client: openai.OpenAI, server: Server) -> None:
    done = client.chat.completions.parse(
        model=server.model, messages=ask("Describe Paris as JSON."), response_format=City, max_tokens=120,
        temperature=0,
    )  # fmt: skip
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.continent in ("Europe", "Asia", "Africa", "Americas", "Oceania")


def test_json_object_output_parses(client: openai.OpenAI, server: Server, openapi_validate: Validate) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=server.model, messages=ask("Give me a JSON object describing a cat."), max_tokens=100,
        response_format={"type": "json_object"}, temperature=0,
    )  # fmt: skip
    openapi_validate(raw.http_response.json(), "CreateChatCompletionResponse")
    choice = raw.parse().choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content or ""), dict)
    else:  # max_tokens ended it mid-object: the text is what was generated
        assert choice.finish_reason == "length" and (choice.message.content or "").lstrip().startswith("{")


def test_an_invalid_schema_is_a_400_naming_it(client: openai.OpenAI, server: Server) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "x"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=ask("hi"), response_format=bad, max_tokens=5)
    assert info.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]


def test_chat_logprobs_in_openai_shape(client: openai.OpenAI, server: Server, openapi_validate: Validate) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=server.model, messages=ask("Say hello."), max_tokens=6, logprobs=True, top_logprobs=3, temperature=0
    )
    body = raw.http_response.json()
    openapi_validate(body, "CreateChatCompletionResponse")
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3 and isinstance(entry["bytes"], list)
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-5  # greedy takes the most likely
    chunks = list(
        client.chat.completions.create(
            model=server.model, messages=ask("Say hello."), max_tokens=6, logprobs=True, top_logprobs=2,
            temperature=0, stream=True,
        )
    )  # fmt: skip
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    # (Token-for-token equality with the first answer is not asked: quantized weights and the prefix cache may
    # round a near-tie differently; every streamed token still carries its own logprob entry.)
    usage_tokens = 6
    assert 0 < len(streamed) <= usage_tokens and all(e.top_logprobs and len(e.top_logprobs) == 2 for e in streamed)
    for c in chunks:
        openapi_validate(c.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")


def test_completions_logprobs_and_echo(client: openai.OpenAI, server: Server, openapi_validate: Validate) -> None:
    done = client.completions.create(
        model=server.model, prompt="The capital of France is", max_tokens=4, logprobs=2, echo=True, temperature=0
    )
    choice = done.choices[0]
    assert choice.text.startswith("The capital of France is")
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.text_offset is not None
    assert lp.token_logprobs[0] is None  # nothing predicts the first prompt token
    assert len(lp.tokens) == done.usage.prompt_tokens + done.usage.completion_tokens  # type: ignore[union-attr]
    assert lp.text_offset == sorted(lp.text_offset)


def test_logit_bias_moves_the_greedy_first_token(client: openai.OpenAI, server: Server) -> None:
    first = client.completions.create(
        model=server.model, prompt="The capital of France is", max_tokens=1, logprobs=0, temperature=0
    )
    lp = first.choices[0].logprobs
    assert lp is not None and lp.tokens
    from transformers import AutoTokenizer

    # The token id of the greedy choice, from the server's own vocabulary (the converted default model).
    tok = AutoTokenizer.from_pretrained(_model_dir())
    token_id = tok.convert_tokens_to_ids(tok.tokenize(lp.tokens[0]))[0]
    again = client.completions.create(
        model=server.model, prompt="The capital of France is", max_tokens=1, logprobs=0, temperature=0,
        logit_bias={str(token_id): -100},
    )  # fmt: skip
    assert again.choices[0].logprobs.tokens[0] != lp.tokens[0]  # type: ignore[union-attr]


def test_frequency_penalty_changes_a_repetitive_output(client: openai.OpenAI, server: Server) -> None:
    prompt = "one one one one one one one one one one one one"
    base = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0)
    penalized = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=24, temperature=0, frequency_penalty=2.0
    )
    assert base.choices[0].text != penalized.choices[0].text
    words = base.choices[0].text.split()
    assert len(set(penalized.choices[0].text.split())) >= len(set(words))


def _model_dir() -> str:
    from aisandbox.runtime.torch.default_model import prepare_default_model
    from aisandbox.settings import ServerSettings

    return str(prepare_default_model(ServerSettings().cache_dir))
