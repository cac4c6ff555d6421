"""A tiny fake OpenAI-compatible streaming server (stdlib only) on loopback, for the benchmark's client tests."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeConfig:
    """How the fake server behaves."""

    model: str = "fake-model"
    token_delay_s: float = 0.002
    """Pause before each streamed token."""
    natural_len: int = 3
    """Tokens generated when ignore_eos is not sent (a model that stops early)."""
    accept_extensions: bool = True
    """False answers 422 to ignore_eos / min_tokens, as `transformers serve` does."""
    send_usage: bool = True
    """Whether a usage chunk is sent when asked for."""
    received: list[dict[str, Any]] = field(default_factory=list)
    """Every request body, in arrival order."""


def _handler(config: FakeConfig) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": config.model, "object": "model"}]})
            else:
                self._json(404, {"error": {"message": "not found", "type": "not_found"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            config.received.append(body)
            chat = self.path == "/v1/chat/completions"
            if not chat and self.path != "/v1/completions":
                self._json(404, {"error": {"message": "not found"}})
                return
            if not config.accept_extensions and ({"ignore_eos", "min_tokens"} & body.keys()):
                self._json(422, {"detail": "Unexpected fields in the request: {'ignore_eos'}"})
                return
            prompt = json.dumps(body.get("messages") or body.get("prompt"))
            if "FAIL500" in prompt:
                self._json(500, {"error": {"message": "boom", "type": "server_error"}})
                return
            n = body["max_tokens"] if body.get("ignore_eos") else min(body["max_tokens"], config.natural_len)
            if not body.get("stream"):
                self._json(200, {"choices": [{"index": 0, "text": "x", "message": {"content": "x"}}]})
                return
            self._stream(body, chat, n, "FAILSTREAM" in prompt)

        def _event(self, payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            chunk = f"data: {data}\n\n".encode()
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()

        def _stream(self, body: dict[str, Any], chat: bool, n: int, fail_mid: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if chat:
                self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(n):
                time.sleep(config.token_delay_s)
                if fail_mid and i == 1:
                    self._event({"error": {"message": "engine died", "type": "server_error"}})
                    break
                piece = f" tok{i}"
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                self._event({"choices": [choice]})
            else:
                if config.send_usage and (body.get("stream_options") or {}).get("include_usage"):
                    self._event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n}})
                self._event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


@dataclass
class FakeServer:
    """A running fake server."""

    config: FakeConfig
    base_url: str


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Say nothing when a client hangs up mid-stream (the tests do it on purpose)."""


def start_fake_server(config: FakeConfig) -> tuple[ThreadingHTTPServer, FakeServer]:
    """Serve `config` on a free loopback port in a daemon thread."""
    server = _QuietServer(("127.0.0.1", 0), _handler(config))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, FakeServer(config, f"http://127.0.0.1:{server.server_address[1]}/v1")
