"""The prefix cache's keys are keyed hashes, and a hit is confirmed by comparing tokens (issue 17 item 7)."""

from __future__ import annotations

import torch

from aisandbox.runtime.torch.backend import _PrefixCache


def kv(lo: int, hi: int) -> torch.Tensor:
    return torch.full((1, 2, 1, hi - lo, 2), float(lo))


def test_a_hit_returns_the_cached_blocks() -> None:
    cache = _PrefixCache(2**20)
    prompt = tuple(range(1, 21))  # 20 tokens: two full blocks of 8
    cache.store(prompt, 0, kv)
    length, blocks = cache.lookup(prompt + (99,))
    assert length == 16 and [float(b[0, 0, 0, 0, 0]) for b in blocks] == [0.0, 8.0]
    assert cache.lookup((1, 2, 3, 4, 5, 6, 7, 99, 9))[0] == 0  # differs inside the first block


def test_keys_are_secret_per_process() -> None:
    a, b = _PrefixCache(1), _PrefixCache(1)
    prompt = tuple(range(16))
    assert a._keys(prompt, 16) != b._keys(prompt, 16)  # a random key each: nothing to precompute offline
    assert a._keys(prompt, 16) == a._keys(prompt, 16)


def test_a_colliding_key_is_not_a_hit() -> None:
    """Even if two prompts' keys collided, the token comparison refuses the other user's KV."""
    cache = _PrefixCache(2**20)
    cache._keys = lambda tokens, upto: [b"same"] * (upto // cache.BLOCK)  # type: ignore[method-assign]
    victim = tuple(range(100, 117))
    cache.store(victim, 0, kv)
    assert cache.lookup(victim)[0] == 8  # its second block shares the key: the tokens tell them apart
    attacker = tuple(range(200, 217))
    assert cache.lookup(attacker) == (0, [])
