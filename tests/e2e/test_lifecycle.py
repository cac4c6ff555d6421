"""Server lifecycle: SIGTERM exits cleanly; bad start-up arguments fail fast with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import start_server

pytestmark = pytest.mark.slow


def test_sigterm_exits_cleanly(tiny_mistral_dir: Path, tmp_path: Path) -> None:
    server = start_server(tmp_path, "--model", str(tiny_mistral_dir), "--served-model-name", "tiny")
    reply = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200
    assert server.stop(timeout_s=60) == 0
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_missing_model_folder_fails_fast(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aisandbox", "serve", "--model", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "not a Hugging Face model folder" in out.stderr
