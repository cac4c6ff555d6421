"""The trtllm backend: a TensorRT-LLM engine built by `aisandbox build-engine`, served through the LLM API.

This is the only runtime module that imports tensorrt_llm, and only inside `_TrtllmRunner`, so everything else
(and this module) imports on machines without it. Design:

* `check_engine_dir` reads the engine's manifest (`aisandbox.artifacts`) and refuses, with what to rebuild,
  an engine whose GPU architecture, TensorRT or tensorrt_llm version differ from this machine's, or any
  tensorrt_llm that is missing or >= 1.3 (which dropped the TensorRT backend). `serve --engine` calls it first.
* `TrtllmBackend.start()` loads in a background thread (manifest check, tokenizer, `_tensorrt_engine.LLM` on the
  engine directory) while `health()` says LOADING; a failure leaves it DEAD with the reason.
* `submit()` calls `LLM.generate_async(token_ids, SamplingParams(...), streaming=True)` on the event loop. The LLM
  API's executor batches in flight in its own process and delivers each step into an asyncio queue of the
  returned RequestOutput, so one task per request iterates it and forwards `token_ids_diff` to the request's
  collector; nothing here polls or blocks the loop.
* Sampling is translated to plain keyword data (`sampling_kwargs`): always `max_tokens`, `n=1` (our HTTP layer
  fans n out), `detokenize=False` (our text layer detokenizes and matches stop strings, then calls
  `RequestStream.aclose()`, which aborts the engine request), a fresh random seed when the client gave none.
* `stats()` combines our in-flight count with the executor's iteration stats (`LLM.get_stats_async`).

tensorrt_llm names used, checked against the v1.2.x source: `tensorrt_llm.__version__` (version.py);
`_tensorrt_engine.LLM` (= llmapi/llm.py `_TrtLLM`; its kwargs are TrtLlmArgs fields, llmapi/llm_args.py);
`LLM.generate_async`, `LLM.get_stats_async`, `LLM.shutdown` (llmapi/llm.py); `llmapi.SamplingParams`
(sampling_params.py); `llmapi.KvCacheConfig` (llmapi/llm_args.py); `RequestOutput.abort`, async iteration,
`outputs[0].token_ids_diff / finish_reason / stop_reason` (executor/result.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aisandbox.artifacts import (
    TRTLLM_MISSING_MESSAGE,
    DeviceInfo,
    DeviceSource,
    EngineIncompatible,
    EngineManifest,
    GpuNotFound,
    LibraryVersions,
    check_compatibility,
    check_trtllm_version,
    library_versions,
    probe_devices,
    read_manifest,
)
from aisandbox.errors import EngineDead, InvalidRequest
from aisandbox.runtime.engine import BackendHost
from aisandbox.runtime.tokenizer import Tokenizer, TokenizerMode, load_tokenizer
from aisandbox.runtime.types import (
    EngineStats,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TokenDelta,
)
from aisandbox.settings import ServerSettings

__all__ = [
    "IterationSnapshot",
    "LlmRunner",
    "TrtllmBackend",
    "TrtllmEngineConfig",
    "check_engine_dir",
    "final_delta",
    "llm_runtime_kwargs",
    "parse_iteration_stats",
    "sampling_kwargs",
]

log = logging.getLogger(__name__)


# ---- plain-data translation (unit-tested against the 1.2.1 names) ----


def sampling_kwargs(sp: SamplingParams, eos_token_ids: Sequence[int], seed: int) -> dict[str, Any]:
    """Keyword arguments of tensorrt_llm's SamplingParams for one of our sequences.

    Args:
        sp: Our sampling parameters (validated by the HTTP layer).
        eos_token_ids: The tokenizer's EOS ids; the first is the engine's end_id, others become stop tokens.
        seed: The seed to use when the request has none (the engine's default seed is 0 for every request,
            which would make sampled completions of one prompt identical).
    """
    if not eos_token_ids:
        raise ValueError("the tokenizer declares no EOS token")
    end_id = eos_token_ids[0]
    kwargs: dict[str, Any] = {
        "max_tokens": sp.max_tokens,
        "n": 1,
        # tensorrt_llm's own ignore_eos also drops stop words (executor/base_worker.py); an end_id of -1 ignores
        # only EOS, as its worker does, and keeps stop_token_ids working.
        "end_id": -1 if sp.ignore_eos else end_id,
        "pad_id": end_id,
        "detokenize": False,
        # Keep the stop token in token_ids; the text layer counts it and never shows it.
        "include_stop_str_in_output": True,
        "seed": sp.seed if sp.seed is not None else seed,
    }
    stop_ids = list(sp.stop_token_ids)
    if not sp.ignore_eos:
        stop_ids += [e for e in eos_token_ids[1:] if e not in stop_ids]
    if stop_ids:
        kwargs["stop_token_ids"] = stop_ids
    if sp.min_tokens > 0:
        kwargs["min_tokens"] = sp.min_tokens
    if sp.greedy:
        kwargs["top_k"] = 1  # greedy; temperature/top_p left unset
    else:
        kwargs["temperature"] = sp.temperature
        kwargs["top_p"] = sp.top_p
        kwargs["top_k"] = sp.top_k  # 0 disables top-k
    if sp.min_p > 0.0:
        kwargs["min_p"] = sp.min_p
    if sp.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = sp.repetition_penalty
    return kwargs


def llm_runtime_kwargs(engine_dir: Path, manifest: EngineManifest) -> dict[str, Any]:
    """Keyword arguments of `_tensorrt_engine.LLM` for serving; `kv_cache_config` holds KvCacheConfig's."""
    profile = manifest.profile
    return {
        "model": str(engine_dir),
        "max_batch_size": profile.max_batch_size,
        "max_num_tokens": profile.max_num_tokens,
        "enable_chunked_prefill": False,
        "kv_cache_config": {
            "free_gpu_memory_fraction": profile.kv_cache_free_gpu_memory_fraction,
            "enable_block_reuse": True,
        },
    }


