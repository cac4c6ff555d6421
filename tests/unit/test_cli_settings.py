"""Settings, the serve command line, and the package's public surface."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from aisandbox.serve import gunicorn_argv, settings_env
from aisandbox.settings import DEFAULT_MODEL_NAME, ServerSettings


def test_defaults() -> None:
    s = ServerSettings()
    assert (s.port, s.workers, s.backend, s.model_name) == (8000, 1, "torch", DEFAULT_MODEL_NAME)


def test_env_round_trip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = ServerSettings(port=9001, model=tmp_path, served_model_name="x/y", api_key="k", max_batch_size=4)
    for key, value in settings_env(s).items():
        monkeypatch.setenv(key, value)
    again = ServerSettings()
    assert again == s and again.model_name == "x/y"


def test_the_cpu_serve_flags_reach_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """`aisandbox serve --kv-cache-dtype float32 ...` becomes the settings the gunicorn workers load again."""
    import argparse

    from aisandbox.runtime.torch.backend import TorchBackend
    from aisandbox.serve import _settings, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--kv-cache-dtype", "float32", "--weights-dtype", "q4_1v", "--retime-cpu-formats"])
    for key, value in settings_env(_settings(args)).items():
        monkeypatch.setenv(key, value)
    config = TorchBackend.from_settings(ServerSettings()).config
    assert (config.kv_cache_dtype, config.weights_dtype, config.retime_cpu_formats) == ("float32", "q4_1v", True)
    assert ServerSettings().kv_cache_dtype == "float32"
    monkeypatch.delenv("AISANDBOX_KV_CACHE_DTYPE")
    assert ServerSettings().kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "fp8"])


def test_engine_selects_trtllm_and_excludes_model(tmp_path: Path) -> None:
    assert ServerSettings(engine_dir=tmp_path).backend == "trtllm"
    with pytest.raises(ValidationError):
        ServerSettings(engine_dir=tmp_path, model=tmp_path)


def test_gunicorn_uses_uvicorn_workers_without_preload() -> None:
    argv = gunicorn_argv(ServerSettings(workers=2, port=1234, host="127.0.0.1"))
    assert "aisandbox.gunicorn_hooks.Worker" in argv and "--preload" not in argv
    assert argv[argv.index("--workers") + 1] == "2" and argv[argv.index("--bind") + 1] == "127.0.0.1:1234"


def test_runtime_does_not_import_http_or_falcon() -> None:
    root = Path(__file__).resolve().parents[2] / "aisandbox"
    for path in (root / "runtime").rglob("*.py"):
        text = path.read_text()
        assert "import falcon" not in text and "aisandbox.http" not in text, path
    for path in (root / "http").rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "tensorrt_llm" not in text, path


class _Worker:
    def __init__(self, pid: int) -> None:
        self.pid = pid


class _Server:
    def __init__(self) -> None:
        self.WORKERS: dict[int, _Worker] = {}

        class _Log:
            def info(self, *args: object) -> None:
                pass

        self.log = _Log()


def test_gunicorn_hooks_pin_one_gpu_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from aisandbox import gunicorn_hooks

    server = _Server()
    workers = []
    for pid in (10, 11, 12):
        w = _Worker(pid)
        gunicorn_hooks.pre_fork(server, w)
        server.WORKERS[pid] = w
        workers.append(w)
    assert [w.aisandbox_slot for w in workers] == [0, 1, 2]  # type: ignore[attr-defined]
    del server.WORKERS[11]  # worker 11 died; its replacement takes slot 1
    new = _Worker(13)
    gunicorn_hooks.pre_fork(server, new)
    assert new.aisandbox_slot == 1  # type: ignore[attr-defined]
    monkeypatch.setenv("AISANDBOX_PIN_GPUS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    gunicorn_hooks.post_fork(server, new)
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
