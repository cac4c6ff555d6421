"""The engine directory and its manifest: the only contract between `build_engine` and `runtime`.

An engine directory, as `aisandbox build-engine` writes it::

    <engine_dir>/
      config.json              TensorRT-LLM's engine config (pretrained_config + build_config), from llm.save
      rank0.engine ...         the serialized TensorRT plan, one per tensor-parallel rank (rank0..rank{tp-1}),
                               bound to one GPU architecture and TensorRT version
      tokenizer.json ...       the checkpoint's tokenizer files (tokenizer.model.v3 for Mistral), copied in
      aisandbox-engine.json    the manifest below, written last

A compiled plan only loads on the GPU architecture (compute capability) and the exact TensorRT version it was
built with, and in practice only with the TensorRT-LLM version whose plugins it embeds. The manifest records
those, plus what was built and why (the resolved GPU profile), so the runtime can refuse an engine up front with
a message that says what to rebuild, instead of failing deep inside TensorRT. Nothing is inferred from paths.

This module also probes the environment the manifest describes (GPUs through NVML or `nvidia-smi`, library
versions through package metadata); it never imports tensorrt_llm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA_VERSION",
    "SUPPORTED_TRTLLM",
    "TRTLLM_MISSING_MESSAGE",
    "TOKENIZER_FILES",
    "TRTLLM_CONFIG_FILE",
    "DeviceInfo",
    "DeviceSource",
    "EngineDirError",
    "EngineIdentity",
    "EngineIncompatible",
    "EngineManifest",
    "EngineProfile",
    "GpuNotFound",
    "LibraryVersions",
    "ModelSummary",
    "check_compatibility",
    "check_trtllm_version",
    "engine_hash",
    "library_versions",
    "parse_nvidia_smi",
    "probe_devices",
    "read_manifest",
    "write_manifest",
]

MANIFEST_FILE = "aisandbox-engine.json"
"""The manifest's file name inside an engine directory."""
MANIFEST_SCHEMA_VERSION = 1
TRTLLM_CONFIG_FILE = "config.json"
"""TensorRT-LLM's own engine config, written by `llm.save`; its presence marks a TensorRT-LLM engine dir."""
SUPPORTED_TRTLLM = "1.2"
"""The tensorrt_llm release line this project is written against (the last with the TensorRT backend)."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer.model.v1",
    "tokenizer.model.v3",
    "tokenizer.model.v7",
    "tokenizer.model.v7m1",
    "tekken.json",
    "generation_config.json",
    "chat_template.jinja",
)
"""Files copied from the checkpoint into the engine dir, so `load_tokenizer(engine_dir)` works there."""

TRTLLM_MISSING_MESSAGE = (
    "tensorrt_llm is not installed here. TensorRT-LLM engines are built and served inside NVIDIA's TensorRT-LLM "
    "release image (nvcr.io/nvidia/tensorrt-llm/release:1.2.1) on an NVIDIA GPU; see docs/deploy.md. "
    "Without a GPU, serve a Hugging Face model with the torch backend instead (aisandbox serve --model DIR)."
)

_REBUILD_HINT = (
    "Rebuild the engine on this machine: aisandbox build-engine --checkpoint <hf-folder> --gpu auto "
    "--output {engine_dir} (see docs/deploy.md, 'Rebuild after a driver or GPU change')."
)


class EngineDirError(ValueError):
    """The engine directory is missing, incomplete or its manifest is unreadable."""


class EngineIncompatible(EngineDirError):
    """The engine was built for another GPU architecture or library version than the one here."""


class GpuNotFound(RuntimeError):
    """No NVIDIA GPU could be found through NVML or nvidia-smi."""


# ---- what the manifest records ----


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One NVIDIA GPU, as NVML or nvidia-smi report it."""

    index: int
    name: str
    """Marketing name, e.g. 'NVIDIA H100 80GB HBM3'."""
    compute_capability: str
    """'major.minor', e.g. '9.0' (Hopper), '8.9' (Ada), '8.0' / '8.6' (Ampere)."""
    memory_bytes: int
    """Total device memory."""
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    """Highest CUDA version the driver supports, e.g. '13.0'."""
    uuid: str | None = None
    """NVML's 'GPU-...' id, which CUDA_VISIBLE_DEVICES accepts regardless of CUDA's device order."""
    memory_used_bytes: int | None = None
    """Memory other processes hold when probed (None: unknown). Not written into manifests."""

    @property
    def memory_gib(self) -> float:
        """Total memory in GiB."""
        return self.memory_bytes / 2**30


