"""The HTTP client and the `aisandbox bench` command against a fake OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_openai_server import FakeConfig, FakeServer

from aisandbox.bench.client import GenerationOptions, HttpClient, HttpClientConfig, Prompt, parse_chunk
from aisandbox.bench.report import load_result
from aisandbox.cli import main


def _collect(server: FakeServer, options: GenerationOptions, prompt: Prompt) -> list:  # type: ignore[type-arg]
    async def go() -> list:  # type: ignore[type-arg]
        client = HttpClient(HttpClientConfig(server.base_url), options)
        try:
            return [e async for e in client.stream(prompt)]
        finally:
            await client.aclose()

    return asyncio.run(go())


PROMPT = Prompt(messages=({"role": "user", "content": "hello"},), output_len=4)


def test_chat_stream_events(fake_server: FakeServer) -> None:
    events = _collect(fake_server, GenerationOptions(model="fake-model", fixed_length=True), PROMPT)
    assert [e.text for e in events] == ["", " tok0", " tok1", " tok2", " tok3", ""]
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 4
    assert all(b.t >= a.t for a, b in zip(events, events[1:], strict=False))
    body = fake_server.config.received[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == 4 and body["max_tokens"] == 4
    assert body["messages"] == [{"role": "user", "content": "hello"}]


def test_completions_stream_and_extra_body(fake_server: FakeServer) -> None:
    options = GenerationOptions(model="m", endpoint="completions", include_usage=False, extra_body={"top_k": 1})
    events = _collect(fake_server, options, PROMPT)
    assert [e.text for e in events] == [" tok0", " tok1", " tok2"]  # no ignore_eos: stops at 3
    body = fake_server.config.received[0]
    assert body["prompt"] == "hello" and body["top_k"] == 1
    assert "stream_options" not in body and "ignore_eos" not in body


def test_http_errors(fake_server: FakeServer) -> None:
    options = GenerationOptions(model="m")
    bad = Prompt(messages=({"role": "user", "content": "FAIL500"},), output_len=4)
    (event,) = _collect(fake_server, options, bad)
    assert event.error is not None and event.error.status == "500" and event.error.message == "boom"
    mid = Prompt(messages=({"role": "user", "content": "FAILSTREAM"},), output_len=4)
    events = _collect(fake_server, options, mid)
    assert events[-1].error is not None and events[-1].error.status == "stream_error"
    dead = FakeServer(FakeConfig(), "http://127.0.0.1:9/v1")  # nothing listens on the discard port
    (event,) = _collect(dead, options, PROMPT)
    assert event.error is not None and event.error.status == "connection"


def test_parse_chunk_shapes() -> None:
    assert parse_chunk('{"error": "plain text error"}', 1.0, "chat").error.message == "plain text error"  # type: ignore[union-attr]
    assert parse_chunk("nonsense", 1.0, "chat").error.status == "stream_error"  # type: ignore[union-attr]
    event = parse_chunk('{"choices": [{"index": 0, "text": "x"}], "usage": null}', 2.0, "completions")
    assert (event.text, event.usage, event.t) == ("x", None, 2.0)


def _bench(server: FakeServer, tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "run.json"
    argv = ["bench", "--base-url", server.base_url, "--concurrency", "1,3", "--num-prompts", "5"]
    argv += ["--input-len", "12", "--output-len", "6", "--warmup", "1", "--no-progress", "--output", str(out), *extra]
    assert main(argv) == 0
    return out


def test_bench_command_writes_every_field(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _bench(fake_server, tmp_path, "--slo", "ttft=1s,tpot=500ms", "--label", "fake run")
    printed = capsys.readouterr().out
    assert printed.startswith("## fake run") and "| C=3 | 5 | 0 |" in printed and "| Load | Latency (ms) |" in printed
    result = load_result(out)
    assert result.config["model"] == "fake-model" and result.config["fixed_length"] is True
    assert result.target["models"][0]["id"] == "fake-model"
    assert result.environment["cpu_count"] and result.environment["versions"]["httpx"]
    assert [p.label for p in result.points] == ["C=1", "C=3"]
    for point in result.points:
        a = point.aggregates
        assert (a.completed, a.failed, a.errors) == (5, 0, {})
        assert a.total_output_tokens == 30 and a.total_input_tokens == 35
        assert a.good_requests == 5 and a.goodput is not None and a.goodput > 0
        for r in point.requests:
            assert r.ok and r.output_tokens == 6 and r.token_source == "usage" and len(r.chunk_offsets_s) == 6
    # 5 measured + 1 warm-up per point, plus the probe.
    assert len(fake_server.config.received) == 1 + 2 * 6
    for png in ("run-sweep.png", "run-ttft.png", "run-itl.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_bench_drops_extensions_the_server_refuses(
    fake_server_factory: Callable[[FakeConfig], FakeServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = fake_server_factory(FakeConfig(accept_extensions=False, send_usage=False))
    out = _bench(server, tmp_path, "--no-plots")
    assert "server refused ignore_eos/min_tokens (422" in capsys.readouterr().err
    result = load_result(out)
    assert result.config["fixed_length"] is False
    records = [r for p in result.points for r in p.requests]
    assert all(r.ok and r.output_tokens == 3 and r.token_source == "chunks" for r in records)
    assert all("ignore_eos" not in body for body in server.config.received[2:])


def test_bench_counts_errors_by_status(fake_server: FakeServer, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "fine"}, {"prompt": "FAIL500"}, {"prompt": "FAILSTREAM"}, {"prompt": "also fine"}]
    data.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "errors.json"
    argv = ["bench", "--base-url", fake_server.base_url, "--dataset", str(data), "--num-prompts", "4"]
    assert main([*argv, "--warmup", "0", "--no-plots", "--no-progress", "--output", str(out)]) == 0
    (point,) = load_result(out).points
    assert point.aggregates.errors == {"500": 1, "stream_error": 1}
    assert point.aggregates.completed == 2


def test_compare_command(fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _bench(fake_server, tmp_path, "--no-plots", "--label", "a")
    b = a.with_name("b.json")
    b.write_text(a.read_text().replace('"label": "a"', '"label": "b"'))
    capsys.readouterr()
    assert main(["bench", "--compare", str(a), str(b), "--label", "ab", "--plot-dir", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "| Load | Metric | a | b | b / a |"
    assert "| C=3 | Out tok/s |" in text
    assert (tmp_path / "plots" / "ab-sweep.png").is_file() and (tmp_path / "plots" / "ab-itl.png").is_file()


def test_bench_package_never_imports_the_runtime() -> None:
    code = (
        "import sys, aisandbox.bench.cli, aisandbox.bench.plots; "
        "banned = ('aisandbox.runtime', 'aisandbox.bench.local_engine', 'torch'); "
        "bad = [m for m in sys.modules if m.startswith(banned)]; "
        "print(bad); raise SystemExit(bool(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_unreachable_server_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--base-url", "http://127.0.0.1:9/v1", "--wait-ready", "0", "--no-progress"]) == 2
    assert "bench: error:" in capsys.readouterr().err
