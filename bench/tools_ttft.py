"""What a forced tool call (and a JSON schema, and top_logprobs) adds to the first token, side by side.

    python bench/tools_ttft.py --base-url http://127.0.0.1:8000/v1 --rounds 5

Alternates a plain streamed chat request with the same request plus `tools` + `tool_choice: "required"`,
plus a `json_schema` response_format, and plus `logprobs` with `top_logprobs: 5`; prints the median time to
the first streamed delta of each, and the difference from plain. The first round (grammar compilation and
the tokenizer's grammar vocabulary) is reported apart, then the cached rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import httpx

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
            "required": ["name", "country"],
            "additionalProperties": False,
        },
    },
}
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "tools required": {"tools": [WEATHER], "tool_choice": "required"},
    "json_schema": {"response_format": SCHEMA},
    "top_logprobs 5": {"logprobs": True, "top_logprobs": 5},
}


def ttft(client: httpx.Client, base: str, model: str, extra: dict[str, Any]) -> float:
    body = {
        "model": model, "stream": True, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}], **extra,
    }  # fmt: skip
    t0 = time.perf_counter()
    with client.stream("POST", f"{base}/chat/completions", json=body) as resp:
        resp.raise_for_status()
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen == 2:  # the first chunk is the role; the second carries the first generated token
                    return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = args.base_url.rstrip("/")
    with httpx.Client(timeout=300) as client:
        model = client.get(f"{base}/models").json()["data"][0]["id"]
        first = {name: ttft(client, base, model, extra) for name, extra in VARIANTS.items()}
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, extra in VARIANTS.items():
                times[name].append(ttft(client, base, model, extra))
    plain = statistics.median(times["plain"])
    print(f"| request | first call ms | TTFT p50 ms ({args.rounds} rounds) | vs plain |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        p50 = statistics.median(values)
        print(f"| {name} | {first[name] * 1000:.0f} | {p50 * 1000:.0f} | {(p50 - plain) * 1000:+.0f} ms |")


if __name__ == "__main__":
    main()