@dataclass(frozen=True, slots=True)
class LibraryVersions:
    """Versions of the libraries a compiled engine is bound to (None: not installed)."""

    tensorrt_llm: str | None
    tensorrt: str | None
    cuda: str | None = None
    """CUDA runtime of the framework build (torch.version.cuda), informational."""


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """What was compiled: the checkpoint's shape, read from its config.json."""

    architecture: str
    dtype: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    num_parameters: int
    checkpoint_fingerprint: str
    """sha256 over config.json and the weight files' names and sizes."""


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """The resolved GPU profile the engine was built with (build limits + runtime KV fraction)."""

    name: str
    weights: str
    """Weight precision: bf16, fp16, fp8, int8_wo, int4_wo, int4_awq, int8_sq."""
    kv_cache: str
    """KV-cache precision: bf16, fp16, fp8, int8."""
    max_batch_size: int
    max_num_tokens: int
    max_input_len: int
    max_seq_len: int
    kv_cache_free_gpu_memory_fraction: float
    """Runtime only: share of free GPU memory (after weights and activations) given to the paged KV cache."""
    tp_size: int = 1
    """Tensor parallelism: ranks (GPUs) the engine spans; rank{N}.engine per rank."""
    scheduler_policy: str = "guaranteed_no_evict"
    """Runtime only: tensorrt_llm CapacitySchedulerPolicy, lower-case (guaranteed_no_evict, max_utilization)."""
    default_max_tokens: int | None = None
    """Runtime only: max_tokens for requests that omit it (None: the rest of the context)."""
    gather_generation_logits: bool = False
    """Runtime only: served with generation logits gathered, so requests may ask for logprobs."""
    runtime_max_num_tokens: int | None = None
    """Runtime only: the executor's per-step token budget with chunked prefill on (None, in manifests written
    before it existed: 2048, capped at max_num_tokens)."""


@dataclass(frozen=True, slots=True)
class EngineIdentity:
    """Exactly what determines the compiled plan; its hash names the engine.

    Not included, because they do not change the plan: the GPU's marketing name and memory size, the driver,
    and the runtime KV-cache fraction.
    """

    checkpoint_fingerprint: str
    architecture: str
    dtype: str
    weights: str
    kv_cache: str
    max_batch_size: int
    max_num_tokens: int
    max_input_len: int
    max_seq_len: int
    compute_capability: str
    tensorrt_llm: str
    tensorrt: str
    tp_size: int = 1


