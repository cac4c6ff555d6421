"""OpenAI's sampling set on a built TensorRT engine (GPU + tensorrt_llm only; skipped elsewhere).

Run inside the release image on a GPU host:  python -m pytest tests/gpu -m gpu -q
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.gpu.test_trtllm_engine import engine_dir, tiny_checkpoint, trtllm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.gpu


def test_logit_bias_penalties_and_refused_logprobs(engine_dir: Path) -> None:  # noqa: F811
    from aisandbox.errors import InvalidRequest
    from aisandbox.runtime.request import GenerationRequest, SamplingParams
    from aisandbox.runtime.trtllm.backend import TrtllmEngine, TrtllmEngineConfig

    async def tokens(engine: TrtllmEngine, rid: str, prompt: tuple[int, ...], sp: SamplingParams) -> list[int]:
        return [t async for d in engine.submit(GenerationRequest(rid, prompt, sp)) for t in d.token_ids]

    async def main() -> None:
        engine = TrtllmEngine(TrtllmEngineConfig(engine_dir))
        await engine.start()
        health = await engine.wait_ready(600)
        assert health.ready, health.reason
        prompt = tuple(engine.tokenizer.encode("Hello"))
        greedy = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
        plain = await tokens(engine, "plain", prompt, greedy)
        biased = await tokens(
            engine, "bias", prompt, SamplingParams(max_tokens=4, temperature=0.0, logit_bias=((plain[0], -100.0),))
        )
        assert biased[0] != plain[0]
        penalized = await tokens(
            engine,
            "freq",
            prompt,
            SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, frequency_penalty=2.0),
        )
        if len(set(plain)) < len(plain):  # the random tiny model loops; a strong penalty breaks the loop
            assert len(set(penalized)) > len(set(plain))
        # Served without gather_generation_logits: logprobs are a 400, not an executor error.
        with pytest.raises(InvalidRequest, match="gather_generation_logits"):
            engine.submit(GenerationRequest("lp", prompt, SamplingParams(max_tokens=2, logprobs=True)))
        await engine.shutdown()

    asyncio.run(main())
