"""The benchmark scripts under bench/ and the micro-benchmarks under aisandbox/bench/micro/ import against the
current package (one of them once broke silently when the engine classes were renamed), and the shell ones parse."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

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