def engine_hash(identity: EngineIdentity) -> str:
    """Return the sha256 (hex) of the canonical JSON of an engine's identity."""
    canonical = json.dumps(dataclasses.asdict(identity), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class EngineManifest:
    """The sidecar `aisandbox build-engine` writes next to the engine."""

    engine_hash: str
    created_at: str
    """ISO 8601, UTC."""
    aisandbox_version: str
    model: ModelSummary
    profile: EngineProfile
    gpu: DeviceInfo
    """The GPU of rank 0 (the only one for tp_size 1)."""
    versions: LibraryVersions
    schema_version: int = MANIFEST_SCHEMA_VERSION
    gpus: tuple[DeviceInfo, ...] = ()
    """Every GPU the engine was built on, rank order (empty in manifests written before tensor parallelism)."""

    @property
    def tp_size(self) -> int:
        """Ranks the engine needs (one GPU each)."""
        return self.profile.tp_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineManifest:
        """Rebuild a manifest from `to_dict()` output; raise EngineDirError on a wrong shape."""
        try:
            return cls(
                engine_hash=str(data["engine_hash"]),
                created_at=str(data["created_at"]),
                aisandbox_version=str(data["aisandbox_version"]),
                model=ModelSummary(**data["model"]),
                profile=EngineProfile(**data["profile"]),
                gpu=DeviceInfo(**data["gpu"]),
                versions=LibraryVersions(**data["versions"]),
                schema_version=int(data["schema_version"]),
                gpus=tuple(DeviceInfo(**g) for g in data.get("gpus", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineDirError(f"the engine manifest has an unexpected shape ({exc!r})") from exc


def write_manifest(engine_dir: Path, manifest: EngineManifest) -> Path:
    """Write the manifest into `engine_dir` atomically; return its path."""
    path = engine_dir / MANIFEST_FILE
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=engine_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_manifest(engine_dir: Path) -> EngineManifest:
    """Read and check an engine directory's manifest.

    Raises:
        EngineDirError: The directory, TensorRT-LLM's config.json or the manifest is missing or unreadable.
    """
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineDirError(f"engine directory {engine_dir} does not exist")
    path = engine_dir / MANIFEST_FILE
    if not path.is_file():
        raise EngineDirError(
            f"{engine_dir} has no {MANIFEST_FILE}: it was not built by `aisandbox build-engine` "
            "(or the build did not finish). " + _REBUILD_HINT.format(engine_dir=engine_dir)
        )
    if not (engine_dir / TRTLLM_CONFIG_FILE).is_file():
        raise EngineDirError(f"{engine_dir} has no {TRTLLM_CONFIG_FILE}: the engine directory is incomplete")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineDirError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        found = data.get("schema_version") if isinstance(data, dict) else None
        raise EngineDirError(
            f"{path} has manifest schema {found!r}, this aisandbox reads schema {MANIFEST_SCHEMA_VERSION}. "
            + _REBUILD_HINT.format(engine_dir=engine_dir)
        )
    return EngineManifest.from_dict(data)


# ---- compatibility ----


def _parse_version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def check_trtllm_version(installed: str | None) -> None:
    """Raise EngineIncompatible unless `installed` is a tensorrt_llm of the supported 1.2 line."""
    if installed is None:
        raise EngineIncompatible(TRTLLM_MISSING_MESSAGE)
    version = _parse_version(installed)
    if version is None:
        raise EngineIncompatible(f"cannot parse the installed tensorrt_llm version {installed!r}")
    if version.release[:2] >= (1, 3):
        raise EngineIncompatible(
            f"tensorrt_llm {installed} is installed, but the TensorRT engine backend was removed in 1.3; "
            f"aisandbox needs tensorrt_llm {SUPPORTED_TRTLLM}.x (use the release:1.2.1 image)."
        )
    if version.release[:2] < (1, 2):
        raise EngineIncompatible(
            f"tensorrt_llm {installed} is older than {SUPPORTED_TRTLLM}; use the release:1.2.1 image."
        )


def check_compatibility(
    manifest: EngineManifest, engine_dir: Path, gpu: DeviceInfo | None, versions: LibraryVersions
) -> list[str]:
    """Check that an engine can load here.

    Args:
        manifest: The engine's manifest.
        engine_dir: Where the engine lives (for the messages).
        gpu: The GPU the engine would run on; None skips the GPU checks (no GPU visible, e.g. a CPU host
            validating a copy; the runtime then fails later, when the executor starts).
        versions: The library versions installed here.

    Returns:
        Warnings that do not block loading (another GPU model of the same architecture, other memory size).

    Raises:
        EngineIncompatible: tensorrt_llm is missing or not 1.2.x, or the compute capability, TensorRT or
            tensorrt_llm version differ from the build's. The message lists every mismatch and the rebuild.
    """
    check_trtllm_version(versions.tensorrt_llm)
    problems: list[str] = []
    warnings: list[str] = []
    built = manifest.versions
    if versions.tensorrt_llm != built.tensorrt_llm:
        problems.append(f"tensorrt_llm is {versions.tensorrt_llm} here, the engine was built with {built.tensorrt_llm}")
    if versions.tensorrt is None:
        problems.append(f"TensorRT is not installed here, the engine was built with {built.tensorrt}")
    elif versions.tensorrt != built.tensorrt:
        problems.append(f"TensorRT is {versions.tensorrt} here, the engine was built with {built.tensorrt}")
    if gpu is not None:
        if gpu.compute_capability != manifest.gpu.compute_capability:
            problems.append(
                f"this GPU ({gpu.name}) has compute capability {gpu.compute_capability}, the engine was built "
                f"for {manifest.gpu.compute_capability} ({manifest.gpu.name})"
            )
        else:
            if gpu.name != manifest.gpu.name:
                warnings.append(
                    f"the engine was built on a {manifest.gpu.name} and runs on a {gpu.name} (same architecture "
                    f"{gpu.compute_capability}); its profile '{manifest.profile.name}' may not suit this GPU"
                )
            if abs(gpu.memory_bytes - manifest.gpu.memory_bytes) > 0.05 * manifest.gpu.memory_bytes:
                warnings.append(
                    f"this GPU has {gpu.memory_gib:.1f} GiB, the engine was planned for "
                    f"{manifest.gpu.memory_gib:.1f} GiB"
                )
    if problems:
        raise EngineIncompatible(
            f"the engine in {engine_dir} cannot load here: "
            + "; ".join(problems)
            + ". "
            + _REBUILD_HINT.format(engine_dir=engine_dir)
        )
    return warnings


# ---- probing the environment ----

DeviceSource = Callable[[], Sequence[DeviceInfo]]
"""Something that lists the GPUs; injectable so tests can describe any machine."""

_SMI_QUERY = "index,name,compute_cap,memory.total,driver_version,uuid,memory.used"


def probe_devices() -> list[DeviceInfo]:
    """List the NVIDIA GPUs through NVML (nvidia-ml-py), falling back to `nvidia-smi`.

    Raises:
        GpuNotFound: Neither NVML nor nvidia-smi reports a GPU.
    """
    errors: list[str] = []
    try:
        devices = _probe_nvml()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        errors.append(f"NVML: {exc}")
    else:
        if devices:
            return devices
        errors.append("NVML: no devices")
    try:
        devices = _probe_nvidia_smi()
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        errors.append(f"nvidia-smi: {exc}")
    else:
        if devices:
            return devices
        errors.append("nvidia-smi: no devices")
    raise GpuNotFound("no NVIDIA GPU found (" + "; ".join(errors) + ")")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _probe_nvml() -> list[DeviceInfo]:
    import pynvml  # nvidia-ml-py; lazily, as most machines running the tests have none

    pynvml.nvmlInit()
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda_int = int(pynvml.nvmlSystemGetCudaDriverVersion())  # e.g. 13000 for 13.0
        cuda = f"{cuda_int // 1000}.{(cuda_int % 1000) // 10}"
        devices = []
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                DeviceInfo(
                    index=i,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    compute_capability=f"{major}.{minor}",
                    memory_bytes=int(memory.total),
                    driver_version=driver,
                    cuda_driver_version=cuda,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    memory_used_bytes=int(memory.used),
                )
            )
        return devices
    finally:
        pynvml.nvmlShutdown()


def _probe_nvidia_smi() -> list[DeviceInfo]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise FileNotFoundError("nvidia-smi is not on PATH")
    out = subprocess.run(
        [exe, f"--query-gpu={_SMI_QUERY}", "--format=csv,noheader,nounits"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return parse_nvidia_smi(out)


def parse_nvidia_smi(csv_text: str) -> list[DeviceInfo]:
    """Parse `nvidia-smi --query-gpu=index,name,compute_cap,memory.total,driver_version[,uuid,memory.used]
    --format=csv,noheader,nounits`.

    Memory comes in MiB.
    """
    devices = []
    for line in csv_text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) not in (5, 7):
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        index, name, cap, mem_mib, driver = fields[:5]
        uuid, used_mib = (fields[5], fields[6]) if len(fields) == 7 else (None, None)
        devices.append(
            DeviceInfo(
                index=int(index),
                name=name,
                compute_capability=cap,
                memory_bytes=int(float(mem_mib)) * 2**20,
                driver_version=driver,
                uuid=uuid or None,
                memory_used_bytes=int(float(used_mib)) * 2**20 if used_mib else None,
            )
        )
    return devices


def _dist_version(*names: str) -> str | None:
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def library_versions() -> LibraryVersions:
    """Versions of tensorrt_llm, TensorRT and CUDA installed here, read without importing tensorrt_llm."""
    trt = _dist_version("tensorrt", "tensorrt-cu13", "tensorrt-cu12")
    if trt is None:
        with contextlib.suppress(ImportError):
            import tensorrt  # the NGC images may install TensorRT's bindings without pip metadata

            trt = str(tensorrt.__version__)
    cuda = None
    if _dist_version("torch") is not None:
        with contextlib.suppress(ImportError):
            import torch

            cuda = torch.version.cuda
    return LibraryVersions(tensorrt_llm=_dist_version("tensorrt_llm"), tensorrt=trt, cuda=cuda)
