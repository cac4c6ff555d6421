"""What grammars and logprobs cost the decode step of the torch backend, side by side in one process.

Sixteen streams decode together on the default model (greedy, 64 tokens each, ignore EOS). Per run, some rows
carry a JSON schema (one that cannot finish within 64 tokens, so every row decodes all 64 steps) or ask for
top_logprobs 5. The engine's `_forward` and `_sample` are timed around each call; a decode step is one forward
plus one sample of all 16 rows. The configurations alternate over several rounds, and each reports the median
per-step time. Run: `.venv/bin/python -m aisandbox.bench.micro.sampling_overhead [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import replace
from typing import Any

from aisandbox.runtime.admission import Admission
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.structured.grammar import compile_grammar
from aisandbox.runtime.torch.backend import TorchBackend, TorchEngineConfig
from aisandbox.runtime.torch.default_model import prepare_default_model
from aisandbox.runtime.types import GrammarSpec
from aisandbox.settings import ServerSettings

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 100},
        "rating": {"type": "integer"},
    },
    "required": ["title", "tags", "rating"],
    "additionalProperties": False,
}
TOPICS = ["the sea", "a cat", "Paris", "rain", "a robot", "winter", "coffee", "the moon"]
CONFIGS = {
    "plain": (0, 0),
    "1 grammar row": (1, 0),
    "16 grammar rows": (16, 0),
    "1 row top_logprobs=5": (0, 1),
}


class StepTimer:
    """Times the engine's forward and sampling calls (the engine thread runs one at a time)."""

    def __init__(self, engine: TorchBackend) -> None:
        self.forward: list[tuple[int, float]] = []  # (rows, seconds)
        self.sample: list[tuple[int, float]] = []
        forward, sample = engine._forward, engine._sample

        def timed_forward(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = forward(*args, **kwargs)
            self.forward.append((int(args[0].shape[1]), time.perf_counter() - t0))  # query width: 1 = decode
            return out

        def timed_sample(seqs: Any, logits: Any) -> Any:
            t0 = time.perf_counter()
            out = sample(seqs, logits)
            self.sample.append((len(seqs), time.perf_counter() - t0))
            return out

        engine._forward = timed_forward  # type: ignore[method-assign]
        engine._sample = timed_sample  # type: ignore[method-assign]

    def reset(self) -> None:
        self.forward.clear()
        self.sample.clear()


async def run(engine: Admission, timer: StepTimer, name: str, tag: str, prompts: list[list[int]]) -> dict[str, float]:
    grammar_rows, logprob_rows = CONFIGS[name]
    base = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    guided = replace(base, guided=spec, grammar=compile_grammar(spec, engine.tokenizer, engine.model_info))
    logprobs = replace(base, logprobs=True, top_logprobs=5)
    params = [
        guided if i < grammar_rows else logprobs if i >= len(prompts) - logprob_rows else base
        for i in range(len(prompts))
    ]
    timer.reset()

    async def one(i: int) -> int:
        n = 0
        stream = engine.submit([GenerationRequest(f"{tag}-{i}", tuple(prompts[i]), params[i])])
        async for _, delta in stream:
            n = delta.completion_tokens
        return n

    counts = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    assert all(c == 64 for c in counts), counts
    # Decode steps with the whole batch: forward query width 1 and 16 rows sampled.
    full = [t for rows, t in timer.sample if rows == len(prompts)]
    decode_fwd = [t for width, t in timer.forward if width == 1]
    return {
        "sample_ms": 1000 * statistics.median(full),
        "forward_ms": 1000 * statistics.median(decode_fwd),
        "step_ms": 1000 * (statistics.median(full) + statistics.median(decode_fwd)),
    }


async def main(rounds: int, threads: int | None) -> None:
    model_dir = prepare_default_model(ServerSettings().cache_dir)
    backend = TorchBackend(TorchEngineConfig(model_path=model_dir, dtype="float32", max_batch_size=16, threads=threads))
    engine = Admission(backend)
    await engine.start()
    await engine.wait_ready()
    timer = StepTimer(backend)
    chats = [[{"role": "user", "content": f"Describe {TOPICS[i % 8]} as JSON (#{i})."}] for i in range(16)]
    prompts = [engine.tokenizer.encode_chat(c) for c in chats]
    await run(engine, timer, "1 grammar row", "warm", prompts)  # compile, warm the caches
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    names = list(CONFIGS)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate so no config always goes first
        for name in order:
            results[name].append(await run(engine, timer, name, f"{r}-{name}", prompts))
    await engine.shutdown()
    plain = statistics.median(x["step_ms"] for x in results["plain"])
    plain_sample = statistics.median(x["sample_ms"] for x in results["plain"])
    print(f"batch 16, 64 decode steps, {rounds} rounds, medians (ms per decode step)")
    print(f"{'config':24} {'step':>8} {'forward':>8} {'sample':>8} {'step/plain':>11} {'sample-plain':>13}")
    for name in names:
        step = statistics.median(x["step_ms"] for x in results[name])
        fwd = statistics.median(x["forward_ms"] for x in results[name])
        smp = statistics.median(x["sample_ms"] for x in results[name])
        print(f"{name:24} {step:8.2f} {fwd:8.2f} {smp:8.2f} {step / plain:11.3f} {smp - plain_sample:13.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.threads))
