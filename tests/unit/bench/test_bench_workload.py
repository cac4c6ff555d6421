"""Workloads: synthetic prompt lengths, seeding, and JSONL prompts / conversations."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from aisandbox.bench.workload import DatasetSpec, SyntheticSpec, load_jsonl, sample_lengths, synthetic_prompts


class CharTokenizer:
    """One token per character: every cut is exact, and easy to check by hand."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in token_ids)


def test_synthetic_without_tokenizer_counts_words() -> None:
    prompts = synthetic_prompts(SyntheticSpec(num_prompts=5, input_len=20, output_len=7, seed=1))
    assert len(prompts) == 5
    assert all(len(p.text.split()) == 20 and p.output_len == 7 and p.input_len is None for p in prompts)
    assert all(p.messages[0]["role"] == "user" for p in prompts)
    assert len({p.text for p in prompts}) == 5  # distinct prompts: no accidental prefix caching


def test_synthetic_is_seeded() -> None:
    spec = SyntheticSpec(num_prompts=3, input_len=10, seed=4)
    assert synthetic_prompts(spec) == synthetic_prompts(spec)
    assert synthetic_prompts(spec) != synthetic_prompts(SyntheticSpec(num_prompts=3, input_len=10, seed=5))


def test_synthetic_exact_lengths_with_tokenizer() -> None:
    tok = CharTokenizer()
    prompts = synthetic_prompts(SyntheticSpec(num_prompts=6, input_len=50, range_ratio=0.5, seed=2), tok)
    for p in prompts:
        assert p.input_len == len(tok.encode(p.text))
        assert 25 <= p.input_len <= 75
    assert len({p.input_len for p in prompts}) > 1


def test_sample_lengths_bounds() -> None:
    lengths = sample_lengths(100, 0.2, 1000, random.Random(0))
    assert min(lengths) >= 80 and max(lengths) <= 120
    assert sample_lengths(5, 0.0, 3, random.Random(0)) == [5, 5, 5]
    assert min(sample_lengths(1, 0.9, 50, random.Random(0))) >= 1


def _write(tmp_path: Path, lines: list[object]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return path


def test_jsonl_shapes(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            {"prompt": "plain prompt", "output_len": 5},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]},
            {
                "conversations": [
                    {"from": "human", "value": "what is up"},
                    {"from": "gpt", "value": "one two three four"},
                    {"from": "human", "value": "later turn"},
                ]
            },
            {"conversations": [{"from": "gpt", "value": "no question"}]},
        ],
    )
    prompts = load_jsonl(DatasetSpec(path, num_prompts=3, output_len=9, seed=0))
    by_text = {p.text: p for p in prompts}
    assert by_text["plain prompt"].output_len == 5
    assert by_text["be brief\nhi there"].output_len == 9
    assert len(by_text["be brief\nhi there"].messages) == 2
    sharegpt = by_text["what is up"]
    assert sharegpt.messages == ({"role": "user", "content": "what is up"},)
    assert sharegpt.output_len == 4  # the answer's length (words, without a tokenizer)


def test_jsonl_repeats_and_counts_with_tokenizer(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"prompt": "abc"}])
    prompts = load_jsonl(DatasetSpec(path, num_prompts=4), CharTokenizer())
    assert len(prompts) == 4 and all(p.input_len == 3 for p in prompts)


def test_jsonl_rejects_unusable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no usable prompt"):
        load_jsonl(DatasetSpec(_write(tmp_path, [{"other": 1}]), num_prompts=1))
    with pytest.raises(ValueError, match="JSON object"):
        load_jsonl(DatasetSpec(_write(tmp_path, [[1, 2]]), num_prompts=1))
