"""The incremental tool-call parsers: whole, streamed in random chunks, malformed, parallel."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Sequence

import pytest

from aisandbox.runtime.structured.tools.parsers import (
    ContentEvent,
    HermesToolParser,
    MistralToolParser,
    ToolCallArguments,
    ToolCallParser,
    ToolCallStart,
    ToolEvent,
    ToolParseResult,
    create_tool_parser,
    feed_tokens,
)
from aisandbox.runtime.structured.tools.plan import ToolPlan, plan_tools
from aisandbox.runtime.structured.tools.specs import ToolCall, ToolChoice, ToolRequest, ToolSpec
from aisandbox.runtime.types import FinishReason

TC = 5  # [TOOL_CALLS] in Mistral's v3 vocabulary
TEXT = 100  # any ordinary token id
NAMES = {"get_weather", "add"}

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], "note": "a \\"quoted\\" }"}}'
ADD = '{"arguments": {"a": 1, "b": -2.5e3}, "name": "add", "id": "abcdefgh1"}'
WEATHER_ARGS = '{"city": "Paris", "days": [1, 2], "note": "a \\"quoted\\" }"}'
ADD_ARGS = '{"a": 1, "b": -2.5e3}'


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def mistral(**kw: object) -> MistralToolParser:
    return MistralToolParser(TC, NAMES, id_factory=ids(), **kw)  # type: ignore[arg-type]


def hermes(**kw: object) -> HermesToolParser:
    return HermesToolParser(NAMES, id_factory=ids(), **kw)  # type: ignore[arg-type]


def chunks(text: str, rng: random.Random | None) -> list[str]:
    """The text in one piece, or in random pieces of 1..7 characters."""
    if rng is None:
        return [text]
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        out.append(text[i : i + n])
        i += n
    return out


def run(parser: ToolCallParser, pieces: Sequence[tuple[Sequence[int], str]]) -> tuple[list[ToolEvent], ToolParseResult]:
    events: list[ToolEvent] = []
    for token_ids, text in pieces:
        events += parser.feed(token_ids, text)
    result = parser.finish()
    return events + list(result.events), result


def mistral_pieces(before: str, after: str | None, rng: random.Random | None) -> list[tuple[list[int], str]]:
    pieces: list[tuple[list[int], str]] = [([TEXT], c) for c in chunks(before, rng)] if before else []
    if after is not None:
        pieces.append(([TC], ""))
        pieces += [([TEXT], c) for c in chunks(after, rng)]
    return pieces


def hermes_pieces(text: str, rng: random.Random | None) -> list[tuple[list[int], str]]:
    return [([TEXT], c) for c in chunks(text, rng)]


def assemble(events: list[ToolEvent]) -> tuple[str, list[dict[str, str]]]:
    """What a client makes of the events: content, and calls by index."""
    content = "".join(e.text for e in events if isinstance(e, ContentEvent))
    calls: dict[int, dict[str, str]] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index not in calls, "a call started twice"
            assert e.index == len(calls), "calls start in index order"
            calls[e.index] = {"id": e.id, "name": e.name, "arguments": ""}
        elif isinstance(e, ToolCallArguments):
            assert e.index in calls, "arguments before the call started"
            calls[e.index]["arguments"] += e.fragment
    return content, [calls[i] for i in sorted(calls)]


SEEDS = [None, *range(8)]  # None: whole; ints: random chunk sizes


@pytest.mark.parametrize("seed", SEEDS)
def test_mistral_parallel_calls(seed: int | None) -> None:
    rng = None if seed is None else random.Random(seed)
    events, result = run(mistral(), mistral_pieces("", f" [{WEATHER}, {ADD}]", rng))
    assert result.tool_calls == (
        ToolCall("call_0", "get_weather", WEATHER_ARGS),
        ToolCall("call_1", "add", ADD_ARGS),
    )
    assert result.content is None and not result.malformed
    assert result.finish_reason("stop") == "tool_calls"
    content, calls = assemble(events)
    assert content == ""
    assert calls == [
        {"id": "call_0", "name": "get_weather", "arguments": WEATHER_ARGS},
        {"id": "call_1", "name": "add", "arguments": ADD_ARGS},
    ]
    for call in calls:
        json.loads(call["arguments"])
    if seed is not None:
        assert sum(isinstance(e, ToolCallArguments) and e.index == 0 for e in events) > 1, "arguments stream"


@pytest.mark.parametrize("seed", SEEDS)
def test_mistral_text_before_the_call_is_content(seed: int | None) -> None:
    rng = None if seed is None else random.Random(seed)
    events, result = run(mistral(), mistral_pieces("Let me look. \n", f"[{WEATHER}]", rng))
    assert result.content == "Let me look."
    content, calls = assemble(events)
    assert content == "Let me look." and [c["name"] for c in calls] == ["get_weather"]


@pytest.mark.parametrize("seed", SEEDS)
def test_mistral_without_a_call_is_plain_text(seed: int | None) -> None:
    rng = None if seed is None else random.Random(seed)
    text = "The weather is [fine] and {ok}.\n"
    events, result = run(mistral(), mistral_pieces(text, None, rng))
    assert result.content == text and result.tool_calls == () and not result.malformed
    assert result.finish_reason("stop") == "stop" and result.finish_reason("length") == "length"
    assert assemble(events) == (text, [])


def test_mistral_call_is_found_by_token_id_never_by_text() -> None:
    text = '[TOOL_CALLS] [{"name": "add", "arguments": {}}]'
    events, result = run(mistral(), [([TEXT], text)])
    assert result.tool_calls == () and result.content == text
    # ... and the token's own text never reaches content (the detokenizer drops it: "" here).
    events, result = run(mistral(), mistral_pieces("", ' [{"name": "add", "arguments": {}}]', None))
    assert "[TOOL_CALLS]" not in assemble(events)[0] and result.tool_calls[0].name == "add"


@pytest.mark.parametrize(
    "after",
    [
        ' [{"name": "get_weather", "arguments": {"city": Paris}}]',  # bad JSON inside the arguments
        " hello there",  # no list
        ' [{"name": "launch_missiles", "arguments": {}}]',  # unknown function
        ' [{"arguments": {"a": 1}}]',  # no name
        ' [{"name": "add", "arguments": {"a": 1}',  # cut off inside the call
        " [",  # cut off before any call
        ' [{"name": "add", "arguments": {"a": 1}}}',  # stray brace
    ],
)
@pytest.mark.parametrize("seed", [None, 1, 2])
def test_mistral_malformed_output_is_returned_as_text(after: str, seed: int | None) -> None:
    rng = None if seed is None else random.Random(seed)
    events, result = run(mistral(stream_calls=False), mistral_pieces("Hm.", after, rng))
    assert result.malformed and result.tool_calls == ()
    assert result.content == "Hm." + after
    assert result.finish_reason("stop") == "stop"
    assert assemble(events) == ("Hm." + after, [])  # held call events are never sent


def test_mistral_missing_closing_bracket_keeps_complete_calls() -> None:
    _, result = run(mistral(), mistral_pieces("", f" [{WEATHER}", None))
    assert [c.name for c in result.tool_calls] == ["get_weather"] and not result.malformed


def test_repeated_arguments_key_streams_the_first() -> None:
    after = ' [{"name": "add", "arguments": {"a": 1}, "parameters": {"b": 2}}]'
    events, result = run(mistral(), mistral_pieces("", after, random.Random(0)))
    assert result.tool_calls[0].arguments_json == '{"a": 1}' == assemble(events)[1][0]["arguments"]


def test_mistral_lone_object_and_string_arguments() -> None:
    after = ' {"name": "add", "arguments": "{\\"a\\": 1}"}'
    events, result = run(mistral(), mistral_pieces("", after, None))
    assert result.tool_calls == (ToolCall("call_0", "add", '{"a": 1}'),)
    assert assemble(events)[1][0]["arguments"] == '{"a": 1}'


def test_mistral_parallel_off_keeps_the_first_call() -> None:
    events, result = run(mistral(parallel=False), mistral_pieces("", f" [{WEATHER}, {ADD}]", None))
    assert [c.name for c in result.tool_calls] == ["get_weather"]
    assert [c["name"] for c in assemble(events)[1]] == ["get_weather"]


def test_mistral_prefilled_starts_inside_the_call() -> None:
    parser = mistral(prefilled=True)
    events, result = run(parser, [([TEXT], f" [{ADD}]")])
    assert [c.name for c in result.tool_calls] == ["add"] and result.content is None


def test_mistral_length_cut_reports_length() -> None:
    _, result = run(mistral(), mistral_pieces("", ' [{"name": "add", "argu', None))
    assert result.malformed and result.finish_reason("length") == "length"


def test_mistral_stream_calls_false_holds_events_until_finish() -> None:
    parser = mistral(stream_calls=False)
    streamed = []
    for token_ids, text in mistral_pieces("", f" [{WEATHER}]", random.Random(3)):
        streamed += parser.feed(token_ids, text)
    assert streamed == []
    result = parser.finish()
    assert assemble(list(result.events))[1][0]["arguments"] == WEATHER_ARGS


@pytest.mark.parametrize("seed", SEEDS)
def test_hermes_parallel_calls_with_text_before(seed: int | None) -> None:
    rng = None if seed is None else random.Random(seed)
    text = f"Sure.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{ADD}</tool_call>\n"
    events, result = run(hermes(), hermes_pieces(text, rng))
    assert result.tool_calls == (
        ToolCall("call_0", "get_weather", WEATHER_ARGS),
        ToolCall("call_1", "add", ADD_ARGS),
    )
    assert result.content == "Sure." and result.finish_reason("stop") == "tool_calls"
    content, calls = assemble(events)
    assert content == "Sure."
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", WEATHER_ARGS), ("add", ADD_ARGS)]
    assert "<tool_call>" not in content


@pytest.mark.parametrize("seed", SEEDS)
def test_hermes_plain_text_and_lookalikes(seed: int | None) -> None:
    rng = None if seed is None else random.Random(seed)
    text = "Use <tool and <b>bold</b>; 1 < 2.  "
    events, result = run(hermes(), hermes_pieces(text, rng))
    assert result.content == text and result.tool_calls == ()
    assert assemble(events) == (text, [])


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "add", "arguments": {"a": }}</tool_call>',
        "<tool_call>not json</tool_call>",
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "add", "arguments": {"a": 1}} trailing</tool_call>',
        '<tool_call>{"name": "add", "arguments": {"a": 1',
    ],
)
@pytest.mark.parametrize("seed", [None, 4, 5])
def test_hermes_malformed_output_is_returned_as_text(text: str, seed: int | None) -> None:
    rng = None if seed is None else random.Random(seed)
    events, result = run(hermes(stream_calls=False), hermes_pieces("Ok " + text, rng))
    assert result.malformed and result.tool_calls == () and result.content == "Ok " + text
    assert result.finish_reason("stop") == "stop"
    assert assemble(events) == ("Ok " + text, [])


def test_hermes_malformed_after_streamed_start_never_raises() -> None:
    text = 'A<tool_call>{"name": "add", "arguments": {"a": nope}}</tool_call>'
    events, result = run(hermes(), hermes_pieces(text, random.Random(0)))
    assert result.malformed and result.content == text
    # The stream showed the start of the call, then the raw text as content: every character once.
    assert assemble(events)[0] == text


def test_hermes_missing_close_tag_keeps_the_call() -> None:
    _, result = run(hermes(), hermes_pieces(f"<tool_call>\n{ADD}\n", None))
    assert [c.name for c in result.tool_calls] == ["add"]


def test_hermes_prefilled_and_parallel_off() -> None:
    text = f"\n{ADD}\n</tool_call>\n<tool_call>{WEATHER}</tool_call>"
    _, result = run(hermes(prefilled=True, parallel=False), hermes_pieces(text, None))
    assert [c.name for c in result.tool_calls] == ["add"]


def test_text_after_calls_joins_content() -> None:
    _, result = run(hermes(), hermes_pieces(f"<tool_call>{ADD}</tool_call>\nDone.", None))
    assert result.content == "Done." and len(result.tool_calls) == 1


def test_any_name_allowed_without_a_tool_list() -> None:
    parser = create_tool_parser("hermes", None, None, id_factory=ids())
    _, result = run(parser, hermes_pieces('<tool_call>{"name": "x", "arguments": {}}</tool_call>', None))
    assert result.tool_calls == (ToolCall("call_0", "x", "{}"),)
    with pytest.raises(ValueError):
        create_tool_parser("mistral", None, None)


def test_default_ids_look_like_openai() -> None:
    _, result = run(MistralToolParser(TC, None), mistral_pieces("", f" [{ADD}, {ADD}]", None))
    a, b = (c.id for c in result.tool_calls)
    assert a.startswith("call_") and len(a) == 29 and a != b


class _FakeDetok:
    """Stands in for IncrementalDetokenizer: each id is one character, the trigger none."""

    def add(self, token_ids: Sequence[int]) -> str:
        return "".join("" if t == TC else chr(t) for t in token_ids)


def test_feed_tokens_cuts_steps_before_the_trigger() -> None:
    output = [ord(c) for c in "Hi "] + [TC] + [ord(c) for c in ' [{"name": "add", "arguments": {}}]']
    for step in (1, 2, 5, len(output)):
        parser, detok, events = mistral(), _FakeDetok(), []
        for i in range(0, len(output), step):
            events += feed_tokens(parser, detok, output[i : i + step])
        result = parser.finish()
        assert result.content == "Hi" and [c.name for c in result.tool_calls] == ["add"], step
        assert assemble(events + list(result.events))[0] == "Hi"


# ---- the per-sequence text state and the plan (aisandbox.runtime.structured.tools.plan) ----


class _FlushDetok(_FakeDetok):
    def flush(self) -> str:
        return ""


def _plan(fmt: str, choice: str = "auto", parallel: bool = True) -> ToolPlan:
    from types import SimpleNamespace

    tools = ToolRequest((ToolSpec("add"), ToolSpec("get_weather")), ToolChoice(choice), parallel)  # type: ignore[arg-type]
    plan = plan_tools(SimpleNamespace(tool_format=fmt, tool_call_token_id=TC), tools)  # type: ignore[arg-type]
    assert plan is not None and (plan.grammar is not None) is (fmt != "mistral" or choice != "auto")
    return plan


def test_forced_mistral_plan_prefills_the_call_prefix() -> None:
    plan = _plan("mistral", "required", parallel=False)
    assert plan.prompt_suffix == (TC,) and plan.grammar is not None and plan.grammar.kind == "tool_calls"
    assert json.loads(plan.grammar.source)["maxItems"] == 1
    state = plan.new_text(_FlushDetok(), guided=True)
    text, events = state.add([ord(c) for c in f" [{ADD}]"])
    end = state.finish(FinishReason.STOP)
    assert text + end.text == "" and end.content is None and [c.name for c in end.calls] == ["add"]
    assert end.finish_reason is FinishReason.TOOL_CALLS


def test_plan_is_none_without_callable_tools() -> None:
    from types import SimpleNamespace

    tok = SimpleNamespace(tool_format="hermes", tool_call_token_id=None)
    assert plan_tools(tok, None) is None  # type: ignore[arg-type]
    assert plan_tools(tok, ToolRequest((ToolSpec("add"),), ToolChoice("none"))) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("guided", [True, False])
def test_tool_call_text_end_to_end(guided: bool) -> None:
    state = _plan("mistral").new_text(_FlushDetok(), guided=guided)
    output = [ord(c) for c in "Hi"] + [TC] + [ord(c) for c in f" [{ADD}]"]
    content, calls = "", []
    for i in range(0, len(output), 3):
        text, events = state.add(output[i : i + 3])
        content += text
        calls += events
        assert all(not isinstance(e, ContentEvent) for e in events)
    end = state.finish(FinishReason.STOP)
    assert content + end.text == "Hi" and end.content == "Hi"
    assert end.finish_reason is FinishReason.TOOL_CALLS and [c.name for c in end.calls] == ["add"]
    assert bool(calls) is guided  # unguided: call events come only at the end
    assert assemble([*calls, *end.events])[1][0]["arguments"] == ADD_ARGS


def test_tool_call_text_malformed_and_length() -> None:
    state = _plan("hermes").new_text(_FlushDetok(), guided=False)
    text, _ = state.add([ord(c) for c in 'x<tool_call>{"name": "add", "argu'])
    end = state.finish(FinishReason.LENGTH)
    assert text + end.text == 'x<tool_call>{"name": "add", "argu' and end.calls == ()
    assert end.finish_reason is FinishReason.LENGTH and end.malformed
