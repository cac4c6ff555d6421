"""The trtllm backend's plumbing with a fake tensorrt_llm LLM: loading, streaming, stop, abort, limits, stats."""

from __future__ import annotations

import asyncio
import importlib.resources
import shutil
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aisandbox.artifacts import (
    DeviceInfo,
    EngineDirError,
    EngineIncompatible,
    EngineManifest,
    EngineProfile,
    GpuNotFound,
    LibraryVersions,
    ModelSummary,
    write_manifest,
)
from aisandbox.errors import (
    ContextLengthExceeded,
    EngineDead,
    EngineError,
    EngineNotReady,
    InvalidRequest,
    Overloaded,
)
from aisandbox.runtime.admission import Admission, AdmissionLimits
from aisandbox.runtime.loader import create_engine
from aisandbox.runtime.request import GenerationRequest, SamplingParams
from aisandbox.runtime.trtllm.backend import (
    TrtllmBackend,
    TrtllmEngineConfig,
    check_engine_dir,
    final_delta,
    parse_iteration_stats,
)
from aisandbox.runtime.types import EngineState, FinishReason, TokenDelta
from aisandbox.settings import ServerSettings

H100 = DeviceInfo(0, "NVIDIA H100 80GB HBM3", "9.0", 81559 * 2**20, "580.65.06", "13.0")
VERSIONS = LibraryVersions(tensorrt_llm="1.2.1", tensorrt="10.13.3.9")
EOS = 2  # Mistral v3 tokenizer


def make_engine_dir(path: Path, max_batch_size: int = 2, max_seq_len: int = 64) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"pretrained_config": {}, "build_config": {}}')
    tok = importlib.resources.files("mistral_common") / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    with importlib.resources.as_file(tok) as src:
        shutil.copy(src, path / "tokenizer.model.v3")
    model = ModelSummary("MistralForCausalLM", "bfloat16", 32768, 64, 128, 2, 4, 2, 16, 2048, 4_000_000, "ab" * 32)
    profile = EngineProfile("h100-sxm", "fp8", "fp8", max_batch_size, 256, 32, max_seq_len, 0.9, default_max_tokens=16)
    write_manifest(
        path, EngineManifest("cd" * 32, "2026-05-01T00:00:00+00:00", "0.1.0", model, profile, H100, VERSIONS)
    )
    return path


@dataclass
class Step:
    token_ids_diff: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def outputs(self) -> list[Step]:
        return [self]


@dataclass
class FakeOutput:
    """Stands in for tensorrt_llm's RequestOutput: async-iterable steps, abort() ends with 'cancelled'."""

    queue: asyncio.Queue[Step | Exception] = field(default_factory=asyncio.Queue)
    aborted: bool = False

    def abort(self) -> None:
        self.aborted = True
        self.queue.put_nowait(Step([], "cancelled"))

    def __aiter__(self) -> AsyncIterator[Step]:
        return self._steps()

    async def _steps(self) -> AsyncIterator[Step]:
        while True:
            step = await self.queue.get()
            if isinstance(step, Exception):
                raise step
            yield step
            if step.finish_reason is not None:
                return


class FakeRunner:
    def __init__(self, script: list[Step] | None = None) -> None:
        self.script = script
        self.calls: list[tuple[list[int], dict[str, Any]]] = []
        self.outputs: list[FakeOutput] = []
        self.stats: list[dict[str, Any]] = []
        self.shut_down = False
        self.fail_with: Exception | None = None
        self.health: str | None = None

    def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any]) -> FakeOutput:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append((prompt_token_ids, sampling))
        out = FakeOutput()
        for step in self.script or []:
            out.queue.put_nowait(step)
        self.outputs.append(out)
        return out

    async def _stats(self) -> AsyncIterator[Mapping[str, Any]]:
        for stat in self.stats:
            yield stat

    def iteration_stats(self, timeout_s: float) -> AsyncIterator[Mapping[str, Any]]:
        return self._stats()

    def shutdown(self) -> None:
        self.shut_down = True

    def check_health(self) -> str | None:
        return self.health


