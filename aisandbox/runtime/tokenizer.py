"""Tokenizers and chat templates shared by every backend.

Two implementations behind one protocol: Hugging Face tokenizers with their own Jinja chat template, and
Mistral's `mistral-common` tokenizer (the reference chat encoding of Mistral-7B-Instruct-v0.3), picked by the
files a model folder holds, as vLLM's `tokenizer_mode=auto|mistral|hf` does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from aisandbox.errors import InvalidRequest

__all__ = [
    "ChatMessage",
    "HFTokenizer",
    "MistralCommonTokenizer",
    "TokenVocab",
    "Tokenizer",
    "TokenizerMode",
    "load_tokenizer",
]

log = logging.getLogger(__name__)

TokenizerMode = Literal["auto", "hf", "mistral"]

ChatMessage = Mapping[str, Any]
"""One chat message: {"role": str, "content": str, ...}, content already flattened to text."""

# Files that mark a Mistral-format tokenizer, most specific first.
_MISTRAL_FILES = ("tekken.json", "tokenizer.model.v7m1", "tokenizer.model.v7", "tokenizer.model.v3")


@dataclass(frozen=True, slots=True)
class TokenVocab:
    """What every token id stands for as bytes: for grammars (xgrammar's RAW vocabulary) and logprobs.

    `pieces[i]` is the text token i adds, as UTF-8 bytes, with the tokenizer's encodings undone: byte-level
    BPE's byte-to-unicode map, SentencePiece's "\u2581" for a space and its <0xNN> byte-fallback tokens. A
    piece may be part of a UTF-8 character. Special (control) tokens hold their written name, such as
    b"</s>", but never appear in text: `special` lists them.
    """

    pieces: tuple[bytes, ...]
    special: frozenset[int]

    def __len__(self) -> int:
        return len(self.pieces)


class Tokenizer(Protocol):
    """Text <-> token ids, plus the model's chat encoding."""

    eos_token_ids: tuple[int, ...]
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Encode a completion prompt, with the model's BOS where it uses one."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """Decode ids to text, skipping special tokens."""

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Encode a conversation ending with the assistant's turn to generate."""

    def vocab_for_grammar(self) -> TokenVocab:
        """Every token id's bytes and the special ids (computed once, then cached)."""


class HFTokenizer:
    """A Hugging Face tokenizer and its Jinja chat template."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path))
        eos: set[int] = set()
        if self._tok.eos_token_id is not None:
            eos.add(int(self._tok.eos_token_id))
        gen_cfg = Path(path) / "generation_config.json"
        if gen_cfg.is_file():
            import json

            value = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos.update(value if isinstance(value, list) else [value] if value is not None else [])
        self.eos_token_ids = tuple(sorted(eos))
        self.vocab_size = len(self._tok)
        self._bos = self._tok.bos_token if self._tok.bos_token and self._adds_bos() else None
        self._vocab: TokenVocab | None = None

    def vocab_for_grammar(self) -> TokenVocab:
        if self._vocab is None:
            self._vocab = _hf_vocab(self._tok)
        return self._vocab

    def _adds_bos(self) -> bool:
        ids = self._tok.encode("a", add_special_tokens=True)
        return bool(ids) and ids[0] == self._tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if not self._tok.chat_template:
            raise InvalidRequest(
                "This model has no chat template; use /v1/completions.", param="messages", code="invalid_value"
            )
        try:
            text = self._tok.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # Jinja templates raise their own errors for unsupported conversations.
            raise InvalidRequest(f"The chat template rejected the messages: {exc}", param="messages") from exc
        # The template already holds the special tokens (BOS included), as vLLM encodes it.
        return list(self._tok.encode(str(text), add_special_tokens=False))


class MistralCommonTokenizer:
    """Mistral's tokenizer and chat encoding from `mistral-common`."""

    def __init__(self, tokenizer_file: str | Path) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self._mt = MistralTokenizer.from_file(str(tokenizer_file))
        self._inner = self._mt.instruct_tokenizer.tokenizer
        self.eos_token_ids: tuple[int, ...] = (int(self._inner.eos_id),)
        self.vocab_size = int(self._inner.n_words)
        self._vocab: TokenVocab | None = None

    def encode(self, text: str) -> list[int]:
        return list(self._inner.encode(text, bos=True, eos=False))

    def vocab_for_grammar(self) -> TokenVocab:
        if self._vocab is None:
            self._vocab = _mistral_vocab(self._inner)
        return self._vocab

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._inner.decode(list(token_ids)))

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        try:
            request = ChatCompletionRequest.model_validate({"messages": [dict(m) for m in messages]})
            return list(self._mt.encode_chat_completion(request).tokens)
        except MistralCommonException as exc:
            raise InvalidRequest(f"Invalid conversation: {exc}", param="messages") from exc
        except ValueError as exc:  # pydantic validation of the messages
            raise InvalidRequest(f"Invalid conversation: {exc}", param="messages") from exc


