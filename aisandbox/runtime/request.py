"""What one sequence asks of a backend: its prompt, how to sample it, its compiled grammar and tool plan.

Above `types` and `structured` (it holds their compiled objects), below the text layer and the backends.
"""

from __future__ import annotations

from dataclasses import dataclass

from aisandbox.runtime.structured.grammar import CompiledGrammar
from aisandbox.runtime.structured.tools.plan import ToolPlan
from aisandbox.runtime.types import GrammarSpec

__all__ = ["GREEDY_BELOW_TEMPERATURE", "GenerationRequest", "SamplingParams"]


GREEDY_BELOW_TEMPERATURE = 1e-5
"""A temperature below this samples greedily: dividing logits by a tinier one overflows them (as vLLM)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one sequence. Validated by the caller (the HTTP schemas)."""

    max_tokens: int
    """Most tokens to generate; always set (the HTTP layer defaults it to the rest of the context)."""
    temperature: float = 1.0
    """0 (anything below GREEDY_BELOW_TEMPERATURE) means greedy."""
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
    """`guided`, compiled for this model's tokenizer (`structured.grammar.compile_grammar`) before submit: the
    engine thread never compiles. A backend that guides itself (trtllm) uses `guided` instead."""

    @property
    def greedy(self) -> bool:
        """Whether sampling reduces to argmax."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate: a tokenized prompt and how to sample it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    tools: ToolPlan | None = None
    """Function calling for this sequence: the text layer parses calls out of its output."""
