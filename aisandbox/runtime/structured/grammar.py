"""Guided decoding with xgrammar: JSON objects, JSON schemas, regexes and EBNF grammars.

xgrammar is the library TensorRT-LLM and vLLM use. How the pieces fit:

* `GrammarSpec` (in `aisandbox.runtime.types`) is what the client asked for. `compile_grammar(spec,
  tokenizer, info)` turns it into a `CompiledGrammar` for this model's vocabulary. It is synchronous and can
  take milliseconds to seconds, so the request path calls it in a worker thread, never on the event loop, and
  puts the result in `SamplingParams.grammar`. Results are cached by spec (LRU), per tokenizer.
* The engine thread gives each guided sequence its own `GrammarMatcher`. Each decode step fills one bitmask
  row per guided sequence and masks the batched logits with it (`mask_logits`), so guided and free
  sequences share one batch; unguided rows are never touched. After sampling, each matcher accepts its token.
* The grammar ends a sequence by accepting a stop token (EOS): the matcher allows only stop tokens once the
  grammar is complete, and `GrammarMatcher.is_terminated` then ends the sequence with finish_reason stop.

xgrammar's vocabulary is built from our own `Tokenizer.vocab_for_grammar()` as a RAW vocabulary (every token's
exact bytes, special tokens empty), so Hugging Face and mistral-common tokenizers go through one path, and
special tokens such as `<|im_start|>` can never appear inside a guided string.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aisandbox.errors import InvalidRequest
from aisandbox.runtime.types import GrammarSpec, ModelInfo, VocabSource

if TYPE_CHECKING:
    import torch
    import xgrammar


__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarMatcher",
    "GrammarSpec",
    "compile_grammar",
    "executor_ebnf",
    "grammar_compiler",
    "mask_logits",
]

ERROR_PARAMS: dict[str, str] = {
    "json_object": "response_format",
    "json_schema": "response_format.json_schema.schema",
    "regex": "guided_regex",
    "ebnf": "guided_grammar",
    "structural_tag": "tools",
    "tool_calls": "tools",
}
"""The request field each kind of grammar comes from, named in a compile error."""

_MAX_WHITESPACE = 16
"""Most whitespace characters in a row inside guided JSON: small models otherwise loop on newlines."""

_WHAT = {
    "json_object": "JSON object",
    "json_schema": "JSON schema",
    "tool_calls": "tool schema",
    "regex": "regex",
    "ebnf": "grammar",
}

_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")


class CompiledGrammar:
    """A grammar compiled for one model's vocabulary; shared, read-only, by every sequence that uses it."""

    __slots__ = ("__weakref__", "compiled", "spec", "stop_token_ids", "vocab_size")

    def __init__(
        self, spec: GrammarSpec, compiled: xgrammar.CompiledGrammar, vocab_size: int, stop_token_ids: tuple[int, ...]
    ) -> None:
        self.spec = spec
        self.compiled = compiled
        self.vocab_size = vocab_size
        """Width of the bitmask: the model's logits, which may be wider than the tokenizer's vocabulary."""
        self.stop_token_ids = stop_token_ids

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar, for one sequence."""
        return GrammarMatcher(self)

    def __repr__(self) -> str:
        return f"CompiledGrammar({self.spec.kind}, {len(self.spec.source)} chars)"


class GrammarMatcher:
    """The grammar state of one sequence: which tokens may come next; owned by the engine thread."""

    __slots__ = ("_m", "grammar")

    def __init__(self, grammar: CompiledGrammar) -> None:
        import xgrammar as xgr

        self.grammar = grammar
        self._m = xgr.GrammarMatcher(grammar.compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 words, one bit per token)."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance over a sampled token; False if the grammar did not allow it (the state is unchanged)."""
        return bool(self._m.accept_token(int(token_id)))

    @property
    def is_terminated(self) -> bool:
        """Whether the grammar accepted a stop token: the sequence is complete."""
        return bool(self._m.is_terminated())


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer and model vocabulary, with an LRU cache of the results.

    Thread-safe: any thread may compile (xgrammar compiles in C++ and releases the GIL).
    """

    def __init__(
        self, tokenizer: VocabSource, vocab_size: int, stop_token_ids: Sequence[int], cache_size: int = 256
    ) -> None:
        import xgrammar as xgr

        if not stop_token_ids:
            raise ValueError("guided decoding needs at least one stop (EOS) token id")
        vocab = tokenizer.vocab_for_grammar()
        width = max(vocab_size, len(vocab))
        # Special tokens are empty: xgrammar then treats them as never part of the text.
        pieces = [b"" if i in vocab.special else p for i, p in enumerate(vocab.pieces)]
        pieces += [b""] * (width - len(pieces))
        self.vocab_size = width
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self._info = xgr.TokenizerInfo(
            pieces, xgr.VocabType.RAW, vocab_size=width, stop_token_ids=list(self.stop_token_ids)
        )
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=2, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.compiled = 0
        """How many specs were compiled (cache misses)."""

    def is_cached(self, spec: GrammarSpec) -> bool:
        """Whether `compile(spec)` would return at once."""
        with self._lock:
            return spec in self._cache

    def check(self, spec: GrammarSpec) -> None:
        """Compile a spec without keeping it (the grammar service's worker processes: only whether it compiles).

        Raises:
            InvalidRequest: As `compile`.
        """
        self._compile(spec)

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile a spec, or return the cached result.

        Raises:
            InvalidRequest: The schema, regex or grammar is invalid or uses what xgrammar does not support;
                `param` names the request field it came from.
        """
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = CompiledGrammar(spec, self._compile(spec), self.vocab_size, self.stop_token_ids)
        with self._lock:
            self.compiled += 1
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        param = ERROR_PARAMS.get(spec.kind, "response_format")
        try:
            if spec.kind in _JSON_KINDS:
                return self._compiler.compile_grammar(_json_grammar(spec))
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.source)
            if spec.kind == "ebnf":
                return self._compiler.compile_grammar(spec.source)
            if spec.kind == "structural_tag":  # tool calls (aisandbox.runtime.structured.tools.grammar), JSON text
                return self._compiler.compile_structural_tag(spec.source)
        except (RuntimeError, ValueError) as exc:
            what = _WHAT.get(spec.kind, "format")
            raise InvalidRequest(
                f"Invalid or unsupported {what}: {_clean_error(exc)}", param=param, code="invalid_value"
            ) from exc
        raise InvalidRequest(f"Unknown grammar kind '{spec.kind}'.", param=param)


