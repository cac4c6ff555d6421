"""Incremental detokenization shared by every backend.

Decoding tokens one at a time is wrong twice over: a byte-level BPE token can hold part of a UTF-8 character,
and SentencePiece drops the leading space of a decoded piece. As vLLM and TGI do, we decode a short window
twice (with and without the new tokens) and emit only the difference, holding back text that ends in an
incomplete character (U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence

from aisandbox.runtime.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# How many tokens before the read offset to decode as context, so SentencePiece spaces come out right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character."""

    def __init__(self, tokenizer: Tokenizer, prompt_tail: Sequence[int] = ()) -> None:
        """Create one for a single sequence.

        Args:
            tokenizer: The shared tokenizer.
            prompt_tail: The last few prompt ids, as context for the first generated tokens' spacing.
        """
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_tail[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # tokens up to here are already emitted as text

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly complete text (possibly empty)."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full_text = self._tok.decode(self._ids[self._prefix :])
        if full_text.endswith(_REPLACEMENT) or len(full_text) <= len(prefix_text):
            # An incomplete character (or nothing visible yet): wait for more tokens.
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self._ids)
        return delta

    def flush(self) -> str:
        """Return text still held back at the end of the sequence (an incomplete character stays U+FFFD)."""
        if self._read >= len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :] if full_text.startswith(prefix_text) else ""
