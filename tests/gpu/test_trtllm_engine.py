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
    from aisandbox.runtime.trtllm.backend import check_engine_dir

    manifest = check_engine_dir(engine_dir, require_gpu=True)
    assert manifest.profile.max_seq_len == 1024
    assert any(engine_dir.glob("*.engine"))


def test_generate_stream_and_abort(engine_dir: Path) -> None:
    from aisandbox.runtime.admission import Admission
    from aisandbox.runtime.request import GenerationRequest, SamplingParams
    from aisandbox.runtime.trtllm.backend import TrtllmBackend, TrtllmEngineConfig
    from aisandbox.runtime.types import FinishReason

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


def test_the_manifest_records_the_gpu_cuda_built_on(engine_dir: Path) -> None:
    """NVML index and CUDA device must agree (the build pins its GPU by UUID; serve sets PCI_BUS_ID order)."""
    from aisandbox.artifacts import probe_devices, read_manifest

    manifest = read_manifest(engine_dir)
    (gpu,) = manifest.gpus
    assert gpu.uuid == manifest.gpu.uuid
    assert any(d.uuid == gpu.uuid and d.compute_capability == gpu.compute_capability for d in probe_devices())


def test_a_killed_executor_worker_makes_the_engine_dead(engine_dir: Path) -> None:
    """Kill the MPI worker processes under a running stream: the watch task must end it and report DEAD."""
    psutil = pytest.importorskip("psutil")
    from aisandbox.runtime.request import GenerationRequest, SamplingParams
    from aisandbox.runtime.trtllm.backend import TrtllmEngine, TrtllmEngineConfig
    from aisandbox.runtime.types import EngineState, FinishReason

    async def main() -> None:
        engine = TrtllmEngine(TrtllmEngineConfig(engine_dir, health_interval_s=1.0, stall_timeout_s=30.0))
        await engine.start()
        health = await engine.wait_ready(600)
        assert health.ready, health.reason
        prompt = tuple(engine.tokenizer.encode("Hello"))
        stream = engine.submit(GenerationRequest("a", prompt, SamplingParams(max_tokens=800, ignore_eos=True)))
        await stream.__anext__()
        for child in psutil.Process().children(recursive=True):  # the executor's MPI workers (and MPI's daemon)
            child.kill()
        rest = [d async for d in stream]  # must end, not hang
        assert rest[-1].finish_reason is FinishReason.ABORT and rest[-1].error
        for _ in range(60):
            if engine.health().state is EngineState.DEAD:
                break
            await asyncio.sleep(1)
        assert engine.health().state is EngineState.DEAD, engine.health()
        await asyncio.wait_for(engine.shutdown(), 120)

    asyncio.run(main())


def test_tp2_engine_builds_and_streams(trtllm: object, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from aisandbox.artifacts import probe_devices

    if len(probe_devices()) < 2:
        pytest.skip("tensor parallelism needs two GPUs")
    from aisandbox.build_engine.pipeline import BuildRequest, run_build
    from aisandbox.runtime.request import GenerationRequest, SamplingParams
    from aisandbox.runtime.trtllm.backend import TrtllmEngine, TrtllmEngineConfig
    from aisandbox.runtime.types import FinishReason

    out = tmp_path / "tiny-tp2"
    overrides = {"weights": "bf16", "kv_cache": "bf16", "tp_size": 2, "max_batch_size": 8, "max_num_tokens": 1024}
    overrides |= {"max_input_len": 512, "max_seq_len": 1024}
    result = run_build(BuildRequest(checkpoint=tiny_checkpoint, output=out, gpu="auto", overrides=overrides))
    assert result.manifest is not None and result.manifest.tp_size == 2 and len(result.manifest.gpus) == 2
    assert {p.name for p in out.glob("rank*.engine")} == {"rank0.engine", "rank1.engine"}

    async def main() -> None:
        engine = TrtllmEngine(TrtllmEngineConfig(out))
        await engine.start()
        health = await engine.wait_ready(600)
        assert health.ready, health.reason
        prompt = tuple(engine.tokenizer.encode("Hello"))
        req = GenerationRequest("a", prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        deltas = [d async for d in engine.submit(req)]
        assert sum(len(d.token_ids) for d in deltas) == 8 and deltas[-1].finish_reason is FinishReason.LENGTH
        await engine.shutdown()

    asyncio.run(main())


def test_a_negative_seed_samples_without_error(engine_dir: Path) -> None:
    from aisandbox.runtime.request import GenerationRequest, SamplingParams
    from aisandbox.runtime.trtllm.backend import TrtllmEngine, TrtllmEngineConfig
    from aisandbox.runtime.types import FinishReason

    async def main() -> None:
        engine = TrtllmEngine(TrtllmEngineConfig(engine_dir))
        await engine.start()
        assert (await engine.wait_ready(600)).ready
        prompt = tuple(engine.tokenizer.encode("Hello"))
        runs = []
        for rid in ("a", "b"):
            sp = SamplingParams(max_tokens=8, temperature=1.0, seed=-(2**63), ignore_eos=True)
            deltas = [d async for d in engine.submit(GenerationRequest(rid, prompt, sp))]
            assert deltas[-1].finish_reason is FinishReason.LENGTH and deltas[-1].error is None
            runs.append(sum((d.token_ids for d in deltas), ()))
        assert runs[0] == runs[1]  # the same seed samples the same tokens
        await engine.shutdown()

    asyncio.run(main())
