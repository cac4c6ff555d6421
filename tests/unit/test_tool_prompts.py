"""Tools in the prompt, by tokenizer kind, and calls read back through the real detokenizer."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from aisandbox.runtime.structured.tools.parsers import (
    ContentEvent,
    ToolCallArguments,
    ToolEvent,
    create_tool_parser,
    feed_tokens,
)
from aisandbox.runtime.structured.tools.specs import (
    MistralIdMap,
    ToolCall,
    ToolChoice,
    ToolRequest,
    ToolSpec,
    is_mistral_id,
)
from aisandbox.runtime.text.detokenizer import IncrementalDetokenizer
from aisandbox.runtime.text.tokenizer import HFTokenizer, MistralCommonTokenizer, load_tokenizer
from tests.conftest import REPO, mistral_v3_tokenizer_file
from tests.unit.tiny_hf import CHATML, MISTRAL_TOOLS, QWEN_TOOLS, build_tiny_hf_tokenizer

WEATHER = ToolSpec(
    "get_weather",
    "Current weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TOOLS = ToolRequest((WEATHER,))
CLIENT_ID = "call_Zx81pQm2LkT0aB9cD3eF4gH5"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": (ToolCall(CLIENT_ID, "get_weather", '{"city": "Paris"}'),)},
    {"role": "tool", "tool_call_id": CLIENT_ID, "content": '{"temp_c": 21}', "name": "get_weather"},
]


@pytest.fixture(scope="module")
def mistral_tok() -> MistralCommonTokenizer:
    return MistralCommonTokenizer(mistral_v3_tokenizer_file())


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-hf")
    templates = {"chatml": CHATML, "qwen": QWEN_TOOLS, "mistral": MISTRAL_TOOLS}
    return {name: build_tiny_hf_tokenizer(root / name, t) for name, t in templates.items()}


# ---- mistral-common ----


def test_mistral_common_prompt_has_the_tool_tokens(mistral_tok: MistralCommonTokenizer) -> None:
    inner = mistral_tok._inner
    ids = mistral_tok.encode_chat(CONVERSATION, TOOLS)
    for piece in ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"):
        assert inner.get_special_token(piece) in ids, piece
    assert mistral_tok.tool_prompt == "mistral-common" and mistral_tok.tool_format == "mistral"
    assert mistral_tok.tool_call_token_id == inner.get_special_token("[TOOL_CALLS]") == 5
    # The client's id never reaches the prompt; its 9-character stand-in does, in the call and in the result.
    text = inner.decode(ids)
    mistral_id = MistralIdMap().to_mistral(CLIENT_ID)
    assert CLIENT_ID not in text and text.count(f'"{mistral_id}"') == 2
    assert '"name": "get_weather"' in text and "Be brief." in text


def test_mistral_common_choice_none_leaves_tools_out(mistral_tok: MistralCommonTokenizer) -> None:
    ids = mistral_tok.encode_chat(CONVERSATION, ToolRequest((WEATHER,), ToolChoice("none")))
    assert 6 not in ids  # [AVAILABLE_TOOLS]
    assert 5 in ids  # the history's call is still there


def test_mistral_common_without_tools_is_unchanged(mistral_tok: MistralCommonTokenizer) -> None:
    plain = [{"role": "user", "content": "Hello"}]
    assert mistral_tok.encode_chat(plain) == mistral_tok.encode_chat(plain, None)
    assert mistral_tok.encode_chat(plain)[:2] == [1, 3]  # <s> [INST]


def test_mistral_common_v3_drops_text_next_to_calls(mistral_tok: MistralCommonTokenizer) -> None:
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["content"] = "Let me check."
    text = mistral_tok._inner.decode(mistral_tok.encode_chat(messages, TOOLS))
    assert "Let me check." not in text  # v3 has no place for it (mistral-common refuses both)


def test_id_map_round_trip() -> None:
    ids = MistralIdMap()
    client = [CLIENT_ID, "call_1", "toolu_01A09q90qw90lq917835lq9", "abcDEF123", "x" * 64]
    mapped = [ids.to_mistral(c) for c in client]
    assert all(is_mistral_id(m) for m in mapped)
    assert mapped[3] == "abcDEF123"  # already valid: kept
    assert len(set(mapped)) == len(client)
    assert [ids.to_client(m) for m in mapped] == client
    assert [MistralIdMap().to_mistral(c) for c in client] == mapped  # deterministic across requests
    assert ids.to_client("zzzzzzzzz") is None


def test_id_map_resolves_clashes() -> None:
    ids = MistralIdMap()
    taken = ids.to_mistral("abcDEF123")
    ids._to_client[ids.to_mistral("other")] = "other"
    # Force a clash: a client id whose hash would be an id already issued gets a salted one.
    ids._to_mistral.pop("other")
    ids._to_client[taken] = "abcDEF123"
    again = ids.to_mistral("other")
    assert is_mistral_id(again) and ids.to_client(again) == "other"


def test_mistral_calls_come_back_through_the_real_detokenizer(mistral_tok: MistralCommonTokenizer) -> None:
    """What Mistral-7B-Instruct-v0.3 writes, token by token, becomes calls with the client never seeing [TOOL_CALLS]."""
    prompt = mistral_tok.encode_chat(CONVERSATION[:2], TOOLS)
    calls = json.dumps([{"name": "get_weather", "arguments": {"city": c}} for c in ("Paris", "Nice")])
    rng = random.Random(0)
    for attempt in range(6):
        before = mistral_tok.encode_fragment("Sure, één moment.") if attempt % 2 else []
        output = [*before, 5, *mistral_tok.encode_fragment(calls), 2]
        parser = create_tool_parser("mistral", 5, ["get_weather"])
        detok = IncrementalDetokenizer(mistral_tok, prompt)
        events: list[ToolEvent] = []
        i = 0
        while i < len(output) - 1:  # the EOS is the stop token: not shown
            n = rng.randint(1, 4)
            events += feed_tokens(parser, detok, output[i : min(i + n, len(output) - 1)])
            i += n
        events += feed_tokens(parser, detok, [])
        result = parser.finish()
        assert [json.loads(c.arguments_json) for c in result.tool_calls] == [{"city": "Paris"}, {"city": "Nice"}]
        shown = "".join(e.text for e in events if isinstance(e, ContentEvent))
        assert result.content == (shown or None)
        assert (shown.strip() or None) == ("Sure, één moment." if before else None)  # the detokenizer's spacing
        args = "".join(e.fragment for e in events if isinstance(e, ToolCallArguments) and e.index == 0)
        assert json.loads(args) == {"city": "Paris"}


# ---- Hugging Face templates ----


def test_hf_template_with_tools_gets_them(hf_dirs: dict[str, Path]) -> None:
    tok = HFTokenizer(hf_dirs["qwen"])
    assert (tok.tool_prompt, tok.tool_format, tok.tool_call_token_id) == ("template", "hermes", None)
    text = tok.decode(tok.encode_chat(CONVERSATION, TOOLS))
    assert '"name": "get_weather"' in text and "# Tools" in text  # the template's own tool section
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in text
    assert "You can call functions" not in text  # no fallback instructions


def test_hf_mistral_template_gets_9_character_ids(hf_dirs: dict[str, Path]) -> None:
    tok = HFTokenizer(hf_dirs["mistral"])
    assert tok.tool_prompt == "template" and tok.tool_format == "mistral"
    assert tok.tool_call_token_id == tok._tok.convert_tokens_to_ids("[TOOL_CALLS]")
    conversation = [*CONVERSATION[1:], {"role": "user", "content": "Thanks"}]
    ids = tok.encode_chat(conversation, TOOLS)
    assert tok.tool_call_token_id in ids
    text = tok._tok.decode(ids)
    assert CLIENT_ID not in text and MistralIdMap().to_mistral(CLIENT_ID) in text
    assert "[AVAILABLE_TOOLS]" in text


def test_hf_template_without_tools_gets_the_fallback(hf_dirs: dict[str, Path]) -> None:
    tok = HFTokenizer(hf_dirs["chatml"])
    assert (tok.tool_prompt, tok.tool_format) == ("fallback", "hermes")
    text = tok.decode(tok.encode_chat(CONVERSATION, ToolRequest((WEATHER,), ToolChoice("named", "get_weather"))))
    system = text.split("user\n")[0]
    assert system.startswith("system\nBe brief.\n\nYou can call functions.")
    assert json.dumps(WEATHER.to_openai()) in system
    assert "You must call the function get_weather now." in system
    # The earlier call and its result, in the same wrapper the model is told to use.
    assert 'assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>{"name": "get_weather", "content": "{\\"temp_c\\": 21}"}</tool_response>' in text
    assert "role" not in text and CLIENT_ID not in text


def test_fallback_without_tools_adds_no_system_prompt(hf_dirs: dict[str, Path]) -> None:
    tok = HFTokenizer(hf_dirs["chatml"])
    text = tok.decode(tok.encode_chat([{"role": "user", "content": "Hi"}], ToolRequest((WEATHER,), ToolChoice("none"))))
    assert text == "user\nHi\nassistant\n"


def test_fallback_merges_consecutive_tool_results(hf_dirs: dict[str, Path]) -> None:
    tok = HFTokenizer(hf_dirs["chatml"])
    calls = (ToolCall("a", "get_weather", '{"city": "A"}'), ToolCall("b", "get_weather", '{"city": "B"}'))
    messages = [
        {"role": "user", "content": "Weather in A and B?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "a", "content": "1", "name": "get_weather"},
        {"role": "tool", "tool_call_id": "b", "content": "2", "name": "get_weather"},
    ]
    text = tok.decode(tok.encode_chat(messages, TOOLS))
    assert text.count("<tool_response>{") == 2 and text.count("\nuser\n") == 2  # one merged user turn


@pytest.mark.slow
def test_default_smollm2_uses_the_fallback() -> None:
    """The real default model's template (SmolLM2-135M-Instruct) has no tool support: the fallback applies."""
    done = subprocess.run(
        [sys.executable, "-m", "aisandbox", "prepare-model"], cwd=REPO, capture_output=True, text=True, check=True
    )
    path = Path(done.stdout.strip().splitlines()[-1])
    tok = load_tokenizer(path)
    assert (tok.tool_prompt, tok.tool_format) == ("fallback", "hermes")
    text = tok.decode(tok.encode_chat(CONVERSATION, TOOLS))
    assert "You can call functions" in text and "SmolLM" not in text  # our system prompt replaces its default
