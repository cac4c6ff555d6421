"""Plain request and result types shared by every backend and by the HTTP layer."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "ContentEvent",
    "EngineState",
    "EngineStats",
    "FinishReason",
    "GrammarKind",
    "GrammarSpec",
    "Health",
    "ModelInfo",
    "ShownLogprob",
    "ShownToken",
    "TextDelta",
    "TokenDelta",
    "TokenLogprob",
    "TokenVocab",
    "ToolCall",
    "ToolCallArguments",
    "ToolCallStart",
    "ToolEvent",
    "VocabSource",
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


GrammarKind = Literal["json_object", "json_schema", "regex", "ebnf", "structural_tag", "tool_calls"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A constraint on the output text, as the client gave it; the key of the compiled-grammar cache."""

    kind: GrammarKind
    source: str = ""
    """The JSON schema (canonical JSON text), the regex or the EBNF grammar; empty for json_object."""
    strict: bool = True
    """json_schema: refuse properties the schema does not list (OpenAI's `strict`; xgrammar's strict_mode)."""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The logprob of one token a sequence took, with the most likely alternatives at that step.

    Token ids only: `aisandbox.runtime.structured.logprobs.LogprobFormatter` turns them into OpenAI's token strings.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, logprob), most likely first; as many as the request's top_logprobs."""


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
    logprobs: tuple[TokenLogprob, ...] | None = None
    """One per token of token_ids (the stop token included) when the request asked for logprobs."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """On the first delta of a request with prompt_logprobs: one per prompt token, None for the first."""

    def merge(self, later: TokenDelta) -> TokenDelta:
        """This delta followed by a later one of the same sequence, as one (for a consumer that fell behind)."""
        logprobs = self.logprobs
        if later.logprobs is not None:
            logprobs = later.logprobs if logprobs is None else logprobs + later.logprobs
        return TokenDelta(
            self.token_ids + later.token_ids,
            later.finish_reason,
            later.stop_token_id,
            later.error,
            logprobs,
            self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
        )


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
    logprobs: tuple[ShownLogprob, ...] = ()
    """With logprobs asked for: one per token of this delta, as OpenAI shows tokens."""
    prompt_logprobs: tuple[ShownLogprob, ...] | None = None
    """On the first delta of an echo with logprobs: one per prompt token (the first has none)."""

    def merge(self, later: TextDelta) -> TextDelta:
        """This delta followed by a later one of the same sequence, as one delta."""
        return TextDelta(
            self.text + later.text,
            later.completion_tokens,
            later.finish_reason,
            later.stop_reason,
            self.tool_events + later.tool_events,
            later.tool_calls or self.tool_calls,
            self.logprobs + later.logprobs,
            self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
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


class VocabSource(Protocol):
    """Anything that can say what each token id stands for (the tokenizers of `runtime.text`)."""

    def vocab_for_grammar(self) -> TokenVocab:
        """Every token id's bytes and the special ids."""
        ...


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call: made by the model (parsed from its output) or sent back by the client in the history."""

    id: str
    name: str
    arguments_json: str
    """The arguments as a JSON text, exactly as OpenAI's `function.arguments` carries them."""

    def arguments(self) -> Any:
        """The arguments parsed, or the raw text when it is not JSON (templates that want a dict get one)."""
        try:
            return json.loads(self.arguments_json)
        except ValueError:
            return self.arguments_json


@dataclass(frozen=True, slots=True)
class ContentEvent:
    """Text for `message.content` / `delta.content`."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A new call: the first streamed delta of call `index`."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArguments:
    """The next piece of call `index`'s arguments JSON."""

    index: int
    fragment: str


ToolEvent = ContentEvent | ToolCallStart | ToolCallArguments


@dataclass(frozen=True, slots=True)
class ShownToken:
    """One token as OpenAI's logprobs show it."""

    token: str
    logprob: float | None
    """None only for the first prompt token of an echo (nothing predicts it)."""
    bytes: list[int]
    token_id: int
    special: bool = False
    """A control token (BOS, EOS, ...): never part of the shown text."""


@dataclass(frozen=True, slots=True)
class ShownLogprob:
    """The chosen token of one step and its alternatives (most likely first)."""

    chosen: ShownToken
    top: tuple[ShownToken, ...]
