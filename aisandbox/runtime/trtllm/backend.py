"""The trtllm backend: a TensorRT-LLM engine built by `aisandbox build-engine`, served through the LLM API.

This is the only runtime module that imports tensorrt_llm, and only inside `_TrtllmRunner`, so everything else
(and this module) imports on machines without it. Design:

* `check_engine_dir` reads the engine's manifest (`aisandbox.artifacts`) and refuses, with what to rebuild,
  an engine whose GPU architecture, TensorRT or tensorrt_llm version differ from this machine's, or any
  tensorrt_llm that is missing or >= 1.3 (which dropped the TensorRT backend). `serve --engine` calls it first.
* `TrtllmBackend.start()` loads in a background thread (manifest check, tokenizer, `_tensorrt_engine.LLM` on the
  engine directory) while `health()` says LOADING; a failure leaves it DEAD with the reason.
* `submit()` calls `LLM.generate_async(token_ids, SamplingParams(...), streaming=True)` on one submit thread (it
  blocks in 1.2: it re-reads the engine's config.json and waits for the worker's acknowledgement). The LLM
  API's executor batches in flight in its own process and delivers each step into an asyncio queue of the
  returned RequestOutput, so one task per request iterates it and forwards `token_ids_diff` to the request's
  collector; nothing here polls or blocks the loop.
* Sampling is translated to plain keyword data (`sampling_kwargs`): always `max_tokens`, `n=1` (our HTTP layer
  fans n out), `detokenize=False` (our text layer detokenizes and matches stop strings, then calls
  `RequestStream.aclose()`, which aborts the engine request), a fresh random seed when the client gave none.
* `stats()` combines our in-flight count with the executor's iteration stats (`LLM.get_stats_async`).
* A watch task notices a dead executor: every `health_interval_s` it asks the runner (`check_health`: the LLM's
  own `_check_health()` where 1.2.x has it, else the executor's shutdown flag, its MPI worker futures and its
  background-error queue), and it treats `stall_timeout_s` without any output or iteration while requests run
  as a hung executor. Either marks the engine DEAD with the reason (so `/health` says so) and ends every live
  request with an error delta.
* Tensor parallelism: `tensor_parallel_size` from the manifest; the LLM API spawns one MPI worker per rank
  (llmapi/mpi_session.py `MpiPoolSession`), each on CUDA device `rank % device_count` (executor/worker.py), so
  this process must see exactly the engine's GPUs.

tensorrt_llm names used, checked against the v1.2.x source: `tensorrt_llm.__version__` (version.py);
`_tensorrt_engine.LLM` (= llmapi/llm.py `_TrtLLM`; its kwargs are TrtLlmArgs fields, llmapi/llm_args.py);
`LLM.generate_async`, `LLM.get_stats_async`, `LLM.shutdown` (llmapi/llm.py); `llmapi.SamplingParams` and
`llmapi.GuidedDecodingParams` (sampling_params.py); `llmapi.KvCacheConfig`, `llmapi.SchedulerConfig`,
`llmapi.CapacitySchedulerPolicy` (llmapi/llm_args.py); `RequestOutput.abort`, async iteration,
`outputs[0].token_ids_diff / finish_reason / stop_reason / logprobs_diff` (executor/result.py). Read
defensively through getattr, as they are private: `LLM._check_health` (llmapi/llm.py, in later 1.2.x),
`LLM._executor`, `GenerationExecutor.is_shutdown()` (executor/executor.py), `GenerationExecutorProxy.mpi_futures`
and `._error_queue` (executor/proxy.py, where `mpi_done_callback` puts a dead worker's exception and nothing
else notices it).

What TensorRT-LLM 1.2 cannot do on the TensorRT engine path (so the torch backend differs there):
* logprobs, even top-1, without `LLM(gather_generation_logits=True)`: llmapi/llm.py `_check_arguments` raises
  ValueError; `sampling_kwargs` turns that into a 400 first.
* prompt logprobs (completions `echo` + `logprobs`) without an engine built with `gather_context_logits`
  (same check); and even then executor/result.py `compute_logprobs` returns only the top-k of each prompt
  position, without the prompt token's own logprob when it is not among them.
JSON schemas are not sent as `GuidedDecodingParams(json=...)` (no strict flag, xgrammar's default whitespace and
json_object): `guided_decoding_kwargs` sends the EBNF we produce, so both backends enforce the same grammar.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
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
from aisandbox.errors import InvalidRequest
from aisandbox.runtime.engine import BackendHost
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.structured.grammar import executor_ebnf
from aisandbox.runtime.text.tokenizer import Tokenizer, TokenizerMode, load_tokenizer
from aisandbox.runtime.types import EngineState, EngineStats, FinishReason, ModelInfo, TokenDelta, TokenLogprob
from aisandbox.settings import ServerSettings

__all__ = [
    "IterationSnapshot",
    "LlmRunner",
    "TrtllmBackend",
    "TrtllmEngineConfig",
    "check_engine_dir",
    "final_delta",
    "guided_decoding_enabled",
    "llm_runtime_kwargs",
    "parse_iteration_stats",
    "executor_health",
    "sampling_kwargs",
    "token_logprobs",
    "uint64_seed",
    "visible_gpus",
]

log = logging.getLogger(__name__)


# ---- plain-data translation (unit-tested against the 1.2.1 names) ----

_UINT64 = 2**64


def uint64_seed(seed: int) -> int:
    """Map any integer seed (OpenAI's is a signed int64) onto tensorrt_llm's uint64 seed, deterministically.

    Two's complement modulo 2**64: non-negative int64 seeds are unchanged, -1 becomes 2**64 - 1, and distinct
    int64 seeds stay distinct (the HTTP layer's seed + choice index may step just past int64; that wraps too).
    """
    return seed % _UINT64


def sampling_kwargs(
    sp: SamplingParams,
    eos_token_ids: Sequence[int],
    seed: int,
    *,
    vocab_size: int | None = None,
    generation_logits: bool = False,
    context_logits: bool = False,
    guided: bool = True,
) -> dict[str, Any]:
    """Keyword arguments of tensorrt_llm's SamplingParams for one of our sequences.

    Plain data, except `embedding_bias` (a float32 torch tensor, as the executor takes it) and
    `guided_decoding` (a dict of GuidedDecodingParams keywords, turned into one by the runner).

    Args:
        sp: Our sampling parameters (validated by the HTTP layer).
        eos_token_ids: The tokenizer's EOS ids; the first is the engine's end_id, others become stop tokens.
        seed: The seed to use when the request has none (the engine's default seed is 0 for every request,
            which would make sampled completions of one prompt identical).
        vocab_size: The engine's (padded) vocabulary: the length of the logit_bias embedding_bias tensor.
        generation_logits: The LLM was built with `gather_generation_logits=True`; llmapi/llm.py
            `_check_arguments` refuses `logprobs` (even top-1) on the TensorRT backend without it.
        context_logits: The engine was built with `gather_context_logits`; prompt logprobs need it.
        guided: The LLM runs with `guided_decoding_backend='xgrammar'` (`guided_decoding_enabled`).

    Raises:
        InvalidRequest: logprobs, prompt logprobs or a grammar on an engine that cannot serve them (a 400 that
            says so).
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
        "seed": uint64_seed(sp.seed) if sp.seed is not None else seed,
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
    # OpenAI's penalties, over generated tokens (tensorrt_llm's penalty layer applies them as OpenAI does).
    if sp.frequency_penalty:
        kwargs["frequency_penalty"] = sp.frequency_penalty
    if sp.presence_penalty:
        kwargs["presence_penalty"] = sp.presence_penalty
    if sp.logit_bias:
        kwargs["embedding_bias"] = _embedding_bias(sp.logit_bias, vocab_size)
    if sp.logprobs:
        if not generation_logits:
            raise InvalidRequest(
                "This TensorRT-LLM engine was not started with gather_generation_logits, so it cannot return "
                "logprobs; serve it with generation logits enabled.",
                param="logprobs",
                code="unsupported_parameter",
            )
        # tensorrt_llm treats logprobs=0 as off; 1 returns the chosen token's logprob (and the top one).
        kwargs["logprobs"] = max(1, sp.top_logprobs)
    if sp.prompt_logprobs is not None:
        if not context_logits:
            raise InvalidRequest(
                "This TensorRT-LLM engine was not built with gather_context_logits, so it cannot return the "
                "prompt's logprobs (echo with logprobs); rebuild it with context logits.",
                param="echo",
                code="unsupported_parameter",
            )
        kwargs["prompt_logprobs"] = max(1, sp.prompt_logprobs)
    if sp.guided is not None:
        if not guided:
            raise InvalidRequest(
                "This TensorRT-LLM engine folder has no Hugging Face tokenizer, which tensorrt_llm needs for "
                "guided decoding (response_format, guided_regex, guided_grammar).",
                param="response_format" if sp.guided.kind.startswith("json") else _GUIDED_PARAM[sp.guided.kind],
                code="unsupported_parameter",
            )
        kwargs["guided_decoding"] = guided_decoding_kwargs(sp)
    return kwargs


def guided_decoding_enabled(engine_dir: Path) -> bool:
    """Whether the LLM can run xgrammar: it builds the grammar vocabulary from the engine folder's Hugging Face
    tokenizer (llmapi/tokenizer.py `_xgrammar_tokenizer_info`), and fails to start without one."""
    return (engine_dir / "tokenizer.json").is_file() or (engine_dir / "tokenizer_config.json").is_file()


_GUIDED_PARAM = {"regex": "guided_regex", "ebnf": "guided_grammar", "structural_tag": "tools", "tool_calls": "tools"}


def guided_decoding_kwargs(sp: SamplingParams) -> dict[str, Any]:
    """Keywords of tensorrt_llm's GuidedDecodingParams (sampling_params.py) for our grammar spec.

    The executor compiles the grammar with its own xgrammar (0.1.25 in the 1.2.1 image, the version we pin), but
    its JSON path uses xgrammar's defaults: `json_object` would admit any JSON value, whitespace runs would be
    unbounded (a model can loop on newlines until max_tokens), and there is no strict flag. So every JSON spec
    (json_object, json_schema, a forced Mistral call list) goes as the EBNF grammar we produce from the schema
    with our settings (`structured.grammar.executor_ebnf`); regexes, EBNF and tool structural tags go as they are.
    """
    spec = sp.guided
    if spec is None:
        return {}
    if spec.kind in ("json_object", "json_schema", "tool_calls"):
        return {"grammar": executor_ebnf(spec)}
    if spec.kind == "regex":
        return {"regex": spec.source}
    if spec.kind == "structural_tag":  # Hermes/fallback tool calls; formats xgrammar 0.1.25 compiles
        return {"structural_tag": spec.source}
    return {"grammar": spec.source}


def _embedding_bias(logit_bias: Sequence[tuple[int, float]], vocab_size: int | None) -> Any:
    """OpenAI's logit_bias as tensorrt_llm's embedding_bias: a float32 [vocab] tensor added to the logits."""
    if not vocab_size:
        raise ValueError("logit_bias on the trtllm backend needs the engine's vocab_size")
    import torch

    bias = torch.zeros(vocab_size, dtype=torch.float32)
    for token_id, value in logit_bias:
        if 0 <= token_id < vocab_size:
            bias[token_id] += value
    return bias


def token_logprobs(
    logprobs_diff: Sequence[Mapping[int, Any]], token_ids: Sequence[int], top: int
) -> tuple[TokenLogprob, ...]:
    """Our TokenLogprobs from tensorrt_llm's `CompletionOutput.logprobs_diff`.

    Each entry is a dict {token id: Logprob(logprob, rank)} holding the top-k and the sampled token
    (executor/result.py `compute_logprobs`: log_softmax of the gathered generation logits, that is the raw
    model distribution, as the torch backend reports it).
    """
    out = []
    for entry, token in zip(logprobs_diff, token_ids, strict=False):
        ranked = sorted(entry.items(), key=lambda kv: getattr(kv[1], "rank", None) or 1 << 30)
        chosen = entry.get(token)
        value = float(getattr(chosen, "logprob", chosen)) if chosen is not None else float("-inf")
        alternatives = tuple((int(t), float(getattr(lp, "logprob", lp))) for t, lp in ranked[:top])
        out.append(TokenLogprob(int(token), value, alternatives))
    return tuple(out)


def llm_runtime_kwargs(
    engine_dir: Path, manifest: EngineManifest, *, gather_generation_logits: bool = False
) -> dict[str, Any]:
    """Keyword arguments of `_tensorrt_engine.LLM` for serving; `kv_cache_config` holds KvCacheConfig's.

    Guided decoding is on wherever it can be (`guided_decoding_enabled`): `guided_decoding_backend='xgrammar'`
    makes the LLM build xgrammar's tokenizer info from the engine folder's Hugging Face tokenizer (llmapi/llm.py
    `_TrtLLM._build_model`), and requests then carry GuidedDecodingParams. `gather_generation_logits` (a
    runtime ExecutorConfig flag in 1.2, no rebuild) lets requests ask for logprobs; it costs a logits copy per
    step for those requests.
    """
    profile = manifest.profile
    kwargs: dict[str, Any] = {
        "model": str(engine_dir),
        "tensor_parallel_size": profile.tp_size,
        "max_batch_size": profile.max_batch_size,
        # Chunked prefill: a long prompt runs in chunks of the runtime token budget between decode steps, instead of
        # one step of up to max_num_tokens that freezes every running stream (issue 17, item 3).
        "max_num_tokens": min(profile.runtime_max_num_tokens or 2048, profile.max_num_tokens),
        "enable_chunked_prefill": True,
        "kv_cache_config": {
            "free_gpu_memory_fraction": profile.kv_cache_free_gpu_memory_fraction,
            "enable_block_reuse": True,
        },
        # CapacitySchedulerPolicy member name; see GpuProfile.scheduler_policy for the trade-off.
        "scheduler_config": {"capacity_scheduler_policy": profile.scheduler_policy.upper()},
    }
    if guided_decoding_enabled(engine_dir):
        kwargs["guided_decoding_backend"] = "xgrammar"
    if gather_generation_logits:
        kwargs["gather_generation_logits"] = True
    return kwargs


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

    def check_health(self) -> str | None:
        """None while the executor is alive, else why it is not (cheap; called on the event loop)."""


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
        from tensorrt_llm.llmapi import CapacitySchedulerPolicy, GuidedDecodingParams, KvCacheConfig, SchedulerConfig
        from tensorrt_llm.llmapi import SamplingParams as TrtllmSamplingParams

        self._sampling_params = TrtllmSamplingParams
        self._guided = GuidedDecodingParams
        kwargs = llm_runtime_kwargs(
            engine_dir, manifest, gather_generation_logits=manifest.profile.gather_generation_logits
        )
        kv_cache_config = KvCacheConfig(**kwargs.pop("kv_cache_config"))
        policy = kwargs.pop("scheduler_config")["capacity_scheduler_policy"]
        scheduler_config = SchedulerConfig(capacity_scheduler_policy=CapacitySchedulerPolicy[policy])
        self._llm = LLM(kv_cache_config=kv_cache_config, scheduler_config=scheduler_config, **kwargs)

    def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any]) -> _RequestOutput:
        if "guided_decoding" in sampling:
            sampling = {**sampling, "guided_decoding": self._guided(**sampling["guided_decoding"])}
        params = self._sampling_params(**sampling)
        output: _RequestOutput = self._llm.generate_async(prompt_token_ids, sampling_params=params, streaming=True)
        return output

    def iteration_stats(self, timeout_s: float) -> AsyncIterable[Mapping[str, Any]]:
        stats: AsyncIterable[Mapping[str, Any]] = self._llm.get_stats_async(timeout=timeout_s)
        return stats

    def shutdown(self) -> None:
        self._llm.shutdown()

    def check_health(self) -> str | None:
        return executor_health(self._llm)


