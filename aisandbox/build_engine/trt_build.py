"""Stage 4: compile the engine with tensorrt_llm 1.2.1 — the only module of build_engine that imports it.

The translation from our profile to tensorrt_llm keyword arguments is plain data (the `*_kwargs` functions,
unit-tested against the names in 1.2.1's BuildConfig, QuantConfig, CalibConfig, KvCacheConfig and TrtLlmArgs);
`build_with_trtllm` only turns that data into objects, and needs a GPU. Checked against the v1.2.x source:

* `tensorrt_llm/_tensorrt_engine/__init__.py`: `LLM` is `llmapi.llm._TrtLLM`, the TensorRT-engine LLM.
* `tensorrt_llm/llmapi/llm.py`: `_TrtLLM.__init__(model, ..., dtype, **kwargs)` validates kwargs against
  `TrtLlmArgs` fields; building from a Hugging Face folder runs `CachedModelLoader` (quantize with ModelOpt when
  `QuantConfig._requires_calibration`, passing `calib_config.to_dict()`; then `build(model, build_config)`),
  saves the tokenizer next to the engine, and starts an executor; `save(engine_dir)` copies the engine out of
  the workspace; `shutdown()` stops it.
* `tensorrt_llm/llmapi/llm_args.py`: `TrtLlmArgs` (build_config, quant_config, calib_config, workspace,
  enable_build_cache; the validator requiring `kv_cache_config.dtype == "auto"`, so FP8 KV comes from
  `QuantConfig.kv_cache_quant_algo`), `CalibConfig`, `KvCacheConfig`.
* `tensorrt_llm/builder.py`: `BuildConfig` fields. `tensorrt_llm/models/modeling_utils.py`: `QuantConfig`.
  `tensorrt_llm/quantization/mode.py`: `QuantAlgo` members.
* Which GPU: tensorrt_llm's executor worker (`tensorrt_llm/executor/worker.py`) selects the CUDA device
  `global_rank % device_count`, so rank 0 always builds on CUDA device 0 of what it can see. CUDA numbers
  devices fastest-first unless `CUDA_DEVICE_ORDER=PCI_BUS_ID`, while NVML (our `--device`) numbers them in PCI
  order. `cuda_device_env` therefore pins the ranks' GPUs by NVML UUID (or PCI-ordered index) in
  CUDA_VISIBLE_DEVICES before tensorrt_llm is imported; its MPI workers inherit the environment.
* Tensor parallelism: `tensor_parallel_size` is an `_TrtLLM.__init__` parameter (llmapi/llm.py); the LLM API
  spawns one MPI worker per rank itself (`MpiPoolSession`, llmapi/mpi_session.py) and writes rank{N}.engine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisandbox.artifacts import TRTLLM_MISSING_MESSAGE, DeviceInfo, EngineIncompatible, check_trtllm_version
from aisandbox.build_engine.profiles import KV_PRECISIONS, WEIGHT_PRECISIONS

__all__ = [
    "BUILD_KV_CACHE_FRACTION",
    "BuildSpec",
    "build_config_kwargs",
    "cuda_device_env",
    "build_with_trtllm",
    "calib_config_kwargs",
    "llm_build_kwargs",
    "quant_config_kwargs",
]

BUILD_KV_CACHE_FRACTION = 0.1
"""KV fraction for the executor LLM() starts after building: the build only needs the engine, not a big cache."""


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """Everything the tensorrt_llm build takes."""

    checkpoint: Path
    dtype: str
    """Compute dtype of the unquantized parts: bfloat16 or float16."""
    weights: str
    kv_cache: str
    max_batch_size: int
    max_num_tokens: int
    max_input_len: int
    max_seq_len: int
    workspace: Path
    """Scratch space for the LLM API (quantized checkpoint, engine before save): next to the output, not /tmp."""
    calib_dataset: Path | None = None
    """A local dataset folder (load_dataset(dir, split='train') with a 'text' column); None when not needed."""
    calib_size: int = 512
    calib_max_seq_length: int = 512
    tp_size: int = 1
    """Tensor-parallel ranks (GPUs)."""
    devices: tuple[DeviceInfo, ...] = ()
    """The ranks' GPUs in rank order (empty: whatever CUDA device 0.. is, as in a dry run)."""


def cuda_device_env(devices: Sequence[DeviceInfo]) -> dict[str, str]:
    """Environment that makes CUDA devices 0..N-1 of this process exactly these GPUs, in this order.

    UUIDs are order-independent; without them, NVML's index is the PCI-bus-order index, so CUDA is told to
    number devices in PCI order too.
    """
    if not devices:
        return {}
    ids = [d.uuid if d.uuid else str(d.index) for d in devices]
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(ids)}


