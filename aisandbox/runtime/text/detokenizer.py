"""Incremental detokenization shared by every backend.

Decoding tokens one at a time is wrong twice over: a byte-level BPE token can hold part of a UTF-8 character,
and SentencePiece drops the leading space of a decoded piece. Where the tokenizer gives a checked table of
each token's bytes (`Tokenizer.byte_table`), a sequence's text is those bytes run through an incremental UTF-8
decoder: a lookup and a few bytes per token, and a character is never split. Otherwise, as vLLM and TGI do,
a short window is decoded twice (with and without the new tokens) and only the difference is emitted, holding
back text that ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from aisandbox.runtime.text.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# How many tokens before the read offset to decode as context, so SentencePiece spaces come out right.
_CONTEXT_TOKENS = 5
_utf8 = codecs.getincrementaldecoder("utf-8")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character."""

    __slots__ = ("_dec", "_ids", "_pieces", "_prefix", "_read", "_strip", "_tok")

    def __init__(self, tokenizer: Tokenizer, prompt_tail: Sequence[int] = ()) -> None:
        """Create one for a single sequence.

        Args:
            tokenizer: The shared tokenizer.
            prompt_tail: The last few prompt ids, as context for the first generated tokens' spacing.
        """
        self._tok = tokenizer
        table = tokenizer.byte_table()
        self._pieces = table.pieces if table is not None else None
        self._dec = _utf8(errors="replace")
        # Without a prompt before it, SentencePiece drops the first piece's leading space.
        self._strip = table is not None and table.strip_first_space and not prompt_tail
        self._ids: list[int] = list(prompt_tail[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # tokens up to here are already emitted as text

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly complete text (possibly empty)."""
        if not token_ids:
            return ""
        pieces = self._pieces
        if pieces is not None:
            n = len(pieces)
            text: str = self._dec.decode(b"".join([pieces[i] if i < n else b"" for i in token_ids]))
            if self._strip and text:
                self._strip = False
                text = text.removeprefix(" ")
            return text
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
        if self._pieces is not None:
            return str(self._dec.decode(b"", final=True))
        if self._read >= len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :] if full_text.startswith(prefix_text) else ""
