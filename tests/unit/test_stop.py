"""Stop strings never leak, not even partly, whatever the chunking."""

from __future__ import annotations

import random

import pytest

from aisandbox.runtime.text.stop import StopMatcher


def run(stops: list[str], chunks: list[str]) -> tuple[str, str | None, list[str]]:
    m = StopMatcher(stops)
    emitted: list[str] = []
    for chunk in chunks:
        text, matched = m.feed(chunk)
        emitted.append(text)
        if matched is not None:
            return "".join(emitted), matched, emitted
    emitted.append(m.flush())
    return "".join(emitted), None, emitted


def test_stop_inside_one_chunk() -> None:
    assert run(["STOP"], ["hello STOP world"])[:2] == ("hello ", "STOP")


def test_stop_split_across_chunks_is_held_back() -> None:
    text, matched, emitted = run(["STOP"], ["hello S", "T", "O", "P and more"])
    assert (text, matched) == ("hello ", "STOP")
    assert all("S" not in e for e in emitted)


def test_partial_prefix_released_when_it_does_not_complete() -> None:
    text, matched, emitted = run(["STOP"], ["a ST", "x"])
    assert matched is None and text == "a STx"
    assert emitted[0] == "a "  # "ST" was held until it could no longer become STOP


def test_earliest_of_several_stops_wins() -> None:
    assert run(["world", "lo"], ["hello world"])[:2] == ("hel", "lo")


def test_no_stops_passes_through() -> None:
    m = StopMatcher([])
    assert not m.active and m.feed("abc") == ("abc", None)


@pytest.mark.parametrize("seed", range(20))
def test_random_chunking_never_leaks(seed: int) -> None:
    rng = random.Random(seed)
    body = "".join(rng.choice("ab<|end|> ") for _ in range(60))
    stop = "<|end|>"
    cut = sorted(rng.sample(range(1, len(body)), 8))
    chunks = [body[i:j] for i, j in zip([0, *cut], [*cut, len(body)], strict=True)]
    text, matched, emitted = run([stop], chunks)
    expected = body.split(stop)[0]
    assert text == expected
    assert matched == (stop if stop in body else None)
    assert stop not in "".join(emitted)
