"""Guided decoding with xgrammar on Mistral's v3 tokenizer (SentencePiece with byte fallback).

A fake model (random logits, nudged towards closing characters) drives the real sampler and matcher, so each
grammar kind is checked end to end: the output parses and validates, and the grammar ends the sequence.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import torch

from aisandbox.errors import InvalidRequest
from aisandbox.runtime.request import SamplingParams
from aisandbox.runtime.structured.grammar import GrammarCompiler, compile_grammar, mask_logits
from aisandbox.runtime.text.tokenizer import MistralCommonTokenizer
from aisandbox.runtime.torch.sampling import Sampler
from aisandbox.runtime.types import GrammarSpec, ModelInfo
from tests.conftest import mistral_v3_tokenizer_file

EOS = 2


@pytest.fixture(scope="module")
def tokenizer() -> MistralCommonTokenizer:
    return MistralCommonTokenizer(mistral_v3_tokenizer_file())


@pytest.fixture(scope="module")
def info(tokenizer: MistralCommonTokenizer) -> ModelInfo:
    return ModelInfo(max_model_len=4096, eos_token_ids=(EOS,), vocab_size=tokenizer.vocab_size, max_running=8)


@pytest.fixture(scope="module")
def nudge(tokenizer: MistralCommonTokenizer) -> torch.Tensor:
    """A logit bonus for tokens that close things, so random logits finish a grammar in few tokens."""
    bonus = torch.zeros(tokenizer.vocab_size)
    for i, piece in enumerate(tokenizer.vocab_for_grammar().pieces):
        if piece and all(chr(b) in '"}],0123456789' for b in piece):
            bonus[i] = 6.0
    bonus[EOS] = 8.0
    return bonus


def generate(
    tokenizer: MistralCommonTokenizer,
    info: ModelInfo,
    nudge: torch.Tensor,
    spec: GrammarSpec,
    max_tokens: int = 400,
    seed: int = 0,
) -> tuple[str, str]:
    """(text, finish reason) of one guided sequence under random logits."""
    sampler = Sampler(info.vocab_size, info.eos_token_ids)
    sp = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, guided=spec, grammar=compile_grammar(spec, tokenizer, info)
    )
    row = sampler.new_row(sp)
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = torch.randn((1, info.vocab_size), generator=g) * 2 + nudge
        step = sampler.sample([row], logits)
        assert not step.grammar_rejected[0]
        if step.grammar_done[0]:
            assert step.tokens[0] == EOS
            return tokenizer.decode(out), "stop"
        out.append(step.tokens[0])
    return tokenizer.decode(out), "length"


def test_json_object_output_parses(tokenizer: Any, info: ModelInfo, nudge: torch.Tensor) -> None:
    for seed in range(3):
        text, reason = generate(tokenizer, info, nudge, GrammarSpec("json_object"), seed=seed)
        assert reason == "stop"
        assert isinstance(json.loads(text), dict), text


SCHEMA = {
    "$defs": {
        "Item": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 6}, "qty": {"type": "integer"}},
            "required": ["sku", "qty"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {
        "status": {"enum": ["open", "closed"]},
        "id": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 2},
        "grid": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
            "maxItems": 2,
        },
    },
    "required": ["status", "id", "items", "grid"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates(tokenizer: Any, info: ModelInfo, nudge: torch.Tensor, seed: int) -> None:
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA), strict=True)
    text, reason = generate(tokenizer, info, nudge, spec, seed=seed)
    assert reason == "stop", text
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    assert set(value) == {"status", "id", "items", "grid"}


def test_json_schema_matcher_accepts_valid_and_refuses_invalid(tokenizer: Any, info: ModelInfo) -> None:
    grammar = compile_grammar(GrammarSpec("json_schema", json.dumps(SCHEMA)), tokenizer, info)

    def accepts(text: str) -> bool:
        return bool(grammar.matcher()._m.accept_string(text))

    good = '{"status": "open", "id": null, "items": [{"sku": "a1", "qty": 2}], "grid": [[1, 2], []]}'
    assert accepts(good)
    assert not accepts('{"status": "pending"')  # not in the enum
    assert not accepts('{"status": "open", "id": null, "items": [{"sku": "a1", "qty": 2, "x"')  # extra key
    assert not accepts('{"status": "open", "id": "7"')  # anyOf integer | null


def test_strict_false_allows_unlisted_properties(tokenizer: Any, info: ModelInfo) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    loose = compile_grammar(GrammarSpec("json_schema", json.dumps(schema), strict=False), tokenizer, info)
    strict = compile_grammar(GrammarSpec("json_schema", json.dumps(schema), strict=True), tokenizer, info)
    text = '{"a": 1, "b": 2}'
    assert loose.matcher()._m.accept_string(text)
    assert not strict.matcher()._m.accept_string(text)


def test_regex(tokenizer: Any, info: ModelInfo, nudge: torch.Tensor) -> None:
    pattern = r"(yes|no)-[0-9]{3}"
    text, reason = generate(tokenizer, info, nudge, GrammarSpec("regex", pattern))
    assert reason == "stop" and re.fullmatch(pattern, text.strip()), text


def test_ebnf(tokenizer: Any, info: ModelInfo, nudge: torch.Tensor) -> None:
    grammar = 'root ::= "SELECT " column " FROM t" \ncolumn ::= "a" | "b" | "c"'
    text, reason = generate(tokenizer, info, nudge, GrammarSpec("ebnf", grammar))
    assert reason == "stop" and re.fullmatch(r"SELECT [abc] FROM t", text.strip()), text


def test_max_tokens_ends_a_sequence_mid_grammar(tokenizer: Any, info: ModelInfo, nudge: torch.Tensor) -> None:
    text, reason = generate(tokenizer, info, nudge, GrammarSpec("json_schema", json.dumps(SCHEMA)), max_tokens=3)
    assert reason == "length" and text.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        (GrammarSpec("json_schema", '{"type": "foo"}'), "response_format.json_schema.schema"),
        (GrammarSpec("json_schema", '{"properties": {"a": {"$ref": "#/$defs/missing"}}}'),
         "response_format.json_schema.schema"),
        (GrammarSpec("json_schema", "not json"), "response_format.json_schema.schema"),
        (GrammarSpec("json_schema", "[1]"), "response_format.json_schema.schema"),
        (GrammarSpec("json_schema", '{"type": "integer", "minimum": 5, "maximum": 2}'),
         "response_format.json_schema.schema"),
        (GrammarSpec("regex", "(("), "guided_regex"),
        (GrammarSpec("ebnf", "root ::= undefined_rule"), "guided_grammar"),
    ],
)  # fmt: skip
def test_invalid_grammars_are_invalid_requests(tokenizer: Any, info: ModelInfo, spec: GrammarSpec, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        compile_grammar(spec, tokenizer, info)
    assert caught.value.param == param
    assert "/project/cpp" not in caught.value.message


def test_compiles_are_cached_by_spec(tokenizer: Any, info: ModelInfo) -> None:
    compiler = GrammarCompiler(tokenizer, info.vocab_size, info.eos_token_ids, cache_size=2)
    a = compiler.compile(GrammarSpec("regex", "a+"))
    assert compiler.compile(GrammarSpec("regex", "a+")) is a
    compiler.compile(GrammarSpec("regex", "b+"))
    compiler.compile(GrammarSpec("regex", "c+"))  # evicts a+
    assert compiler.compile(GrammarSpec("regex", "a+")) is not a
    assert compiler.compiled == 4


def test_special_tokens_never_appear_inside_guided_text(tokenizer: Any, info: ModelInfo) -> None:
    grammar = compile_grammar(GrammarSpec("json_object"), tokenizer, info)
    logits = torch.zeros((1, info.vocab_size))
    m = grammar.matcher()
    assert m._m.accept_string('{"a": "x')  # inside a string, where any text may follow
    mask_logits(logits, [0], [m])
    allowed = torch.isfinite(logits[0])
    special = sorted(tokenizer.vocab_for_grammar().special)
    assert not allowed[special].any()


def test_a_finished_grammar_allows_only_its_stop_tokens_and_never_nothing(tokenizer: Any, info: ModelInfo) -> None:
    grammar = compile_grammar(GrammarSpec("regex", "ok"), tokenizer, info)
    m = grammar.matcher()
    assert m._m.accept_string("ok")
    logits = torch.zeros((2, info.vocab_size))
    mask_logits(logits, [1], [m])
    assert torch.isfinite(logits[0]).all()  # the unguided row is untouched
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [EOS]
    # min_tokens banned EOS as well: the grammar's stop token comes back rather than an empty row.
    sampler = Sampler(info.vocab_size, info.eos_token_ids)
    row = sampler.new_row(SamplingParams(max_tokens=8, temperature=0.0, min_tokens=5))
    row.matcher = grammar.matcher()
    assert row.matcher._m.accept_string("ok")
    step = sampler.sample([row], torch.zeros((1, info.vocab_size)))
    assert step.tokens == [EOS] and step.grammar_done == [True]
