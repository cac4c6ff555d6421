"""Build a tiny Mistral engine with tensorrt_llm and serve it through TrtllmEngine (GPU + tensorrt_llm only).

Run inside the release image on a GPU host:  python -m pytest tests/gpu -m gpu -q
"""

from __future__ import annotations

import asyncio
import importlib.resources
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def trtllm() -> object:
    module = pytest.importorskip("tensorrt_llm", reason="tensorrt_llm 1.2.x is not installed (GPU image only)")
    from aisandbox.artifacts import GpuNotFound, probe_devices

    try:
        probe_devices()
    except GpuNotFound as exc:
        pytest.skip(f"no NVIDIA GPU: {exc}")
    return module


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Mistral whose head_dim (64) the fused attention kernels support."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    path = tmp_path_factory.mktemp("tiny-mistral-gpu")
    config = MistralConfig(
        vocab_size=32768,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        sliding_window=None,
    )
    MistralForCausalLM(config).to(dtype=torch.bfloat16).save_pretrained(path)
    tok = importlib.resources.files("mistral_common") / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    with importlib.resources.as_file(tok) as src:
        shutil.copy(src, path / "tokenizer.model.v3")
    return path


@pytest.fixture(scope="module")
def engine_dir(trtllm: object, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aisandbox.build_engine.pipeline import BuildRequest, run_build

    out = tmp_path_factory.mktemp("engines") / "tiny"
    request = BuildRequest(
        checkpoint=tiny_checkpoint,
        output=out,
        gpu="auto",
        overrides={
            "weights": "bf16",
            "kv_cache": "bf16",
            "max_batch_size": 8,
            "max_num_tokens": 1024,
            "max_input_len": 512,
            "max_seq_len": 1024,
        },
    )
    result = run_build(request)
    assert result.engine_dir == out.resolve()
    return out


def test_the_built_engine_matches_this_machine(engine_dir: Path) -> None:
    from aisandbox.runtime.trtllm_backend import check_engine_dir

    manifest = check_engine_dir(engine_dir, require_gpu=True)
    assert manifest.profile.max_seq_len == 1024
    assert any(engine_dir.glob("*.engine"))


def test_generate_stream_and_abort(engine_dir: Path) -> None:
    from aisandbox.runtime.admission import Admission
    from aisandbox.runtime.trtllm_backend import TrtllmBackend, TrtllmEngineConfig
    from aisandbox.runtime.types import FinishReason, GenerationRequest, SamplingParams

    async def main() -> None:
        engine = Admission(TrtllmBackend(TrtllmEngineConfig(engine_dir)))
        await engine.start()
        health = await engine.wait_ready(600)
        assert health.ready, health.reason
        prompt = tuple(engine.tokenizer.encode("Hello"))
        req = GenerationRequest("a", prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        deltas = [d async for _, d in engine.submit([req])]
        assert deltas[-1].completion_tokens == 16
        assert deltas[-1].finish_reason is FinishReason.LENGTH

        long = GenerationRequest("b", prompt, SamplingParams(max_tokens=500, ignore_eos=True))
        stream = engine.submit([long])
        await anext(aiter(stream))
        await stream.aclose()
        for _ in range(100):
            if engine.stats().running + engine.stats().waiting == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().running + engine.stats().waiting == 0
        await engine.shutdown()

    asyncio.run(main())
