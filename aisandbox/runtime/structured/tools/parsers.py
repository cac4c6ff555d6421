"""Incremental tool-call parsers: model output in, content text and tool-call events out.

One parser per call format (`aisandbox.runtime.structured.tools.specs.ToolFormat`):

- `MistralToolParser`: the `[TOOL_CALLS]` control token followed by a JSON list of
  `{"name": ..., "arguments": {...}}` objects. The token is recognised by its id, never by text (the
  detokenizer drops control tokens, and a model writing the letters "[TOOL_CALLS]" is not calling anything).
- `HermesToolParser`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the text (Hermes,
  Qwen, and this server's fallback prompt).

Both are plain synchronous objects that run wherever the sequence's text is made (the engine thread or a text
thread), fed once per step with that step's new token ids and their new text (`feed`), then closed with
`finish`. Use `feed_tokens` to drive one from an incremental detokenizer: it cuts a step before each trigger
token so that text before and after `[TOOL_CALLS]` is never mixed.

Events (`ToolEvent`): `ContentEvent` (text to show as `content`), `ToolCallStart` (index, id `call_...`, name)
and `ToolCallArguments` (a piece of the arguments JSON; the pieces of one call concatenate to its final
`arguments`). Rules:

- Text is content until a call starts; the call syntax itself never reaches content, and whitespace right
  before a call is dropped. Text after the calls is added to content at `finish` (models rarely write any).
- A call is announced once its name is known and is one of the allowed tools; its arguments then stream as
  they arrive. With `stream_calls=False` call events are held until the whole output has parsed (use it
  when nothing constrains the model's output, so a stream never shows a call that later turns out broken).
- Malformed output (bad JSON, an unknown function, a list that never starts, a call cut off mid-way) never
  raises: the result carries the raw text as content, no calls, and `finish_reason(...)` stays the engine's
  (`stop` or `length`). In a stream, the raw text not yet shown is sent as content at that point; call
  events already sent (only possible with `stream_calls=True`) cannot be taken back.
- `finish_reason("stop")` is `tool_calls` when calls were made.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from aisandbox.runtime.structured.tools.specs import (
    FALLBACK_CALL_CLOSE,
    FALLBACK_CALL_OPEN,
    ToolCall,
    ToolFormat,
    new_call_id,
)
from aisandbox.runtime.types import ContentEvent, ToolCallArguments, ToolCallStart, ToolEvent

__all__ = [
    "ContentEvent",
    "HermesToolParser",
    "MistralToolParser",
    "SupportsAdd",
    "ToolCallArguments",
    "ToolCallParser",
    "ToolCallStart",
    "ToolEvent",
    "ToolParseResult",
    "create_tool_parser",
    "feed_tokens",
]

log = logging.getLogger(__name__)

_WS = " \t\r\n"


@dataclass(frozen=True, slots=True)
class ToolParseResult:
    """What a parser made of a whole output."""

    content: str | None
    """`message.content`: None when the answer is calls only."""
    tool_calls: tuple[ToolCall, ...]
    events: tuple[ToolEvent, ...]
    """Events released by `finish` itself: stream them before the final chunk."""
    malformed: bool = False
    """The output started a call but did not parse; `content` is then the raw text."""

    def finish_reason(self, engine_reason: str) -> str:
        """The OpenAI finish reason: `tool_calls` when calls were made and the model stopped by itself."""
        return "tool_calls" if self.tool_calls and engine_reason == "stop" else engine_reason


class ToolCallParser(Protocol):
    """The interface every parser offers."""

    trigger_token_ids: frozenset[int]
    """Token ids that start a tool section (`feed_tokens` cuts steps before them)."""

    def feed(self, token_ids: Sequence[int], text: str) -> list[ToolEvent]:
        """Take one step's new tokens and their text; return the events they complete."""

    def finish(self) -> ToolParseResult:
        """End of the sequence: the final calls and content."""


class SupportsAdd(Protocol):
    """An incremental detokenizer (`aisandbox.runtime.text.detokenizer.IncrementalDetokenizer`)."""

    def add(self, token_ids: Sequence[int]) -> str: ...


