"""Chunked prefill, side by side in one run: a running stream's largest gap while a long prompt prefills, and
decode throughput at 1 and 16 streams, with chunking off and on (torch backend, default model, defaults).

    .venv/bin/python -m aisandbox.bench.micro.chunked_prefill [--prompt-tokens 4000] [--chunk 512]

"off" sets max_prefill_tokens above the long prompt, so it prefills in one step (as before chunked prefill);
"on" uses the chunk size. Each configuration loads its own engine; they run alternately, twice. Decode
throughput: short prompts (no chunking happens), 64 greedy tokens a stream, output tokens per second of wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from typing import Any

from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.torch.backend import TorchBackend, TorchEngineConfig


class _Host:
    """The Backend's host, recording when each request's deltas arrive."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.times: dict[str, list[float]] = {}
        self.done: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    def loaded(self, *args: Any) -> None:
        self.ready.set()

    def failed(self, reason: str) -> None:
        raise SystemExit(f"engine failed: {reason}")

    def emit(self, deltas: Any) -> None:
        now = time.perf_counter()
        for rid, delta in deltas:
            self.times.setdefault(rid, []).append(now)
            self.tokens[rid] = self.tokens.get(rid, 0) + len(delta.token_ids)
            if delta.finish_reason is not None:
                self.done[rid] = now


async def _wait(host: _Host, rids: list[str], timeout_s: float = 600) -> None:
    deadline = time.perf_counter() + timeout_s
    while not all(r in host.done for r in rids):
        if time.perf_counter() > deadline:
            raise SystemExit("timed out")
        await asyncio.sleep(0.005)


async def _run(chunk: int, prompt_tokens: int) -> dict[str, float]:
    from aisandbox.runtime.torch.default_model import prepare_default_model
    from aisandbox.settings import ServerSettings

    path = prepare_default_model(ServerSettings().cache_dir)
    backend = TorchBackend(TorchEngineConfig(model_path=path, max_prefill_tokens=chunk))
    host = _Host()
    backend.start(host)  # type: ignore[arg-type]
    await asyncio.to_thread(host.ready.wait, 600)
    greedy = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    out: dict[str, float] = {}
    try:
        # Warm up (the format choice, the first forward).
        backend.add(GenerationRequest("warm", (1, 2, 3, 4), greedy))
        await _wait(host, ["warm"])
        # 1. The gap: one stream decodes; a long prompt arrives; the stream's largest gap while it prefills.
        long_sp = SamplingParams(max_tokens=100000, temperature=0.0, ignore_eos=True)
        backend.add(GenerationRequest("bg", (1, 5, 6, 7), long_sp))
        await asyncio.sleep(0.5)
        prompt = tuple([1] + [(i * 37) % 40000 + 100 for i in range(prompt_tokens - 1)])
        t0 = time.perf_counter()
        backend.add(GenerationRequest("long", prompt, SamplingParams(max_tokens=1, temperature=0.0)))
        await _wait(host, ["long"])
        t1 = time.perf_counter()
        await asyncio.sleep(0.5)  # the stream goes on after the prefill: its first token after it counts
        stamps = [t for t in host.times["bg"] if t0 - 1.0 <= t <= t1 + 0.5]
        out["prefill_s"] = t1 - t0
        out["gap_s"] = max((b - a for a, b in zip(stamps, stamps[1:], strict=False)), default=t1 - t0)
        backend.abort("bg")
        await asyncio.sleep(0.2)
        # 2. Decode throughput at 1 and 16 streams (short prompts: chunking never applies).
        for streams in (1, 16):
            rids = [f"d{streams}-{i}" for i in range(streams)]
            t0 = time.perf_counter()
            for i, rid in enumerate(rids):
                backend.add(GenerationRequest(rid, (1, 10 + i, 20 + i, 30 + i), greedy))
            await _wait(host, rids)
            out[f"tok_s_{streams}"] = sum(host.tokens[r] for r in rids) / (time.perf_counter() - t0)
    finally:
        await backend.shutdown()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows: list[tuple[str, dict[str, float]]] = []
    for _ in range(args.rounds):
        for name, chunk in (("off", args.prompt_tokens + 16), ("on", args.chunk)):
            rows.append((name, await _run(chunk, args.prompt_tokens)))
            r = rows[-1][1]
            print(
                f"chunking {name:3s} (max_prefill_tokens {chunk}): largest gap {r['gap_s']:.3f} s while a "
                f"{args.prompt_tokens}-token prompt prefilled in {r['prefill_s']:.2f} s; decode "
                f"{r['tok_s_1']:.1f} tok/s at 1 stream, {r['tok_s_16']:.1f} at 16",
                flush=True,
            )
    for key, label in (("gap_s", "largest gap"), ("tok_s_1", "1-stream tok/s"), ("tok_s_16", "16-stream tok/s")):
        off = [r[key] for n, r in rows if n == "off"]
        on = [r[key] for n, r in rows if n == "on"]
        print(
            f"{label}: off {min(off):.3f}-{max(off):.3f}, on {min(on):.3f}-{max(on):.3f},"
            f" on/off {sum(on) / sum(off):.3f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
