"""GPU profiles: every file loads and is valid; impossible precisions are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aisandbox.build_engine.errors import ProfileError
from aisandbox.build_engine.profiles import (
    DEFAULT_PROFILES_DIR,
    SCHEDULER_POLICIES,
    check_kv_cache_combination,
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


# ---- issue 8: KV-cache precisions TensorRT-LLM 1.2 cannot build, scheduling defaults, tensor parallelism ----


@pytest.mark.parametrize("weights", ["bf16", "fp16", "fp8", "int8_wo", "int4_wo", "int4_awq", "int8_sq"])
def test_an_int8_kv_cache_is_refused_with_every_weight_precision(weights: str) -> None:
    # tensorrt_llm/builder.py build(): "Paged Context FMHA doesn't work with int8 kv cache currently."
    with pytest.raises(ProfileError, match="INT8 KV cache cannot be built.*--kv-cache-dtype bf16"):
        check_kv_cache_combination(weights, "int8")


@pytest.mark.parametrize("weights", ["bf16", "fp16", "int8_wo", "int4_wo", "int4_awq", "int8_sq"])
def test_an_fp8_kv_cache_needs_fp8_weights(weights: str) -> None:
    # tensorrt_llm/builder.py build(): "FP8 Paged Context FMHA only works with fp8 quantization workflow currently."
    with pytest.raises(ProfileError, match="FP8 KV cache needs FP8 weights"):
        check_kv_cache_combination(weights, "fp8")
    check_kv_cache_combination(weights, "bf16")


def test_fp8_weights_allow_fp8_or_16_bit_kv() -> None:
    for kv in ("fp8", "bf16", "fp16"):
        check_kv_cache_combination("fp8", kv)


def test_the_ampere_hint_no_longer_recommends_an_int8_kv_cache() -> None:
    with pytest.raises(ProfileError) as info:
        check_precision_supported("fp8", "bf16", "8.0", "NVIDIA A100")
    assert "int8 KV" not in str(info.value) and "bf16 KV cache" in str(info.value)


def test_dry_run_with_a_real_checkpoint_refuses_int8_kv(tiny_mistral: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aisandbox.cli import main

    status = main(
        [
            "build-engine",
            "--checkpoint",
            str(tiny_mistral),
            "--gpu",
            "h100-sxm",
            "--dry-run",
            "--kv-cache-dtype",
            "int8",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert "INT8 KV cache cannot be built" in err and "--kv-cache-dtype bf16" in err and "--weights fp8" in err
    status = main(
        ["build-engine", "--checkpoint", str(tiny_mistral), "--gpu", "h100-sxm", "--dry-run"]
        + ["--weights", "int4_awq", "--kv-cache-dtype", "fp8"]
    )
    err = capsys.readouterr().err
    assert status == 2 and "FP8 KV cache needs FP8 weights" in err


@pytest.mark.parametrize("name", list_profiles(DEFAULT_PROFILES_DIR))
def test_requests_without_max_tokens_do_not_starve_the_batch(name: str) -> None:
    """Under guaranteed_no_evict each request reserves KV for prompt + max_tokens up front. With the old default
    (the rest of the context) an H100 ran ~31 such requests at once, not max_batch_size 256."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_plan import mistral_7b

    from aisandbox.build_engine.plan import plan_memory

    profile = load_profile(name)
    plan = plan_memory(
        mistral_7b(), profile, gpu_name=profile.display_name, gpu_memory_bytes=int(profile.memory_gib * 2**30)
    )
    assert profile.default_max_tokens is not None
    assert profile.scheduler_policy in SCHEDULER_POLICIES
    assert plan.kv_tokens >= profile.max_batch_size * profile.default_max_tokens
    engine_profile = profile.to_engine_profile()
    assert (engine_profile.scheduler_policy, engine_profile.default_max_tokens, engine_profile.tp_size) == (
        profile.scheduler_policy,
        profile.default_max_tokens,
        profile.tp_size,
    )


def test_ada_profiles_carry_the_unverified_fp8_attention_caveat() -> None:
    for profile in load_profiles():
        if profile.compute_capability == "8.9":
            assert any("SM89" in c and "int4_awq" in c for c in profile.caveats), profile.name


def test_tensor_parallel_profiles_exist() -> None:
    tp = {p.name: p.tp_size for p in load_profiles() if p.tp_size > 1}
    assert tp == {"l4-tp2": 2, "a10g-tp2": 2, "h100-sxm-tp2": 2}
