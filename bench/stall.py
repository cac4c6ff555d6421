"""Does one huge request stall the others? /health latency and a concurrent stream's inter-token latency,
without and then with a huge chat body in flight, against any running server.

    python bench/stall.py --base-url http://127.0.0.1:8000 --body-mb 30

Phase 1 streams one chat completion and polls /health every 10 ms; phase 2 does the same while a second
client posts a chat body of --body-mb megabytes. Prints p50/p99/max of both latencies per phase and what the
huge request got back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx


def _stream_itl(base: str, model: str, out: list[float], stop: threading.Event) -> None:
    body = {
        "model": model, "stream": True, "max_tokens": 400, "ignore_eos": True, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long story about the sea."}],
    }  # fmt: skip
    while not stop.is_set():
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as resp:
            last = None
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                if last is not None:
                    out.append(now - last)
                last = now
                if stop.is_set():
                    break


def _poll_health(base: str, out: list[float], stop: threading.Event) -> None:
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            client.get(f"{base}/health")
            out.append(time.perf_counter() - t0)
            time.sleep(0.01)


def _summary(name: str, values: list[float]) -> str:
    if not values:
        return f"{name}: no samples"
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return f"{name}: n={len(ms)} p50={statistics.median(ms):.1f} ms p99={p99:.1f} ms max={ms[-1]:.1f} ms"


def _phase(base: str, model: str, seconds: float, big: bytes | None) -> None:
    itl: list[float] = []
    health: list[float] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_stream_itl, args=(base, model, itl, stop)),
        threading.Thread(target=_poll_health, args=(base, health, stop)),
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the stream is flowing
    itl.clear()
    health.clear()
    outcome = "none"
    t0 = time.perf_counter()
    if big is not None:
        resp = httpx.post(
            f"{base}/v1/chat/completions", content=big, headers={"content-type": "application/json"}, timeout=600
        )
        took = time.perf_counter() - t0
        outcome = f"{resp.status_code} {resp.text[:160]!r} after {took:.2f} s"
    remaining = seconds - (time.perf_counter() - t0)
    if remaining > 0:
        time.sleep(remaining)
    stop.set()
    for t in threads:
        t.join()
    print(f"  huge request: {outcome}")
    print("  " + _summary("GET /health latency", health))
    print("  " + _summary("stream inter-token latency", itl))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--body-mb", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    args = parser.parse_args()
    base = args.base_url.rstrip("/").removesuffix("/v1")
    model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
    text = "Tell me about the sea. " * int(args.body_mb * 2**20 / 23)
    big = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8}).encode()
    print(f"server {base}, model {model}")
    print("phase 1: no huge request")
    _phase(base, model, args.seconds, None)
    print(f"phase 2: a {len(big) / 2**20:.1f} MiB chat body in flight")
    _phase(base, model, args.seconds, big)


if __name__ == "__main__":
    main()
