"""The KV cache's dtype (`kv_cache_dtype`): float16 on the CPU tuned path, whose C kernels convert as they read
and write it; float32 on request, and wherever the kernels are off. Tiny random Mistral, real code paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aisandbox.runtime.admission import AdmissionLimits
from aisandbox.runtime.torch import cpu_kernels
from aisandbox.runtime.torch.backend import TorchBackend, TorchEngineConfig
from aisandbox.runtime.types import EngineState
from tests.integration.test_torch_engine import Tapped, collect, reference_greedy
from tests.integration.test_torch_isolation import greedy


async def _run(model_dir: Path, **kw: object) -> tuple[Tapped, list[list[int]]]:
    """An engine with the C kernels on (q4_1 weights), a chunked prompt, the same prompt again (its prefix now
    from the prefix cache) and a short one; then the engine is shut down."""
    config = TorchEngineConfig(
        model_path=model_dir, dtype="float32", weights_dtype="q4_1", max_prefill_tokens=16, kv_cache_mb=1, **kw
    )  # type: ignore[arg-type]
    eng = Tapped(TorchBackend(config), AdmissionLimits(max_queue=64))
    await eng.start()
    assert (await eng.wait_ready(120)).state is EngineState.READY
    try:
        long = [1] + [(37 * i) % 3000 + 10 for i in range(1, 40)]
        out = [(await collect(eng, f"r{i}", p, greedy(12)))[0] for i, p in enumerate((long, long, [1, 5, 9, 14]))]
    finally:
        await eng.shutdown()
    return eng, out


async def test_the_cpu_tuned_path_keeps_a_float16_cache_in_half_the_memory(tiny_mistral_dir: Path) -> None:
    kernels = cpu_kernels.load()
    if kernels is None or not kernels.kv_half:
        pytest.skip("no C kernels with F16C here: the cache stays float32")
    half, out16 = await _run(tiny_mistral_dir)
    full, out32 = await _run(tiny_mistral_dir, kv_cache_dtype="float32")
    assert half.torch._fast is not None and half.torch._fast.kernels is not None
    assert half.torch._kv.dtype == torch.float16 and full.torch._kv.dtype == torch.float32
    assert half.torch._kv_cells == 2 * full.torch._kv_cells  # the same 1 MiB budget holds twice the tokens
    assert out16[0] == out16[1]  # the second run's prefix came from the prefix cache's float16 blocks
    # Rounding K and V to float16 moves this model's logits by about 1e-3: the same greedy tokens as float32.
    assert out16 == out32


async def test_float16_is_not_used_where_the_kernels_are_off(tiny_mistral_dir: Path) -> None:
    """weights fp32 keeps transformers' exact output: no kernels, so the cache keeps the model's dtype."""
    config = TorchEngineConfig(model_path=tiny_mistral_dir, dtype="float32", weights_dtype="fp32", kv_cache_mb=1)
    eng = Tapped(TorchBackend(config), AdmissionLimits(max_queue=64))
    await eng.start()
    assert (await eng.wait_ready(120)).state is EngineState.READY
    try:
        assert eng.torch._kv.dtype == torch.float32
        tokens, _ = await collect(eng, "a", [1, 5, 9, 14], greedy(8))
        assert tokens == reference_greedy(tiny_mistral_dir, [1, 5, 9, 14], 8)
    finally:
        await eng.shutdown()
