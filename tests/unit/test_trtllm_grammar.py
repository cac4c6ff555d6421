"""Every guided-decoding spec the trtllm backend sends, compiled as TensorRT-LLM 1.2.1's executor compiles it:
with the pinned xgrammar (0.1.25, the image's) over Mistral-7B-v0.3's real vocabulary as a Hugging Face tokenizer
(what tensorrt_llm loads from the engine folder), converted here from mistral-common's v3 SentencePiece model.

`pytest -m trtllm_grammar` runs these alone. What is not run here (no GPU): the executor's C++ matcher itself; it is
the same xgrammar version, so what compiles and matches here is what it compiles and matches.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aisandbox.runtime.request import SamplingParams
from aisandbox.runtime.structured.tools.plan import plan_tools
from aisandbox.runtime.structured.tools.specs import ToolChoice, ToolRequest, ToolSpec
from aisandbox.runtime.trtllm.backend import guided_decoding_kwargs
from aisandbox.runtime.types import GrammarSpec
from tests.conftest import REPO, mistral_v3_tokenizer_file

pytestmark = pytest.mark.trtllm_grammar
xgr = pytest.importorskip("xgrammar")

TOOL_CALLS = 5
"""[TOOL_CALLS] in Mistral's v3 vocabulary."""

ADD = ToolSpec(
    "add",
    "",
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
    strict=True,
)
WEATHER = ToolSpec(
    "get_weather",
    "",
    {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]},
)
CALL_ADD = {"name": "add", "arguments": {"a": 1, "b": 2}}
CALL_WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}

SCHEMA = {
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
    "type": "object",
    "properties": {
        "kind": {"enum": ["a", "b"]},
        "at": {"$ref": "#/$defs/point"},
        "value": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    },
    "required": ["kind", "at", "value"],
    "additionalProperties": False,
}


def test_xgrammar_pin_agrees_everywhere() -> None:
    """pyproject, the Dockerfile and this environment run the same xgrammar as TensorRT-LLM 1.2.1."""
    pinned = re.search(r'"xgrammar==([\d.]+)"', (REPO / "pyproject.toml").read_text())
    docker = re.search(r"ARG XGRAMMAR_VERSION=([\d.]+)", (REPO / "Dockerfile").read_text())
    assert pinned and docker and pinned.group(1) == docker.group(1) == "0.1.25"
    assert '"xgrammar==${XGRAMMAR_VERSION}"' in (REPO / "Dockerfile").read_text()
    assert importlib.metadata.version("xgrammar") == pinned.group(1)


@pytest.fixture(scope="module")
def mistral_hf(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Mistral-7B-v0.3's tokenizer as Hugging Face's (transformers converts the SentencePiece model)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("mistral-v3-hf")
    shutil.copy(mistral_v3_tokenizer_file(), folder / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False, "add_prefix_space": True}))
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 32768 and tok.convert_ids_to_tokens(TOOL_CALLS) == "[TOOL_CALLS]"
    return tok


@pytest.fixture(scope="module")
def executor_compiler(mistral_hf: Any) -> Any:
    """xgrammar's compiler as tensorrt_llm builds it (llmapi/tokenizer.py: TokenizerInfo.from_huggingface)."""
    info = xgr.TokenizerInfo.from_huggingface(mistral_hf, vocab_size=32768, stop_token_ids=[2])
    assert info.vocab_type == xgr.VocabType.BYTE_FALLBACK
    return xgr.GrammarCompiler(info)


def executor_compile(compiler: Any, spec: GrammarSpec | None) -> Any:
    """Compile what guided_decoding_kwargs sends, by GuidedDecodingParams field, as the 1.2 executor would."""
    kwargs = guided_decoding_kwargs(SamplingParams(max_tokens=8, guided=spec))
    ((field, value),) = kwargs.items()
    if field == "grammar":
        return compiler.compile_grammar(value)
    if field == "regex":
        return compiler.compile_regex(value)
    if field == "structural_tag":
        return compiler.compile_structural_tag(value)
    raise AssertionError(f"unexpected GuidedDecodingParams field {field}")


def takes(compiled: Any, ids: list[int]) -> bool:
    """Whether the grammar takes these tokens and then ends on EOS."""
    matcher = xgr.GrammarMatcher(compiled)
    return all(matcher.accept_token(t) for t in ids) and matcher.accept_token(2) and matcher.is_terminated()


def ids(tok: Any, text: str) -> list[int]:
    """The tokens of text as a model writes it mid-sequence: no SentencePiece dummy prefix ("▁") in front."""
    out = list(tok.encode("\n" + text, add_special_tokens=False))
    assert tok.convert_ids_to_tokens(out[:2]) == ["▁", "<0x0A>"]
    return out[2:]