class Tapped(Admission):
    """The admission layer over the trtllm backend, also recording the raw token deltas it emits."""

    def __init__(self, backend: TrtllmBackend, limits: AdmissionLimits | None = None) -> None:
        super().__init__(backend, limits)
        self.raw: dict[str, list[TokenDelta]] = {}

    def emit(self, deltas: Any) -> None:
        for rid, delta in deltas:
            self.raw.setdefault(rid, []).append(delta)
        super().emit(deltas)

    @property
    def trtllm(self) -> TrtllmBackend:
        assert isinstance(self.backend, TrtllmBackend)
        return self.backend


def make_backend(tmp_path: Path, runner: FakeRunner, **config: Any) -> TrtllmBackend:
    versions = config.pop("versions", VERSIONS)
    return TrtllmBackend(
        TrtllmEngineConfig(make_engine_dir(tmp_path / "engine"), **{"stats_timeout_s": 0.01, **config}),
        runner_factory=runner if callable(runner) and not isinstance(runner, FakeRunner) else lambda d, m: runner,
        devices=lambda: [H100],
        versions=lambda: versions,
    )


def make_engine(
    tmp_path: Path,
    runner: FakeRunner,
    *,
    versions: LibraryVersions = VERSIONS,
    max_queue: int = 1,
    health_interval_s: float = 5.0,
    stall_timeout_s: float = 120.0,
) -> Tapped:
    backend = make_backend(
        tmp_path, runner, versions=versions, health_interval_s=health_interval_s, stall_timeout_s=stall_timeout_s
    )
    return Tapped(backend, AdmissionLimits(max_queue=max_queue))


def request(rid: str = "r1", prompt: tuple[int, ...] = (1, 5, 6), **sampling: Any) -> list[GenerationRequest]:
    return [GenerationRequest(rid, prompt, SamplingParams(**{"max_tokens": 8, **sampling}))]


async def collect(engine: Tapped, stream: Any, rid: str = "r1") -> list[TokenDelta]:
    """Drain the text stream (raising what it raises); return the raw token deltas emitted for `rid`."""
    async for _ in stream:
        pass
    return engine.raw[rid]


async def first_raw(engine: Tapped, rid: str) -> TokenDelta:
    for _ in range(2000):
        if engine.raw.get(rid):
            return engine.raw[rid][0]
        await asyncio.sleep(0.001)
    raise AssertionError(f"no delta for {rid}")


def test_loads_in_the_background_then_streams_token_ids(tmp_path: Path) -> None:
    runner = FakeRunner([Step([10, 11]), Step([12]), Step([], "stop")])

    async def main() -> None:
        engine = make_engine(tmp_path, runner)
        assert engine.health().state is EngineState.LOADING
        with pytest.raises(EngineNotReady):
            engine.submit(request())
        await engine.start()
        assert (await engine.wait_ready(10)).ready
        assert engine.model_info.max_model_len == 64
        assert engine.model_info.eos_token_ids == (EOS,)
        assert engine.model_info.default_max_tokens == 16  # from the engine profile, for the HTTP layer
        deltas = await collect(engine, engine.submit(request(temperature=0.0)))
        # (the collector may merge deltas a slow reader has not taken yet)
        assert sum((d.token_ids for d in deltas), ()) == (10, 11, 12, EOS)
        # EOS ends token_ids (tensorrt_llm may leave it out) and is named as the stop token
        assert (deltas[-1].finish_reason, deltas[-1].stop_token_id) == (FinishReason.STOP, EOS)
        assert all(d.finish_reason is None for d in deltas[:-1])
        prompt, sampling = runner.calls[0]
        assert prompt == [1, 5, 6]
        assert sampling["max_tokens"] == 8 and sampling["end_id"] == EOS and sampling["detokenize"] is False
        assert engine.stats().running == 0 and engine.stats().waiting == 0
        await engine.shutdown()
        assert runner.shut_down

    asyncio.run(main())