@dataclass(frozen=True, slots=True)
class IterationSnapshot:
    """The executor's load at its latest iteration."""

    active: int = 0
    queued: int = 0
    kv_cache_usage: float = 0.0


def parse_iteration_stats(stat: Mapping[str, Any]) -> IterationSnapshot:
    """Read one iteration-stats dict (the executor's IterationStats JSON: camelCase keys)."""
    kv = stat.get("kvCacheStats") or {}
    max_blocks = int(kv.get("maxNumBlocks", 0) or 0)
    used = int(kv.get("usedNumBlocks", max_blocks - int(kv.get("freeNumBlocks", max_blocks) or 0)) or 0)
    return IterationSnapshot(
        active=int(stat.get("numActiveRequests", 0) or 0),
        queued=int(stat.get("numQueuedRequests", 0) or 0),
        kv_cache_usage=min(1.0, used / max_blocks) if max_blocks > 0 else 0.0,
    )


def final_delta(
    new_ids: tuple[int, ...], finish_reason: str, stop_reason: int | str | None, end_id: int, last_id: int | None
) -> TokenDelta:
    """The last TokenDelta of a sequence, from tensorrt_llm's CompletionOutput finish fields.

    For 'stop' the EOS or stop token ends token_ids (appended if the engine left it out) and is named in
    stop_token_id, as every backend reports it.
    """
    if finish_reason == "length":
        return TokenDelta(new_ids, FinishReason.LENGTH)
    if finish_reason == "stop":
        stop_id = stop_reason if isinstance(stop_reason, int) else end_id
        if stop_id < 0:
            return TokenDelta(new_ids, FinishReason.STOP)
        tail = new_ids[-1] if new_ids else last_id
        ids = new_ids if tail == stop_id else (*new_ids, stop_id)
        return TokenDelta(ids, FinishReason.STOP, stop_token_id=stop_id)
    if finish_reason == "cancelled":
        return TokenDelta(new_ids, FinishReason.ABORT)
    return TokenDelta(new_ids, FinishReason.ABORT, error=f"the engine ended the request ({finish_reason})")


# ---- the tensorrt_llm boundary ----


class _Completion(Protocol):
    @property
    def token_ids_diff(self) -> list[int]: ...

    @property
    def finish_reason(self) -> str | None: ...

    @property
    def stop_reason(self) -> int | str | None: ...


