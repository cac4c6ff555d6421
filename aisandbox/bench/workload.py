"""Workloads: synthetic prompts of chosen lengths, or prompts and conversations from a local JSONL file.

Both are deterministic for a seed, so the same command sends the same prompts to every server it compares.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aisandbox.bench.client import Message, Prompt

__all__ = [
    "DatasetSpec",
    "HFTextTokenizer",
    "SyntheticSpec",
    "TextTokenizer",
    "load_jsonl",
    "sample_lengths",
    "synthetic_prompts",
]

# Common English words, each one token (with its leading space) in most BPE vocabularies, so that a prompt of
# n words is close to n tokens even without a tokenizer.
_WORD_TEXT = """
the of and to in is was for on that with as by at from his her it an are were which this be or had not
but their one all they there been has have new more first its also who after two other when time into
over can only such most years some may these state many would people then than city during about world
between used under where three made both well year before him while last being each part school water
known high name same work house music film game team group book life light small long early family
power land river south north east west church line order open place great road point form field home
side way day night area case war public local report market story white black green blue red large old
young good best left right hand word number system program question government company country room
fact money month lot study job business issue service student
"""
_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))


class TextTokenizer(Protocol):
    """What the workload needs of a tokenizer: plain text <-> ids, without special tokens."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`."""
        ...


class HFTextTokenizer:
    """A Hugging Face tokenizer from a local folder (nothing is downloaded)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`."""
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))

    def count(self, text: str) -> int:
        """How many tokens `text` has."""
        return len(self.encode(text))


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """Random prompts whose input and output lengths are drawn uniformly around a mean."""

    num_prompts: int
    input_len: int = 128
    """Mean prompt length in tokens (in words without a tokenizer)."""
    output_len: int = 64
    """Mean max_tokens."""
    range_ratio: float = 0.0
    """Lengths are drawn from [len * (1 - r), len * (1 + r)]; 0 makes every length exact."""
    seed: int = 0


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """Prompts sampled from a JSONL file."""

    path: Path
    num_prompts: int
    output_len: int = 64
    """max_tokens of lines that carry no answer length of their own."""
    seed: int = 0


def sample_lengths(mean: int, range_ratio: float, count: int, rng: random.Random) -> list[int]:
    """Draw `count` integer lengths uniformly from [mean * (1 - r), mean * (1 + r)], each at least 1."""
    low = max(1, round(mean * (1.0 - range_ratio)))
    high = max(low, round(mean * (1.0 + range_ratio)))
    return [rng.randint(low, high) for _ in range(count)]


def _random_words(count: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def _exact_text(length: int, rng: random.Random, tokenizer: TextTokenizer) -> str:
    """Random words cut to exactly `length` tokens, where the tokenizer allows it."""
    ids = tokenizer.encode(_random_words(length + 8, rng))
    while len(ids) < length:
        ids += tokenizer.encode(" " + _random_words(length, rng))
    # A cut can merge or split tokens on re-encoding; move the cut until the text round-trips to `length`.
    for cut in (length, length - 1, length + 1, length - 2, length + 2):
        text = tokenizer.decode(ids[:cut]).strip()
        if len(tokenizer.encode(text)) == length:
            return text
    return tokenizer.decode(ids[:length]).strip()


def synthetic_prompts(spec: SyntheticSpec, tokenizer: TextTokenizer | None = None) -> list[Prompt]:
    """Build `spec.num_prompts` single-turn prompts of random common words.

    Args:
        spec: Counts, lengths and seed.
        tokenizer: When given, each prompt's text is exactly its drawn length in tokens (the chat template
            adds its own tokens around it); without one, lengths count words.
    """
    rng = random.Random(spec.seed)
    input_lens = sample_lengths(spec.input_len, spec.range_ratio, spec.num_prompts, rng)
    output_lens = sample_lengths(spec.output_len, spec.range_ratio, spec.num_prompts, rng)
    prompts = []
    for n_in, n_out in zip(input_lens, output_lens, strict=True):
        if tokenizer is not None:
            text = _exact_text(n_in, rng, tokenizer)
            input_len: int | None = len(tokenizer.encode(text))
        else:
            text, input_len = _random_words(n_in, rng), None
        prompts.append(Prompt(messages=({"role": "user", "content": text},), output_len=n_out, input_len=input_len))
    return prompts


def _length(text: str, tokenizer: TextTokenizer | None) -> int:
    return len(tokenizer.encode(text)) if tokenizer is not None else len(text.split())


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _parse_line(record: dict[str, Any], default_output_len: int, tokenizer: TextTokenizer | None) -> Prompt | None:
    """One JSONL record as a prompt; None for a record with nothing to ask.

    Accepted shapes: `{"prompt": str, "output_len"?: int}`; `{"messages": [{"role", "content"}, ...]}` (OpenAI);
    `{"conversations": [{"from": "human"|"gpt", "value": str}, ...]}` (ShareGPT). A conversation is cut after
    its first user turn that has an answer, and that answer's length becomes max_tokens, as vLLM's ShareGPT
    benchmark does; without an answer, `default_output_len` is used.
    """
    output_len = int(record.get("output_len") or default_output_len)
    if isinstance(record.get("prompt"), str):
        messages: list[Message] = [{"role": "user", "content": record["prompt"]}]
    else:
        raw = record.get("messages") or record.get("conversations") or []
        messages = []
        for turn in raw:
            role = _SHAREGPT_ROLES.get(str(turn.get("role") or turn.get("from")), "user")
            content = turn.get("content", turn.get("value"))
            if not isinstance(content, str):
                continue
            if role == "assistant" and messages and messages[-1]["role"] == "user":
                if "output_len" not in record:
                    output_len = max(1, _length(content, tokenizer))
                break
            messages.append({"role": role, "content": content})
        while messages and messages[-1]["role"] != "user":
            messages.pop()
    if not messages or not any(m["content"].strip() for m in messages):
        return None
    input_len = sum(_length(m["content"], tokenizer) for m in messages) if tokenizer is not None else None
    return Prompt(messages=tuple(messages), output_len=output_len, input_len=input_len)


def load_jsonl(spec: DatasetSpec, tokenizer: TextTokenizer | None = None) -> list[Prompt]:
    """Sample `spec.num_prompts` prompts from a JSONL file, repeating it when it holds fewer.

    Raises:
        ValueError: When the file holds no usable prompt, or a line is not a JSON object.
    """
    candidates = []
    with spec.path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"{spec.path}:{number}: expected a JSON object")
            prompt = _parse_line(record, spec.output_len, tokenizer)
            if prompt is not None:
                candidates.append(prompt)
    if not candidates:
        raise ValueError(f"{spec.path}: no usable prompt (expected prompt, messages or conversations)")
    rng = random.Random(spec.seed)
    order = list(range(len(candidates)))
    rng.shuffle(order)
    return [candidates[order[i % len(order)]] for i in range(spec.num_prompts)]