def test_aclose_aborts_the_engine_request(tmp_path: Path) -> None:
    runner = FakeRunner([Step([10])])

    async def main() -> None:
        engine = make_engine(tmp_path, runner)
        await engine.start()
        await engine.wait_ready(10)
        stream = engine.submit(request())
        assert await first_raw(engine, "r1") == TokenDelta((10,))
        assert engine.stats().running + engine.stats().waiting == 1
        await stream.aclose()  # e.g. a stop string matched, or the client went away
        assert runner.outputs[0].aborted
        for _ in range(10):
            await asyncio.sleep(0)
        assert engine.stats().running == 0 and engine.stats().waiting == 0
        await engine.shutdown()

    asyncio.run(main())


def test_limits_and_overload(tmp_path: Path) -> None:
    runner = FakeRunner()  # requests never finish on their own

    async def main() -> None:
        engine = make_engine(tmp_path, runner, max_queue=1)
        await engine.start()
        await engine.wait_ready(10)
        with pytest.raises(ContextLengthExceeded, match="at most 32 tokens"):
            engine.submit(request(prompt=tuple(range(33))))
        with pytest.raises(ContextLengthExceeded, match="maximum context length is 64"):
            engine.submit(request(prompt=(1,) * 30, max_tokens=40))
        with pytest.raises(InvalidRequest, match="empty"):
            engine.submit(request(prompt=()))
        streams = [engine.submit(request(f"r{i}")) for i in range(3)]  # 2 running (max_batch_size) + 1 waiting
        with pytest.raises(InvalidRequest, match="Duplicate"):
            engine.submit(request("r0"))
        with pytest.raises(Overloaded):
            engine.submit(request("r3"))
        for stream in streams:
            await stream.aclose()
        await engine.shutdown()

    asyncio.run(main())


def test_an_engine_error_ends_only_that_request(tmp_path: Path) -> None:
    runner = FakeRunner([Step([10]), RuntimeError("CUDA error: an illegal memory access")])  # type: ignore[list-item]

    async def main() -> None:
        engine = make_engine(tmp_path, runner)
        await engine.start()
        await engine.wait_ready(10)
        with pytest.raises(EngineError, match="illegal memory access"):
            await collect(engine, engine.submit(request()))
        assert engine.raw["r1"][-1].finish_reason is FinishReason.ABORT
        assert engine.health().ready
        await engine.shutdown()

    asyncio.run(main())


def test_a_failed_executor_kills_the_engine(tmp_path: Path) -> None:
    runner = FakeRunner()

    async def main() -> None:
        engine = make_engine(tmp_path, runner)
        await engine.start()
        await engine.wait_ready(10)
        runner.fail_with = RuntimeError("LLM is shutting down")
        with pytest.raises((EngineDead, EngineError)):  # raised on the submit thread, ends the request
            await collect(engine, engine.submit(request()))
        assert engine.health().state is EngineState.DEAD
        with pytest.raises(EngineDead):
            engine.submit(request())
        await engine.shutdown()

    asyncio.run(main())


def test_a_blocking_generate_async_never_stalls_the_event_loop(tmp_path: Path) -> None:
    """1.2's generate_async blocks its caller; it runs on the submit thread while the loop keeps serving."""

    class SlowRunner(FakeRunner):
        def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any]) -> FakeOutput:
            time.sleep(0.5)
            return super().generate(prompt_token_ids, sampling)

    runner = SlowRunner([Step([10]), Step([11], "length")])

    async def main() -> None:
        engine = make_engine(tmp_path, runner)
        await engine.start()
        await engine.wait_ready(10)
        t0 = time.perf_counter()
        streams = [engine.submit(request(f"r{i}")) for i in range(2)]
        submitted = time.perf_counter() - t0
        gaps = []
        for _ in range(20):  # the loop ticks (as /health would be answered) while both submits block
            t1 = time.perf_counter()
            await asyncio.sleep(0.01)
            gaps.append(time.perf_counter() - t1)
            assert engine.health().ready
        assert submitted < 0.1 and max(gaps) < 0.2, (submitted, max(gaps))
        for i, stream in enumerate(streams):
            await collect(engine, stream, f"r{i}")
        assert len(runner.calls) == 2  # one submit thread, in order
        print(
            f"submit {submitted * 1000:.2f} ms for two 500 ms generate_async calls;"
            f" loop gap max {max(gaps) * 1000:.1f} ms"
        )
        await engine.shutdown()

    asyncio.run(main())