_JSON_OBJECT = '{"type": "object"}'


_JSON_KINDS = ("json_object", "json_schema", "tool_calls")


def _json_grammar(spec: GrammarSpec) -> xgrammar.Grammar:
    """The xgrammar Grammar of a JSON spec, with our settings.

    json_object is an object (OpenAI's meaning; xgrammar's builtin JSON grammar also allows arrays and scalars);
    whitespace runs are bounded (`_MAX_WHITESPACE`); `strict` is xgrammar's strict_mode. tool_calls (a forced
    Mistral call list after `[TOOL_CALLS]`) may start with the one space the model writes there ("▁[").

    Raises:
        InvalidRequest: An invalid or unsupported schema (a 400 naming its field).
    """
    import xgrammar as xgr

    param = ERROR_PARAMS[spec.kind]
    source = _JSON_OBJECT if spec.kind == "json_object" else json.dumps(_parse_schema(spec.source, param))
    try:
        grammar = xgr.Grammar.from_json_schema(
            source, strict_mode=spec.strict and spec.kind != "json_object", max_whitespace_cnt=_MAX_WHITESPACE
        )
        if spec.kind == "tool_calls":
            grammar = xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= "" | " "'), grammar)
    except (RuntimeError, ValueError) as exc:
        raise InvalidRequest(
            f"Invalid or unsupported {_WHAT[spec.kind]}: {_clean_error(exc)}", param=param, code="invalid_value"
        ) from exc
    return grammar