def executor_health(llm: object) -> str | None:
    """Why tensorrt_llm's LLM can no longer serve, or None; reads its private state defensively.

    In 1.2 a dead MPI worker only puts its exception into the proxy's `_error_queue` (executor/proxy.py
    `mpi_done_callback`), which is drained on the next submit; `is_shutdown()` stays False until then, so the
    worker futures and the queue are checked directly.
    """
    check = getattr(llm, "_check_health", None)
    if callable(check) and not check():
        return "the TensorRT-LLM executor reports itself unhealthy"
    executor = getattr(llm, "_executor", None)
    if executor is None:
        return "the TensorRT-LLM executor is gone (shut down)"
    is_shutdown = getattr(executor, "is_shutdown", None)
    if callable(is_shutdown) and is_shutdown():
        return "the TensorRT-LLM executor has shut down"
    for future in getattr(executor, "mpi_futures", None) or ():
        if future.done():
            error = future.exception() if not future.cancelled() else None
            return f"a TensorRT-LLM executor worker process exited{f': {error}' if error else ''}"
    errors = getattr(executor, "_error_queue", None)
    if errors is not None and not errors.empty():
        return "the TensorRT-LLM executor reported a background error"
    return None


# ---- checks before loading ----


def visible_gpus(devices: Sequence[DeviceInfo], cuda_visible_devices: str | None) -> list[DeviceInfo]:
    """The GPUs CUDA will give this process, in CUDA's order (rank r of a TP engine uses the r-th).

    NVML lists every GPU regardless of CUDA_VISIBLE_DEVICES. Its entries are UUIDs ('GPU-...') or indices; an
    index is NVML's (PCI order) because `aisandbox serve` sets CUDA_DEVICE_ORDER=PCI_BUS_ID. Unknown entries are
    skipped, as CUDA skips them.
    """
    if cuda_visible_devices is None or not cuda_visible_devices.strip():
        return list(devices)
    by_index = {str(d.index): d for d in devices}
    by_uuid = {d.uuid: d for d in devices if d.uuid}
    visible = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        device = by_uuid.get(entry) or by_index.get(entry)
        if device is None:
            break  # CUDA stops at the first invalid entry
        visible.append(device)
    return visible