def test_an_abort_while_submitting_aborts_the_output(tmp_path: Path) -> None:
    class SlowRunner(FakeRunner):
        def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any]) -> FakeOutput:
            time.sleep(0.3)
            return super().generate(prompt_token_ids, sampling)

    runner = SlowRunner([Step([10])])

    async def main() -> None:
        engine = make_engine(tmp_path, runner)
        await engine.start()
        await engine.wait_ready(10)
        stream = engine.submit(request())
        await stream.aclose()
        for _ in range(100):
            if runner.outputs and runner.outputs[0].aborted:
                break
            await asyncio.sleep(0.01)
        assert runner.outputs[0].aborted
        assert engine.stats().running == 0
        await engine.shutdown()

    asyncio.run(main())


def test_a_mismatched_engine_is_dead_with_the_reason(tmp_path: Path) -> None:
    async def main() -> None:
        engine = make_engine(tmp_path, FakeRunner(), versions=LibraryVersions("1.3.0", "10.14.1"))
        await engine.start()
        health = await engine.wait_ready(10)
        assert health.state is EngineState.DEAD
        assert "removed in 1.3" in (health.reason or "")
        with pytest.raises(EngineDead, match="removed in 1.3"):
            engine.submit(request())
        await engine.shutdown()

    asyncio.run(main())


def test_stats_come_from_the_executor_iteration_stats(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.stats = [
        {
            "numActiveRequests": 1,
            "numQueuedRequests": 0,
            "kvCacheStats": {"maxNumBlocks": 100, "freeNumBlocks": 75, "usedNumBlocks": 25},
        }
    ]

    async def main() -> None:
        engine = make_engine(tmp_path, runner)
        await engine.start()
        await engine.wait_ready(10)
        streams = [engine.submit(request(f"r{i}")) for i in range(2)]
        for _ in range(20):
            await asyncio.sleep(0.005)
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.kv_cache_usage) == (1, 1, 0.25)
        for stream in streams:
            await stream.aclose()
        await engine.shutdown()

    asyncio.run(main())


def test_parse_iteration_stats() -> None:
    snap = parse_iteration_stats(
        {"numActiveRequests": 5, "numQueuedRequests": 3, "kvCacheStats": {"maxNumBlocks": 1000, "freeNumBlocks": 400}}
    )
    assert (snap.active, snap.queued, snap.kv_cache_usage) == (5, 3, 0.6)
    assert parse_iteration_stats({}).kv_cache_usage == 0.0


def test_final_delta_mapping() -> None:
    assert final_delta((4,), "length", None, EOS, 3) == TokenDelta((4,), FinishReason.LENGTH)
    assert final_delta((4, EOS), "stop", None, EOS, 3) == TokenDelta((4, EOS), FinishReason.STOP, EOS)
    assert final_delta((), "stop", 9, EOS, 9) == TokenDelta((), FinishReason.STOP, 9)  # already streamed
    assert final_delta((4,), "stop", 9, EOS, 3) == TokenDelta((4, 9), FinishReason.STOP, 9)
    assert final_delta((), "cancelled", None, EOS, 3) == TokenDelta((), FinishReason.ABORT)
    timed_out = final_delta((), "timeout", None, EOS, 3)
    assert timed_out.finish_reason is FinishReason.ABORT and timed_out.error


