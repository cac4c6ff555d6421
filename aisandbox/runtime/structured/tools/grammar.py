"""What guided decoding must allow when tools are in play, as plain data for the grammar compiler.

Pure functions, no xgrammar import: they return JSON Schemas and xgrammar structural tags (dicts in
xgrammar's `{"type": "structural_tag", "format": {...}}` form) that the guided-decoding module compiles with
its `GrammarCompiler` for the loaded tokenizer.

Two ways to force a call (`tool_choice` `required` or a named function):

A. One grammar over the whole output: `tool_structural_tag(request, tool_format, token_id)`. It makes the model
   write the call prefix itself (the `[TOOL_CALLS]` token for Mistral, `<tool_call>` for Hermes), then
   `{"name": "<one of the tools>", "arguments": <that tool's schema>}`, several when parallel calls are
   allowed. The Mistral tag holds a token format, so compile it with the compiler (it needs the tokenizer
   info), not with `Grammar.from_structural_tag`. Parse the output with a normal parser.

B. Prefix in the prompt: append `forced_prefix(tokenizer).token_ids` to the prompt, constrain the output with
   `tool_structural_tag(request, tool_format, token_id, prefilled=True)` (what follows the prefix, in the
   model's own layout: Mistral writes " [" first) or, simplest to compile, with the JSON Schema
   `tool_calls_json_schema(request, tool_format)` (no leading space, and a Hermes answer then holds exactly
   one call), and parse with `create_tool_parser(..., prefilled=True)`.

With `tool_choice` `auto`, use A: the model writes text freely until it writes the call prefix, and from then on
the call's name and arguments are constrained (`strict` or not, arguments always follow their schema once a
call has started). With `none`, no grammar.

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
_MISTRAL_LIST_OPEN = " ["
_MISTRAL_SEPARATOR = ", "


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
        if not request.parallel:
            schema["maxItems"] = 1
        return schema
    return one


def _tag(begin: Any, content: Mapping[str, Any], end: Any) -> dict[str, Any]:
    return {"type": "tag", "begin": begin, "content": dict(content), "end": end}


def _const(value: str) -> dict[str, Any]:
    return {"type": "const_string", "value": value}


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


def tool_structural_tag(
    request: ToolRequest, tool_format: ToolFormat, tool_call_token_id: int | None = None, *, prefilled: bool = False
) -> dict[str, Any]:
    """The xgrammar structural tag for the output, for `auto`, `required` or a named function.

    Args:
        request: The request's tools and choice (must be active: tools given, choice not `none`).
        tool_format: `Tokenizer.tool_format`.
        tool_call_token_id: `Tokenizer.tool_call_token_id`, required for `mistral` (unless prefilled).
        prefilled: Way B: the prompt already ends with `forced_prefix(...)`; the tag covers what follows it.
            Only for forced calls.
    """
    if not request.active:
        raise ValueError("no grammar for a request without callable tools")
    if prefilled:
        if not request.forced:
            raise ValueError("a prefilled call prefix is only for forced calls")
        return {"type": "structural_tag", "format": _after_prefix(request, tool_format)}
    if tool_format == "mistral":
        if tool_call_token_id is None:
            raise ValueError("the mistral format needs the [TOOL_CALLS] token id")
        # [TOOL_CALLS] " [" call (", " call)* "]": a tag that begins with the token and ends with the "]".
        body = {"type": "sequence", "elements": [_const(_MISTRAL_LIST_OPEN), _mistral_calls(request)]}
        section = _tag({"type": "token", "token": tool_call_token_id}, body, "]")
        if request.forced:
            fmt: dict[str, Any] = section
        else:
            fmt = {
                "type": "token_triggered_tags",
                "trigger_tokens": [tool_call_token_id],
                "tags": [section],
                "stop_after_first": True,
            }
        return {"type": "structural_tag", "format": fmt}
    fmt = {
        "type": "triggered_tags",
        "triggers": [FALLBACK_CALL_OPEN],
        "tags": _call_tags(request, HERMES_BEGIN, _HERMES_END),
        "at_least_one": request.forced,
        "stop_after_first": not request.parallel,
    }
    return {"type": "structural_tag", "format": fmt}


def _mistral_calls(request: ToolRequest) -> dict[str, Any]:
    return {
        "type": "tags_with_separator",
        "tags": _call_tags(request, "", ""),
        "separator": _MISTRAL_SEPARATOR,
        "at_least_one": True,
        "stop_after_first": not request.parallel,
    }


def _after_prefix(request: ToolRequest, tool_format: ToolFormat) -> dict[str, Any]:
    """What follows the call prefix: Mistral's ` [call, ...]`, or Hermes' first call body and further calls."""
    if tool_format == "mistral":
        elements = [_const(_MISTRAL_LIST_OPEN), _mistral_calls(request), _const("]")]
        return {"type": "sequence", "elements": elements}
    first = {"type": "or", "elements": _call_tags(request, "", _HERMES_END)}
    if not request.parallel:
        return first
    more = {
        "type": "triggered_tags",
        "triggers": [FALLBACK_CALL_OPEN],
        "tags": _call_tags(request, HERMES_BEGIN, _HERMES_END),
    }
    return {"type": "sequence", "elements": [first, more]}


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
