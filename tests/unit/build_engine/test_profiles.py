"""GPU profiles: every file loads and is valid; impossible precisions are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aisandbox.build_engine.errors import ProfileError
from aisandbox.build_engine.profiles import (
    DEFAULT_PROFILES_DIR,
    check_precision_supported,
    list_profiles,
    load_profile,
    load_profiles,
)

REQUIRED = {
    "h100-sxm",
    "h100-pcie",
    "h200",
    "a100-80gb",
    "a100-40gb",
    "l40s",
    "l4",
    "a10g",
    "rtx-4000-ada",
    "rtx-6000-ada",
    "rtx-4090",
}


def test_the_required_gpu_types_have_profiles() -> None:
    assert set(list_profiles()) >= REQUIRED


@pytest.mark.parametrize("name", list_profiles(DEFAULT_PROFILES_DIR))
def test_every_profile_file_loads_and_is_consistent(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.max_input_len < profile.max_seq_len <= 32768  # Mistral-7B's window
    assert profile.max_input_len <= profile.max_num_tokens
    major_minor = tuple(int(x) for x in profile.compute_capability.split("."))
    if major_minor >= (8, 9):  # Ada / Hopper: FP8 weights and FP8 KV, as the issue asks
        assert (profile.quantization.weights, profile.quantization.kv_cache) == ("fp8", "fp8")
    else:  # Ampere: never FP8
        assert "fp8" not in (profile.quantization.weights, profile.quantization.kv_cache)


def test_fp8_on_ampere_is_refused_with_the_reason() -> None:
    with pytest.raises(ProfileError, match="FP8 needs an Ada.*or Hopper"):
        check_precision_supported("fp8", "bf16", "8.0", "NVIDIA A100")
    with pytest.raises(ProfileError, match="cannot run fp8 KV cache"):
        check_precision_supported("int4_awq", "fp8", "8.6", "NVIDIA A10G")
    check_precision_supported("fp8", "fp8", "8.9", "NVIDIA L4")  # Ada is fine


def test_an_override_to_fp8_on_an_ampere_profile_is_refused() -> None:
    with pytest.raises(ProfileError, match="cannot run fp8 weights"):
        load_profile("a100-80gb").with_overrides({"weights": "fp8"})


def test_overrides_are_validated_again() -> None:
    profile = load_profile("h100-sxm")
    assert profile.with_overrides({"max_batch_size": 8, "max_seq_len": None}).max_batch_size == 8
    with pytest.raises(ProfileError, match="max_input_len"):
        profile.with_overrides({"max_seq_len": 1024})  # max_input_len 16384 no longer fits


def test_a_profile_file_with_fp8_on_ampere_is_rejected(tmp_path: Path) -> None:
    data = yaml.safe_load((DEFAULT_PROFILES_DIR / "a100-80gb.yaml").read_text())
    data["quantization"]["weights"] = "fp8"
    (tmp_path / "a100-80gb.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match="FP8 needs an Ada"):
        load_profiles(tmp_path)


def test_unknown_fields_and_unknown_profiles_are_errors(tmp_path: Path) -> None:
    data = yaml.safe_load((DEFAULT_PROFILES_DIR / "l4.yaml").read_text())
    data["max_batch"] = 3
    (tmp_path / "l4.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match="max_batch"):
        load_profile("l4", tmp_path)
    with pytest.raises(ProfileError, match="unknown GPU profile 'b200'.*known profiles: l4"):
        load_profile("b200", tmp_path)


def test_the_file_name_must_be_the_profile_name(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text((DEFAULT_PROFILES_DIR / "l4.yaml").read_text())
    with pytest.raises(ProfileError, match="must be l4.yaml"):
        load_profile("mine", tmp_path)