def test_check_engine_dir_fails_fast_without_tensorrt_llm(tmp_path: Path) -> None:
    d = make_engine_dir(tmp_path / "engine")
    assert "tensorrt_llm" not in sys.modules
    with pytest.raises(EngineIncompatible, match="tensorrt_llm is not installed.*release:1.2.1"):
        check_engine_dir(d)  # the real probes: this machine has no tensorrt_llm
    with pytest.raises(EngineDirError, match="no aisandbox-engine.json"):
        check_engine_dir(tmp_path)
    assert "tensorrt_llm" not in sys.modules


def test_check_engine_dir_with_the_right_environment(tmp_path: Path) -> None:
    d = make_engine_dir(tmp_path / "engine")
    assert check_engine_dir(d, devices=lambda: [H100], versions=lambda: VERSIONS).profile.name == "h100-sxm"

    def no_gpu() -> list[DeviceInfo]:
        raise GpuNotFound("no NVIDIA GPU found")

    check_engine_dir(d, devices=no_gpu, versions=lambda: VERSIONS)  # serve's pre-check on a GPU-less host
    with pytest.raises(EngineIncompatible, match="no NVIDIA GPU is visible"):
        check_engine_dir(d, devices=no_gpu, versions=lambda: VERSIONS, require_gpu=True)


def test_the_trtllm_engine_is_built_from_settings_like_every_backend(tmp_path: Path) -> None:
    settings = ServerSettings(engine_dir=tmp_path, max_queue=7, text_workers=3, tokenizer_mode="mistral")
    engine = create_engine(settings)
    assert isinstance(engine.backend, TrtllmBackend)
    assert engine.backend.config == TrtllmEngineConfig(engine_dir=tmp_path, tokenizer_mode="mistral")
    assert engine.limits == AdmissionLimits(max_queue=7, text_workers=3)
    with pytest.raises(ValueError, match="engine_dir"):
        TrtllmBackend.from_settings(ServerSettings())


def test_without_tensorrt_llm_the_real_engine_dies_with_the_reason(tmp_path: Path) -> None:
    async def main() -> None:
        engine = Admission(
            TrtllmBackend(TrtllmEngineConfig(make_engine_dir(tmp_path / "engine")), devices=lambda: [H100])
        )
        await engine.start()
        health = await engine.wait_ready(30)
        assert health.state is EngineState.DEAD
        assert "tensorrt_llm is not installed" in (health.reason or "")
        await engine.shutdown()

    asyncio.run(main())


# ---- issue 8: a dead or hung executor, the load/shutdown race, seeds, stats during a long prefill ----


def test_a_dead_executor_is_noticed_and_ends_every_live_request(tmp_path: Path) -> None:
    """The MPI worker died: 1.2's LLM only notices on the next submit. The watch task must notice by itself."""
    runner = FakeRunner([Step([10])])  # each request streams one token, then waits forever

    async def main() -> None:
        engine = make_engine(tmp_path, runner, max_queue=4, health_interval_s=0.02)
        await engine.start()
        await engine.wait_ready(10)
        streams = [engine.submit(request(f"r{i}")) for i in range(3)]
        firsts = [await first_raw(engine, f"r{i}") for i in range(3)]
        assert all(d == TokenDelta((10,)) for d in firsts)
        runner.health = "a TensorRT-LLM executor worker process exited: MPI worker died"

        async def ends(stream: Any) -> BaseException | None:
            try:
                async for _ in stream:
                    pass
            except Exception as exc:
                return exc
            return None

        errors = await asyncio.wait_for(asyncio.gather(*(ends(s) for s in streams)), 5)
        assert all(isinstance(e, EngineDead) and "worker process exited" in e.message for e in errors), errors
        health = engine.health()
        assert health.state is EngineState.DEAD and "worker process exited" in (health.reason or "")
        assert engine.stats().running == 0 and engine.stats().waiting == 0
        with pytest.raises(EngineDead, match="worker process exited"):
            engine.submit(request("r9"))
        assert all(o.aborted for o in runner.outputs)
        await engine.shutdown()

    asyncio.run(main())


