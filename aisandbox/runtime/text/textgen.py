"""The shared text layer: token deltas from any backend in, text deltas out.

`TextState` holds one sequence's incremental detokenizer and stop-string matcher. The admission layer runs
it on its text thread, once per engine step for all sequences, never on the event loop; both backends
stream token ids only, so this is the one place where text is made.
"""

from __future__ import annotations

from dataclasses import replace

from aisandbox.errors import ContextLengthExceeded
from aisandbox.runtime.request import GenerationRequest
from aisandbox.runtime.structured.logprobs import LogprobFormatter
from aisandbox.runtime.structured.tools.parsers import ToolEvent
from aisandbox.runtime.text.detokenizer import IncrementalDetokenizer
from aisandbox.runtime.text.stop import StopMatcher
from aisandbox.runtime.text.tokenizer import Tokenizer
from aisandbox.runtime.types import FinishReason, TextDelta, TokenDelta

__all__ = ["TextState", "check_context"]


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str | None) -> int:
    """Resolve max_tokens against the context window.

    Args:
        prompt_len: Prompt tokens, chat template included.
        max_tokens: What the client asked for, or None for "the rest of the context".
        max_model_len: The context window.
        param: The request field that holds the prompt, for the error.

    Returns:
        The max_tokens to submit.

    Raises:
        ContextLengthExceeded: The prompt leaves no room, or prompt + max_tokens does not fit.
    """
    room = max_model_len - prompt_len
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = f" + {max_tokens} completion tokens" if max_tokens is not None else ""
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + (max_tokens or 0)} tokens ({prompt_len} in the prompt{asked}). "
            "Please reduce the length of the prompt or the completion.",
            param=param,
        )
    return room if max_tokens is None else max_tokens


class TextState:
    """One sequence's text: detokenizer, stop strings, token count. Used by one thread at a time."""

    __slots__ = ("_detok", "_logprobs", "_min_tokens", "_prompt", "_stops", "_tools", "count", "finished")

    def __init__(
        self, tokenizer: Tokenizer, request: GenerationRequest, logprobs: LogprobFormatter | None = None
    ) -> None:
        """One sequence's text state; `logprobs` formats its logprobs when the request asked for them."""
        sampling = request.sampling
        self._logprobs = logprobs
        self._prompt = request.prompt_token_ids
        self._detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
        # With tools, a parser sits on the detokenizer: call syntax never reaches the content.
        guided = getattr(sampling, "grammar", None) is not None
        self._tools = request.tools.new_text(self._detok, guided=guided) if request.tools is not None else None
        self._stops = StopMatcher(sampling.stop)
        self._min_tokens = sampling.min_tokens
        self.count = 0
        self.finished = False

    def feed(self, delta: TokenDelta) -> TextDelta | None:
        """Turn one token delta into a text delta (None when nothing is to be shown yet).

        The result ends the sequence (finish_reason set) when the backend ended it or a stop string matched;
        then `finished` is True and, for a stop string, the caller aborts the backend's sequence.
        """
        self.count += len(delta.token_ids)
        shown = delta.token_ids[:-1] if delta.stop_token_id is not None else delta.token_ids
        done = delta.finish_reason is not None
        out = self._text(delta, shown, done)
        if self._logprobs is None or (delta.logprobs is None and delta.prompt_logprobs is None):
            return out
        fmt = self._logprobs
        entries = delta.logprobs or ()
        if delta.stop_token_id is not None and len(entries) == len(delta.token_ids):
            entries = entries[:-1]  # the EOS or stop token is counted but never shown, in the text or here
        steps = tuple(fmt.format_all(entries))
        prompt = (
            None if delta.prompt_logprobs is None else tuple(fmt.format_prompt(self._prompt, delta.prompt_logprobs))
        )
        if out is None:
            return TextDelta("", self.count, logprobs=steps, prompt_logprobs=prompt)
        return replace(out, logprobs=steps, prompt_logprobs=prompt)

    def _text(self, delta: TokenDelta, shown: tuple[int, ...], done: bool) -> TextDelta | None:
        events: tuple[ToolEvent, ...] = ()
        if self._tools is not None:
            text, events = self._tools.add(shown)
        else:
            text = self._detok.add(shown)
            if done:
                text += self._detok.flush()
        stopping = self._stops.active and self.count >= self._min_tokens
        if stopping:
            text, matched = self._stops.feed(text)
            if matched is not None:
                self.finished = True
                if self._tools is None:
                    return TextDelta(text, self.count, FinishReason.STOP, matched)
                end = self._tools.finish(FinishReason.STOP)  # what follows the stop string is dropped
                return TextDelta(text, self.count, end.finish_reason, matched, events + end.events, end.calls)
        if not done:
            return TextDelta(text, self.count, tool_events=events) if text or events else None
        self.finished = True
        assert delta.finish_reason is not None
        if self._tools is None:
            if stopping:
                text += self._stops.flush()
            return TextDelta(text, self.count, delta.finish_reason, delta.stop_token_id)
        end = self._tools.finish(delta.finish_reason)
        tail = end.text
        if stopping:
            tail, matched = self._stops.feed(tail)
            tail += "" if matched is not None else self._stops.flush()
        reason = end.finish_reason
        return TextDelta(text + tail, self.count, reason, delta.stop_token_id, events + end.events, end.calls)
