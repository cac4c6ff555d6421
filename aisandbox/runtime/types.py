"""Plain request and result types shared by every backend and by the HTTP layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aisandbox.runtime.tool_calling import ToolPlan
    from aisandbox.runtime.tool_parsers import ToolEvent
    from aisandbox.runtime.tools import ToolCall

__all__ = [
    "EngineState",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "Health",
    "ModelInfo",
    "SamplingParams",
    "TextDelta",
    "TokenDelta",
]


class FinishReason(enum.StrEnum):
    """Why a sequence ended."""

    STOP = "stop"
    """EOS, a stop token id or a stop string."""
    LENGTH = "length"
    """max_tokens reached, or the context window is full."""
    ABORT = "abort"
    """Aborted by the client or by the server."""
    TOOL_CALLS = "tool_calls"
    """The model called tools (set by the tool-call text layer from STOP, never by a backend)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one sequence. Validated by the caller (the HTTP schemas)."""

    max_tokens: int
    """Most tokens to generate; always set (the HTTP layer defaults it to the rest of the context)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Stop strings: matched on text by the shared text layer, never by a backend."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    """EOS, stop tokens and stop strings are ignored until this many tokens exist."""

    @property
    def greedy(self) -> bool:
        """Whether sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate: a tokenized prompt and how to sample it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    tools: ToolPlan | None = None
    """Function calling for this sequence: the text layer parses calls out of its output."""


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New tokens of one sequence, as a backend streams them."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    """Set on the last delta of a sequence."""
    stop_token_id: int | None = None
    """The EOS or stop token that ended the sequence: the last of token_ids, counted but never shown as text."""
    error: str | None = None
    """Set when the engine failed this request; finish_reason is ABORT then."""


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text of one sequence, after detokenization and stop strings."""

    text: str
    completion_tokens: int
    """Tokens generated so far for this sequence (cumulative)."""
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    """The stop string or token id that ended the sequence, when one did."""
    tool_events: tuple[ToolEvent, ...] = ()
    """Tool-call events of this step (call starts and argument pieces); content stays in `text`."""
    tool_calls: tuple[ToolCall, ...] = ()
    """On the last delta of a sequence that called tools: every call it made."""

    def merge(self, later: TextDelta) -> TextDelta:
        """This delta followed by a later one of the same sequence, as one delta."""
        return TextDelta(
            self.text + later.text,
            later.completion_tokens,
            later.finish_reason,
            later.stop_reason,
            self.tool_events + later.tool_events,
            later.tool_calls or self.tool_calls,
        )


class EngineState(enum.StrEnum):
    """Lifecycle of an engine."""

    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Health:
    """An engine's health, with a reason when it is not ready."""

    state: EngineState
    reason: str | None = None

    @property
    def ready(self) -> bool:
        """Whether the engine accepts requests."""
        return self.state is EngineState.READY


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of an engine's load."""

    running: int
    """Sequences being decoded."""
    waiting: int
    """Sequences queued, not yet prefilled."""
    kv_cache_usage: float = 0.0
    """Fraction of the KV cache in use, 0..1."""
    extra: dict[str, float] = field(default_factory=dict)
    """Backend-specific gauges, exported to /metrics as aisandbox_engine_<name>."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the HTTP layer needs to know about the loaded model."""

    max_model_len: int
    """Context window in tokens (prompt + completion)."""
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    max_running: int
    """Sequences the backend decodes at once; requests beyond it (plus the queue bound) get 429."""
    max_prompt_len: int | None = None
    """Longest prompt the backend accepts, when shorter than max_model_len - 1 (a TensorRT engine's max_input_len)."""
    default_max_tokens: int | None = None
    """max_tokens for a request that omits it, capped at the rest of the context (None: the rest of the context).
    The trtllm backend sets it from the engine profile: its scheduler reserves KV for prompt + max_tokens."""
