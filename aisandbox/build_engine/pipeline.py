"""The build as named stages, each printing its progress; the engine directory appears only when complete.

1. checkpoint   validate the Hugging Face folder (`checkpoint.read_checkpoint`)
2. gpu          resolve the GPU profile, apply overrides, cap limits at the model's window, pick the GPU of
                every tensor-parallel rank (`detect`, `profiles`)
3. plan         memory plan per rank (`plan`); a dry run stops here and shows the tensorrt_llm call it would make;
                a real build first checks that the GPUs are not busy (another server holding their memory)
4. compile      tensorrt_llm 1.2.1 build + llm.save into a temporary directory next to the output (`trt_build`)
5. tokenizer    copy the checkpoint's tokenizer files (tokenizer.model.v3 for mistral-common) into it
6. manifest     write aisandbox-engine.json (`aisandbox.artifacts`)
7. publish      rename the temporary directory to --output; on any failure it is deleted instead
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aisandbox import __version__
from aisandbox.artifacts import (
    TOKENIZER_FILES,
    TRTLLM_CONFIG_FILE,
    DeviceInfo,
    DeviceSource,
    EngineIdentity,
    EngineManifest,
    LibraryVersions,
    check_trtllm_version,
    engine_hash,
    library_versions,
    probe_devices,
    write_manifest,
)
from aisandbox.build_engine.checkpoint import Checkpoint, read_checkpoint
from aisandbox.build_engine.detect import GpuChoice, rank_devices, resolve_gpu
from aisandbox.build_engine.errors import BuildEngineError
from aisandbox.build_engine.plan import (
    ACTIVATION_BYTES,
    MemoryPlan,
    fit_profile_to_model,
    format_plan,
    human_count,
    plan_memory,
)
from aisandbox.build_engine.profiles import DEFAULT_PROFILES_DIR, GpuProfile
from aisandbox.build_engine.trt_build import (
    BUILD_KV_CACHE_FRACTION,
    BuildSpec,
    build_config_kwargs,
    build_with_trtllm,
    calib_config_kwargs,
    llm_build_kwargs,
    quant_config_kwargs,
)

__all__ = [
    "BUSY_GPU_MARGIN_BYTES",
    "STAGES",
    "BuildRequest",
    "BuildResult",
    "Builder",
    "build_memory_need",
    "check_gpus_free",
    "run_build",
]

STAGES = ("checkpoint", "gpu", "plan", "compile", "tokenizer", "manifest", "publish")
_CALIB_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")

Builder = Callable[[BuildSpec, Path, Callable[[str], None]], str]
"""Compiles into a directory and returns the tensorrt_llm version (`trt_build.build_with_trtllm`)."""


@dataclass(frozen=True, slots=True)
class BuildRequest:
    """What `aisandbox build-engine` was asked to do."""

    checkpoint: Path
    output: Path
    gpu: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)
    """Profile fields to replace (None values ignored): limits, kv fraction, weights, kv_cache."""
    calib_dataset: Path | None = None
    dry_run: bool = False
    force: bool = False
    """Replace an existing --output directory."""
    device_index: int = 0
    """NVML index of rank 0's GPU (as nvidia-smi lists them)."""
    device_indices: tuple[int, ...] = ()
    """NVML indices of every rank's GPU (overrides device_index; default: device_index and the next ones)."""
    profiles_dir: Path = DEFAULT_PROFILES_DIR


@dataclass(frozen=True, slots=True)
class BuildResult:
    """What the build produced."""

    plan: MemoryPlan
    engine_dir: Path | None = None
    """None after a dry run."""
    manifest: EngineManifest | None = None


class _Progress:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def stage(self, name: str, detail: str) -> None:
        self.say(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name:<10} {detail}")


def _describe_checkpoint(ckpt: Checkpoint) -> str:
    m = ckpt.summary
    return (
        f"{ckpt.path}: {m.architecture}, {m.dtype}, vocab {m.vocab_size}, {m.num_layers} layers, hidden "
        f"{m.hidden_size}, {m.num_attention_heads} heads ({m.num_kv_heads} KV, head_dim {m.head_dim}), "
        f"context {m.max_position_embeddings}, {human_count(m.num_parameters)} parameters"
    )


def _resolve_profile(request: BuildRequest, ckpt: Checkpoint, choice: GpuChoice) -> tuple[GpuProfile, list[str]]:
    profile = choice.profile.with_overrides(request.overrides)
    explicit = frozenset(k for k, v in request.overrides.items() if v is not None)
    fitted, notes = fit_profile_to_model(profile, ckpt.summary, explicit)
    return fitted, list(choice.notes) + notes


def _check_calib_dataset(path: Path) -> None:
    if not path.is_dir():
        raise BuildEngineError(f"--calib-dataset {path} is not a directory")
    if not any(p.suffix in _CALIB_SUFFIXES for p in path.rglob("*") if p.is_file()):
        raise BuildEngineError(
            f"--calib-dataset {path} holds no {'/'.join(_CALIB_SUFFIXES)} files; it must load with "
            "datasets.load_dataset(DIR, split='train') and have a 'text' column"
        )