def quant_config_kwargs(weights: str, kv_cache: str) -> dict[str, str | None]:
    """QuantConfig keyword arguments, with QuantAlgo members by name (None: no quantization)."""
    return {
        "quant_algo": WEIGHT_PRECISIONS[weights].quant_algo,
        "kv_cache_quant_algo": KV_PRECISIONS[kv_cache].quant_algo,
    }


def build_config_kwargs(spec: BuildSpec) -> dict[str, int]:
    """BuildConfig keyword arguments: the engine's limits (everything else keeps 1.2.1's defaults)."""
    return {
        "max_batch_size": spec.max_batch_size,
        "max_num_tokens": spec.max_num_tokens,
        "max_input_len": spec.max_input_len,
        "max_seq_len": spec.max_seq_len,
        "max_beam_width": 1,
    }


def calib_config_kwargs(spec: BuildSpec) -> dict[str, Any] | None:
    """CalibConfig keyword arguments, or None when the precision needs no calibration."""
    needed = WEIGHT_PRECISIONS[spec.weights].needs_calibration or KV_PRECISIONS[spec.kv_cache].needs_calibration
    if not needed:
        return None
    if spec.calib_dataset is None:
        raise ValueError("this precision needs calibration: pass --calib-dataset DIR (a local dataset)")
    return {
        "device": "cuda",
        "calib_dataset": str(spec.calib_dataset),
        "calib_batches": spec.calib_size,
        "calib_max_seq_length": spec.calib_max_seq_length,
    }


def llm_build_kwargs(spec: BuildSpec) -> dict[str, Any]:
    """The plain-data keyword arguments of `_tensorrt_engine.LLM(...)` for a build (objects added separately)."""
    return {
        "model": str(spec.checkpoint),
        "dtype": spec.dtype,
        "tensor_parallel_size": spec.tp_size,
        "workspace": str(spec.workspace),
        # The built-in build cache keys on the model path and build config but not the GPU architecture.
        "enable_build_cache": False,
    }


def _offline() -> None:
    """Forbid hub downloads (calibration datasets, tokenizers): everything must be local."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def build_with_trtllm(spec: BuildSpec, engine_dir: Path, say: Callable[[str], None]) -> str:
    """Build the engine from the checkpoint and save it into `engine_dir`; return the tensorrt_llm version.

    Needs a GPU (tp_size of them) and tensorrt_llm 1.2.x (NVIDIA's release:1.2.1 image).
    """
    _offline()
    env = cuda_device_env(spec.devices)
    torch: Any = sys.modules.get("torch")
    cuda_started = torch is not None and bool(torch.cuda.is_initialized())
    if env and (cuda_started or any(name in sys.modules for name in ("tensorrt_llm", "mpi4py"))):
        # CUDA and MPI read the device list once; too late to pin the GPUs in this process.
        raise RuntimeError("CUDA or MPI started before the build chose its GPUs; run build-engine in its own process")
    os.environ.update(env)
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise EngineIncompatible(TRTLLM_MISSING_MESSAGE) from exc
    version = str(tensorrt_llm.__version__)
    check_trtllm_version(version)
    from tensorrt_llm._tensorrt_engine import LLM
    from tensorrt_llm.llmapi import BuildConfig, CalibConfig, KvCacheConfig, QuantAlgo, QuantConfig

    names = quant_config_kwargs(spec.weights, spec.kv_cache)
    quant = {key: (QuantAlgo[name] if name is not None else None) for key, name in names.items()}
    kwargs = llm_build_kwargs(spec)
    kwargs["build_config"] = BuildConfig(**build_config_kwargs(spec))
    kwargs["quant_config"] = QuantConfig(**quant)
    kwargs["kv_cache_config"] = KvCacheConfig(free_gpu_memory_fraction=BUILD_KV_CACHE_FRACTION)
    calib = calib_config_kwargs(spec)
    if calib is not None:
        kwargs["calib_config"] = CalibConfig(**calib)
    spec.workspace.mkdir(parents=True, exist_ok=True)
    say(f"tensorrt_llm {version}: loading, {'calibrating, ' if calib else ''}compiling (this takes minutes)")
    llm = LLM(**kwargs)
    try:
        say(f"saving the engine to {engine_dir}")
        llm.save(str(engine_dir))
    finally:
        llm.shutdown()
    return version
