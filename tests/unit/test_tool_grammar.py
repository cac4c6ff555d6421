"""Tool-call grammars: the JSON Schemas are valid, and xgrammar compiles the structural tags and accepts exactly
the calls the request allows (checked with a grammar matcher over real token ids)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from aisandbox.runtime.structured.tools.grammar import (
    call_object_schema,
    forced_prefix,
    tool_calls_json_schema,
    tool_structural_tag,
)
from aisandbox.runtime.structured.tools.parsers import create_tool_parser
from aisandbox.runtime.structured.tools.specs import ToolChoice, ToolRequest, ToolSpec
from aisandbox.runtime.text.tokenizer import HFTokenizer, MistralCommonTokenizer
from tests.conftest import mistral_v3_tokenizer_file
from tests.unit.tiny_hf import CHATML, build_tiny_hf_tokenizer

xgr = pytest.importorskip("xgrammar")

WEATHER = ToolSpec(
    "get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
)
ADD = ToolSpec(
    "add",
    "",
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
    strict=True,
)
NO_PARAMS = ToolSpec("now", "", {})
CALL_ADD = {"name": "add", "arguments": {"a": 1, "b": 2}}
CALL_WEATHER = {"name": "get_weather", "arguments": {"city": "Paris"}}


def request(mode: str, parallel: bool = True, name: str | None = None) -> ToolRequest:
    return ToolRequest((WEATHER, ADD, NO_PARAMS), ToolChoice(mode, name), parallel)  # type: ignore[arg-type]


def test_call_schema_ties_name_to_arguments() -> None:
    validator = jsonschema.Draft202012Validator(call_object_schema(ADD))
    assert validator.is_valid(CALL_ADD)
    assert not validator.is_valid({"name": "add", "arguments": {"a": "x", "b": 2}})
    assert not validator.is_valid({"name": "get_weather", "arguments": {"a": 1, "b": 2}})
    assert not validator.is_valid({"name": "add", "arguments": {"a": 1, "b": 2}, "extra": 1})
    assert jsonschema.Draft202012Validator(call_object_schema(NO_PARAMS)).is_valid({"name": "now", "arguments": {}})


@pytest.mark.parametrize(
    ("req", "fmt", "good", "bad"),
    [
        (request("required"), "mistral", [[CALL_ADD, CALL_WEATHER]], [[], [{"name": "add", "arguments": {}}]]),
        (request("required", parallel=False), "mistral", [[CALL_WEATHER]], [[CALL_ADD, CALL_WEATHER]]),
        (request("named", name="add"), "mistral", [[CALL_ADD]], [[CALL_WEATHER]]),
        (request("required"), "hermes", [CALL_ADD, CALL_WEATHER], [[CALL_ADD], {"name": "x", "arguments": {}}]),
        (request("named", name="get_weather"), "hermes", [CALL_WEATHER], [CALL_ADD]),
    ],
)
def test_json_schema_for_forced_calls(req: ToolRequest, fmt: str, good: list[Any], bad: list[Any]) -> None:
    schema = tool_calls_json_schema(req, fmt)  # type: ignore[arg-type]
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert all(validator.is_valid(v) for v in good)
    assert not any(validator.is_valid(v) for v in bad)
    xgr.Grammar.from_json_schema(json.dumps(schema))  # compiles as a grammar too


def test_no_grammar_without_callable_tools() -> None:
    with pytest.raises(ValueError):
        tool_structural_tag(ToolRequest((WEATHER,), ToolChoice("none")), "hermes")
    with pytest.raises(ValueError):
        tool_structural_tag(request("auto"), "mistral")  # no token id


# ---- compiled and matched over real token ids ----


@pytest.fixture(scope="module")
def mistral_setup() -> tuple[MistralCommonTokenizer, Any]:
    tok = MistralCommonTokenizer(mistral_v3_tokenizer_file())
    model = tok._inner._model  # sentencepiece
    vocab = [model.id_to_piece(i) for i in range(tok.vocab_size)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_FALLBACK, stop_token_ids=list(tok.eos_token_ids))
    return tok, xgr.GrammarCompiler(info)


@pytest.fixture(scope="module")
def hermes_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[HFTokenizer, Any]:
    tok = HFTokenizer(build_tiny_hf_tokenizer(tmp_path_factory.mktemp("hf") / "chatml", CHATML))
    info = xgr.TokenizerInfo.from_huggingface(tok._tok, stop_token_ids=list(tok.eos_token_ids))
    return tok, xgr.GrammarCompiler(info)


def accepts(compiled: Any, token_ids: list[int], eos: int) -> bool:
    """Whether the grammar takes these tokens and then lets the sequence end."""
    matcher = xgr.GrammarMatcher(compiled)
    return all(matcher.accept_token(t) for t in token_ids) and matcher.accept_token(eos)


def mistral_output(tok: MistralCommonTokenizer, calls: list[dict[str, Any]] | None, text: str = "") -> list[int]:
    ids = tok.encode_fragment(text) if text else []
    if calls is not None:
        ids += [5, *tok.encode_fragment(json.dumps(calls))]
    return ids


@pytest.mark.parametrize(
    ("req", "accepted", "refused"),
    [
        (request("required"), [[CALL_ADD], [CALL_ADD, CALL_WEATHER]], [None, []]),
        (request("required", parallel=False), [[CALL_WEATHER]], [[CALL_ADD, CALL_WEATHER]]),
        (request("named", name="add"), [[CALL_ADD]], [[CALL_WEATHER], None]),
        (request("auto"), [None, [CALL_ADD], [CALL_WEATHER, CALL_ADD]], [[{"name": "add", "arguments": {"a": 1}}]]),
    ],
)
def test_mistral_structural_tag(
    mistral_setup: tuple[MistralCommonTokenizer, Any],
    req: ToolRequest,
    accepted: list[Any],
    refused: list[Any],
) -> None:
    tok, compiler = mistral_setup
    compiled = compiler.compile_structural_tag(json.dumps(tool_structural_tag(req, "mistral", 5)))
    eos = tok.eos_token_ids[0]
    for calls in accepted:
        assert accepts(compiled, mistral_output(tok, calls, "" if calls else "Hello"), eos), calls
    for calls in refused:
        assert not accepts(compiled, mistral_output(tok, calls, "Hello" if calls is None else ""), eos), calls


@pytest.mark.parametrize("parallel", [True, False])
def test_mistral_forced_prefix_and_parser(mistral_setup: tuple[MistralCommonTokenizer, Any], parallel: bool) -> None:
    """Way B: the prompt ends with [TOOL_CALLS]; a grammar takes the list; the prefilled parser reads it."""
    tok, compiler = mistral_setup
    prefix = forced_prefix(tok)
    assert prefix.token_ids == (5,) and prefix.text == ""
    req = request("required", parallel)
    output = tok.encode_fragment(json.dumps([CALL_ADD]))  # starts with "▁[", as the model writes it
    tag = tool_structural_tag(req, "mistral", prefilled=True)
    assert accepts(compiler.compile_structural_tag(json.dumps(tag)), output, tok.eos_token_ids[0])
    two = tok.encode_fragment(json.dumps([CALL_ADD, CALL_ADD]))
    assert accepts(compiler.compile_structural_tag(json.dumps(tag)), two, tok.eos_token_ids[0]) is parallel
    # The JSON Schema alternative takes the list without the leading space.
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(tool_calls_json_schema(req, "mistral"))))
    assert matcher.accept_string(json.dumps([CALL_ADD])) and matcher.accept_token(tok.eos_token_ids[0])
    parser = create_tool_parser("mistral", 5, [t.name for t in req.callable_tools], prefilled=True)
    parser.feed(output, tok.decode(output))
    assert [c.name for c in parser.finish().tool_calls] == ["add"]


@pytest.mark.parametrize("parallel", [True, False])
def test_hermes_prefilled_grammar(hermes_setup: tuple[HFTokenizer, Any], parallel: bool) -> None:
    tok, compiler = hermes_setup
    req = request("named", parallel, name="add")
    compiled = compiler.compile_structural_tag(json.dumps(tool_structural_tag(req, "hermes", prefilled=True)))
    one = hermes_text([CALL_ADD]).removeprefix("<tool_call>\n")
    two = hermes_text([CALL_ADD, CALL_ADD]).removeprefix("<tool_call>\n")
    eos = tok.eos_token_ids[0]
    assert accepts(compiled, tok.encode_fragment(one), eos)
    assert accepts(compiled, tok.encode_fragment(two), eos) is parallel
    assert not accepts(compiled, tok.encode_fragment(hermes_text([CALL_WEATHER]).removeprefix("<tool_call>\n")), eos)
    with pytest.raises(ValueError):
        tool_structural_tag(request("auto"), "hermes", prefilled=True)


def hermes_text(calls: list[dict[str, Any]], text: str = "") -> str:
    return text + "".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)


@pytest.mark.parametrize(
    ("req", "accepted", "refused"),
    [
        (request("required"), [hermes_text([CALL_ADD]), hermes_text([CALL_ADD, CALL_WEATHER])], ["Hello"]),
        (request("required", parallel=False), [hermes_text([CALL_WEATHER])], [hermes_text([CALL_ADD, CALL_ADD])]),
        (request("named", name="add"), [hermes_text([CALL_ADD])], [hermes_text([CALL_WEATHER])]),
        (
            request("auto"),
            ["Hello", hermes_text([CALL_ADD], "Sure. "), hermes_text([{"name": "now", "arguments": {}}])],
            [hermes_text([{"name": "add", "arguments": {"a": "1", "b": 2}}])],
        ),
    ],
)
def test_hermes_structural_tag(
    hermes_setup: tuple[HFTokenizer, Any], req: ToolRequest, accepted: list[str], refused: list[str]
) -> None:
    tok, compiler = hermes_setup
    compiled = compiler.compile_structural_tag(json.dumps(tool_structural_tag(req, "hermes")))
    eos = tok.eos_token_ids[0]
    for text in accepted:
        assert accepts(compiled, tok.encode_fragment(text), eos), text
    for text in refused:
        assert not accepts(compiled, tok.encode_fragment(text), eos), text


def test_hermes_grammar_output_parses(hermes_setup: tuple[HFTokenizer, Any]) -> None:
    """What the grammar lets through, the parser reads as calls (the layouts agree)."""
    text = hermes_text([CALL_ADD, CALL_WEATHER], "Sure. ")
    parser = create_tool_parser("hermes", None, ["add", "get_weather"])
    parser.feed([], text)
    result = parser.finish()
    assert [json.loads(c.arguments_json) for c in result.tool_calls] == [
        CALL_ADD["arguments"],
        CALL_WEATHER["arguments"],
    ]
    assert result.content == "Sure."
    tok, _ = hermes_setup
    prefix = forced_prefix(tok)
    assert prefix.text == "<tool_call>\n" and tok.decode(list(prefix.token_ids)) == prefix.text


def test_default_smollm2_vocab_compiles(tmp_path: Path) -> None:
    """Structural tags compile for the byte-level vocabulary the default model uses (tiny stand-in here)."""
    tok = HFTokenizer(build_tiny_hf_tokenizer(tmp_path / "t", CHATML))
    info = xgr.TokenizerInfo.from_huggingface(tok._tok)
    for req in (request("auto"), request("required", parallel=False), request("named", name="now")):
        xgr.GrammarCompiler(info).compile_structural_tag(json.dumps(tool_structural_tag(req, "hermes")))
