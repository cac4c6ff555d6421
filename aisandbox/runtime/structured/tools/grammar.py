"""What guided decoding must allow when tools are in play, as plain data for the grammar compiler.

Pure functions, no xgrammar import: they return JSON Schemas and xgrammar structural tags (dicts in
xgrammar's `{"type": "structural_tag", "format": {...}}` form) that the guided-decoding module compiles with
its `GrammarCompiler` for the loaded tokenizer.

Every grammar here compiles with xgrammar 0.1.25, the version TensorRT-LLM 1.2.1's executor runs, so the torch
and trtllm backends constrain tool calls the same way:

- Hermes and fallback formats: `tool_structural_tag(request, tool_format)` covers the whole output. `auto`:
  free text until `<tool_call>`, then the call is constrained (`triggered_tags`). `required` or a named
  function: the output is the call, or the calls separated by newlines when parallel calls are allowed, and
  then only EOS (`tags_with_separator`): a forced call ends at the call.
- Mistral: its call prefix `[TOOL_CALLS]` is a control token, and 0.1.25's tags begin only with strings. So
  `auto` gets no grammar (the parser finds `[TOOL_CALLS]` by token id), and a forced call appends
  `forced_prefix(tokenizer).token_ids` to the prompt and constrains what follows with the plain JSON Schema
  `tool_calls_json_schema(request, "mistral")`: the list of calls, then only EOS.

Output layouts the grammars produce (the parsers accept these and more):
- mistral: `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, {"name": "g", "arguments": {...}}]`
- hermes: `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>` per call (Qwen's layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aisandbox.runtime.structured.tools.specs import (
    FALLBACK_CALL_CLOSE,
    FALLBACK_CALL_OPEN,
    ToolFormat,
    ToolRequest,
    ToolSpec,
)

__all__ = [
    "ForcedPrefix",
    "call_object_schema",
    "forced_prefix",
    "tool_calls_json_schema",
    "tool_structural_tag",
]

HERMES_BEGIN = FALLBACK_CALL_OPEN + "\n"
"""What a Hermes-format call starts with; the forced prefix for way B."""
_HERMES_END = "\n" + FALLBACK_CALL_CLOSE


def _arguments_schema(tool: ToolSpec) -> dict[str, Any]:
    params = dict(tool.parameters) if tool.parameters else {}
    # An empty schema means "no parameters" to OpenAI; as a grammar it must still be an object.
    return params or {"type": "object", "properties": {}}


def call_object_schema(tool: ToolSpec) -> dict[str, Any]:
    """JSON Schema of one call to `tool`: `{"name": <const>, "arguments": <parameters>}`."""
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "const": tool.name}, "arguments": _arguments_schema(tool)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _one_call_schema(request: ToolRequest) -> dict[str, Any]:
    tools = request.callable_tools
    if not tools:
        raise ValueError("the request allows no tool call")
    if len(tools) == 1:
        return call_object_schema(tools[0])
    return {"anyOf": [call_object_schema(t) for t in tools]}


def tool_calls_json_schema(request: ToolRequest, tool_format: ToolFormat) -> dict[str, Any]:
    """JSON Schema of what follows the forced prefix (way B).

    `mistral`: the JSON list of calls (one item when `parallel_tool_calls` is false). `hermes`: one call object.
    Each call is `{"name": <const>, "arguments": <that tool's parameters>}`; for `required` any callable tool
    (anyOf), for a named function that one.
    """
    one = _one_call_schema(request)
    if tool_format == "mistral":
        schema: dict[str, Any] = {"type": "array", "items": one, "minItems": 1}
        if request.single_call:
            schema["maxItems"] = 1
        return schema
    return one


def _tag(begin: Any, content: Mapping[str, Any], end: Any) -> dict[str, Any]:
    return {"type": "tag", "begin": begin, "content": dict(content), "end": end}


MAX_WHITESPACE = 8
"""Most consecutive whitespace characters the arguments JSON may hold between tokens. Unbounded whitespace lets
a weak model loop on spaces and newlines until max_tokens (seen with the tiny test model); 8 still allows
`json.dumps(indent=2)` three levels deep."""


def _json(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": dict(schema), "max_whitespace_cnt": MAX_WHITESPACE}


def _call_tags(request: ToolRequest, begin: str, end: str) -> list[dict[str, Any]]:
    """One tag per callable tool: the name is fixed by the tag's begin, the arguments by the tool's schema."""
    return [
        _tag(f'{begin}{{"name": "{t.name}", "arguments": ', _json(_arguments_schema(t)), f"}}{end}")
        for t in request.callable_tools
    ]


def tool_structural_tag(request: ToolRequest, tool_format: ToolFormat) -> dict[str, Any]:
    """The xgrammar structural tag for the whole output of a Hermes or fallback-format request.

    `auto`: free text until the model writes `<tool_call>`, then the call's name and arguments are constrained.
    `required` or a named function: the output is the call (several, separated by a newline, when parallel calls
    are allowed) and nothing else: once the last call is closed only EOS is allowed. Uses only formats that
    xgrammar 0.1.25 (TensorRT-LLM 1.2.1's) compiles: string tags, `triggered_tags`, `tags_with_separator`.

    Raises:
        ValueError: An inactive request, or the `mistral` format (see `tool_calls_json_schema`: Mistral's call
            prefix is a control token, which a 0.1.25 tag cannot begin with).
    """
    if not request.active:
        raise ValueError("no grammar for a request without callable tools")
    if tool_format == "mistral":
        raise ValueError("the mistral format is constrained by tool_calls_json_schema after a forced prefix")
    tags = _call_tags(request, HERMES_BEGIN, _HERMES_END)
    if request.forced:
        fmt: dict[str, Any] = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": "\n",
            "at_least_one": True,
            "stop_after_first": request.single_call,
        }
    else:
        fmt = {
            "type": "triggered_tags",
            "triggers": [FALLBACK_CALL_OPEN],
            "tags": tags,
            "at_least_one": False,
            "stop_after_first": not request.parallel,
        }
    return {"type": "structural_tag", "format": fmt}


@dataclass(frozen=True, slots=True)
class ForcedPrefix:
    """What a forced call starts with, to append to the prompt (way B) or to force as the first tokens."""

    token_ids: tuple[int, ...]
    text: str
    """Its text; empty for Mistral's control token, which has none."""


class _PrefixTokenizer(Protocol):
    tool_format: ToolFormat
    tool_call_token_id: int | None

    def encode_fragment(self, text: str) -> list[int]: ...


def forced_prefix(tokenizer: _PrefixTokenizer) -> ForcedPrefix:
    """The call prefix of a tokenizer's format: the `[TOOL_CALLS]` token, or the tokens of `<tool_call>\\n`."""
    if tokenizer.tool_format == "mistral":
        if tokenizer.tool_call_token_id is None:
            raise ValueError("the mistral format needs the [TOOL_CALLS] token id")
        return ForcedPrefix((tokenizer.tool_call_token_id,), "")
    return ForcedPrefix(tuple(tokenizer.encode_fragment(HERMES_BEGIN)), HERMES_BEGIN)
