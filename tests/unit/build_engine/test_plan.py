"""The memory plan against hand-computed numbers for Mistral-7B (7.25 B parameters, 128 KiB bf16 KV per token)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aisandbox.artifacts import ModelSummary
from aisandbox.build_engine.checkpoint import Checkpoint, count_parameters
from aisandbox.build_engine.errors import PlanError
from aisandbox.build_engine.plan import fit_profile_to_model, format_plan, kv_bytes_per_token, plan_memory
from aisandbox.build_engine.profiles import load_profile

GiB = 2**30
# Mistral-7B-Instruct-v0.3's config.json
SIZES = {
    "vocab_size": 32768,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_layers": 32,
    "num_attention_heads": 32,
    "num_kv_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32768,
}


def mistral_7b() -> Checkpoint:
    linear, other = count_parameters(SIZES, tied=False)
    summary = ModelSummary(
        architecture="MistralForCausalLM",
        dtype="bfloat16",
        num_parameters=linear + other,
        checkpoint_fingerprint="0" * 64,
        **SIZES,
    )
    return Checkpoint(Path("/models/Mistral-7B-Instruct-v0.3"), summary, linear, other)


def test_parameter_count_is_7_25_billion() -> None:
    ckpt = mistral_7b()
    # per layer: q 4096x4096 + k,v 4096x1024 each + o 4096x4096 + gate/up/down 3 x 4096x14336
    assert ckpt.linear_parameters == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) == 6_979_321_856
    # embeddings + untied lm_head + 2 norms per layer + final norm
    assert ckpt.other_parameters == 2 * 32768 * 4096 + 32 * 2 * 4096 + 4096 == 268_701_696
    assert ckpt.summary.num_parameters == 7_248_023_552  # 7.25 B


def test_kv_bytes_per_token() -> None:
    model = mistral_7b().summary
    assert kv_bytes_per_token(model, "bf16") == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert kv_bytes_per_token(model, "fp8") == 64 * 1024
    assert kv_bytes_per_token(model, "int8") == 64 * 1024


def test_h100_fp8_plan() -> None:
    plan = plan_memory(mistral_7b(), load_profile("h100-sxm"), gpu_name="H100", gpu_memory_bytes=80 * GiB)
    assert plan.weights_bytes == 6_979_321_856 * 1 + 268_701_696 * 2 == 7_516_725_248  # ~7.0 GiB
    # activations: 16384 tokens x (3 x 14336 + 3 x 4096) x 2 B + 256 x 32768 x 4 B of logits
    assert plan.activation_bytes == 1_811_939_328 + 33_554_432
    assert plan.free_bytes == 80 * GiB - 7_516_725_248 - 1_845_493_760 - GiB == 75_463_385_088
    assert plan.kv_pool_bytes == int(75_463_385_088 * 0.90) == 67_917_046_579
    assert plan.kv_bytes_per_token == 65536
    assert plan.kv_tokens == 67_917_046_579 // 65536 // 32 * 32 == 1_036_320
    assert plan.full_length_sequences == 31  # of 32768 tokens
    assert plan.tokens_per_sequence_at_max_batch == 4048  # 256 sequences running
    assert plan.compute_dtype == "bfloat16"
    assert plan.needs_calibration


def test_a100_bf16_plan() -> None:
    plan = plan_memory(mistral_7b(), load_profile("a100-80gb"), gpu_name="A100", gpu_memory_bytes=80 * GiB)
    assert plan.weights_bytes == 2 * 7_248_023_552 == 14_496_047_104  # 13.5 GiB
    assert plan.kv_bytes_per_token == 131072
    assert plan.kv_tokens == 476_448
    assert plan.full_length_sequences == 14
    assert not plan.needs_calibration


def test_int4_awq_weights() -> None:
    plan = plan_memory(mistral_7b(), load_profile("a10g"), gpu_name="A10G", gpu_memory_bytes=23028 * 2**20)
    # 4 bits + an fp16 scale per 128 weights = 0.515625 B per projection weight
    assert plan.weights_bytes == 3_598_712_832 + 2 * 268_701_696


def test_bf16_on_a_20_gb_card_with_32k_context_does_not_fit_one_sequence_of_kv() -> None:
    # 20 GiB - 13.5 GiB weights - 1.7 GiB activations - 1 GiB = 3.8 GiB; x 0.9 / 128 KiB = ~27.9k tokens < 32768
    profile = load_profile("rtx-4000-ada").with_overrides(
        {"weights": "bf16", "kv_cache": "bf16", "max_seq_len": 32768, "max_input_len": 16384, "max_num_tokens": 16384}
    )
    with pytest.raises(PlanError, match="less than one max_seq_len sequence"):
        plan_memory(mistral_7b(), profile, gpu_name="RTX 4000 Ada", gpu_memory_bytes=20475 * 2**20)
    fp8_kv = profile.with_overrides({"weights": "fp8", "kv_cache": "fp8"})  # the fix the message suggests
    assert plan_memory(mistral_7b(), fp8_kv, gpu_name="RTX 4000 Ada", gpu_memory_bytes=20475 * 2**20).kv_tokens > 32768


def test_weights_that_do_not_fit_are_an_error() -> None:
    profile = load_profile("rtx-4000-ada").with_overrides({"weights": "bf16", "kv_cache": "bf16"})
    with pytest.raises(PlanError, match="does not fit.*int4_awq"):
        plan_memory(mistral_7b(), profile, gpu_name="RTX 4000 Ada", gpu_memory_bytes=14 * GiB)


def test_limits_are_capped_at_a_shorter_model_window_unless_explicit() -> None:
    import dataclasses

    short = dataclasses.replace(mistral_7b().summary, max_position_embeddings=2048)
    fitted, notes = fit_profile_to_model(load_profile("h100-sxm"), short)
    assert (fitted.max_seq_len, fitted.max_input_len) == (2048, 1024)
    assert notes
    explicit = load_profile("h100-sxm").with_overrides({"max_seq_len": 4096, "max_input_len": 1024})
    with pytest.raises(PlanError, match="exceeds the model's context window"):
        fit_profile_to_model(explicit, short, frozenset({"max_seq_len"}))


def test_the_printed_plan_names_the_numbers() -> None:
    text = format_plan(plan_memory(mistral_7b(), load_profile("h100-sxm"), gpu_name="H100", gpu_memory_bytes=80 * GiB))
    assert "7.25 B parameters" in text
    assert "64.00 KiB" in text
    assert "1036320 tokens" in text
    assert "31 sequences of the full 32768 tokens" in text
