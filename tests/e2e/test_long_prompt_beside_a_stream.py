"""A long prompt beside a running stream, through a real server on the default model (issue 17 item 3): with
chunked prefill the stream keeps getting tokens while the prompt prefills, instead of freezing for all of it."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow


def test_a_running_stream_keeps_flowing_while_a_long_prompt_prefills(server: Server) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    stamps: list[float] = []
    done = threading.Event()

    def stream() -> None:
        chunks = client.completions.create(
            model=server.model, prompt="Count: one, two,", max_tokens=4000, temperature=0, stream=True
        )
        for _ in chunks:
            stamps.append(time.monotonic())
            if done.is_set():
                break
        chunks.close()

    thread = threading.Thread(target=stream)
    thread.start()
    while len(stamps) < 5:
        time.sleep(0.05)
    words = " ".join(f"w{i % 97}" for i in range(1400))  # about 4,000 tokens
    t0 = time.monotonic()
    reply = client.completions.create(model=server.model, prompt=words, max_tokens=1, temperature=0)
    t1 = time.monotonic()
    done.set()
    thread.join(60)
    assert reply.usage is not None and reply.usage.prompt_tokens > 3000
    during = [t for t in stamps if t0 <= t <= t1]
    gaps = [b - a for a, b in zip([t0, *during], [*during, t1], strict=False)]
    print(f"{reply.usage.prompt_tokens}-token prompt answered in {t1 - t0:.2f} s; the stream got {len(during)} "
          f"chunks meanwhile, largest gap {max(gaps):.2f} s")  # fmt: skip
    assert len(during) >= 3, "the stream froze while the long prompt prefilled"
    assert max(gaps) < max(0.5 * (t1 - t0), 1.0)
