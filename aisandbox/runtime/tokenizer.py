"""Tokenizers and chat templates shared by every backend.

Two implementations behind one protocol: Hugging Face tokenizers with their own Jinja chat template, and
Mistral's `mistral-common` tokenizer (the reference chat encoding of Mistral-7B-Instruct-v0.3), picked by the
files a model folder holds, as vLLM's `tokenizer_mode=auto|mistral|hf` does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from aisandbox.errors import InvalidRequest

__all__ = ["ChatMessage", "HFTokenizer", "MistralCommonTokenizer", "Tokenizer", "TokenizerMode", "load_tokenizer"]

log = logging.getLogger(__name__)

TokenizerMode = Literal["auto", "hf", "mistral"]

ChatMessage = Mapping[str, Any]
"""One chat message: {"role": str, "content": str, ...}, content already flattened to text."""

# Files that mark a Mistral-format tokenizer, most specific first.
_MISTRAL_FILES = ("tekken.json", "tokenizer.model.v7m1", "tokenizer.model.v7", "tokenizer.model.v3")


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

    def encode(self, text: str) -> list[int]:
        return list(self._inner.encode(text, bos=True, eos=False))

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
