"""Tests that need ../shared never vanish: without it they warn what they could not check; under CI they fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SharedFileMissing, shared_file


def test_a_missing_shared_file_warns_outside_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.warns(SharedFileMissing, match="spec.yaml is missing, so the bodies was not checked"):
        assert shared_file(tmp_path / "spec.yaml", "the bodies") is None


def test_a_missing_shared_file_fails_under_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires ../shared"):
        shared_file(tmp_path / "spec.yaml", "the bodies")


def test_a_present_shared_file_is_returned(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text("x")
    assert shared_file(tmp_path / "spec.yaml", "the bodies") == tmp_path / "spec.yaml"