def test_a_stalled_executor_is_declared_dead(tmp_path: Path) -> None:
    """A hung worker: no token and no iteration for stall_timeout_s while a request runs."""
    runner = FakeRunner()  # requests never produce a step, the health check says nothing

    async def main() -> None:
        engine = make_engine(tmp_path, runner, health_interval_s=0.02, stall_timeout_s=0.2)
        await engine.start()
        await engine.wait_ready(10)
        await asyncio.sleep(0.4)  # idle: no requests, so no stall
        assert engine.health().ready
        with pytest.raises(EngineDead, match="no progress"):
            await asyncio.wait_for(collect(engine, engine.submit(request())), 5)
        assert engine.health().state is EngineState.DEAD
        await engine.shutdown()

    asyncio.run(main())


class _Future:
    def __init__(self, error: BaseException | None, done: bool = True) -> None:
        self._error, self._done = error, done

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return self._error


class _Executor:
    def __init__(self) -> None:
        import queue

        self.mpi_futures: list[_Future] = [_Future(None, done=False)]
        self._error_queue: queue.Queue[BaseException] = queue.Queue()
        self.shut = False

    def is_shutdown(self) -> bool:
        return self.shut


def test_executor_health_reads_the_1_2_proxy_state() -> None:
    from aisandbox.runtime.trtllm.backend import executor_health

    class Llm:
        def __init__(self) -> None:
            self._executor: _Executor | None = _Executor()

    llm = Llm()
    assert executor_health(llm) is None
    assert llm._executor is not None
    llm._executor._error_queue.put(RuntimeError("boom"))
    assert "background error" in (executor_health(llm) or "")
    llm._executor = _Executor()
    llm._executor.mpi_futures = [_Future(RuntimeError("rank 0: CUDA error"))]
    assert "worker process exited: rank 0: CUDA error" in (executor_health(llm) or "")
    llm._executor = _Executor()
    llm._executor.shut = True
    assert "shut down" in (executor_health(llm) or "")
    llm._executor = None
    assert "gone" in (executor_health(llm) or "")

    class LaterLlm(Llm):
        def _check_health(self) -> bool:
            return False

    assert "unhealthy" in (executor_health(LaterLlm()) or "")


def test_loading_that_finishes_as_shutdown_starts_does_not_leak_the_executor(tmp_path: Path) -> None:
    """The load thread has posted _on_loaded, but shutdown() runs before that callback does."""
    runner = FakeRunner()

    async def main() -> None:
        engine = make_engine(tmp_path, runner)
        await engine.start()
        assert engine.trtllm._thread is not None
        engine.trtllm._thread.join(10)  # blocks the loop: the posted _on_loaded cannot run before shutdown() starts
        await engine.shutdown()
        assert runner.shut_down
        await asyncio.sleep(0.01)  # the late callback finds nothing to install
        assert engine.health().state is EngineState.DEAD

    asyncio.run(main())


def test_shutdown_while_loading_stops_the_executor_when_it_arrives(tmp_path: Path) -> None:
    import threading

    runner = FakeRunner()
    go = threading.Event()

    def slow_factory(engine_dir: Path, manifest: EngineManifest) -> FakeRunner:
        go.wait(10)
        return runner

    async def main() -> None:
        engine = Admission(
            TrtllmBackend(
                TrtllmEngineConfig(make_engine_dir(tmp_path / "engine")),
                runner_factory=slow_factory,
                devices=lambda: [H100],
                versions=lambda: VERSIONS,
            )
        )
        await engine.start()
        closing = asyncio.get_running_loop().create_task(engine.shutdown())
        await asyncio.sleep(0.05)
        assert not closing.done()
        go.set()
        await asyncio.wait_for(closing, 10)
        assert runner.shut_down and engine.health().state is EngineState.DEAD

    asyncio.run(main())


