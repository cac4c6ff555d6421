"""The request path through a real server: text work never stalls the event loop, bodies are bounded, and the
HTTP tier's null-engine benchmark runs."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow


def test_health_answers_while_a_huge_prompt_is_tokenized(server: Server) -> None:
    """A prompt just under the early-refusal bound is templated and tokenized (seconds) off the event loop."""
    content = "Tell me about the sea. " * 50_000  # 1.15M characters: tokenized, then refused as too long
    body = {"model": server.model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    result: dict[str, object] = {}

    def big() -> None:
        t0 = time.perf_counter()
        resp = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)
        result.update(status=resp.status_code, body=resp.json(), seconds=time.perf_counter() - t0)

    worker = threading.Thread(target=big)
    worker.start()
    latencies = []
    with httpx.Client(timeout=30) as client:
        while worker.is_alive() and len(latencies) < 3000:
            t0 = time.perf_counter()
            assert client.get(f"{server.root}/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
    worker.join()
    assert result["status"] == 400 and result["body"]["error"]["code"] == "context_length_exceeded"  # type: ignore[index]
    assert len(latencies) >= 10, f"the big request took only {result['seconds']}s"
    # Before this path existed, /health waited for the whole tokenization (49 s for a 30 MB body).
    assert max(latencies) < 0.5, sorted(latencies)[-5:]


def test_a_body_over_the_limit_is_refused_before_it_is_read(server: Server) -> None:
    """Content-Length over max_body_bytes (4 MiB by default): 413 at once, the rest of the body never sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 31457280\r\n\r\n" + b"{" * 1024
        )
        reply = b""
        while b"request_too_large" not in reply:  # headers and body may come in separate segments
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    text = reply.decode(errors="replace")
    assert text.startswith("HTTP/1.1 413"), text[:200]
    assert '"code":"request_too_large"' in text.replace(" ", "")


def test_the_null_engine_benchmark_measures_the_http_tier(tmp_path: Path) -> None:
    from aisandbox.bench.tier import run_tier, tier_markdown

    points = run_tier([1, 8], tokens_per_point=800, log_path=tmp_path / "null.log")
    assert [p.streams for p in points] == [1, 8]
    assert points[0].tokens == 800 and points[1].tokens == 800  # every stream's usage came back
    assert all(p.events > 0 and p.tokens_per_s > 0 for p in points)
    assert "| 8 | 800 |" in tier_markdown(points)


def test_chunked_bodies_over_the_limit_get_413(server: Server) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"a" * 65536  # 5 MiB in all, without a Content-Length
        yield b'"}]}'

    resp = httpx.post(
        f"{server.base_url}/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413 and json.loads(resp.text)["error"]["code"] == "request_too_large"
