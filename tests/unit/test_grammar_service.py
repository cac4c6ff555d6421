"""Grammar compilation as a bounded service (issue 17 item 2): a deadline, cancellation that frees the CPU, and
a fresh worker after either."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aisandbox.errors import InvalidRequest
from aisandbox.runtime.structured.grammar_service import GrammarService
from aisandbox.runtime.text.tokenizer import HFTokenizer
from aisandbox.runtime.types import GrammarSpec
from tests.unit.tiny_hf import CHATML, build_tiny_hf_tokenizer

pytest.importorskip("xgrammar")

SIMPLE = GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
# 300 optional properties: about 5 s to compile with xgrammar 0.1.25 on a 2-core machine, tiny vocabulary.
HARD = GrammarSpec(
    "json_schema", json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(300)}})
)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[GrammarService]:
    tok = HFTokenizer(build_tiny_hf_tokenizer(tmp_path / "t", CHATML))
    svc = GrammarService(tok.vocab_for_grammar(), tok.vocab_size, tuple(tok.eos_token_ids), timeout_s=0.5)
    await svc.start()
    yield svc
    workers = list(svc._all)
    await svc.close()
    assert not any(w.process.is_alive() for w in workers)


async def test_a_grammar_that_compiles_in_time_passes(service: GrammarService) -> None:
    t0 = time.monotonic()
    await service.check(SIMPLE, "response_format")
    print(f"simple schema through the service: {(time.monotonic() - t0) * 1000:.1f} ms")
    assert service.stats().compiled == 1 and service.stats().waiting == 0


async def test_an_invalid_grammar_is_a_400_naming_its_field(service: GrammarService) -> None:
    with pytest.raises(InvalidRequest) as info:
        await service.check(GrammarSpec("regex", "(unclosed"), "guided_regex")
    assert info.value.param == "guided_regex" and info.value.code == "invalid_value"


async def test_past_the_deadline_the_worker_is_killed_and_replaced(service: GrammarService) -> None:
    (worker,) = service._all
    t0 = time.monotonic()
    with pytest.raises(InvalidRequest) as info:
        await service.check(HARD, "response_format")
    assert info.value.code == "grammar_too_complex" and info.value.param == "response_format"
    assert time.monotonic() - t0 < 2.0
    for _ in range(200):
        if not worker.process.is_alive() and service._idle.qsize() == 1:
            break
        await asyncio.sleep(0.02)
    assert not worker.process.is_alive(), "the compile's CPU is freed at the deadline"
    assert service.stats().timeouts == 1 and service.restarts == 1
    await service.check(SIMPLE, "response_format")  # a fresh worker serves the next grammar


async def test_a_client_that_leaves_kills_its_compile(service: GrammarService) -> None:
    service.timeout_s = 60.0
    (worker,) = service._all
    task = asyncio.create_task(service.check(HARD, "response_format"))
    await asyncio.sleep(0.3)
    assert service.stats().waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if not worker.process.is_alive():
            break
        await asyncio.sleep(0.02)
    assert not worker.process.is_alive() and service.stats().cancelled == 1
    t0 = time.monotonic()
    await service.check(SIMPLE, "response_format")
    print(f"worker restart + simple compile: {(time.monotonic() - t0) * 1000:.0f} ms")