class _RequestOutput(Protocol):
    @property
    def outputs(self) -> Sequence[_Completion]: ...

    def abort(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[_RequestOutput]: ...


class LlmRunner(Protocol):
    """What the engine needs from tensorrt_llm's LLM (a fake in tests)."""

    def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any]) -> _RequestOutput:
        """Submit one streaming request; raise ValueError for a bad request, RuntimeError if the LLM failed."""

    def iteration_stats(self, timeout_s: float) -> AsyncIterable[Mapping[str, Any]]:
        """Iteration-stats dicts as they come; ends after `timeout_s` without one."""

    def shutdown(self) -> None:
        """Stop the executor and free the GPU (blocking)."""


RunnerFactory = Callable[[Path, EngineManifest], LlmRunner]


class _TrtllmRunner:
    """tensorrt_llm 1.2's `_tensorrt_engine.LLM` on an engine directory."""

    def __init__(self, engine_dir: Path, manifest: EngineManifest) -> None:
        try:
            import tensorrt_llm
        except ImportError as exc:
            raise EngineIncompatible(TRTLLM_MISSING_MESSAGE) from exc
        check_trtllm_version(str(tensorrt_llm.__version__))
        from tensorrt_llm._tensorrt_engine import LLM
        from tensorrt_llm.llmapi import KvCacheConfig
        from tensorrt_llm.llmapi import SamplingParams as TrtllmSamplingParams

        self._sampling_params = TrtllmSamplingParams
        kwargs = llm_runtime_kwargs(engine_dir, manifest)
        kv_cache_config = KvCacheConfig(**kwargs.pop("kv_cache_config"))
        self._llm = LLM(kv_cache_config=kv_cache_config, **kwargs)

    def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any]) -> _RequestOutput:
        params = self._sampling_params(**sampling)
        output: _RequestOutput = self._llm.generate_async(prompt_token_ids, sampling_params=params, streaming=True)
        return output

    def iteration_stats(self, timeout_s: float) -> AsyncIterable[Mapping[str, Any]]:
        stats: AsyncIterable[Mapping[str, Any]] = self._llm.get_stats_async(timeout=timeout_s)
        return stats

    def shutdown(self) -> None:
        self._llm.shutdown()


# ---- checks before loading ----


def _engine_device(devices: Sequence[DeviceInfo]) -> DeviceInfo:
    """The GPU this process will use.

    NVML lists every GPU regardless of CUDA_VISIBLE_DEVICES. On the usual host all GPUs are one type and any
    will do; on a mixed host, CUDA's own variable says which one CUDA will give us.
    """
    if len({d.compute_capability for d in devices}) == 1:
        return devices[0]
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    by_index = {d.index: d for d in devices}
    return by_index.get(int(first), devices[0]) if first.isdigit() else devices[0]


