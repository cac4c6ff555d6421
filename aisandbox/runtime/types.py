"""Plain request and result types shared by every backend and by the HTTP layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from aisandbox.runtime.guided import CompiledGrammar
    from aisandbox.runtime.logprobs import ShownLogprob
    from aisandbox.runtime.tool_calling import ToolPlan
    from aisandbox.runtime.tool_parsers import ToolEvent
    from aisandbox.runtime.tools import ToolCall

__all__ = [
    "EngineState",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "GrammarKind",
    "GrammarSpec",
    "Health",
    "ModelInfo",
    "SamplingParams",
    "TextDelta",
    "TokenDelta",
    "TokenLogprob",
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


GrammarKind = Literal["json_object", "json_schema", "regex", "ebnf", "structural_tag"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A constraint on the output text, as the client gave it; the key of the compiled-grammar cache."""

    kind: GrammarKind
    source: str = ""
    """The JSON schema (canonical JSON text), the regex or the EBNF grammar; empty for json_object."""
    strict: bool = True
    """json_schema: refuse properties the schema does not list (OpenAI's `strict`; xgrammar's strict_mode)."""


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
    frequency_penalty: float = 0.0
    """OpenAI's: logits -= frequency_penalty * count, over the generated tokens only (-2..2)."""
    presence_penalty: float = 0.0
    """OpenAI's: logits -= presence_penalty * (count > 0), over the generated tokens only (-2..2)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias -100..100) added to that token's logit; ids checked against the vocab by the caller."""
    logprobs: bool = False
    """Return the chosen token's logprob (from the raw model distribution) with every token."""
    top_logprobs: int = 0
    """With logprobs: also the most likely tokens of each step, 0..20."""
    prompt_logprobs: int | None = None
    """Completions `echo` with `logprobs`: logprobs of the prompt tokens, with this many alternatives each."""
    guided: GrammarSpec | None = None
    """The grammar the output must follow, as the client asked for it (response_format and extensions)."""
    grammar: CompiledGrammar | None = None
    """`guided`, compiled for this model's tokenizer (aisandbox.runtime.guided.compile_grammar) before submit:
    the engine thread never compiles. A backend that guides itself (trtllm) uses `guided` instead."""

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
class TokenLogprob:
    """The logprob of one token a sequence took, with the most likely alternatives at that step.

    Token ids only: `aisandbox.runtime.logprobs.LogprobFormatter` turns them into OpenAI's token strings.
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
