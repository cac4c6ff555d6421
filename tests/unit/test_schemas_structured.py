"""Structured outputs, logprobs and the OpenAI sampling set in the request schemas and response builders."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from aisandbox.errors import InvalidRequest
from aisandbox.http import schemas
from aisandbox.http.errors import error_response
from aisandbox.http.schemas import ChatCompletionRequest, CompletionRequest, check_logit_bias
from aisandbox.runtime.structured.logprobs import LogprobFormatter
from aisandbox.runtime.text.tokenizer import MistralCommonTokenizer
from aisandbox.runtime.types import GrammarSpec, TokenLogprob
from tests.conftest import mistral_v3_tokenizer_file

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({**CHAT, **fields})


def error(model: type[Any], body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises((ValidationError, InvalidRequest)) as info:
        model.model_validate(body)
    status, out, _ = error_response(info.value)
    assert status == 400
    return dict(out["error"])


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_response_formats_become_grammar_specs() -> None:
    assert chat(response_format={"type": "text"}).to_sampling_params(8).guided is None
    assert chat(response_format={"type": "json_object"}).to_sampling_params(8).guided == GrammarSpec("json_object")
    sp = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": SCHEMA, "strict": True}}
    ).to_sampling_params(8)
    assert sp.guided == GrammarSpec("json_schema", json.dumps(SCHEMA, separators=(",", ":")), strict=True)
    assert sp.grammar is None  # compiled later, off the event loop
    loose = chat(response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": SCHEMA}})
    assert loose.to_sampling_params(8).guided.strict is False  # type: ignore[union-attr]
    no_schema = chat(response_format={"type": "json_schema", "json_schema": {"name": "A"}})
    assert no_schema.to_sampling_params(8).guided == GrammarSpec("json_object")


def test_schema_property_order_is_kept() -> None:
    schema = {"type": "object", "properties": {"z": {"type": "string"}, "a": {"type": "string"}}}
    body = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    source = body.to_sampling_params(8).guided.source  # type: ignore[union-attr]
    assert source.index('"z"') < source.index('"a"')


def test_extensions_regex_and_grammar_also_on_completions() -> None:
    assert chat(guided_regex="[0-9]+").to_sampling_params(8).guided == GrammarSpec("regex", "[0-9]+")
    body = CompletionRequest.model_validate({**COMPLETION, "guided_grammar": 'root ::= "a"'})
    assert body.to_sampling_params(8).guided == GrammarSpec("ebnf", 'root ::= "a"')
    body = CompletionRequest.model_validate({**COMPLETION, "response_format": {"type": "json_object"}})
    assert body.to_sampling_params(8).guided == GrammarSpec("json_object")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
    ],
)  # fmt: skip
def test_invalid_values_name_their_param(fields: dict[str, Any], param: str) -> None:
    err = error(ChatCompletionRequest, {**CHAT, **fields})
    assert err["param"] == param, err


def test_sampling_fields_reach_sampling_params() -> None:
    sp = chat(
        frequency_penalty=0.5, presence_penalty=-0.25, logit_bias={"7": -100, "9": 3.5}, logprobs=True, top_logprobs=4
    ).to_sampling_params(8)
    assert (sp.frequency_penalty, sp.presence_penalty) == (0.5, -0.25)
    assert sp.logit_bias == ((7, -100.0), (9, 3.5))
    assert (sp.logprobs, sp.top_logprobs, sp.prompt_logprobs) == (True, 4, None)
    assert chat(logprobs=False).to_sampling_params(8).logprobs is False


def test_completion_logprobs_and_echo() -> None:
    def sp(**fields: Any) -> Any:
        return CompletionRequest.model_validate({**COMPLETION, **fields}).to_sampling_params(8)

    assert (sp().logprobs, sp().prompt_logprobs) == (False, None)
    assert (sp(logprobs=0).logprobs, sp(logprobs=0).top_logprobs) == (True, 0)
    assert (sp(logprobs=3, echo=True).top_logprobs, sp(logprobs=3, echo=True).prompt_logprobs) == (3, 3)
    assert sp(echo=True).prompt_logprobs is None
    assert error(CompletionRequest, {**COMPLETION, "logprobs": 6})["param"] == "logprobs"


def test_logit_bias_ids_are_checked_against_the_vocabulary() -> None:
    check_logit_bias(chat(logit_bias={"0": 1, "99": 1}).to_sampling_params(8), 100)
    with pytest.raises(InvalidRequest) as info:
        check_logit_bias(chat(logit_bias={"100": 1}).to_sampling_params(8), 100)
    assert info.value.param == "logit_bias"


# ---- response shapes, validated against OpenAI's spec ----


@pytest.fixture(scope="module")
def formatter() -> LogprobFormatter:
    return LogprobFormatter(MistralCommonTokenizer(mistral_v3_tokenizer_file()))


def test_token_strings_and_bytes(formatter: LogprobFormatter) -> None:
    tok = MistralCommonTokenizer(mistral_v3_tokenizer_file())
    ids = tok.encode("hello é\n")[1:]
    texts = [formatter.token(i)[0] for i in ids]
    assert "".join(texts).strip() == "hello é"
    assert bytes(b for i in ids for b in formatter.token(i)[1]).decode() == " hello é\n"
    newline = tok._inner._model.piece_to_id("<0x0A>")
    assert formatter.token(newline) == ("\n", [10])
    part = tok._inner._model.piece_to_id("<0xC3>")  # the first byte of a two-byte character
    assert formatter.token(part) == ("bytes:\\xc3", [0xC3])
    assert formatter.token(2) == ("</s>", list(b"</s>"))


def steps(formatter: LogprobFormatter) -> list[Any]:
    return formatter.format_all(
        [TokenLogprob(1056, -0.5, ((1056, -0.5), (2, -1.25))), TokenLogprob(2, -0.1, ((2, -0.1), (5, -3.0)))]
    )


def test_chat_logprobs_validate(openapi_validate: Callable[[Any, str], None], formatter: LogprobFormatter) -> None:
    lp = schemas.chat_logprobs(steps(formatter))
    body = schemas.chat_response("c", 1, "m", [("hi", "stop")], schemas.usage(1, 2), logprobs=[lp])
    openapi_validate(body, "CreateChatCompletionResponse")
    entry = body["choices"][0]["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
    assert entry["logprob"] == -0.5 and len(entry["top_logprobs"]) == 2
    assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    chunk = schemas.chat_chunk("c", 1, "m", 0, {"content": "hi"}, None, lp)
    openapi_validate(chunk, "CreateChatCompletionStreamResponse")
    openapi_validate(schemas.chat_chunk("c", 1, "m", 0, {}, "stop"), "CreateChatCompletionStreamResponse")


def test_completion_logprobs_validate(
    openapi_validate: Callable[[Any, str], None], formatter: LogprobFormatter
) -> None:
    lp = schemas.completion_logprobs(steps(formatter), text_offset=3)
    body = schemas.completion_response("c", 1, "m", [("xyz", "stop")], schemas.usage(1, 2), [lp])
    openapi_validate(body, "CreateCompletionResponse")
    assert lp["text_offset"][0] == 3 and len(lp["tokens"]) == 2
    assert lp["top_logprobs"][0] == {formatter.token(1056)[0]: -0.5, "</s>": -1.25}
    openapi_validate(schemas.completion_chunk("c", 1, "m", 0, "x", "length", lp), "CreateCompletionResponse")


def test_echo_logprobs_start_with_a_null(formatter: LogprobFormatter) -> None:
    prompt = formatter.format_prompt([1, 1056], [None, TokenLogprob(1056, -2.0, ((7, -1.0),))])
    lp = schemas.completion_logprobs(prompt + steps(formatter))
    # OpenAI's legacy API and vLLM send null for the first prompt token (the spec's schema says number).
    assert lp["token_logprobs"][:2] == [None, -2.0] and lp["top_logprobs"][0] is None
    assert lp["tokens"][0] == "<s>" and lp["text_offset"][:2] == [0, 0]  # <s> is not text