def test_seeds_map_into_uint64(tmp_path: Path) -> None:
    runner = FakeRunner([Step([], "length")])

    async def main() -> None:
        engine = make_engine(tmp_path, runner, max_queue=4)
        await engine.start()
        await engine.wait_ready(10)
        for rid, seed in (("a", -1), ("b", 2**63 - 1), ("c", -(2**63)), ("d", 2**63)):
            await collect(engine, engine.submit(request(rid, seed=seed)), rid)
        seeds = [sampling["seed"] for _, sampling in runner.calls]
        assert seeds == [2**64 - 1, 2**63 - 1, 2**63, 2**63]
        assert all(0 <= s < 2**64 for s in seeds)
        await engine.shutdown()

    asyncio.run(main())


def test_requests_newer_than_the_iteration_stats_count_as_running(tmp_path: Path) -> None:
    """During a long prefill no iteration ends, so the stats predate the burst that started it."""
    runner = FakeRunner()

    async def main() -> None:
        engine = make_engine(tmp_path, runner, max_queue=4)
        await engine.start()
        await engine.wait_ready(10)
        streams = [engine.submit(request(f"r{i}")) for i in range(3)]  # max_batch_size 2
        stats = engine.stats()
        assert (stats.running, stats.waiting) == (2, 1)  # not (0, 3): no iteration has reported yet
        runner.stats = [{"numActiveRequests": 1, "numQueuedRequests": 2, "kvCacheStats": {}}]
        for _ in range(20):
            await asyncio.sleep(0.005)
        stats = engine.stats()
        assert (stats.running, stats.waiting) == (1, 2)
        assert stats.extra["executor_stats_age_s"] >= 0.0
        for stream in streams:
            await stream.aclose()
        await engine.shutdown()

    asyncio.run(main())


def test_shutdown_does_not_hang_on_a_hung_executor(tmp_path: Path) -> None:
    import threading

    release = threading.Event()

    class HungRunner(FakeRunner):
        def shutdown(self) -> None:
            release.wait(30)  # an MPI worker that never answers
            self.shut_down = True

    runner = HungRunner()

    async def main() -> None:
        engine = Admission(
            TrtllmBackend(
                TrtllmEngineConfig(make_engine_dir(tmp_path / "engine"), shutdown_timeout_s=0.2),
                runner_factory=lambda engine_dir, manifest: runner,
                devices=lambda: [H100],
                versions=lambda: VERSIONS,
            )
        )
        await engine.start()
        await engine.wait_ready(10)
        await asyncio.wait_for(engine.shutdown(), 5)
        assert engine.health().state is EngineState.DEAD

    asyncio.run(main())
    release.set()


def test_logprobs_follow_the_profile_gather_generation_logits(tmp_path: Path) -> None:
    """Logprobs are a 400 naming `logprobs` unless the engine's profile serves with generation logits."""
    import dataclasses

    from aisandbox.artifacts import read_manifest

    async def main(gather: bool) -> tuple[bool, list[dict[str, Any]]]:
        runner = FakeRunner([Step([10]), Step([], "length")])
        engine = make_engine(tmp_path / str(gather), runner)
        d = tmp_path / str(gather) / "engine"
        manifest = read_manifest(d)
        profile = dataclasses.replace(manifest.profile, gather_generation_logits=gather)
        write_manifest(d, dataclasses.replace(manifest, profile=profile))
        await engine.start()
        await engine.wait_ready(10)
        try:
            await collect(engine, engine.submit(request(logprobs=True, top_logprobs=2)))
            ok = True
        except InvalidRequest as exc:
            assert exc.param == "logprobs" and "gather_generation_logits" in exc.message
            ok = False
        await engine.shutdown()
        return ok, [sampling for _, sampling in runner.calls]

    refused, calls = asyncio.run(main(False))
    assert not refused and not calls
    served, calls = asyncio.run(main(True))
    assert served and calls[0]["logprobs"] == 2