def _engine_device(devices: Sequence[DeviceInfo], tp_size: int = 1) -> DeviceInfo:
    """Rank 0's GPU; raise EngineIncompatible if fewer than `tp_size` GPUs of one type are visible."""
    visible = visible_gpus(devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if len(visible) < tp_size:
        raise EngineIncompatible(
            f"the engine is tensor parallel over {tp_size} GPUs, but this process sees {len(visible)} "
            f"({', '.join(d.name for d in visible) or 'none'}); give it {tp_size} GPUs and one gunicorn worker "
            "(--workers 1)"
        )
    if not visible:
        raise IndexError("CUDA_VISIBLE_DEVICES names no GPU that NVML lists")
    ranks = visible[:tp_size]
    if len({d.compute_capability for d in ranks}) > 1:
        raise EngineIncompatible(
            "the GPUs this process sees for the engine's ranks are of different types: "
            + ", ".join(f"{d.index} {d.name}" for d in ranks)
        )
    return ranks[0]


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
            or tensorrt_llm version differ from the build's (the message says what to rebuild); fewer GPUs are
            visible than the engine's tensor-parallel ranks.
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    found = versions()
    gpu: DeviceInfo | None = None
    try:
        gpu = _engine_device(list(devices()), manifest.tp_size)
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
    health_interval_s: float = 5.0
    """How often the watch task asks the runner whether the executor is alive."""
    stall_timeout_s: float = 120.0
    """Requests running with neither a token nor an executor iteration for this long: the executor is hung. One
    iteration (even a max_num_tokens prefill) takes seconds at most."""
    shutdown_timeout_s: float = 60.0
    """How long shutdown() waits for tensorrt_llm's LLM.shutdown(); a hung MPI worker can block it forever."""


@dataclass(slots=True)
class _Active:
    task: asyncio.Task[None]
    submitted_at: float = 0.0
    """time.monotonic() at submit, to tell requests the latest iteration stats know of from newer ones."""
    output: _RequestOutput | None = None
    """Set once `generate_async` has returned on the submit thread; None until then."""
    aborted: bool = False
    """Aborted before `output` existed: abort it as soon as it does."""


class TrtllmBackend:
    """The `Backend` protocol over tensorrt_llm's in-flight batching executor.

    The executor batches itself; this class submits each admitted request with `generate_async`, and one task
    per request forwards its steps' new token ids to the admission layer, which detokenizes them off the loop.
    Its own state (loading, ready, draining, dead) only drives the watch and shutdown; the admission layer
    owns what clients see.
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
        self._loop_thread = 0
        self._guided = False
        self._generation_logits = False
        self._state = EngineState.LOADING
        self._reason: str | None = f"loading the TensorRT-LLM engine from {config.engine_dir}"
        self._settled = threading.Event()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: LlmRunner | None = None
        self._manifest: EngineManifest | None = None
        self._tokenizer: Tokenizer | None = None
        self._info: ModelInfo | None = None
        self._active: dict[str, _Active] = {}
        self._submitter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trtllm-submit")
        """One thread calls `generate_async` (it blocks; see `_submit`), so submits keep their order."""
        self._snapshot = IterationSnapshot()
        self._snapshot_at = 0.0
        self._work: asyncio.Event | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._last_progress = time.monotonic()
        # The load thread hands its result over under this lock, so a shutdown that starts at any moment
        # either receives the runner or makes the load thread stop it (no executor is leaked).
        self._handoff = threading.Lock()
        self._pending: tuple[EngineManifest, Tokenizer, LlmRunner] | None = None

    # ---- lifecycle ----

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> TrtllmBackend:
        """The backend for `aisandbox serve --engine DIR` (call `check_engine_dir` first to fail fast)."""
        if settings.engine_dir is None:
            raise ValueError("the trtllm backend needs settings.engine_dir (aisandbox serve --engine DIR)")
        return cls(TrtllmEngineConfig(engine_dir=settings.engine_dir, tokenizer_mode=settings.tokenizer_mode))

    def start(self, host: BackendHost) -> None:
        self._host = host
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._work = asyncio.Event()
        self._thread = threading.Thread(target=self._load, name="aisandbox-trtllm-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        """Background thread: check, load the tokenizer, start the executor; report to the loop."""
        assert self._loop is not None  # set by start() before the thread exists
        try:
            manifest = check_engine_dir(
                self.config.engine_dir, devices=self._devices, versions=self._versions, require_gpu=True
            )
            tokenizer = load_tokenizer(self.config.engine_dir, self.config.tokenizer_mode)
            runner = self._runner_factory(self.config.engine_dir, manifest)
        except Exception as exc:
            log.exception("the trtllm engine failed to load")
            if not self._post(self._on_failed, f"the TensorRT-LLM engine failed to load: {exc}"):
                self._settled.set()
            return
        with self._handoff:
            closing = self._closing
            if not closing:
                self._pending = (manifest, tokenizer, runner)
        if closing or not self._post(self._on_loaded):
            self._take_pending()
            log.info("shutdown began while the engine loaded; stopping the executor")
            runner.shutdown()  # nothing will use it
            self._settled.set()

    def _take_pending(self) -> tuple[EngineManifest, Tokenizer, LlmRunner] | None:
        with self._handoff:
            pending, self._pending = self._pending, None
        return pending

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        """Run `callback(*args)` on the event loop; False if the loop is already closed."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False
        return True

    def _on_loaded(self) -> None:
        pending = self._take_pending()
        if pending is None or self._closing:  # shutdown() took (or will take) the runner and stops it
            if pending is not None:
                with self._handoff:
                    self._pending = pending
            self._settled.set()
            return
        manifest, tokenizer, runner = pending
        self._manifest, self._tokenizer, self._runner = manifest, tokenizer, runner
        # What each request may ask of this engine, decided once (not a file-system check per request).
        self._guided = guided_decoding_enabled(self.config.engine_dir)
        self._generation_logits = manifest.profile.gather_generation_logits
        self._info = ModelInfo(
            max_model_len=manifest.profile.max_seq_len,
            eos_token_ids=tokenizer.eos_token_ids,
            vocab_size=manifest.model.vocab_size,
            max_running=manifest.profile.max_batch_size,
            max_prompt_len=min(manifest.profile.max_input_len, manifest.profile.max_seq_len - 1),
            default_max_tokens=manifest.profile.default_max_tokens,
        )
        self._state, self._reason = EngineState.READY, None
        loop = asyncio.get_running_loop()
        self._stats_task = loop.create_task(self._stats_loop(), name="aisandbox-trtllm-stats")
        self._watch_task = loop.create_task(self._watch_loop(), name="aisandbox-trtllm-watch")
        log.info(
            "trtllm engine ready: %s, profile %s (%s weights, %s KV), max_batch_size %d, max_seq_len %d",
            self.config.engine_dir,
            manifest.profile.name,
            manifest.profile.weights,
            manifest.profile.kv_cache,
            manifest.profile.max_batch_size,
            manifest.profile.max_seq_len,
        )
        self._settled.set()
        assert self._host is not None
        self._host.loaded(self._info, tokenizer)

    def _on_failed(self, reason: str) -> None:
        self._state, self._reason = EngineState.DEAD, reason
        self._settled.set()
        assert self._host is not None
        self._host.failed(reason)

    async def shutdown(self) -> None:
        with self._handoff:
            self._closing = True
        if self._state in (EngineState.READY, EngineState.LOADING):
            self._state, self._reason = EngineState.DRAINING, "shutting down"
        for active in list(self._active.values()):
            self._abort_output(active.output)
            active.task.cancel()
        tasks = [a.task for a in self._active.values()]
        for task in (self._stats_task, self._watch_task):
            if task is not None:
                task.cancel()
                tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._submitter.shutdown(wait=False, cancel_futures=True)
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            # LLM() cannot be interrupted; wait for the load thread so its executor is stopped, not leaked. From
            # here on it either handed the runner over (pending, or already on self._runner) or stops it itself.
            await loop.run_in_executor(None, self._thread.join)
        runners = [self._runner] if self._runner is not None else []
        pending = self._take_pending()
        if pending is not None:
            runners.append(pending[2])
        self._runner = None
        for runner in runners:
            await self._stop_runner(runner)
        self._state, self._reason = EngineState.DEAD, "shut down"

    async def _stop_runner(self, runner: LlmRunner) -> None:
        """Run runner.shutdown() in a daemon thread; give up after shutdown_timeout_s (the process is exiting)."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def stop() -> None:
            try:
                runner.shutdown()
            except Exception:
                log.exception("stopping the TensorRT-LLM executor failed")
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone by now
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=stop, name="aisandbox-trtllm-stop", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), self.config.shutdown_timeout_s)
        except TimeoutError:
            log.error(
                "the TensorRT-LLM executor did not stop within %.0f s; leaving it", self.config.shutdown_timeout_s
            )

    # ---- state ----

    def stats(self) -> EngineStats:
        """Running / waiting from the latest iteration stats, corrected for requests newer than them.

        The executor reports at the end of each iteration (executor/worker.py fetches
        `get_latest_iteration_stats()` between iterations), so during a long prefill the snapshot is as old as
        that iteration. Requests it knows of are split by its numActiveRequests; requests submitted since are
        counted as running while the engine has batch slots for them, not as waiting (else a burst after idle
        shows as all-waiting until the first prefill ends, and the autoscaler reacts to a queue that is not there).
        """
        in_flight = len(self._active)
        snap = self._snapshot
        newer = sum(1 for a in self._active.values() if a.submitted_at > self._snapshot_at)
        known = in_flight - newer
        slots = self._manifest.profile.max_batch_size if self._manifest is not None else in_flight
        running = min(min(snap.active, known) + newer, slots, in_flight)
        age = time.monotonic() - self._snapshot_at if self._snapshot_at else 0.0
        return EngineStats(
            running=running,
            waiting=in_flight - running,
            kv_cache_usage=snap.kv_cache_usage,
            extra={"executor_queued": float(snap.queued), "executor_stats_age_s": round(age, 3)},
        )

    # ---- requests ----

    def add(self, request: GenerationRequest) -> None:
        assert self._runner is not None and self._info is not None  # admitted implies READY
        kwargs = sampling_kwargs(
            request.sampling,
            self._info.eos_token_ids,
            secrets.randbits(63),
            vocab_size=self._info.vocab_size,
            guided=self._guided,
            generation_logits=self._generation_logits,
        )
        top = request.sampling.top_logprobs if request.sampling.logprobs else None
        prompt = list(request.prompt_token_ids)
        task = asyncio.get_running_loop().create_task(self._submit(request.request_id, prompt, kwargs, top))
        now = time.monotonic()
        if not self._active:
            self._last_progress = now  # the stall clock runs only while requests do
        self._active[request.request_id] = _Active(task, now)
        if self._work is not None:
            self._work.set()

    async def _submit(
        self, request_id: str, prompt: list[int], kwargs: dict[str, Any], top_logprobs: int | None
    ) -> None:
        """Submit on the submit thread, then pump the request's steps on the loop.

        1.2's `generate_async` blocks its caller (it re-reads the engine's config.json per request, and the proxy
        waits for the worker's acknowledgement), so it never runs on the event loop: one thread submits, in order.
        """
        assert self._runner is not None and self._host is not None
        loop = asyncio.get_running_loop()
        try:
            output = await loop.run_in_executor(self._submitter, self._runner.generate, prompt, kwargs)
        except asyncio.CancelledError:  # shutdown or a dead executor, while submitting
            self._active.pop(request_id, None)
            reason = self._reason if self._state is EngineState.DEAD else None
            error = reason or "the engine is shutting down"
            self._host.emit(((request_id, TokenDelta((), FinishReason.ABORT, error=error)),))
            raise
        except Exception as exc:
            self._active.pop(request_id, None)
            if isinstance(exc, ValueError):  # tensorrt_llm's own argument checks
                error = f"The engine refused the request: {exc}"
            else:  # the LLM is shut down or its executor failed (it shuts itself down)
                error = f"The engine has failed: {exc}"
                self._executor_dead(f"the TensorRT-LLM executor failed: {exc}")
            self._host.emit(((request_id, TokenDelta((), FinishReason.ABORT, error=error)),))
            return
        active = self._active.get(request_id)
        if active is None or active.aborted:  # aborted (or the engine went down) while it was being submitted
            self._abort_output(output)
            if active is not None:
                self._active.pop(request_id, None)
                self._host.emit(((request_id, TokenDelta((), FinishReason.ABORT)),))
            return
        active.output = output
        await self._pump(request_id, output, top_logprobs)

    def abort(self, request_id: str) -> None:
        if threading.get_ident() == self._loop_thread:
            self._abort_now(request_id)
        elif self._loop is not None:
            self._post(self._abort_now, request_id)  # from the text thread (a stop string): the executor is the loop's

    def _abort_now(self, request_id: str) -> None:
        active = self._active.get(request_id)
        if active is not None:
            active.aborted = True
            if active.output is not None:
                self._abort_output(active.output)

    @staticmethod
    def _abort_output(output: _RequestOutput | None) -> None:
        if output is None:  # still being submitted: `_submit` aborts it when generate_async returns
            return
        try:
            output.abort()
        except Exception:  # already finished, or the executor is gone
            log.debug("abort failed", exc_info=True)

    async def _pump(self, request_id: str, output: _RequestOutput, top_logprobs: int | None) -> None:
        """Forward one request's engine steps to the admission layer until it finishes.

        With logprobs asked for (`top_logprobs` not None), each step's `logprobs_diff` comes along.
        """
        assert self._info is not None and self._host is not None
        emit = self._host.emit
        end_id = self._info.eos_token_ids[0]
        last_id: int | None = None
        delta: TokenDelta | None = None
        try:
            async for step in output:
                self._last_progress = time.monotonic()
                completion = step.outputs[0]
                ids = tuple(completion.token_ids_diff)
                lp = None
                if top_logprobs is not None:
                    lp = token_logprobs(getattr(completion, "logprobs_diff", None) or (), ids, top_logprobs)
                if completion.finish_reason is None:
                    if ids:
                        emit(((request_id, TokenDelta(ids, logprobs=lp)),))
                        last_id = ids[-1]
                    continue
                delta = final_delta(ids, completion.finish_reason, completion.stop_reason, end_id, last_id)
                if lp:
                    delta = replace(delta, logprobs=lp)
                break
            if delta is None:
                delta = TokenDelta((), FinishReason.ABORT, error="the engine ended the request without a finish reason")
        except asyncio.CancelledError:
            reason = self._reason if self._state is EngineState.DEAD else None
            emit(((request_id, TokenDelta((), FinishReason.ABORT, error=reason or "the engine is shutting down")),))
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
                    self._snapshot_at = self._last_progress = time.monotonic()
            except Exception:
                log.debug("iteration stats unavailable", exc_info=True)
            # The stats stream ends after `timeout` without an iteration; wait as long before reading again.
            await asyncio.sleep(timeout)

    async def _watch_loop(self) -> None:
        """Notice a dead or hung executor: ask the runner periodically, and time out stalled streams."""
        assert self._runner is not None
        runner, config = self._runner, self.config
        while self._state is EngineState.READY:
            await asyncio.sleep(min(config.health_interval_s, config.stall_timeout_s))
            try:
                problem = runner.check_health()
            except Exception as exc:  # a broken executor may fail the question itself
                problem = f"the TensorRT-LLM executor health check failed: {exc}"
            stalled = time.monotonic() - self._last_progress
            if problem is None and self._active and stalled > config.stall_timeout_s:
                problem = (
                    f"the TensorRT-LLM executor made no progress for {stalled:.0f} s with {len(self._active)} "
                    "requests running (hung or dead worker)"
                )
            if problem is not None and self._state is EngineState.READY:
                log.error("trtllm engine dead: %s", problem)
                self._executor_dead(problem)

    def _executor_dead(self, reason: str) -> None:
        """Mark the engine DEAD with `reason` and end every live request with an error delta.

        The runner is not shut down here: a hung MPI worker can make that block forever. The process stays up
        with /health answering dead, so the orchestrator restarts it (docs/deploy.md, liveness probe).
        """
        self._state, self._reason = EngineState.DEAD, reason
        self._settled.set()
        if self._host is not None:
            self._host.failed(reason)  # every live request ends at once, /health says dead
        for active in list(self._active.values()):
            self._abort_output(active.output)
            active.task.cancel()  # _pump puts TokenDelta((), ABORT, error=reason) and unregisters it
