"""Engine alone vs transformers' own continuous batching, in one process, on the same prompts.

Why the torch backend schedules itself instead of using `ContinuousBatchingManager`: this script measures
both on the default model (greedy, max_tokens 64, ignore EOS so both produce the same token counts), at 1 and
16 concurrent sequences, and prints the ratio.
Run: `.venv/bin/python -m aisandbox.bench.micro.engine_vs_transformers_cb`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from aisandbox.runtime.admission import Admission
from aisandbox.runtime.engine import stream_text
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.torch.backend import TorchBackend, TorchEngineConfig
from aisandbox.runtime.torch.default_model import prepare_default_model
from aisandbox.settings import ServerSettings

TOPICS = ["the sea", "a cat", "Paris", "rain", "a robot", "winter", "coffee", "the moon"]


def prompts(tokenizer, n: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [
        tokenizer.encode_chat([{"role": "user", "content": f"Write a short story about {TOPICS[i % 8]} (#{i})."}])
        for i in range(n)
    ]


async def ours(model_dir: Path, concurrency: int, max_tokens: int) -> tuple[float, int]:
    engine = Admission(TorchBackend(TorchEngineConfig(model_path=model_dir, dtype="float32")))
    await engine.start()
    await engine.wait_ready()
    batch = prompts(engine.tokenizer, concurrency)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, ids: list[int]) -> int:
        n = 0
        async for delta in stream_text(engine, GenerationRequest(f"r{i}", tuple(ids), sp)):
            n = delta.completion_tokens
        return n

    await one(-1, batch[0])  # warm-up
    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(batch)))
    elapsed = time.perf_counter() - start
    await engine.shutdown()
    return elapsed, sum(counts)


def transformers_cb(model_dir: Path, token_prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    model.generate_batch(inputs=token_prompts[:1], generation_config=config)  # warm-up
    start = time.perf_counter()
    out = model.generate_batch(inputs=token_prompts, generation_config=config)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(r.generated_tokens) for r in out.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = prepare_default_model(ServerSettings().cache_dir)
    from aisandbox.runtime.text.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {model_dir.name}")
    print("| sequences | ours engine-alone tok/s | transformers CB tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    for c in (int(x) for x in args.concurrency.split(",")):
        t_ours, n_ours = asyncio.run(ours(model_dir, c, args.max_tokens))
        t_cb, n_cb = transformers_cb(model_dir, prompts(tok, c), args.max_tokens)
        a, b = n_ours / t_ours, n_cb / t_cb
        print(f"| {c} | {a:.1f} | {b:.1f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