BUSY_GPU_MARGIN_BYTES = 2 * 2**30
"""Memory others may hold on a GPU before a build counts it busy (driver, a desktop, a monitoring agent)."""


def build_memory_need(ckpt: Checkpoint, plan: MemoryPlan) -> int:
    """Bytes one rank's GPU must have free for the build (an estimate that errs high).

    The build loads the weights, runs a profiling pass of max_num_tokens, then starts an executor with a small KV
    cache. Calibration (ModelOpt) first loads the whole unquantized checkpoint on one GPU, in bf16/fp16.
    """
    need = plan.weights_bytes + plan.activation_bytes + plan.overhead_bytes
    if plan.needs_calibration:
        need = max(need, ckpt.summary.num_parameters * ACTIVATION_BYTES + plan.overhead_bytes)
    return need


def check_gpus_free(ckpt: Checkpoint, plan: MemoryPlan, devices: tuple[DeviceInfo, ...]) -> None:
    """Refuse to build on GPUs that other processes hold (a running `api` server keeps ~90% for its KV cache).

    Raises:
        BuildEngineError: A GPU has less free memory than the build needs; the message names the GPU and the fix.
    """
    need = build_memory_need(ckpt, plan)
    for device in devices:
        used = device.memory_used_bytes
        if used is None or used <= BUSY_GPU_MARGIN_BYTES:
            continue
        free = device.memory_bytes - used
        if free < need:
            raise BuildEngineError(
                f"GPU {device.index} ({device.name}) has {used / 2**30:.1f} GiB in use by other processes, "
                f"{free / 2**30:.1f} GiB free; the build needs about {need / 2**30:.1f} GiB"
                + (" (calibration loads the whole checkpoint in 16-bit)" if plan.needs_calibration else "")
                + ". Stop what holds it first, e.g. the serving container (docker compose stop api), or build on "
                "another GPU (--device)."
            )


def _spec(request: BuildRequest, plan: MemoryPlan, workspace: Path, devices: tuple[DeviceInfo, ...] = ()) -> BuildSpec:
    p = plan.profile
    return BuildSpec(
        checkpoint=request.checkpoint,
        dtype=plan.compute_dtype,
        weights=p.quantization.weights,
        kv_cache=p.quantization.kv_cache,
        max_batch_size=p.max_batch_size,
        max_num_tokens=p.max_num_tokens,
        max_input_len=p.max_input_len,
        max_seq_len=p.max_seq_len,
        workspace=workspace,
        calib_dataset=request.calib_dataset,
        tp_size=p.tp_size,
        devices=devices,
    )


def _call(name: str, kwargs: dict[str, Any]) -> str:
    return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


def describe_trtllm_call(spec: BuildSpec, needs_calibration: bool) -> str:
    """The tensorrt_llm call the build makes, as text (shown by --dry-run)."""
    quant = {k: (f"QuantAlgo.{v}" if v else None) for k, v in quant_config_kwargs(spec.weights, spec.kv_cache).items()}
    parts = [
        *(f"{k}={v!r}" for k, v in llm_build_kwargs(spec).items()),
        "build_config=" + _call("BuildConfig", build_config_kwargs(spec)),
        "quant_config=QuantConfig(" + ", ".join(f"{k}={v}" for k, v in quant.items()) + ")",
        "kv_cache_config=" + _call("KvCacheConfig", {"free_gpu_memory_fraction": BUILD_KV_CACHE_FRACTION}),
    ]
    if needs_calibration:
        calib_spec = spec if spec.calib_dataset else dataclasses.replace(spec, calib_dataset=Path("<--calib-dataset>"))
        parts.append("calib_config=" + _call("CalibConfig", calib_config_kwargs(calib_spec) or {}))
    return "tensorrt_llm._tensorrt_engine.LLM(\n      " + ",\n      ".join(parts) + ")\n    then llm.save(...)"


