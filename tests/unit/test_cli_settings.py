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


def test_engine_selects_trtllm_and_excludes_model(tmp_path: Path) -> None:
    assert ServerSettings(engine_dir=tmp_path).backend == "trtllm"
    with pytest.raises(ValidationError):
        ServerSettings(engine_dir=tmp_path, model=tmp_path)


def test_gunicorn_uses_uvicorn_workers_without_preload() -> None:
    argv = gunicorn_argv(ServerSettings(workers=2, port=1234, host="127.0.0.1"))
    assert "uvicorn_worker.UvicornWorker" in argv and "--preload" not in argv
    assert argv[argv.index("--workers") + 1] == "2" and argv[argv.index("--bind") + 1] == "127.0.0.1:1234"


def test_runtime_does_not_import_http_or_falcon() -> None:
    root = Path(__file__).resolve().parents[2] / "aisandbox"
    for path in (root / "runtime").rglob("*.py"):
        text = path.read_text()
        assert "import falcon" not in text and "aisandbox.http" not in text, path
    for path in (root / "http").rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "tensorrt_llm" not in text, path
