"""`aisandbox bench --null-engine`: what the HTTP tier alone can stream, reproducibly.

Starts `aisandbox serve --null-engine` (the real app and text layer over a backend that emits canned tokens at
no cost) pinned to one core, pins this client to another, and drives N concurrent streamed chat completions
over raw sockets (an HTTP client library would be the bottleneck). Reports output tokens per second (from
each stream's usage chunk), SSE events per second and tokens per event, per stream count.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TierPoint", "run_tier", "tier_markdown"]


@dataclass(frozen=True, slots=True)
class TierPoint:
    """One measured stream count."""

    streams: int
    tokens: int
    events: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _one_stream(port: int, model: str, max_tokens: int) -> tuple[int, int]:
    """One streamed request over a raw socket: (completion tokens from usage, SSE data events)."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    chunks = []
    while True:
        data = await reader.read(1 << 16)
        if not data:
            break
        chunks.append(data)
    writer.close()
    raw = b"".join(chunks)
    head = raw[: raw.find(b"\r\n")]
    if b" 200 " not in head:
        raise RuntimeError(f"the server answered {head.decode(errors='replace')}")
    usage_at = raw.rfind(b'"completion_tokens":')
    tokens = int(raw[usage_at + 20 : raw.find(b",", usage_at)].strip()) if usage_at >= 0 else 0
    return tokens, raw.count(b"data: ")


async def _point(port: int, model: str, streams: int, max_tokens: int) -> TierPoint:
    start = time.perf_counter()
    results = await asyncio.gather(*(_one_stream(port, model, max_tokens) for _ in range(streams)))
    seconds = time.perf_counter() - start
    return TierPoint(streams, sum(r[0] for r in results), sum(r[1] for r in results), seconds)


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the null-engine server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the null-engine server did not become ready")


def run_tier(
    streams: list[int],
    *,
    tokens_per_point: int = 65536,
    server_cpus: set[int] | None = None,
    client_cpus: set[int] | None = None,
    extra_args: list[str] | None = None,
    log_path: Path | None = None,
) -> list[TierPoint]:
    """Start the null-engine server, measure each stream count, stop the server."""
    port = _free_port()
    model = "null-engine"
    cmd = [
        sys.executable, "-m", "aisandbox", "serve", "--null-engine", "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", model, "--max-batch-size", str(max(streams)), "--max-queue", str(max(streams)),
        "--log-level", "warning", *(extra_args or []),
    ]  # fmt: skip

    def pin() -> None:
        if server_cpus:
            os.sched_setaffinity(0, server_cpus)

    log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
    try:
        _wait_ready(port, proc, 300)
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)
        points = []
        with asyncio.Runner() as runner:
            runner.run(_point(port, model, 1, 64))  # warm-up
            for n in streams:
                points.append(runner.run(_point(port, model, n, max(16, tokens_per_point // n))))
        return points
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def tier_markdown(points: list[TierPoint]) -> str:
    """The points as a Markdown table."""
    rows = [
        "| streams | tokens | seconds | output tok/s | SSE events/s | tokens per event |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        per_event = p.tokens / max(1, p.events - 3 * p.streams)  # role chunk, usage chunk and [DONE] carry none
        rows.append(
            f"| {p.streams} | {p.tokens} | {p.seconds:.2f} | {p.tokens_per_s:,.0f} | {p.events_per_s:,.0f} "
            f"| {per_event:.2f} |"
        )
    return "\n".join(rows)
