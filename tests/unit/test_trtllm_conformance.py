"""Every tensorrt_llm name the package uses exists in the recorded 1.2.x API (static check, no tensorrt_llm)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import shared_file

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT.parent / "shared" / "tools" / "trtllm_conformance.py"
# The only modules that may import tensorrt_llm, and only inside functions (lazily).
ALLOWED = {"aisandbox/runtime/trtllm/backend.py", "aisandbox/build_engine/trt_build.py"}


def test_tensorrt_llm_is_imported_lazily_in_the_allowed_modules_only() -> None:
    pattern = re.compile(r"^(\s*)(?:import|from)\s+tensorrt_llm\b", re.M)
    seen = {}
    for path in sorted((ROOT / "aisandbox").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for match in pattern.finditer(path.read_text()):
            seen.setdefault(rel, []).append(match.group(1))
    assert set(seen) <= ALLOWED, seen
    assert "aisandbox/runtime/trtllm/backend.py" in seen
    assert all(indent for indents in seen.values() for indent in indents), "a module-level tensorrt_llm import"


def test_conformance_reports_no_unknown_names() -> None:
    tool = shared_file(TOOL, "the tensorrt_llm names against the recorded 1.2 API")
    if tool is None:
        return
    result = subprocess.run(
        [sys.executable, str(tool), str(ROOT), "--deep"], capture_output=True, text=True, timeout=120, check=False
    )
    last = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ", 0 unknown," in last, last
    checked = int(last.split()[0])
    assert checked >= 20, last  # the imports and calls of both trtllm modules were seen
