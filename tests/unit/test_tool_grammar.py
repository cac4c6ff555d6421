"""Tool-call grammars: the JSON Schemas are valid, and xgrammar compiles the structural tags and accepts exactly
the calls the request allows (checked with a grammar matcher over real token ids)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from aisandbox.runtime.structured.grammar import grammar_compiler
from aisandbox.runtime.structured.tools.grammar import (
    call_object_schema,
    forced_prefix,
    tool_calls_json_schema,
    tool_structural_tag,
)
from aisandbox.runtime.structured.tools.parsers import create_tool_parser
from aisandbox.runtime.structured.tools.plan import plan_tools
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
        tool_structural_tag(request("auto"), "mistral")  # [TOOL_CALLS] is a token: no 0.1.25 tag begins with one


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


class _MistralFormat:
    tool_format = "mistral"
    tool_call_token_id = 5


def test_mistral_auto_has_no_grammar() -> None:
    """`auto`: the model writes freely; the parser finds [TOOL_CALLS] by its token id."""
    plan = plan_tools(_MistralFormat(), request("auto"))
    assert plan is not None and plan.grammar is None and plan.prompt_suffix == ()


@pytest.mark.parametrize(
    ("req", "accepted", "refused"),
    [
        (request("required"), [[CALL_ADD], [CALL_ADD, CALL_WEATHER]], [[]]),
        (request("required", parallel=False), [[CALL_WEATHER]], [[CALL_ADD, CALL_WEATHER]]),
        (request("named", name="add"), [[CALL_ADD]], [[CALL_WEATHER]]),
    ],
)
def test_mistral_forced_call_list_ends_at_the_call(
    mistral_setup: tuple[MistralCommonTokenizer, Any], req: ToolRequest, accepted: list[Any], refused: list[Any]
) -> None:
    """A forced call: [TOOL_CALLS] ends the prompt, the grammar takes the list as the model writes it ("▁[...]")
    and then only EOS: no text after the call. Compiled as the torch backend compiles it."""
    tok, _ = mistral_setup
    plan = plan_tools(_MistralFormat(), req)
    assert plan is not None and plan.prompt_suffix == (5,) and plan.grammar is not None
    compiled = grammar_compiler(tok, tok.vocab_size, tok.eos_token_ids).compile(plan.grammar)
    eos = tok.eos_token_ids[0]

    def takes(ids: list[int]) -> bool:
        matcher = compiled.matcher()
        return all(matcher.accept(t) for t in ids) and matcher.accept(eos) and matcher.is_terminated

    for calls in accepted:
        ids = tok.encode_fragment(json.dumps(calls))
        assert takes(ids), calls
        assert not takes(ids + tok.encode_fragment(" The result comes back in a block.")), calls
        parser = create_tool_parser("mistral", 5, [t.name for t in req.callable_tools], prefilled=True)
        parser.feed(ids, tok.decode(ids))
        assert [c.name for c in parser.finish().tool_calls] == [c["name"] for c in calls]
    for calls in refused:
        assert not takes(tok.encode_fragment(json.dumps(calls))), calls
    assert not takes(tok.encode_fragment("Hello"))


def hermes_text(calls: list[dict[str, Any]], text: str = "") -> str:
    return text + "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)


@pytest.mark.parametrize(
    ("req", "accepted", "refused"),
    [
        (
            request("required"),
            [hermes_text([CALL_ADD]), hermes_text([CALL_ADD, CALL_WEATHER])],
            ["Hello", hermes_text([CALL_ADD], "Sure. "), hermes_text([CALL_ADD]) + " The result comes back."],
        ),
        (request("required", parallel=False), [hermes_text([CALL_WEATHER])], [hermes_text([CALL_ADD, CALL_ADD])]),
        (
            request("named", name="add"),
            [hermes_text([CALL_ADD])],
            [hermes_text([CALL_WEATHER]), hermes_text([CALL_ADD]) + "\nDone."],
        ),
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
