"""What a Responses request adds over the same chat request, measured side by side against one server.

    python -m aisandbox.bench.micro.responses_overhead --base-url http://127.0.0.1:8000/v1 [--model NAME] [--rounds 200]

Alternates the two front ends request by request (same prompt, same max tokens, greedy), non-streamed (whole
request) and streamed (time to the first content event: the first `content` delta for chat, the first
`response.output_text.delta` for Responses). Run it against `aisandbox serve --null-engine` to see the front end's
own cost, or against the real model. store is false, so the database write is not in the figure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    client = httpx.Client(base_url=args.base_url, timeout=60)
    model = args.model or client.get("/models").json()["data"][0]["id"]
    prompt = "Say hello in one short sentence."
    chat = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": 0}  # fmt: skip
    resp = {"model": model, "input": prompt, "max_output_tokens": args.max_tokens, "temperature": 0, "store": False}
    times: dict[str, list[float]] = {"chat": [], "responses": [], "chat first": [], "responses first": []}
    for i in range(args.rounds + 10):
        for name, path, body in (("chat", "/chat/completions", chat), ("responses", "/responses", resp)):
            t0 = time.perf_counter()
            r = client.post(path, json=body)
            r.raise_for_status()
            total = time.perf_counter() - t0
            t0 = time.perf_counter()
            first = None
            with client.stream("POST", path, json={**body, "stream": True}) as s:
                for line in s.iter_lines():
                    if (
                        first is None
                        and ('"content":"' in line or "output_text.delta" in line)
                        and '"content":""' not in line
                    ):
                        first = time.perf_counter() - t0
            if i >= 10 and first is not None:  # the first rounds warm up
                times[name].append(total * 1000)
                times[f"{name} first"].append(first * 1000)
    for key in ("chat", "responses", "chat first", "responses first"):
        v = times[key]
        print(
            f"{key:16s} p50 {statistics.median(v):7.2f} ms  p90 {statistics.quantiles(v, n=10)[-1]:7.2f} ms  n={len(v)}"
        )
    whole = statistics.median(times["responses"]) - statistics.median(times["chat"])
    first = statistics.median(times["responses first"]) - statistics.median(times["chat first"])
    print(f"Responses adds {whole:+.2f} ms non-streamed, {first:+.2f} ms to the first content event (p50 differences)")


if __name__ == "__main__":
    main()
