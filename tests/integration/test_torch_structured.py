"""Grammars, penalties and logprobs on the torch backend (tiny random Mistral) under continuous batching."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import torch

from aisandbox.errors import EngineError
from aisandbox.runtime.engine import stream_text
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.structured.grammar import compile_grammar
from aisandbox.runtime.types import EngineState, GrammarSpec, TokenDelta
from tests.integration.test_torch_engine import Tapped, make_engine

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "score"],
    "additionalProperties": False,
}


@pytest.fixture
async def engine(tiny_mistral_dir: Path) -> AsyncIterator[Tapped]:
    eng = make_engine(tiny_mistral_dir)
    await eng.start()
    health = await eng.wait_ready(120)
    assert health.state is EngineState.READY, health
    yield eng
    await eng.shutdown()


async def run(engine: Tapped, rid: str, prompt: list[int], sp: SamplingParams) -> list[TokenDelta]:
    """Submit through the admission layer (its text layer runs too); return the backend's raw token deltas."""
    raw = engine.raw[rid] = asyncio.Queue()
    stream = engine.submit([GenerationRequest(rid, tuple(prompt), sp)])
    deltas = []
    while True:
        delta = await raw.get()
        deltas.append(delta)
        if delta.finish_reason is not None:
            break
    with contextlib.suppress(EngineError):  # a request the engine failed (the test checks its raw delta)
        async for _ in stream:
            pass
    return deltas


def tokens(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def guided(engine: Tapped, sp: SamplingParams, spec: GrammarSpec) -> SamplingParams:
    """What the request path does: compile off the engine thread, attach to the sampling params."""
    return replace(sp, guided=spec, grammar=compile_grammar(spec, engine.tokenizer, engine.model_info))


async def test_mixed_batch_grammar_penalties_logprobs_and_plain(engine: Tapped) -> None:
    tok = engine.tokenizer
    prompt = tok.encode("Question: is it? Answer in JSON.")
    plain = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    alone = tokens(await run(engine, "alone", prompt, plain))
    alone_penalized = tokens(await run(engine, "alone-p", prompt, replace(plain, frequency_penalty=2.0)))

    schema = guided(
        engine, SamplingParams(max_tokens=80, temperature=0.0), GrammarSpec("json_schema", json.dumps(SCHEMA))
    )
    sampled_schema = guided(
        engine, SamplingParams(max_tokens=80, temperature=1.0, seed=5), GrammarSpec("json_schema", json.dumps(SCHEMA))
    )
    regex = guided(engine, SamplingParams(max_tokens=40, temperature=0.0), GrammarSpec("regex", "(yes|no)-[0-9]"))
    cut = guided(engine, SamplingParams(max_tokens=3, temperature=0.0), GrammarSpec("regex", "a{50}"))
    jobs = {
        "plain": plain,
        "penalized": replace(plain, frequency_penalty=2.0),
        "presence": replace(plain, presence_penalty=1.5, logit_bias=((alone[0], -100.0),)),
        "logprobs": replace(plain, logprobs=True, top_logprobs=5),
        "schema": schema,
        "sampled-schema": sampled_schema,
        "regex": regex,
        "cut": cut,
    }
    results = dict(
        zip(jobs, await asyncio.gather(*(run(engine, rid, prompt, sp) for rid, sp in jobs.items())), strict=True)
    )
    assert engine.stats().running == 0

    # Sharing the batch with grammars and penalties changes nothing for the plain sequence ...
    assert tokens(results["plain"]) == alone
    assert tokens(results["penalized"]) == alone_penalized
    # ... and the penalties did change their own.
    assert len(set(alone)) < len(alone)  # the tiny model loops ...
    assert len(set(alone_penalized)) == len(alone_penalized)  # ... and a frequency penalty of 2 breaks the loop
    assert tokens(results["presence"])[0] != alone[0]  # logit_bias -100 on the greedy first token

    for rid in ("schema", "sampled-schema"):
        deltas = results[rid]
        assert deltas[-1].finish_reason is not None and deltas[-1].finish_reason.value == "stop", rid
        assert deltas[-1].stop_token_id in engine.model_info.eos_token_ids
        jsonschema.validate(json.loads(tok.decode(tokens(deltas)[:-1])), SCHEMA)
    regex_text = tok.decode(tokens(results["regex"])[:-1]).strip()
    assert regex_text[:-1] in ("yes-", "no-") and regex_text[-1].isdigit()

    cut_deltas = results["cut"]
    assert cut_deltas[-1].finish_reason is not None and cut_deltas[-1].finish_reason.value == "length"
    assert len(tokens(cut_deltas)) == 3 and set(tok.decode(tokens(cut_deltas)).strip()) == {"a"}

    # Greedy logprobs: the chosen token is the raw distribution's most likely one.
    lp_deltas = results["logprobs"]
    assert tokens(lp_deltas) == alone
    for d in lp_deltas:  # deltas a slow reader left unread arrive merged: one entry per token still
        assert d.logprobs is not None and len(d.logprobs) == len(d.token_ids)
        for token, entry in zip(d.token_ids, d.logprobs, strict=True):
            assert entry.token_id == token and len(entry.top) == 5
            assert entry.top[0][0] == entry.token_id and entry.top[0][1] == pytest.approx(entry.logprob)
            assert entry.logprob <= 0.0
    assert all(d.logprobs is None for d in results["plain"])


async def test_prompt_logprobs_match_a_full_forward(engine: Tapped, tiny_mistral_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    prompt = engine.tokenizer.encode("one two three four five six seven eight nine ten eleven twelve")
    # Warm the prefix cache: an echo request must still run (and score) every prompt token.
    await run(engine, "warm", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    sp = SamplingParams(max_tokens=2, temperature=0.0, logprobs=True, top_logprobs=2, prompt_logprobs=2)
    deltas = await run(engine, "echo", prompt, sp)
    got = deltas[0].prompt_logprobs
    assert got is not None and len(got) == len(prompt) and got[0] is None
    assert all(d.prompt_logprobs is None for d in deltas[1:])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_mistral_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
    for j in range(1, len(prompt)):
        entry = got[j]
        assert entry is not None and entry.token_id == prompt[j]
        assert entry.logprob == pytest.approx(float(ref[j - 1, prompt[j]]), abs=1e-4)
        assert [t for t, _ in entry.top] == ref[j - 1].topk(2).indices.tolist()


async def test_text_layer_sees_guided_text(engine: Tapped) -> None:
    prompt = engine.tokenizer.encode("JSON please")
    sp = guided(engine, SamplingParams(max_tokens=60, temperature=0.0), GrammarSpec("json_schema", json.dumps(SCHEMA)))
    text, last = "", None
    async for delta in stream_text(engine, GenerationRequest("txt", tuple(prompt), sp)):
        text += delta.text
        last = delta
    assert last is not None and last.finish_reason is not None and last.finish_reason.value == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


async def test_an_uncompiled_grammar_is_still_honoured(engine: Tapped) -> None:
    prompt = engine.tokenizer.encode("x")
    sp = SamplingParams(max_tokens=20, temperature=0.0, guided=GrammarSpec("regex", "(yes|no)"))
    deltas = await run(engine, "late", prompt, sp)
    assert engine.tokenizer.decode(tokens(deltas)[:-1]).strip() in ("yes", "no")
    bad = SamplingParams(max_tokens=5, temperature=0.0, guided=GrammarSpec("regex", "(("))
    deltas = await run(engine, "bad", prompt, bad)
    assert deltas[-1].error is not None and "regex" in deltas[-1].error
