"""The shared text layer: token deltas from any backend in, text deltas out.

Detokenizes incrementally, applies stop strings with hold-back, and aborts the engine request as soon as a
stop string matches. Both backends stream token ids only, so this is the one place where text is made.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aisandbox.errors import ContextLengthExceeded, EngineDead, EngineError
from aisandbox.runtime.detokenizer import IncrementalDetokenizer
from aisandbox.runtime.engine import Engine, RequestStream
from aisandbox.runtime.stop import StopMatcher
from aisandbox.runtime.types import EngineState, FinishReason, GenerationRequest, TextDelta

__all__ = ["check_context", "stream_text"]


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
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


def stream_text(engine: Engine, request: GenerationRequest) -> AsyncIterator[TextDelta]:
    """Submit a request now and return an async iterator of its text as it is generated.

    The last delta carries the finish reason. Leaving the iteration early (or closing it) aborts the engine
    request at once.

    Raises:
        Overloaded, EngineNotReady, EngineDead: From submit, at once, before anything is iterated.
        EngineError: While iterating, when the engine failed this request mid-way.
    """
    stream = engine.submit(request)
    return _text_deltas(engine, request, stream)


async def _text_deltas(engine: Engine, request: GenerationRequest, stream: RequestStream) -> AsyncIterator[TextDelta]:
    sampling = request.sampling
    detok = IncrementalDetokenizer(engine.tokenizer, request.prompt_token_ids)
    stops = StopMatcher(sampling.stop)
    count = 0
    try:
        async for delta in stream:
            if delta.error is not None:
                if engine.health().state is EngineState.DEAD:
                    raise EngineDead(delta.error)
                raise EngineError(delta.error)
            count += len(delta.token_ids)
            shown = delta.token_ids[:-1] if delta.stop_token_id is not None else delta.token_ids
            text = detok.add(shown)
            if delta.finish_reason is not None:
                text += detok.flush()
            if stops.active and count >= sampling.min_tokens:
                text, matched = stops.feed(text)
                if matched is not None:
                    yield TextDelta(text, count, FinishReason.STOP, matched)
                    return
                if delta.finish_reason is not None:
                    text += stops.flush()
            if delta.finish_reason is not None:
                yield TextDelta(text, count, delta.finish_reason, delta.stop_token_id)
                return
            if text:
                yield TextDelta(text, count)
    finally:
        await stream.aclose()
