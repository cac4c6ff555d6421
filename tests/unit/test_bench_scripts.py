"""The benchmark scripts under bench/ and the micro-benchmarks under aisandbox/bench/micro/ import against the
current package (one of them once broke silently when the engine classes were renamed), and the shell ones parse."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
MICRO = ROOT / "aisandbox" / "bench" / "micro"


@pytest.mark.parametrize("script", sorted([*BENCH.glob("*.py"), *MICRO.glob("[!_]*.py")]), ids=lambda p: p.name)
def test_python_bench_scripts_import(script: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # each script runs its work only under __main__


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.sh")), ids=lambda p: p.name)
def test_shell_bench_scripts_parse(script: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    subprocess.run([bash, "-n", str(script)], check=True)


def _result(label: str, per_point: dict[str, tuple[float, float]], prompts: int = 32) -> Any:
    """A result file's content: for each point label, (output tok/s, TTFT ms), from `prompts` 64-token requests."""
    from aisandbox.bench.metrics import RequestRecord, compute_aggregates
    from aisandbox.bench.report import BenchResult, PointResult

    points = []
    for point, (tok_s, ttft_ms) in per_point.items():
        records = [
            RequestRecord(index=i, start_s=0.0, ttft_s=ttft_ms / 1e3, e2e_s=1.0, input_tokens=37, output_tokens=64)
            for i in range(prompts)
        ]
        points.append(
            PointResult(label=point, aggregates=compute_aggregates(records, prompts * 64 / tok_s), requests=[])
        )
    return BenchResult(label=label, created="2026-12-04T00:00:00Z", points=points)


def test_headline_gives_every_target_and_the_long_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/headline.py's verdicts from a run_report folder, the long 16-stream points included."""
    from aisandbox.bench.report import write_result

    ours = {"C=1": (150.0, 20.0), "C=4": (400.0, 40.0), "C=16": (800.0, 90.0)}
    write_result(_result("aisandbox-http", ours), tmp_path / "aisandbox-http.json")
    write_result(_result("aisandbox-http-2", {**ours, "C=16": (720.0, 95.0)}), tmp_path / "aisandbox-http-2.json")
    write_result(_result("aisandbox-engine", ours), tmp_path / "aisandbox-engine.json")
    write_result(_result("vllm-cpu", {"C=1": (50.0, 45.0), "C=4": (150.0, 90.0), "C=16": (380.0, 300.0)}),
                 tmp_path / "vllm-cpu.json")  # fmt: skip
    write_result(_result("llamacpp", {"C=1": (110.0, 55.0), "C=16": (270.0, 140.0)}), tmp_path / "llamacpp.json")
    write_result(_result("long", {"C=16": (700.0, 150.0)}, 256), tmp_path / "long-aisandbox-http.json")
    write_result(_result("long-2", {"C=16": (735.0, 150.0)}, 256), tmp_path / "long-aisandbox-http-2.json")
    write_result(_result("vllm-long", {"C=16": (400.0, 300.0)}, 256), tmp_path / "long-vllm-cpu.json")
    spec = importlib.util.spec_from_file_location("bench_headline", BENCH / "headline.py")
    assert spec is not None and spec.loader is not None
    headline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headline)
    headline.main(tmp_path)
    out = capsys.readouterr().out
    # the 32-prompt starts (the long files are not restarts), then the long points and their ratio
    assert "C=16 across 2 server starts: 800.0 / 720.0 output tokens/s, spread 11.1%. Target < 10%: NOT met." in out
    assert "C=16 over 256 prompts (about 23 s a point) on the same 2 starts: 700.0 / 735.0" in out
    assert "spread 5.0% (< 10%: met)" in out
    assert "Against vLLM-CPU's point of the same length: 1.75x (700.0 vs 400.0; >= 2x: NOT met)" in out
    assert "aisandbox vs llama.cpp's server at C=1: 1.36x" in out and "Target >= 1.5x: NOT met" in out
    assert "aisandbox vs vLLM-CPU at C=16: 2.11x output tokens/s (800.0 vs 380.0). Target >= 2x: met." in out
    assert "median TTFT 20.0 ms (target <= 30: met)" in out
