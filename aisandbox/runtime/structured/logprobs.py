"""Logprobs as OpenAI shows them: token ids from a backend in, token strings and UTF-8 bytes out.

Backends report `TokenLogprob`s (token ids and floats). `LogprobFormatter` turns them into the `token`,
`bytes` and `logprob` fields of OpenAI's logprobs objects, for either tokenizer kind, in the thread that
runs the per-sequence text work (plain, synchronous, no event loop). A token's string is its own bytes from
`Tokenizer.vocab_for_grammar()`:

* byte-level BPE (SmolLM2, Llama 3) and SentencePiece ("\u2581the" is " the", "<0x0A>" is "\\n") and Tekken all
  come out as the text the token adds;
* a token that is only part of a UTF-8 character (a byte-fallback or byte-level piece) cannot be a string of
  its own: its `token` is written as OpenAI writes such tokens, "bytes:\\xe2\\x80", and its `bytes` are exact;
* a special token shows its name (for example "</s>") with the bytes of that name.
"""

from __future__ import annotations

from collections.abc import Sequence

from aisandbox.runtime.types import ShownLogprob, ShownToken, TokenLogprob, VocabSource

__all__ = ["LogprobFormatter", "ShownLogprob", "ShownToken"]


class LogprobFormatter:
    """Token strings and bytes of one tokenizer (build once per engine; reading it is thread-safe)."""

    def __init__(self, tokenizer: VocabSource) -> None:
        vocab = tokenizer.vocab_for_grammar()
        self._pieces = vocab.pieces
        self._special = vocab.special
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """The token string and its UTF-8 bytes as a list of ints."""
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        raw = self._pieces[token_id] if 0 <= token_id < len(self._pieces) else b""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        shown = (text, list(raw))
        self._cache[token_id] = shown
        return shown

    def shown(self, token_id: int, logprob: float) -> ShownToken:
        """One token with its logprob."""
        text, raw = self.token(token_id)
        return ShownToken(text, _finite(logprob), list(raw), token_id, token_id in self._special)

    def format(self, entry: TokenLogprob) -> ShownLogprob:
        """One step: the chosen token and its top alternatives."""
        return ShownLogprob(self.shown(entry.token_id, entry.logprob), tuple(self.shown(t, lp) for t, lp in entry.top))

    def format_all(self, entries: Sequence[TokenLogprob]) -> list[ShownLogprob]:
        """Every step of a delta (`TokenDelta.logprobs`), in order."""
        return [self.format(e) for e in entries]

    def format_prompt(
        self, prompt_token_ids: Sequence[int], entries: Sequence[TokenLogprob | None]
    ) -> list[ShownLogprob]:
        """The prompt's steps for an echo (`TokenDelta.prompt_logprobs`); the first has logprob None."""
        out = []
        for token_id, entry in zip(prompt_token_ids, entries, strict=True):
            if entry is None:
                text, raw = self.token(token_id)
                special = token_id in self._special
                out.append(ShownLogprob(ShownToken(text, None, list(raw), token_id, special), ()))
            else:
                out.append(self.format(entry))
        return out


def _finite(logprob: float) -> float:
    """JSON has no -inf: a token of probability 0 shows -9999.0, as vLLM shows it."""
    return max(float(logprob), -9999.0)
