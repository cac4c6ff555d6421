"""Every tensorrt_llm name the package uses exists in the recorded 1.2.x API (static check, no tensorrt_llm)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT.parent / "shared" / "tools" / "trtllm_conformance.py"


@pytest.mark.skipif(not TOOL.is_file(), reason=f"{TOOL} (the shared conformance tool) is absent")
def test_conformance_reports_no_unknown_names() -> None:
    result = subprocess.run(
        [sys.executable, str(TOOL), str(ROOT), "--deep"], capture_output=True, text=True, timeout=120, check=False
    )
    last = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ", 0 unknown," in last, last
    checked = int(last.split()[0])
    assert checked >= 20, last  # the imports and calls of both trtllm modules were seen
