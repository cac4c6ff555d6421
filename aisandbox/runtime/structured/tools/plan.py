"""Function calling for one request, in the few calls the request path and the text layer make.

Request path (once per request, where the prompt is built)::

    tools = body.tool_request()                                   # ToolRequest | None
    messages = body.conversation(with_tools=True)
    prompt_ids = tokenizer.encode_chat(messages, tools)
    plan = plan_tools(tokenizer, tools)                           # None: no tool calling for this request
    prompt_ids += plan.prompt_suffix                              # a forced Mistral call's [TOOL_CALLS]
    if plan is not None and plan.grammar is not None:
        ...hand plan.grammar (a GrammarSpec) to guided decoding...

Text layer (per sequence, in the engine or text thread; replaces `detok.add` / `detok.flush`)::

    text_state = plan.new_text(detokenizer, guided=...)           # ToolCallText
    content, call_events = text_state.add(shown_token_ids)        # each step; stop strings apply to content
    end = text_state.finish(engine_finish_reason)                 # last step: end.text, end.events, end.calls,
                                                                  # end.finish_reason (TOOL_CALLS when calls)

The HTTP layer turns `call_events` into stream deltas with the HTTP schemas' `chat_deltas` and the final
calls into `message.tool_calls` with `chat_response(..., tool_calls=...)`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from aisandbox.runtime.structured.tools.grammar import tool_calls_json_schema, tool_structural_tag
from aisandbox.runtime.structured.tools.parsers import (
    ContentEvent,
    SupportsAdd,
    ToolCallParser,
    ToolEvent,
    create_tool_parser,
    feed_tokens,
)
from aisandbox.runtime.structured.tools.specs import ToolCall, ToolFormat, ToolRequest
from aisandbox.runtime.types import FinishReason, GrammarSpec

__all__ = ["ToolCallText", "ToolPlan", "ToolTextEnd", "plan_tools"]


class _ToolTokenizer(Protocol):
    tool_format: ToolFormat
    tool_call_token_id: int | None


class _Flushable(SupportsAdd, Protocol):
    def flush(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ToolTextEnd:
    """The end of one sequence's output, with tools."""

    text: str
    """Content still to send (text after the calls, or the raw text of malformed calls)."""
    events: tuple[ToolEvent, ...]
    """Call events still to send (all of them when calls were held until the end)."""
    calls: tuple[ToolCall, ...]
    """Every call the sequence made, for `message.tool_calls`."""
    content: str | None
    """The whole `message.content` (None when the answer is calls only)."""
    finish_reason: FinishReason
    malformed: bool


class ToolCallText:
    """One sequence's text with tools: token ids in, content and call events out. Plain and synchronous."""

    def __init__(self, parser: ToolCallParser, detokenizer: _Flushable) -> None:
        self._parser = parser
        self._detok = detokenizer

    def add(self, token_ids: Sequence[int]) -> tuple[str, tuple[ToolEvent, ...]]:
        """One step's shown tokens (the stop token left out) -> (content text, call events)."""
        return _split(feed_tokens(self._parser, self._detok, token_ids))

    def finish(self, engine_reason: FinishReason) -> ToolTextEnd:
        """The sequence ended (`engine_reason` from the backend or the stop-string matcher)."""
        events = self._parser.feed((), self._detok.flush())
        result = self._parser.finish()
        text, calls = _split([*events, *result.events])
        reason = result.finish_reason(engine_reason.value)
        return ToolTextEnd(text, calls, result.tool_calls, result.content, FinishReason(reason), result.malformed)


def _split(events: Sequence[ToolEvent]) -> tuple[str, tuple[ToolEvent, ...]]:
    content = "".join(e.text for e in events if isinstance(e, ContentEvent))
    return content, tuple(e for e in events if not isinstance(e, ContentEvent))


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request does function calling on the loaded tokenizer."""

    request: ToolRequest
    tool_format: ToolFormat
    tool_call_token_id: int | None
    grammar: GrammarSpec | None
    """What guided decoding must allow: a structural tag over the whole output (Hermes, fallback), the JSON
    Schema of the call list after `prompt_suffix` (a forced Mistral call), or None (Mistral `auto`)."""
    prompt_suffix: tuple[int, ...] = ()
    """Token ids to append to the prompt: the call prefix of a forced Mistral call, so the output is the list."""

    def new_parser(self, *, guided: bool) -> ToolCallParser:
        """A parser for one sequence.

        Args:
            guided: Whether `grammar` is enforced on this sequence. Then calls stream as they are written (the
                grammar guarantees they parse); otherwise call events are held until the output has parsed.
        """
        return create_tool_parser(
            self.tool_format,
            self.tool_call_token_id,
            [t.name for t in self.request.callable_tools],
            parallel=self.request.parallel,
            stream_calls=guided,
            prefilled=bool(self.prompt_suffix),
        )

    def new_text(self, detokenizer: _Flushable, *, guided: bool) -> ToolCallText:
        """The per-sequence text state (a parser around the sequence's detokenizer)."""
        return ToolCallText(self.new_parser(guided=guided), detokenizer)


def plan_tools(tokenizer: _ToolTokenizer, request: ToolRequest | None) -> ToolPlan | None:
    """The plan for a request, or None when it has no callable tools (no tools, or `tool_choice` none)."""
    if request is None or not request.active:
        return None
    fmt, token_id = tokenizer.tool_format, tokenizer.tool_call_token_id
    if fmt != "mistral":
        tag = json.dumps(tool_structural_tag(request, fmt), separators=(",", ":"))
        return ToolPlan(request, fmt, token_id, GrammarSpec("structural_tag", tag))
    if not request.forced:
        return ToolPlan(request, fmt, token_id, None)
    schema = json.dumps(tool_calls_json_schema(request, fmt), separators=(",", ":"))
    if token_id is None:
        raise ValueError("the mistral format needs the [TOOL_CALLS] token id")
    return ToolPlan(request, fmt, token_id, GrammarSpec("tool_calls", schema), (token_id,))
