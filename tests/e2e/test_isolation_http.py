"""Isolation through a real `aisandbox serve` (gunicorn + the aisandbox uvicorn worker): the API key cannot be
skipped with `//v1`, SIGTERM ends a stream longer than the drain with an error event and `data: [DONE]` and the
server exits cleanly, and a 300,000-prompt body neither stalls /health nor reaches the engine.

The null engine (the tiny Mistral's tokenizer, canned tokens at 20 ms a step) keeps start-up to seconds and
makes a stream last as long as asked. Timings are bounds with room for a loaded machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.slow

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
NULL = ("--null-engine", "--null-engine-step-ms", "20", "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def keyed(tiny_mistral_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("keyed"), "--model", str(tiny_mistral_dir), *NULL, "--api-key", KEY,
        ready_timeout_s=180,
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


@pytest.mark.parametrize("path", ["/v1/models", "//v1/models", "//v1//models/", "/v1/nope"])
def test_the_key_cannot_be_skipped(keyed: Server, path: str) -> None:
    assert httpx.get(keyed.root + path, timeout=30).status_code == 401
    assert httpx.post(f"{keyed.root}//v1/chat/completions", json=chat(), timeout=30).status_code == 401
    assert httpx.post(f"{keyed.root}//v1/chat/completions", json=chat(), headers=AUTH, timeout=30).status_code == 200
    assert httpx.get(f"{keyed.root}/health", timeout=30).status_code == 200


def test_a_300k_prompt_body_is_refused_beside_a_responsive_health(keyed: Server) -> None:
    body = json.dumps({"model": "tiny", "prompt": [[1, 2]] * 300_000, "max_tokens": 1}).encode()
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                started = time.perf_counter()
                assert client.get(f"{keyed.root}/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.3)
    started = time.perf_counter()
    headers = {**AUTH, "Content-Type": "application/json"}
    reply = httpx.post(f"{keyed.root}/v1/completions", content=body, headers=headers, timeout=120)
    elapsed = time.perf_counter() - started
    time.sleep(0.3)
    done.set()
    prober.join(60)
    print(f"300k-prompt body ({len(body)} bytes): {reply.status_code} in {elapsed:.2f} s; "
          f"/health max {max(latencies):.3f} s over {len(latencies)} probes")  # fmt: skip
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", reply.text
    assert max(latencies) < 3.0  # was 8.3-9.6 s: per-prompt work ran on the event loop
    metrics = httpx.get(f"{keyed.root}/metrics", timeout=30).text
    assert 'aisandbox_requests_refused_total{reason="limit_prompt"}' in metrics


def test_sigterm_ends_a_long_stream_with_an_error_event_then_exits(tiny_mistral_dir: Path, tmp_path: Path) -> None:
    server = start_server(
        tmp_path, "--model", str(tiny_mistral_dir), *NULL, "--drain-timeout-s", "2", ready_timeout_s=180
    )
    lines: list[str] = []
    first = threading.Event()
    ended: list[float] = []

    def stream() -> None:
        body = chat(stream=True, max_tokens=5000)  # 100 s of tokens: far longer than the 2 s drain
        with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[len("data: ") :])
                    first.set()
        ended.append(time.monotonic())

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    time.sleep(0.5)
    sigterm = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    health = httpx.get(f"{server.root}/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    reader.join(60)
    status = server.stop(timeout_s=60)
    assert ended, "the stream did not end"
    exited = time.monotonic()
    print(f"SIGTERM -> stream ended {ended[0] - sigterm:.2f} s, server exited {exited - sigterm:.2f} s")
    assert lines[-1] == "[DONE]"
    error = json.loads(lines[-2])
    assert error["error"]["code"] == "server_shutting_down" and error["error"]["type"] == "server_error"
    assert len(lines) > 10  # tokens flowed until the drain deadline
    assert status == 0
    assert exited - sigterm < 2 + 15  # inside gunicorn's graceful timeout (drain + 15)
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_a_worker_whose_engine_died_exits_and_is_replaced(tiny_mistral_dir: Path, tmp_path: Path) -> None:
    from aisandbox.serve import gunicorn_argv, settings_env
    from aisandbox.settings import ServerSettings
    from tests.conftest import free_port

    settings = ServerSettings(host="127.0.0.1", port=free_port(), model=tiny_mistral_dir, null_engine=True)
    argv = [a if a != "aisandbox.http.asgi:app" else "tests.e2e.dying_app:app" for a in gunicorn_argv(settings)]
    log = tmp_path / "gunicorn.log"
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(proc, settings.port, "tiny", log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and log.read_text().count("Booting worker") < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        text = log.read_text()
        assert "the engine died while serving" in text and "exited with code 1" in text, text[-3000:]
        assert text.count("Booting worker") >= 2  # gunicorn started a fresh worker
    finally:
        assert server.stop(timeout_s=60) == 0