def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode map (byte-level BPE writes byte b as this character)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


def _sentencepiece_bytes(piece: str) -> bytes:
    """A SentencePiece piece as bytes: <0xNN> is one byte, "\u2581" is a space."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode("utf-8")


def _hf_vocab(tok: Any) -> TokenVocab:
    """Decode a Hugging Face vocabulary: byte-level BPE, SentencePiece byte-fallback or raw strings."""
    vocab: dict[str, int] = tok.get_vocab()
    size = max(len(vocab), max(vocab.values()) + 1)
    names = [""] * size
    for name, idx in vocab.items():
        names[idx] = name
    special = set(int(i) for i in tok.all_special_ids)
    for idx, added in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(idx))
    byte_level = _byte_level_decoder()
    if "<0x0A>" in vocab:
        kind = "sentencepiece"
    elif all(ch in byte_level for ch in "".join(n for i, n in enumerate(names) if i not in special)):
        kind = "byte_level"
    else:
        kind = "raw"

    def decode(name: str) -> bytes:
        if kind == "sentencepiece":
            return _sentencepiece_bytes(name)
        if kind == "byte_level":
            return bytes(byte_level[ch] for ch in name)
        return name.encode("utf-8")

    pieces = tuple(name.encode("utf-8") if i in special else decode(name) for i, name in enumerate(names))
    return TokenVocab(pieces, frozenset(special))


def _mistral_vocab(inner: Any) -> TokenVocab:
    """Decode a mistral-common vocabulary: Tekken (tiktoken bytes) or SentencePiece (byte fallback)."""
    special = frozenset(int(i) for i in inner.special_ids)
    n = int(inner.n_words)
    if hasattr(inner, "id_to_byte_piece"):  # Tekken
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        pieces = tuple(bytes(inner.id_to_byte_piece(i, SpecialTokenPolicy.KEEP)) for i in range(n))
        return TokenVocab(pieces, special)
    names = inner.vocab()
    unk = int(inner.unk_id) if getattr(inner, "unk_id", -1) is not None else -1
    special = special | ({unk} if unk >= 0 else set())
    pieces = tuple(names[i].encode("utf-8") if i in special else _sentencepiece_bytes(names[i]) for i in range(n))
    return TokenVocab(pieces, special)


def find_mistral_tokenizer_file(path: str | Path) -> Path | None:
    """Return the Mistral-format tokenizer file in a model folder, if it has one."""
    for name in _MISTRAL_FILES:
        candidate = Path(path) / name
        if candidate.is_file():
            return candidate
    return None


def load_tokenizer(path: str | Path, mode: TokenizerMode = "auto") -> Tokenizer:
    """Load the tokenizer of a model folder.

    Args:
        path: A Hugging Face model folder, or a TensorRT-LLM engine folder with the tokenizer copied in.
        mode: `mistral` forces mistral-common, `hf` forces Hugging Face, `auto` prefers mistral-common where
            the folder holds a Mistral tokenizer file (tekken.json or tokenizer.model.v*).
    """
    mistral_file = find_mistral_tokenizer_file(path)
    if mode == "mistral" or (mode == "auto" and mistral_file is not None):
        if mistral_file is None:
            raise FileNotFoundError(f"no Mistral tokenizer file ({', '.join(_MISTRAL_FILES)}) in {path}")
        log.info("tokenizer: mistral-common from %s", mistral_file)
        return MistralCommonTokenizer(mistral_file)
    log.info("tokenizer: Hugging Face from %s", path)
    return HFTokenizer(path)