def _copy_tokenizer(checkpoint: Path, engine_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = checkpoint / name
        if src.is_file():
            shutil.copy2(src, engine_dir / name)
            copied.append(name)
    return copied


def _manifest(
    ckpt: Checkpoint, plan: MemoryPlan, devices: tuple[DeviceInfo, ...], versions: LibraryVersions
) -> EngineManifest:
    p = plan.profile
    recorded = tuple(dataclasses.replace(d, memory_used_bytes=None) for d in devices)
    device = recorded[0]
    if versions.tensorrt_llm is None or versions.tensorrt is None:
        raise BuildEngineError(f"cannot record the engine's library versions ({versions}); is TensorRT installed?")
    identity = EngineIdentity(
        checkpoint_fingerprint=ckpt.summary.checkpoint_fingerprint,
        architecture=ckpt.summary.architecture,
        dtype=plan.compute_dtype,
        weights=p.quantization.weights,
        kv_cache=p.quantization.kv_cache,
        max_batch_size=p.max_batch_size,
        max_num_tokens=p.max_num_tokens,
        max_input_len=p.max_input_len,
        max_seq_len=p.max_seq_len,
        compute_capability=device.compute_capability,
        tensorrt_llm=versions.tensorrt_llm,
        tensorrt=versions.tensorrt,
        tp_size=p.tp_size,
    )
    return EngineManifest(
        engine_hash=engine_hash(identity),
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        aisandbox_version=__version__,
        model=ckpt.summary,
        profile=p.to_engine_profile(),
        gpu=device,
        versions=versions,
        gpus=recorded,
    )


def _publish(built: Path, output: Path, force: bool) -> None:
    if not output.exists():
        os.rename(built, output)
        return
    if not force:
        raise BuildEngineError(f"{output} appeared during the build; not overwriting it")
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    os.rename(output, old / "engine")
    os.rename(built, output)
    shutil.rmtree(old, ignore_errors=True)


def run_build(
    request: BuildRequest,
    *,
    devices: DeviceSource = probe_devices,
    versions: Callable[[], LibraryVersions] = library_versions,
    builder: Builder = build_with_trtllm,
    say: Callable[[str], None] = print,
) -> BuildResult:
    """Run the stages; see the module docstring.

    Raises:
        BuildEngineError: The checkpoint, profile or plan is invalid, or the build produced no engine.
        aisandbox.artifacts.EngineIncompatible: tensorrt_llm is missing or not 1.2.x (real builds only).
    """
    progress = _Progress(say)
    ckpt = read_checkpoint(request.checkpoint)
    progress.stage("checkpoint", _describe_checkpoint(ckpt))

    choice = resolve_gpu(
        request.gpu,
        profiles_dir=request.profiles_dir,
        devices=devices,
        device_index=(request.device_indices or (request.device_index,))[0],
        dry_run=request.dry_run,
        tp_size=request.overrides.get("tp_size"),
    )
    profile, notes = _resolve_profile(request, ckpt, choice)
    q = profile.quantization
    indices = request.device_indices or (request.device_index,)
    ranks = rank_devices(choice, indices, profile.tp_size)
    tp = f", tensor parallel over {profile.tp_size} GPUs" if profile.tp_size > 1 else ""
    on = f" on GPU {','.join(str(d.index) for d in ranks)}" if ranks else ""
    progress.stage(
        "gpu",
        f"profile {profile.name} ({profile.display_name}, compute {profile.compute_capability}; {choice.how}): "
        f"weights {q.weights}, KV cache {q.kv_cache}{tp}{on}",
    )

    plan = plan_memory(
        ckpt, profile, gpu_name=choice.gpu_name, gpu_memory_bytes=choice.memory_bytes, notes=tuple(notes)
    )
    progress.stage("plan", "memory plan")
    say(format_plan(plan))

    output = request.output.resolve()
    if request.dry_run:
        spec = _spec(request, plan, output.parent / f".{output.name}.partial-XXXX" / "workspace")
        progress.stage("compile", "skipped (dry run); the build would call:")
        say("    " + describe_trtllm_call(spec, plan.needs_calibration))
        say(f"dry run: nothing written; the engine would go to {output}")
        return BuildResult(plan)

    if plan.needs_calibration:
        if request.calib_dataset is None:
            raise BuildEngineError(
                f"{q.weights} weights / {q.kv_cache} KV cache need calibration: pass --calib-dataset DIR (a local "
                "dataset folder with a 'text' column; nothing is downloaded), or choose --weights/--kv-cache-dtype "
                "that need none (bf16, int8_wo, int4_wo)"
            )
        _check_calib_dataset(request.calib_dataset)
    if output.exists() and not request.force:
        raise BuildEngineError(f"{output} already exists; pass --force to replace it")
    check_trtllm_version(versions().tensorrt_llm)
    if not ranks:
        raise BuildEngineError("a real build needs the GPU it compiles for")  # resolve_gpu always probes then
    check_gpus_free(ckpt, plan, ranks)

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        built = partial / "engine"
        built.mkdir()
        progress.stage("compile", f"building in {partial}")
        trtllm_version = builder(_spec(request, plan, partial / "workspace", ranks), built, say)
        missing = [f"rank{r}.engine" for r in range(profile.tp_size) if not (built / f"rank{r}.engine").is_file()]
        if not (built / TRTLLM_CONFIG_FILE).is_file() or missing:
            raise BuildEngineError(f"tensorrt_llm saved no complete engine into {built} (missing: {missing})")

        copied = _copy_tokenizer(request.checkpoint, built)
        progress.stage("tokenizer", "copied " + ", ".join(copied))

        found = versions()
        manifest = _manifest(ckpt, plan, ranks, dataclasses.replace(found, tensorrt_llm=trtllm_version))
        write_manifest(built, manifest)
        progress.stage(
            "manifest",
            f"engine {manifest.engine_hash[:16]}, tensorrt_llm {trtllm_version}, TensorRT {manifest.versions.tensorrt}",
        )

        _publish(built, output, request.force)
        progress.stage("publish", f"{output}")
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return BuildResult(plan, output, manifest)
