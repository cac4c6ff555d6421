"""A hard grammar beside a plain request, through a real server (issue 17 item 2): the plain request answers
promptly, the grammar gets a 400 at its deadline, and /metrics counts it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.slow

# About 5 s or more to compile with xgrammar 0.1.25 on a 2-core machine (300 optional properties).
HARD_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(300)}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("grammar"), "--grammar-compile-timeout-s", "1.5")
    yield srv
    assert srv.stop() == 0


def chat(server: Server, **extra: Any) -> httpx.Response:
    body = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)


def test_a_hard_grammar_never_delays_a_plain_request(server: Server, tmp_path: Path) -> None:
    assert chat(server, response_format={"type": "json_object"}).status_code == 200  # warm: grammar workers up
    hard: dict[str, Any] = {}

    def send_hard() -> None:
        t0 = time.monotonic()
        fmt = {"type": "json_schema", "json_schema": {"name": "big", "schema": HARD_SCHEMA}}
        hard["response"] = chat(server, response_format=fmt)
        hard["s"] = time.monotonic() - t0

    thread = threading.Thread(target=send_hard)
    thread.start()
    time.sleep(0.3)
    waiting = server.metric("aisandbox_engine_requests_waiting_for_grammar")
    t0 = time.monotonic()
    plain = chat(server)
    plain_s = time.monotonic() - t0
    thread.join(60)
    response = hard["response"]
    print(f"plain chat beside the hard grammar: {plain_s:.2f} s; hard grammar refused after {hard['s']:.2f} s")
    assert plain.status_code == 200 and plain_s < 3.0
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "grammar_too_complex" and error["param"] == "response_format.json_schema.schema"
    assert hard["s"] < 1.5 + 3.0
    assert waiting == 1.0
    assert server.metric("aisandbox_engine_grammar_timeouts_total") >= 1
    assert server.metric("aisandbox_engine_requests_waiting_for_grammar") == 0
    # The next grammar compiles on a fresh worker.
    ok = chat(
        server, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"].startswith("{")