@functools.lru_cache(maxsize=256)
def executor_ebnf(spec: GrammarSpec) -> str:
    """A JSON spec (json_object, json_schema, tool_calls) as the EBNF text of the grammar we compile ourselves.

    For a backend whose executor compiles grammars itself (trtllm), sent as GuidedDecodingParams(grammar=...): it
    carries our choices, which the executor's own JSON path drops (see `_json_grammar`).

    Raises:
        InvalidRequest: An invalid schema (a 400 naming its field).
        ValueError: Not a JSON spec.
    """
    if spec.kind not in _JSON_KINDS:
        raise ValueError(f"{spec.kind} is not a JSON spec")
    return str(_json_grammar(spec))


def _parse_schema(source: str, param: str) -> dict[str, Any]:
    try:
        schema = json.loads(source)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"The JSON schema is not valid JSON: {exc}", param=param, code="invalid_value") from exc
    if not isinstance(schema, dict):
        raise InvalidRequest("The JSON schema must be an object.", param=param, code="invalid_value")
    return schema


def _clean_error(exc: Exception) -> str:
    """xgrammar's C++ message without its timestamp and source location."""
    lines = [_CPP_PREFIX.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(exc).__name__


_compilers: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], GrammarCompiler]] = (
    weakref.WeakKeyDictionary()
)
_compilers_lock = threading.Lock()


def grammar_compiler(tokenizer: VocabSource, vocab_size: int, stop_token_ids: Sequence[int]) -> GrammarCompiler:
    """The shared compiler (and cache) of one tokenizer and model vocabulary; built on first use."""
    key = (int(vocab_size), tuple(int(t) for t in stop_token_ids))
    with _compilers_lock:
        per_tok = _compilers.setdefault(tokenizer, {})
        compiler = per_tok.get(key)
        if compiler is None:
            compiler = per_tok[key] = GrammarCompiler(tokenizer, vocab_size, stop_token_ids)
    return compiler


def compile_grammar(spec: GrammarSpec, tokenizer: VocabSource, info: ModelInfo) -> CompiledGrammar:
    """Compile a client's grammar for the loaded model (cached). Synchronous: call it off the event loop.

    Args:
        spec: From the request (`SamplingParams.guided`).
        tokenizer: `engine.tokenizer`.
        info: `engine.model_info` (the logits width and the EOS ids that end a guided sequence).

    Raises:
        InvalidRequest: An invalid or unsupported schema, regex or grammar (a 400 naming its field).
    """
    return grammar_compiler(tokenizer, info.vocab_size, info.eos_token_ids).compile(spec)


def mask_logits(
    logits: torch.Tensor,
    rows: Sequence[int],
    matchers: Sequence[GrammarMatcher],
    recheck: Sequence[int] = (),
) -> None:
    """Mask, in place, every token each matcher forbids in its row of `logits` [batch, vocab].

    Other rows are untouched. A row left with no allowed token gets its grammar's stop tokens back, so the
    sequence ends instead of sampling garbage: a row whose grammar allows nothing (which a well-formed grammar
    never does, read off the bitmask), or one of `recheck` (rows where the caller banned tokens before, such as
    EOS under min_tokens) whose logits hold no finite value any more.
    """
    import torch
    import xgrammar as xgr

    if not rows:
        return
    width = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], width)
    for row, matcher in zip(rows, matchers, strict=True):
        matcher.fill(bitmask, row)
    bits = bitmask.to(logits.device, non_blocking=True) if logits.device.type != "cpu" else bitmask
    xgr.apply_token_bitmask_inplace(logits, bits, vocab_size=width, indices=list(rows))
    dead: set[int] = set()
    empty = (bitmask[list(rows)] == 0).all(dim=-1).tolist()  # [rows] int32 words: 32x less than the logits
    dead.update(row for row, is_empty in zip(rows, empty, strict=True) if is_empty)
    if recheck:
        index = torch.tensor(list(recheck), device=logits.device)
        finite = torch.isfinite(logits.index_select(0, index)).any(dim=-1).tolist()
        dead.update(row for row, ok in zip(recheck, finite, strict=True) if not ok)
    for row, matcher in zip(rows, matchers, strict=True):
        if row in dead:
            logits[row, list(matcher.grammar.stop_token_ids)] = 0.0