def check_engine_dir(
    engine_dir: Path,
    *,
    devices: DeviceSource = probe_devices,
    versions: Callable[[], LibraryVersions] = library_versions,
    require_gpu: bool = False,
) -> EngineManifest:
    """Check, without loading anything onto a GPU, that the engine in `engine_dir` can run here.

    Args:
        engine_dir: A directory built by `aisandbox build-engine`.
        devices: Lists the GPUs (NVML / nvidia-smi).
        versions: Reports the installed tensorrt_llm / TensorRT versions.
        require_gpu: Fail when no GPU is visible (the engine itself); otherwise skip the GPU check.

    Returns:
        The engine's manifest.

    Raises:
        aisandbox.artifacts.EngineDirError: No engine or no manifest in `engine_dir`.
        aisandbox.artifacts.EngineIncompatible: tensorrt_llm missing or not 1.2.x; the GPU architecture, TensorRT
            or tensorrt_llm version differ from the build's (the message says what to rebuild).
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    found = versions()
    gpu: DeviceInfo | None = None
    try:
        gpu = _engine_device(list(devices()))
    except (GpuNotFound, IndexError) as exc:
        if require_gpu:
            raise EngineIncompatible(
                f"no NVIDIA GPU is visible ({exc}); the engine in {engine_dir} needs a {manifest.gpu.name} "
                f"(compute capability {manifest.gpu.compute_capability})"
            ) from exc
    for warning in check_compatibility(manifest, engine_dir, gpu, found):
        log.warning("%s", warning)
    return manifest


# ---- the engine ----


@dataclass(frozen=True, slots=True)
class TrtllmEngineConfig:
    """What the trtllm backend needs."""

    engine_dir: Path
    tokenizer_mode: TokenizerMode = "auto"
    stats_timeout_s: float = 1.0
    """How long a stats read waits for the next iteration before it ends."""


@dataclass(slots=True)
class _Active:
    output: _RequestOutput
    task: asyncio.Task[None]


class TrtllmBackend:
    """The `Backend` protocol over tensorrt_llm's in-flight batching executor.

    The executor batches itself; this class submits each admitted request with `generate_async`, and one task
    per request forwards its steps' new token ids to the admission layer, which detokenizes them off the loop.
    """

    def __init__(
        self,
        config: TrtllmEngineConfig,
        *,
        runner_factory: RunnerFactory = _TrtllmRunner,
        devices: DeviceSource = probe_devices,
        versions: Callable[[], LibraryVersions] = library_versions,
    ) -> None:
        self.config = config
        self._runner_factory = runner_factory
        self._devices = devices
        self._versions = versions
        self._host: BackendHost | None = None
        self._settled = threading.Event()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._thread: threading.Thread | None = None
        self._runner: LlmRunner | None = None
        self._info: ModelInfo | None = None
        self._active: dict[str, _Active] = {}
        self._snapshot = IterationSnapshot()
        self._work: asyncio.Event | None = None
        self._stats_task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> TrtllmBackend:
        """The backend for `aisandbox serve --engine DIR` (call `check_engine_dir` first to fail fast)."""
        if settings.engine_dir is None:
            raise ValueError("the trtllm backend needs settings.engine_dir (aisandbox serve --engine DIR)")
        return cls(TrtllmEngineConfig(engine_dir=settings.engine_dir, tokenizer_mode=settings.tokenizer_mode))

    # ---- lifecycle ----

    def start(self, host: BackendHost) -> None:
        self._host = host
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._work = asyncio.Event()
        self._thread = threading.Thread(target=self._load, name="aisandbox-trtllm-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        """Background thread: check, load the tokenizer, start the executor; report to the loop."""
        assert self._host is not None  # set by start() before the thread exists
        try:
            manifest = check_engine_dir(
                self.config.engine_dir, devices=self._devices, versions=self._versions, require_gpu=True
            )
            tokenizer = load_tokenizer(self.config.engine_dir, self.config.tokenizer_mode)
            runner = self._runner_factory(self.config.engine_dir, manifest)
        except Exception as exc:
            log.exception("the trtllm engine failed to load")
            self._settled.set()
            self._host.failed(f"the TensorRT-LLM engine failed to load: {exc}")
        else:
            if not self._post(self._on_loaded, manifest, tokenizer, runner):
                runner.shutdown()  # nothing can use it any more

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        """Run `callback(*args)` on the event loop; False if the loop is already closed."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            self._settled.set()
            return False
        return True

    def _on_loaded(self, manifest: EngineManifest, tokenizer: Tokenizer, runner: LlmRunner) -> None:
        self._runner = runner  # if shutdown() is already waiting for the load, it stops this executor
        self._settled.set()
        if self._closing:
            return
        assert self._host is not None
        profile = manifest.profile
        self._info = ModelInfo(
            max_model_len=profile.max_seq_len,
            eos_token_ids=tokenizer.eos_token_ids,
            vocab_size=manifest.model.vocab_size,
            max_running=profile.max_batch_size,
            max_prompt_len=min(profile.max_input_len, profile.max_seq_len - 1),
        )
        self._stats_task = asyncio.get_running_loop().create_task(self._stats_loop(), name="aisandbox-trtllm-stats")
        log.info(
            "trtllm engine ready: %s, profile %s (%s weights, %s KV), max_batch_size %d, max_seq_len %d",
            self.config.engine_dir,
            profile.name,
            profile.weights,
            profile.kv_cache,
            profile.max_batch_size,
            profile.max_seq_len,
        )
        self._host.loaded(self._info, tokenizer)

    async def shutdown(self) -> None:
        self._closing = True
        for active in list(self._active.values()):
            self._abort_output(active.output)
            active.task.cancel()
        tasks = [a.task for a in self._active.values()]
        if self._stats_task is not None:
            self._stats_task.cancel()
            tasks.append(self._stats_task)
        await asyncio.gather(*tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        if self._thread is not None and self._thread.is_alive():
            # LLM() cannot be interrupted; wait for it so its executor is stopped below, not leaked.
            await loop.run_in_executor(None, self._settled.wait, None)
        await asyncio.sleep(0)  # let a posted _on_loaded hand over its runner
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await loop.run_in_executor(None, runner.shutdown)

    # ---- state ----

    def stats(self) -> EngineStats:
        snap = self._snapshot
        return EngineStats(
            running=min(snap.active, len(self._active)),
            waiting=0,
            kv_cache_usage=snap.kv_cache_usage,
            extra={"executor_queued": float(snap.queued)},
        )

    # ---- requests ----

    def add(self, request: GenerationRequest) -> None:
        assert self._runner is not None and self._info is not None and self._host is not None  # READY implies it
        kwargs = sampling_kwargs(request.sampling, self._info.eos_token_ids, secrets.randbits(63))
        try:
            output = self._runner.generate(list(request.prompt_token_ids), kwargs)
        except ValueError as exc:  # tensorrt_llm's own argument checks
            raise InvalidRequest(str(exc)) from exc
        except RuntimeError as exc:  # the LLM is shut down or its executor failed (it shuts itself down)
            self._host.failed(f"the TensorRT-LLM executor failed: {exc}")
            raise EngineDead(f"The engine has failed: {exc}") from exc
        task = asyncio.get_running_loop().create_task(self._pump(request.request_id, output))
        self._active[request.request_id] = _Active(output, task)
        if self._work is not None:
            self._work.set()

    def abort(self, request_id: str) -> None:
        if threading.get_ident() == self._loop_thread:
            self._abort_now(request_id)
        elif self._loop is not None:
            self._post(self._abort_now, request_id)  # from the text thread (a stop string): the executor is the loop's

    def _abort_now(self, request_id: str) -> None:
        active = self._active.get(request_id)
        if active is not None:
            self._abort_output(active.output)

    @staticmethod
    def _abort_output(output: _RequestOutput) -> None:
        try:
            output.abort()
        except Exception:  # already finished, or the executor is gone
            log.debug("abort failed", exc_info=True)

    async def _pump(self, request_id: str, output: _RequestOutput) -> None:
        """Forward one request's engine steps to the admission layer until it finishes."""
        assert self._info is not None and self._host is not None
        emit = self._host.emit
        end_id = self._info.eos_token_ids[0]
        last_id: int | None = None
        delta: TokenDelta | None = None
        try:
            async for step in output:
                completion = step.outputs[0]
                ids = tuple(completion.token_ids_diff)
                if completion.finish_reason is None:
                    if ids:
                        emit(((request_id, TokenDelta(ids)),))
                        last_id = ids[-1]
                    continue
                delta = final_delta(ids, completion.finish_reason, completion.stop_reason, end_id, last_id)
                break
            if delta is None:
                delta = TokenDelta((), FinishReason.ABORT, error="the engine ended the request without a finish reason")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a per-request error from the executor
            log.warning("request %s failed in the engine: %s", request_id, exc)
            delta = TokenDelta((), FinishReason.ABORT, error=f"The engine failed this request: {exc}")
        finally:
            self._active.pop(request_id, None)
        emit(((request_id, delta),))

    async def _stats_loop(self) -> None:
        """Keep the latest iteration stats while requests run; sleep on an event while idle."""
        assert self._work is not None and self._runner is not None
        runner, timeout = self._runner, self.config.stats_timeout_s
        while True:
            if not self._active:
                self._snapshot = IterationSnapshot(kv_cache_usage=self._snapshot.kv_cache_usage)
                self._work.clear()
                await self._work.wait()
            try:
                async for stat in runner.iteration_stats(timeout):
                    self._snapshot = parse_iteration_stats(stat)
            except Exception:
                log.debug("iteration stats unavailable", exc_info=True)
            # The stats stream ends after `timeout` without an iteration; wait as long before reading again.
            await asyncio.sleep(timeout)