@pytest.mark.parametrize(
    ("spec", "good", "bad"),
    [
        (GrammarSpec("json_object"), ['{"a": [1, 2]}'], ["[1, 2]", '"x"', "{" + "\n" * 30 + "}"]),
        (
            GrammarSpec("json_schema", json.dumps(SCHEMA)),
            ['{"kind": "a", "at": {"x": 1.5}, "value": 3}', '{"kind": "b", "at": {"x": 0}, "value": "s"}'],
            ['{"kind": "c", "at": {"x": 1}, "value": 3}', '{"kind": "a", "at": {}, "value": 3}'],
        ),
        (GrammarSpec("regex", r"\d{3}-[a-z]+"), ["123-abc"], ["12-abc", "123-ABC"]),
        (GrammarSpec("ebnf", 'root ::= "yes" | "no"'), ["yes", "no"], ["maybe"]),
    ],
)
def test_guided_specs_compile_and_match_on_mistral_vocab(
    mistral_hf: Any, executor_compiler: Any, spec: GrammarSpec, good: list[str], bad: list[str]
) -> None:
    compiled = executor_compile(executor_compiler, spec)
    for text in good:
        assert takes(compiled, ids(mistral_hf, text)), text
    for text in bad:
        assert not takes(compiled, ids(mistral_hf, text)), text


def tools(mode: str, parallel: bool = True, name: str | None = None) -> ToolRequest:
    return ToolRequest((ADD, WEATHER), ToolChoice(mode, name), parallel)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("req", "good", "bad"),
    [
        (tools("required"), [[CALL_ADD], [CALL_ADD, CALL_WEATHER]], [[]]),
        (tools("required", parallel=False), [[CALL_WEATHER]], [[CALL_ADD, CALL_WEATHER]]),
        (tools("named", name="add"), [[CALL_ADD]], [[CALL_WEATHER]]),
    ],
)
def test_mistral_forced_calls(
    mistral_hf: Any, executor_compiler: Any, req: ToolRequest, good: list[Any], bad: list[Any]
) -> None:
    """[TOOL_CALLS] ends the prompt (placed by us); the list follows as the model writes it ("▁[..."), then EOS."""
    plan = plan_tools(SimpleNamespace(tool_format="mistral", tool_call_token_id=TOOL_CALLS), req)
    assert plan is not None and plan.prompt_suffix == (TOOL_CALLS,)
    compiled = executor_compile(executor_compiler, plan.grammar)
    for calls in good:
        out = list(mistral_hf.encode(json.dumps(calls), add_special_tokens=False))
        assert mistral_hf.convert_ids_to_tokens(out[0]) == "▁["  # how the model writes the list after [TOOL_CALLS]
        assert takes(compiled, out), calls
        assert not takes(compiled, out + ids(mistral_hf, " Done.")), calls  # a forced call ends at the call
    for calls in bad:
        assert not takes(compiled, ids(mistral_hf, json.dumps(calls))), calls


def test_mistral_auto_sends_no_grammar() -> None:
    plan = plan_tools(SimpleNamespace(tool_format="mistral", tool_call_token_id=TOOL_CALLS), tools("auto"))
    assert plan is not None and plan.grammar is None
    assert guided_decoding_kwargs(SamplingParams(max_tokens=8)) == {}


def hermes(calls: list[dict[str, Any]], text: str = "") -> str:
    return text + "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)


@pytest.mark.parametrize("fmt", ["hermes", "fallback"])
@pytest.mark.parametrize(
    ("req", "good", "bad"),
    [
        (tools("auto"), ["Hello", hermes([CALL_ADD], "Sure. ")], [hermes([{"name": "add", "arguments": {}}])]),
        (tools("required"), [hermes([CALL_ADD, CALL_WEATHER])], ["Hello", hermes([CALL_ADD]) + " Done."]),
        (tools("required", parallel=False), [hermes([CALL_WEATHER])], [hermes([CALL_ADD, CALL_ADD])]),
        (tools("named", name="add"), [hermes([CALL_ADD])], [hermes([CALL_WEATHER])]),
    ],
)
def test_hermes_and_fallback_tool_tags(
    mistral_hf: Any, executor_compiler: Any, fmt: str, req: ToolRequest, good: list[str], bad: list[str]
) -> None:
    """Hugging Face-template (Hermes) and fallback tool prompts share the `<tool_call>` layout and its tags."""
    plan = plan_tools(SimpleNamespace(tool_format="hermes", tool_call_token_id=None), req)
    assert plan is not None and plan.grammar is not None and plan.grammar.kind == "structural_tag"
    compiled = executor_compile(executor_compiler, plan.grammar)
    for text in good:
        assert takes(compiled, ids(mistral_hf, text)), (fmt, text)
    for text in bad:
        assert not takes(compiled, ids(mistral_hf, text)), (fmt, text)


def test_marker_is_registered() -> None:
    assert "trtllm_grammar" in (REPO / "pyproject.toml").read_text()
    assert Path(__file__).name == "test_trtllm_grammar.py"