def feed_tokens(parser: ToolCallParser, detokenizer: SupportsAdd, token_ids: Sequence[int]) -> list[ToolEvent]:
    """Detokenize one step's tokens and feed them to a parser, cut before each trigger token.

    The trigger token itself decodes to nothing; cutting there keeps the text before it (content) apart from
    the text after it (call JSON) even when a backend returns several tokens in one step.
    """
    events: list[ToolEvent] = []
    start = 0
    triggers = parser.trigger_token_ids
    for i, token in enumerate(token_ids):
        if token in triggers and i > start:
            piece = token_ids[start:i]
            events += parser.feed(piece, detokenizer.add(piece))
            start = i
    if start < len(token_ids) or not token_ids:
        piece = token_ids[start:]
        events += parser.feed(piece, detokenizer.add(piece))
    return events


# ---- one call object, scanned character by character ----


class _Malformed(Exception):
    """The model's output is not a valid call; handled inside the parser, never raised to callers."""


_ARGUMENT_KEYS = ("arguments", "parameters")


class _CallScanner:
    """Scans one JSON object `{"name": ..., "arguments": ...}` as it arrives, one character at a time.

    Knows, at depth 1 of the object, which key it is reading, so the `name` can be announced as soon as it is
    complete and the `arguments` value can be streamed as its characters come. The whole object is checked
    with `json.loads` when it closes.
    """

    def __init__(self) -> None:
        self.raw: list[str] = []
        self.state = "open"  # open, key_or_end, key, colon, value, value_or_end(after a value: , or })
        self.key: list[str] = []
        self.current_key: str | None = None
        self.value: list[str] = []
        self.nest = 0
        self.in_string = False
        self.escaped = False
        self.name: str | None = None
        self.arguments: str | None = None
        self.string_arguments = False
        self.pending_args: list[str] = []  # argument characters not yet handed out
        self.done = False

    @property
    def in_arguments(self) -> bool:
        # Only the first arguments value streams (a repeated key would make the pieces disagree with the result).
        return (
            self.state == "value"
            and self.current_key in _ARGUMENT_KEYS
            and not self.string_arguments
            and self.arguments is None
        )

    def take_fragment(self) -> str:
        """Argument text that is safe to stream now (trailing whitespace is held: it may lie outside)."""
        text = "".join(self.pending_args)
        safe = text.rstrip(_WS)
        self.pending_args = [text[len(safe) :]] if len(safe) < len(text) else []
        return safe

    def feed(self, text: str) -> int:
        """Consume characters until the object closes; return how many were consumed."""
        for i, ch in enumerate(text):
            self._char(ch)
            if self.done:
                return i + 1
        return len(text)

    def _char(self, ch: str) -> None:
        state = self.state
        if state == "open":
            if ch in _WS:
                return
            if ch != "{":
                raise _Malformed(f"expected '{{', got {ch!r}")
            self.raw.append(ch)
            self.state = "key_or_end"
            return
        self.raw.append(ch)
        if state in ("key_or_end", "key_next"):
            if ch in _WS:
                return
            if ch == '"':
                self.key = [ch]
                self.state = "key"
                self.escaped = False
                return
            if ch == "}" and state == "key_or_end":
                self._close()
                return
            raise _Malformed(f"expected a key, got {ch!r}")
        if state == "key":
            self.key.append(ch)
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                try:
                    self.current_key = json.loads("".join(self.key))
                except ValueError as exc:
                    raise _Malformed("bad key") from exc
                self.state = "colon"
            return
        if state == "colon":
            if ch in _WS:
                return
            if ch != ":":
                raise _Malformed(f"expected ':', got {ch!r}")
            self.state = "value_start"
            return
        if state == "value_start":
            if ch in _WS:
                return
            self.state = "value"
            self.value = []
            self.nest = 0
            self.in_string = self.escaped = False
            if self.current_key in _ARGUMENT_KEYS:
                self.string_arguments = ch == '"'
            self._value_char(ch)
            return
        if state == "value":
            self._value_char(ch)
            return
        raise _Malformed(f"unexpected {ch!r}")  # pragma: no cover - every state is handled above

    def _value_char(self, ch: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.nest += 1
        elif ch in "}]":
            if self.nest == 0:
                if ch == "]":
                    raise _Malformed("unbalanced ']'")
                self._end_value()
                self._close()
                return
            self.nest -= 1
        elif ch == "," and self.nest == 0:
            self._end_value()
            self.state = "key_next"
            return
        self.value.append(ch)
        if self.in_arguments:
            self.pending_args.append(ch)

    def _end_value(self) -> None:
        text = "".join(self.value).strip(_WS)
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise _Malformed(f"bad value for {self.current_key!r}") from exc
        if self.current_key == "name":
            if not isinstance(value, str) or not value:
                raise _Malformed("the name is not a string")
            self.name = value
        elif self.current_key in _ARGUMENT_KEYS and self.arguments is None:
            if isinstance(value, str):
                # Some models send the arguments as a JSON-encoded string, as OpenAI's wire format does.
                try:
                    json.loads(value)
                except ValueError as exc:
                    raise _Malformed("string arguments are not JSON") from exc
                self.arguments = value
            else:
                self.arguments = text
        if self.current_key in _ARGUMENT_KEYS:
            # The value is over: whitespace after it lies outside the arguments; the rest is still to hand out.
            self.pending_args = list("".join(self.pending_args).rstrip(_WS))
        self.current_key = None

    def _close(self) -> None:
        try:
            json.loads("".join(self.raw))
        except ValueError as exc:
            raise _Malformed("the call is not valid JSON") from exc
        if self.name is None:
            raise _Malformed("the call has no name")
        if self.arguments is None:
            self.arguments = "{}"
        self.done = True


# ---- the shared machinery of both formats ----


class _BaseParser:
    """Content hold-back, call bookkeeping, buffering and the malformed fallback, shared by both formats."""

    trigger_token_ids: frozenset[int] = frozenset()

    def __init__(
        self,
        tool_names: Collection[str] | None = None,
        *,
        parallel: bool = True,
        stream_calls: bool = True,
        prefilled: bool = False,
        id_factory: Callable[[], str] = new_call_id,
    ) -> None:
        """Create a parser for one sequence.

        Args:
            tool_names: The functions a call may name (others make the output malformed); None allows any.
            parallel: `parallel_tool_calls`; when False only the first call is kept.
            stream_calls: Stream call events as they parse (True) or hold them until `finish` (False).
            prefilled: The prompt already ends with the format's call prefix (`[TOOL_CALLS]` or `<tool_call>`),
                as `structured.tools.grammar.forced_prefix` makes it for a forced call; the output starts
                inside a call.
            id_factory: Makes each call's id (tests pass a deterministic one).
        """
        self._names = frozenset(tool_names) if tool_names is not None else None
        self._parallel = parallel
        self._stream_calls = stream_calls
        self._new_id = id_factory
        self._raw: list[str] = []  # every character of text fed (control tokens decode to nothing)
        self._shown = 0  # characters of _raw already emitted as content (content is a prefix of _raw)
        self._held_ws = ""  # whitespace after the shown content, held until we know it is not before a call
        self._after: list[str] = []  # text after the first call section; joins content at finish
        self._calls: list[ToolCall] = []
        self._held_events: list[ToolEvent] = []
        self._scanner: _CallScanner | None = None
        self._announced = False
        self._call_id = ""
        self._failed = False
        self._done = False  # no more calls are read (parallel=False after the first, or a closed list)
        self._seen_call = prefilled

    # -- helpers for subclasses --

    def _content(self, text: str, out: list[ToolEvent]) -> None:
        """Plain text outside any call."""
        if not text:
            return
        if self._seen_call:
            self._after.append(text)
            return
        stripped = text.rstrip(_WS)
        if stripped:
            out.append(ContentEvent(self._held_ws + stripped))
            self._shown += len(self._held_ws) + len(stripped)
            self._held_ws = text[len(stripped) :]
        else:
            self._held_ws += text

    def _start_call(self) -> None:
        self._seen_call = True
        self._scanner = _CallScanner()
        self._announced = False

    def _scan(self, text: str, out: list[ToolEvent]) -> int:
        """Feed call text to the current scanner; return the characters it consumed."""
        scanner = self._scanner
        assert scanner is not None
        used = scanner.feed(text)
        index = len(self._calls)
        if not self._announced and scanner.name is not None:
            if self._names is not None and scanner.name not in self._names:
                raise _Malformed(f"unknown function {scanner.name!r}")
            self._call_id = self._new_id()
            self._emit(ToolCallStart(index, self._call_id, scanner.name), out)
            self._announced = True
        if self._announced and not scanner.string_arguments:
            fragment = scanner.take_fragment()
            if fragment:
                self._emit(ToolCallArguments(index, fragment), out)
        if scanner.done:
            assert scanner.name is not None and scanner.arguments is not None
            if scanner.string_arguments:
                self._emit(ToolCallArguments(index, scanner.arguments), out)
            self._calls.append(ToolCall(self._call_id, scanner.name, scanner.arguments))
            self._scanner = None
            if not self._parallel:
                self._done = True
        return used

    def _emit(self, event: ToolEvent, out: list[ToolEvent]) -> None:
        if self._stream_calls:
            out.append(event)
        else:
            self._held_events.append(event)

    def _fail(self, reason: str, out: list[ToolEvent]) -> None:
        """Switch to the fallback: everything not yet shown becomes content, and so does what follows."""
        log.info("tool-call output did not parse (%s); returning it as text", reason)
        self._failed = True
        self._held_events.clear()
        rest = "".join(self._raw)[self._shown :]
        if rest:
            out.append(ContentEvent(rest))
            self._shown += len(rest)
        self._held_ws = ""

    def _pass_through(self, text: str, out: list[ToolEvent]) -> None:
        if text:
            out.append(ContentEvent(text))
            self._shown += len(text)

    def _result(self, events: list[ToolEvent], incomplete: str | None) -> ToolParseResult:
        if incomplete is not None and not self._failed:
            self._fail(incomplete, events)
        if self._failed or not self._calls:
            if not self._failed:
                # No call at all: a plain answer (held whitespace included, as without tools).
                tail = self._held_ws + "".join(self._after)
                if tail:
                    events.append(ContentEvent(tail))
                self._held_ws = ""
            text = "".join(self._raw)
            return ToolParseResult(text, (), tuple(events), malformed=self._failed)
        events.extend(self._held_events)
        self._held_events.clear()
        shown = "".join(self._raw)[: self._shown]
        after = "".join(self._after).strip(_WS)
        if after:
            events.append(ContentEvent(("\n" if shown else "") + after))
        content = "\n".join(part for part in (shown, after) if part) or None
        return ToolParseResult(content, tuple(self._calls), tuple(events))


class MistralToolParser(_BaseParser):
    """`[TOOL_CALLS]` (by token id) followed by a JSON list of calls."""

    def __init__(self, tool_call_token_id: int, tool_names: Collection[str] | None = None, **kwargs: object) -> None:
        """See `_BaseParser.__init__`; `tool_call_token_id` is the tokenizer's `[TOOL_CALLS]` id."""
        super().__init__(tool_names, **kwargs)  # type: ignore[arg-type]
        self.trigger_token_ids = frozenset({tool_call_token_id})
        self._state = "list_start" if self._seen_call else "content"  # content, list_start, item, sep, done
        self._lone = False  # a lone call object instead of a list

    def feed(self, token_ids: Sequence[int], text: str) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        # The trigger should open the step (feed_tokens cuts steps so); if a caller did not cut, the step's
        # text is all taken as call text.
        restart = self._state == "content" or (self._state == "done" and not self._done)
        if not self._failed and restart and any(t in self.trigger_token_ids for t in token_ids):
            self._state = "list_start"
            self._seen_call = True
            self._held_ws = ""
        self._raw.append(text)
        if self._failed:
            self._pass_through(text, out)
            return out
        try:
            self._text(text, out)
        except _Malformed as exc:
            self._fail(str(exc), out)
        return out

    def _text(self, text: str, out: list[ToolEvent]) -> None:
        i = 0
        while i < len(text):
            state = self._state
            if state == "content":
                self._content(text[i:], out)
                return
            if state == "done":
                self._after.append(text[i:])
                return
            if self._scanner is not None:
                i += self._scan(text[i:], out)
                if self._scanner is None:
                    self._state = "done" if self._done or self._lone else "sep"
                continue
            ch = text[i]
            i += 1
            if ch in _WS:
                continue
            if state == "list_start":
                if ch == "[":
                    self._state = "item"
                elif ch == "{":  # a lone object instead of a list: accepted
                    self._start_call()
                    self._lone = True
                    i -= 1
                else:
                    raise _Malformed(f"expected a JSON list after [TOOL_CALLS], got {ch!r}")
            elif state == "item":
                if ch != "{":
                    raise _Malformed(f"expected a call object, got {ch!r}")
                self._start_call()
                i -= 1
            elif state == "sep":
                if ch == ",":
                    self._state = "item"
                elif ch == "]":
                    self._state = "done"
                else:
                    raise _Malformed(f"expected ',' or ']', got {ch!r}")

    def finish(self) -> ToolParseResult:
        events: list[ToolEvent] = []
        incomplete = None
        if not self._failed:
            if self._scanner is not None:
                incomplete = "the output ended inside a call"
            elif self._state in ("list_start", "item") or (self._state != "content" and not self._calls):
                incomplete = "the output ended before any call"
            # state "sep" at the end: the closing ']' is missing; the complete calls stand.
        if self._state == "done" or self._state == "sep":
            # Text after the list is not content in Mistral's format (the model ends its turn there).
            self._after.clear()
        return self._result(events, incomplete)


class HermesToolParser(_BaseParser):
    """`<tool_call>{json}</tool_call>` blocks found in the text."""

    def __init__(self, tool_names: Collection[str] | None = None, **kwargs: object) -> None:
        """See `_BaseParser.__init__`."""
        super().__init__(tool_names, **kwargs)  # type: ignore[arg-type]
        self._state = "object" if self._seen_call else "content"  # content, object, close, done
        self._buf = ""  # text held in "content" (a possible partial <tool_call>) or "close"

    def feed(self, token_ids: Sequence[int], text: str) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        self._raw.append(text)
        if self._failed:
            self._pass_through(text, out)
            return out
        try:
            self._text(text, out)
        except _Malformed as exc:
            self._fail(str(exc), out)
        return out

    def _text(self, text: str, out: list[ToolEvent]) -> None:
        while text:
            if self._state == "done":
                return  # parallel calls off: what follows the first call is dropped
            if self._state == "content":
                buf = self._buf + text
                text = ""
                at = buf.find(FALLBACK_CALL_OPEN)
                if at >= 0:
                    self._content(buf[:at], out)
                    self._buf = ""
                    self._held_ws = ""
                    self._state = "object"
                    self._start_call()
                    text = buf[at + len(FALLBACK_CALL_OPEN) :]
                    continue
                keep = _partial_suffix(buf, FALLBACK_CALL_OPEN)
                self._content(buf[: len(buf) - keep], out)
                self._buf = buf[len(buf) - keep :]
                return
            if self._state == "object":
                if self._scanner is None:
                    self._start_call()
                used = self._scan(text, out)
                text = text[used:]
                if self._scanner is None:
                    self._state = "close"
                    self._buf = ""
                continue
            # close: whitespace, then </tool_call>
            buf = (self._buf + text).lstrip(_WS)
            text = ""
            if buf.startswith(FALLBACK_CALL_CLOSE):
                text = buf[len(FALLBACK_CALL_CLOSE) :]
                self._buf = ""
                self._state = "done" if self._done else "content"
            elif FALLBACK_CALL_CLOSE.startswith(buf):
                self._buf = buf
            else:
                raise _Malformed(f"expected {FALLBACK_CALL_CLOSE}, got {buf[:20]!r}")

    def finish(self) -> ToolParseResult:
        events: list[ToolEvent] = []
        incomplete = None
        if not self._failed:
            if self._state == "object":
                incomplete = "the output ended inside a call"
            elif self._state == "content" and self._buf:
                self._content(self._buf, events)  # a partial "<tool_" that never became a call
                self._buf = ""
            # state "close" at the end: </tool_call> is missing; the complete call stands.
        return self._result(events, incomplete)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def create_tool_parser(
    tool_format: ToolFormat,
    tool_call_token_id: int | None,
    tool_names: Collection[str] | None,
    **options: object,
) -> ToolCallParser:
    """The parser for a tokenizer's call format.

    Args:
        tool_format: `Tokenizer.tool_format`.
        tool_call_token_id: `Tokenizer.tool_call_token_id` (required for `mistral`).
        tool_names: `ToolRequest.callable_tools` names.
        options: `parallel`, `stream_calls`, `prefilled`, `id_factory` (see `_BaseParser.__init__`).
    """
    if tool_format == "mistral":
        if tool_call_token_id is None:
            raise ValueError("the mistral call format needs the [TOOL_CALLS] token id")
        return MistralToolParser(tool_call_token_id, tool_names, **options)
    return HermesToolParser(tool_names, **options)
