"""`aisandbox bench` against a real `aisandbox serve` subprocess (the session's `server` fixture), and
through the engine in process.

A handful of short requests with the default model: the result file must have every field filled. Nothing
here asserts a speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aisandbox.bench.report import load_result
from aisandbox.cli import main
from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

# Fields that are None by design: the load mode not used, the error of a request that succeeded, options
# not given, headers a server may not send.
NULLABLE = {"request_rate", "max_concurrency", "error", "dataset", "duration_s", "tokenizer", "server_header"}


def _nulls(node: Any, path: str = "") -> list[str]:
    """Paths of None values in a JSON tree, except under keys that are None by design."""
    if isinstance(node, dict):
        return [p for k, v in node.items() if k not in NULLABLE for p in _nulls(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _nulls(v, f"{path}[{i}]")]
    return [path] if node is None else []


def _run(tmp_path: Path, name: str, *target: str) -> Path:
    out = tmp_path / f"{name}.json"
    argv = ["bench", *target, "--concurrency", "1,2", "--num-prompts", "3", "--input-len", "16", "--output-len", "8"]
    argv += ["--warmup", "1", "--slo", "ttft=60s,tpot=10s", "--no-progress", "--label", name, "--output", str(out)]
    assert main(argv) == 0
    return out


def _check_filled(path: Path) -> None:
    result = load_result(path)
    assert _nulls(result.model_dump(mode="json")) == []
    assert [p.label for p in result.points] == ["C=1", "C=2"]
    assert result.config["fixed_length"] is True  # aisandbox honours ignore_eos / min_tokens
    for point in result.points:
        a = point.aggregates
        assert (a.completed, a.failed, a.errors) == (3, 0, {})
        assert a.total_output_tokens == 24 and a.good_requests == 3
        for r in point.requests:
            assert r.output_tokens == 8 and r.token_source == "usage" and r.input_tokens
            assert r.chunk_offsets_s and r.ttft_s == r.chunk_offsets_s[0] and r.output_chars > 0
    for png in ("sweep", "ttft", "itl"):
        assert path.with_name(f"{path.stem}-{png}.png").stat().st_size > 1000


def test_bench_against_aisandbox_serve(server: Server, tmp_path: Path) -> None:
    out = _run(tmp_path, "http", "--base-url", server.base_url, "--model", server.model)
    _check_filled(out)
    assert load_result(out).target["models"][0]["id"] == server.model


def test_bench_engine_alone_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(tmp_path, "local", "--engine", "local")
    _check_filled(out)
    assert load_result(out).target["kind"] == "local"
    other = out.with_name("again.json")
    other.write_text(out.read_text().replace('"label": "local"', '"label": "again"'))
    capsys.readouterr()
    assert main(["bench", "--compare", str(out), str(other), "--no-plots"]) == 0
    assert "| C=2 | Out tok/s |" in capsys.readouterr().out
