"""trtllm: chunked prefill on, with a latency-oriented per-step token budget from the profile, recorded in the
manifest (issue 17 item 3)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from aisandbox.artifacts import read_manifest, write_manifest
from aisandbox.build_engine.profiles import list_profiles
from aisandbox.runtime.trtllm.backend import llm_runtime_kwargs
from tests.unit.test_trtllm_kwargs import TRT_LLM_ARGS, manifest_for


@pytest.mark.parametrize("name", list_profiles())
def test_every_profile_serves_with_chunked_prefill_and_a_small_step(name: str, tmp_path: Path) -> None:
    manifest = manifest_for(name)
    kwargs = llm_runtime_kwargs(tmp_path, manifest)
    assert kwargs["enable_chunked_prefill"] is True and set(kwargs) <= TRT_LLM_ARGS
    budget = kwargs["max_num_tokens"]
    assert budget == manifest.profile.runtime_max_num_tokens
    assert budget <= manifest.profile.max_num_tokens and budget in (2048, 4096)
    assert budget == (4096 if ("h100" in name or "tp2" in name) else 2048)


def test_the_budget_is_recorded_in_the_manifest(tmp_path: Path) -> None:
    manifest = manifest_for("h100-sxm")
    write_manifest(tmp_path, manifest)
    (tmp_path / "config.json").write_text("{}")  # TensorRT-LLM's own, which read_manifest expects beside it
    assert read_manifest(tmp_path).profile.runtime_max_num_tokens == 4096
    # A manifest written before the field existed still serves, with chunked prefill at 2048 tokens a step.
    old = dataclasses.replace(manifest, profile=dataclasses.replace(manifest.profile, runtime_max_num_tokens=None))
    assert llm_runtime_kwargs(tmp_path, old)["max_num_tokens"] == 2048
