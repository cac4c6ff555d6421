"""Our requests and profiles translate to tensorrt_llm keyword arguments whose names exist in 1.2.1.

The field names below were read from the NVIDIA/TensorRT-LLM source of the 1.2 line: sampling_params.py
(SamplingParams), builder.py (BuildConfig), models/modeling_utils.py (QuantConfig), quantization/mode.py
(QuantAlgo), llmapi/llm_args.py (CalibConfig, KvCacheConfig, TrtLlmArgs). Where the shared API record
(../shared/tools/trtllm-1.2-api.json) is present, the snapshot is checked against it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aisandbox.artifacts import EngineManifest, EngineProfile
from aisandbox.build_engine.profiles import KV_PRECISIONS, WEIGHT_PRECISIONS, list_profiles, load_profile
from aisandbox.build_engine.trt_build import (
    BuildSpec,
    build_config_kwargs,
    calib_config_kwargs,
    llm_build_kwargs,
    quant_config_kwargs,
)
from aisandbox.errors import InvalidRequest
from aisandbox.runtime.request import SamplingParams
from aisandbox.runtime.trtllm.backend import llm_runtime_kwargs, sampling_kwargs, token_logprobs
from aisandbox.runtime.types import GrammarSpec
from tests.conftest import shared_file

SAMPLING_PARAMS = set(
    [
        "end_id",
        "pad_id",
        "max_tokens",
        "bad",
        "bad_token_ids",
        "stop",
        "stop_token_ids",
        "include_stop_str_in_output",
        "embedding_bias",
        "logits_processor",
        "apply_batched_logits_processor",
        "n",
        "best_of",
        "use_beam_search",
        "top_k",
        "top_p",
        "top_p_min",
        "top_p_reset_ids",
        "top_p_decay",
        "seed",
        "temperature",
        "min_tokens",
        "beam_search_diversity_rate",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "prompt_ignore_length",
        "length_penalty",
        "early_stopping",
        "no_repeat_ngram_size",
        "min_p",
        "beam_width_array",
        "logprobs",
        "prompt_logprobs",
        "return_context_logits",
        "return_generation_logits",
        "exclude_input_from_output",
        "return_encoder_output",
        "return_perf_metrics",
        "additional_model_outputs",
        "lookahead_config",
        "guided_decoding",
        "ignore_eos",
        "detokenize",
        "add_special_tokens",
        "truncate_prompt_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
    ]
)
GUIDED_DECODING_PARAMS = {"json", "regex", "grammar", "json_object", "structural_tag"}  # sampling_params.py
BUILD_CONFIG = set(
    [
        "max_input_len",
        "max_seq_len",
        "opt_batch_size",
        "max_batch_size",
        "max_beam_width",
        "max_num_tokens",
        "opt_num_tokens",
        "max_prompt_embedding_table_size",
        "kv_cache_type",
        "gather_context_logits",
        "gather_generation_logits",
        "strongly_typed",
        "force_num_profiles",
        "profiling_verbosity",
        "enable_debug_output",
        "max_draft_len",
        "speculative_decoding_mode",
        "use_refit",
        "input_timing_cache",
        "output_timing_cache",
        "lora_config",
        "weight_sparsity",
        "weight_streaming",
        "plugin_config",
        "use_strip_plan",
        "max_encoder_input_len",
        "dry_run",
        "visualize_network",
        "monitor_memory",
        "use_mrope",
    ]
)
QUANT_CONFIG = set(
    [
        "quant_algo",
        "kv_cache_quant_algo",
        "group_size",
        "smoothquant_val",
        "clamp_val",
        "use_meta_recipe",
        "has_zero_point",
        "pre_quant_scale",
        "exclude_modules",
        "mamba_ssm_cache_dtype",
    ]
)
QUANT_ALGO = set(
    [
        "W8A16",
        "W4A16",
        "W4A16_AWQ",
        "W4A8_AWQ",
        "W8A16_GPTQ",
        "W4A16_GPTQ",
        "W8A8_SQ_PER_CHANNEL",
        "W8A8_SQ_PER_TENSOR_PLUGIN",
        "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
        "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
        "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
        "W4A8_QSERVE_PER_GROUP",
        "W4A8_QSERVE_PER_CHANNEL",
        "FP8",
        "FP8_PER_CHANNEL_PER_TOKEN",
        "FP8_BLOCK_SCALES",
        "INT8",
        "MIXED_PRECISION",
        "NVFP4",
        "W4A8_NVFP4_FP8",
        "W4A8_MXFP4_FP8",
        "W4A8_MXFP4_MXFP8",
        "W4A16_MXFP4",
        "NO_QUANT",
    ]
)
KV_CACHE_QUANT_ALGOS = {"FP8", "INT8", "NVFP4"}  # quantization/mode.py KV_CACHE_QUANT_ALGO_LIST
CALIB_CONFIG = set(
    [
        "device",
        "calib_dataset",
        "calib_batches",
        "calib_batch_size",
        "calib_max_seq_length",
        "random_seed",
        "tokenizer_max_seq_length",
    ]
)
KV_CACHE_CONFIG = set(
    [
        "enable_block_reuse",
        "max_tokens",
        "max_attention_window",
        "sink_token_length",
        "free_gpu_memory_fraction",
        "host_cache_size",
        "onboard_blocks",
        "cross_kv_cache_fraction",
        "secondary_offload_min_priority",
        "event_buffer_max_size",
        "attention_dp_events_gather_period_ms",
        "enable_partial_reuse",
        "copy_on_partial_reuse",
        "use_uvm",
        "max_gpu_total_bytes",
        "dtype",
        "mamba_ssm_cache_dtype",
        "tokens_per_block",
    ]
)
# _tensorrt_engine.LLM's explicit parameters plus the TrtLlmArgs fields it validates **kwargs against.


def manifest_for(name: str) -> EngineManifest:
    """The manifest an engine built with profile `name` would carry (a tiny stand-in model)."""
    from aisandbox.artifacts import DeviceInfo, LibraryVersions, ModelSummary

    p = load_profile(name)
    return EngineManifest(
        engine_hash="0",
        created_at="",
        aisandbox_version="",
        gpu=DeviceInfo(0, "x", p.compute_capability, 1),
        model=ModelSummary("MistralForCausalLM", "bfloat16", 1, 1, 1, 1, 1, 1, 1, 1, 1, "0"),
        profile=p.to_engine_profile(),
        versions=LibraryVersions("1.2.1", "10.13.3.9"),
    )


TRT_LLM_ARGS = set(
    [
        "model",
        "tokenizer",
        "tokenizer_mode",
        "skip_tokenizer_init",
        "trust_remote_code",
        "tensor_parallel_size",
        "dtype",
        "revision",
        "tokenizer_revision",
        "pipeline_parallel_size",
        "context_parallel_size",
        "gpus_per_node",
        "moe_cluster_parallel_size",
        "moe_tensor_parallel_size",
        "moe_expert_parallel_size",
        "enable_attention_dp",
        "enable_lm_head_tp_in_adp",
        "cp_config",
        "load_format",
        "fail_fast_on_attention_window_too_large",
        "enable_lora",
        "lora_config",
        "kv_cache_config",
        "enable_chunked_prefill",
        "guided_decoding_backend",
        "batched_logits_processor",
        "iter_stats_max_iterations",
        "request_stats_max_iterations",
        "peft_cache_config",
        "scheduler_config",
        "cache_transceiver_config",
        "sparse_attention_config",
        "speculative_config",
        "max_batch_size",
        "max_input_len",
        "max_seq_len",
        "max_beam_width",
        "max_num_tokens",
        "gather_generation_logits",
        "num_postprocess_workers",
        "postprocess_tokenizer_dir",
        "reasoning_parser",
        "decoding_config",
        "backend",
        "return_perf_metrics",
        "orchestrator_type",
        "enable_tqdm",
        "workspace",
        "enable_build_cache",
        "extended_runtime_perf_knob_config",
        "calib_config",
        "quant_config",
        "embedding_parallel_mode",
        "fast_build",
        "build_config",
        "enable_prompt_adapter",
        "max_prompt_adapter_token",
        "batching_type",
        "normalize_log_probs",
    ]
)

API_JSON = Path(__file__).resolve().parents[2].parent / "shared" / "tools" / "trtllm-1.2-api.json"


def test_the_snapshot_matches_the_shared_api_record() -> None:
    record = shared_file(API_JSON, "the keyword snapshots against the recorded 1.2 API")
    if record is None:
        return
    classes = json.loads(record.read_text())["classes"]
    assert set(classes["SamplingParams"]["fields"]) == SAMPLING_PARAMS
    assert set(classes["GuidedDecodingParams"]["fields"]) == GUIDED_DECODING_PARAMS
    assert set(classes["BuildConfig"]["fields"]) == BUILD_CONFIG
    assert set(classes["QuantConfig"]["fields"]) == QUANT_CONFIG
    assert set(classes["QuantAlgo"]["members"]) == QUANT_ALGO
    assert set(classes["CalibConfig"]["fields"]) == CALIB_CONFIG
    assert set(classes["KvCacheConfig"]["fields"]) == KV_CACHE_CONFIG
    assert set(classes["TrtLLM"]["fields"]) >= TRT_LLM_ARGS


def spec(weights: str = "fp8", kv: str = "fp8", calib: Path | None = Path("/data/calib")) -> BuildSpec:
    return BuildSpec(
        checkpoint=Path("/models/mistral"),
        dtype="bfloat16",
        weights=weights,
        kv_cache=kv,
        max_batch_size=256,
        max_num_tokens=16384,
        max_input_len=16384,
        max_seq_len=32768,
        workspace=Path("/engines/.w"),
        calib_dataset=calib,
    )


def test_build_kwargs_use_build_config_names() -> None:
    kwargs = build_config_kwargs(spec())
    assert set(kwargs) <= BUILD_CONFIG
    assert kwargs == {
        "max_batch_size": 256,
        "max_num_tokens": 16384,
        "max_input_len": 16384,
        "max_seq_len": 32768,
        "max_beam_width": 1,
    }


@pytest.mark.parametrize("weights", sorted(WEIGHT_PRECISIONS))
@pytest.mark.parametrize("kv", sorted(KV_PRECISIONS))
def test_every_precision_maps_to_quant_algo_members(weights: str, kv: str) -> None:
    kwargs = quant_config_kwargs(weights, kv)
    assert set(kwargs) <= QUANT_CONFIG
    assert kwargs["quant_algo"] is None or kwargs["quant_algo"] in QUANT_ALGO
    assert kwargs["kv_cache_quant_algo"] is None or kwargs["kv_cache_quant_algo"] in KV_CACHE_QUANT_ALGOS


def test_quantization_of_the_profiles() -> None:
    assert quant_config_kwargs("fp8", "fp8") == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    assert quant_config_kwargs("int4_awq", "bf16") == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None}
    assert quant_config_kwargs("bf16", "bf16") == {"quant_algo": None, "kv_cache_quant_algo": None}


def test_calibration_is_local_and_only_when_needed() -> None:
    kwargs = calib_config_kwargs(spec())
    assert kwargs is not None and set(kwargs) <= CALIB_CONFIG
    assert kwargs["calib_dataset"] == "/data/calib"
    assert calib_config_kwargs(spec("bf16", "bf16")) is None
    assert calib_config_kwargs(spec("int8_wo", "bf16")) is None
    with pytest.raises(ValueError, match="--calib-dataset"):
        calib_config_kwargs(spec(calib=None))


def test_llm_build_kwargs_are_trt_llm_args() -> None:
    kwargs = llm_build_kwargs(spec())
    assert set(kwargs) | {"build_config", "quant_config", "calib_config", "kv_cache_config"} <= TRT_LLM_ARGS
    assert kwargs["enable_build_cache"] is False  # its key ignores the GPU architecture


@pytest.mark.parametrize("name", list_profiles())
def test_runtime_llm_kwargs_are_trt_llm_args(name: str) -> None:
    p = load_profile(name)
    manifest = manifest_for(name)
    kwargs = llm_runtime_kwargs(Path("/engines/e"), manifest)
    assert set(kwargs) <= TRT_LLM_ARGS
    assert set(kwargs["kv_cache_config"]) <= KV_CACHE_CONFIG
    assert "dtype" not in kwargs["kv_cache_config"]  # TrtLlmArgs asserts kv_cache_config.dtype == "auto"
    assert kwargs["kv_cache_config"]["free_gpu_memory_fraction"] == p.kv_cache_free_gpu_memory_fraction
    assert isinstance(p.to_engine_profile(), EngineProfile)


def test_sampling_kwargs_use_sampling_params_names() -> None:
    sp = SamplingParams(
        max_tokens=64,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        seed=7,
        stop_token_ids=(5,),
        min_tokens=3,
    )
    kwargs = sampling_kwargs(sp, (2,), seed=99)
    assert set(kwargs) <= SAMPLING_PARAMS
    assert kwargs == {
        "max_tokens": 64,
        "n": 1,
        "end_id": 2,
        "pad_id": 2,
        "detokenize": False,
        "include_stop_str_in_output": True,
        "seed": 7,
        "stop_token_ids": [5],
        "min_tokens": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
    }


def test_greedy_unseeded_and_defaults() -> None:
    kwargs = sampling_kwargs(SamplingParams(max_tokens=8, temperature=0.0), (2,), seed=99)
    assert set(kwargs) <= SAMPLING_PARAMS
    assert kwargs["top_k"] == 1 and "temperature" not in kwargs and "top_p" not in kwargs
    assert kwargs["seed"] == 99  # a fresh seed per request: the engine's default (0) would repeat samples
    assert "stop_token_ids" not in kwargs and "min_tokens" not in kwargs and "min_p" not in kwargs


def test_ignore_eos_keeps_stop_tokens_and_extra_eos_become_stop_tokens() -> None:
    ignore = sampling_kwargs(SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=(9,)), (2, 7), seed=1)
    assert ignore["end_id"] == -1 and ignore["pad_id"] == 2 and ignore["stop_token_ids"] == [9]
    assert "ignore_eos" not in ignore  # tensorrt_llm's ignore_eos would drop the stop tokens too
    normal = sampling_kwargs(SamplingParams(max_tokens=8, stop_token_ids=(9,)), (2, 7), seed=1)
    assert normal["end_id"] == 2 and normal["stop_token_ids"] == [9, 7]
    with pytest.raises(ValueError, match="no EOS"):
        sampling_kwargs(SamplingParams(max_tokens=8), (), seed=1)


SCHEDULER_CONFIG = {"capacity_scheduler_policy", "context_chunking_policy", "dynamic_batch_config"}
CAPACITY_SCHEDULER_POLICY = {"MAX_UTILIZATION", "GUARANTEED_NO_EVICT", "STATIC_BATCH"}


def test_scheduler_names_match_the_shared_api_record() -> None:
    record = shared_file(API_JSON, "the scheduler names against the recorded 1.2 API")
    if record is None:
        return
    classes = json.loads(record.read_text())["classes"]
    assert set(classes["SchedulerConfig"]["fields"]) == SCHEDULER_CONFIG
    assert set(classes["CapacitySchedulerPolicy"]["members"]) == CAPACITY_SCHEDULER_POLICY


@pytest.mark.parametrize("name", list_profiles())
def test_runtime_kwargs_carry_tp_and_the_scheduler_policy(name: str) -> None:
    p = load_profile(name)
    kwargs = llm_runtime_kwargs(Path("/engines/e"), manifest_for(name))
    assert kwargs["tensor_parallel_size"] == p.tp_size
    assert set(kwargs["scheduler_config"]) <= SCHEDULER_CONFIG
    assert kwargs["scheduler_config"]["capacity_scheduler_policy"] in CAPACITY_SCHEDULER_POLICY


def test_build_kwargs_carry_tp() -> None:
    import dataclasses

    assert llm_build_kwargs(spec())["tensor_parallel_size"] == 1
    assert llm_build_kwargs(dataclasses.replace(spec(), tp_size=2))["tensor_parallel_size"] == 2


def test_seed_mapping_into_uint64() -> None:
    from aisandbox.runtime.trtllm.backend import uint64_seed

    assert [uint64_seed(s) for s in (0, 7, -1, -(2**63), 2**63 - 1)] == [0, 7, 2**64 - 1, 2**63, 2**63 - 1]
    assert sampling_kwargs(SamplingParams(max_tokens=8, seed=-3), (2,), seed=1)["seed"] == 2**64 - 3


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1])
def test_a_seed_outside_int64_is_a_400_naming_seed(seed: int) -> None:
    from pydantic import ValidationError

    from aisandbox.errors import InvalidRequest
    from aisandbox.http.errors import from_validation_error
    from aisandbox.http.schemas import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": seed}
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    error = from_validation_error(info.value)
    assert isinstance(error, InvalidRequest) and error.param == "seed"
    assert ChatCompletionRequest.model_validate({**body, "seed": -1}).seed == -1  # negative int64: fine, mapped later


def test_penalties_logit_bias_and_logprobs_use_sampling_params_names() -> None:
    sp = SamplingParams(
        max_tokens=8,
        frequency_penalty=0.5,
        presence_penalty=-1.0,
        logit_bias=((3, -100.0), (7, 2.5)),
        logprobs=True,
        top_logprobs=4,
    )
    kwargs = sampling_kwargs(sp, (2,), seed=1, vocab_size=16, generation_logits=True)
    assert set(kwargs) <= SAMPLING_PARAMS
    assert (kwargs["frequency_penalty"], kwargs["presence_penalty"], kwargs["logprobs"]) == (0.5, -1.0, 4)
    bias = kwargs["embedding_bias"]
    assert bias.shape == (16,) and str(bias.dtype) == "torch.float32"
    assert bias[3].item() == -100.0 and bias[7].item() == 2.5 and bias.abs().sum().item() == 102.5
    # Unset ones stay unset: tensorrt_llm's C++ defaults.
    plain = sampling_kwargs(SamplingParams(max_tokens=8), (2,), seed=1)
    assert not {"frequency_penalty", "presence_penalty", "embedding_bias", "logprobs", "guided_decoding"} & set(plain)


def test_top_1_logprobs_ask_for_one() -> None:
    kwargs = sampling_kwargs(SamplingParams(max_tokens=8, logprobs=True), (2,), seed=1, generation_logits=True)
    assert kwargs["logprobs"] == 1  # 0 would mean "no logprobs" to tensorrt_llm


def test_logprobs_need_generation_logits_and_echo_needs_context_logits() -> None:
    with pytest.raises(InvalidRequest) as info:
        sampling_kwargs(SamplingParams(max_tokens=8, logprobs=True), (2,), seed=1)
    assert info.value.param == "logprobs" and "gather_generation_logits" in info.value.message
    echo = SamplingParams(max_tokens=8, logprobs=True, top_logprobs=2, prompt_logprobs=2)
    with pytest.raises(InvalidRequest) as info:
        sampling_kwargs(echo, (2,), seed=1, generation_logits=True)
    assert info.value.param == "echo" and "gather_context_logits" in info.value.message
    kwargs = sampling_kwargs(echo, (2,), seed=1, generation_logits=True, context_logits=True)
    assert kwargs["prompt_logprobs"] == 2 and set(kwargs) <= SAMPLING_PARAMS


def test_logit_bias_needs_the_vocab_size() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        sampling_kwargs(SamplingParams(max_tokens=8, logit_bias=((1, 1.0),)), (2,), seed=1)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (GrammarSpec("regex", "a+"), {"regex": "a+"}),
        (GrammarSpec("ebnf", 'root ::= "a"'), {"grammar": 'root ::= "a"'}),
        (GrammarSpec("structural_tag", '{"type":"structural_tag"}'), {"structural_tag": '{"type":"structural_tag"}'}),
    ],
)
def test_grammars_become_guided_decoding_params(spec: GrammarSpec, expected: dict[str, object]) -> None:
    kwargs = sampling_kwargs(SamplingParams(max_tokens=8, guided=spec), (2,), seed=1)
    assert set(kwargs) <= SAMPLING_PARAMS
    assert kwargs["guided_decoding"] == expected
    assert set(kwargs["guided_decoding"]) <= GUIDED_DECODING_PARAMS


@pytest.mark.parametrize(
    ("spec", "good", "bad"),
    [
        (GrammarSpec("json_object"), ['{"a": [1, 2]}'], ["[1, 2]", '"text"', "1", "{" + " " * 40 + "}"]),
        (
            GrammarSpec("json_schema", '{"type":"object","properties":{"n":{"type":"integer"}},"required":["n"]}'),
            ['{"n": 3}'],
            ['{"n": "3"}', '{"n": 3, "extra": 1}', '{"n":' + "\n" * 40 + "3}"],
        ),
        (
            GrammarSpec("json_schema", '{"type":"object","properties":{"n":{"type":"integer"}}}', strict=False),
            ['{"n": 3, "extra": 1}'],
            ["[1]"],
        ),
        (
            GrammarSpec("tool_calls", '{"type":"array","items":{"type":"integer"},"maxItems":1}'),
            [" [1]", "[2]"],
            ["[1, 2]"],
        ),
    ],
)
def test_json_specs_go_as_our_own_grammar(spec: GrammarSpec, good: list[str], bad: list[str]) -> None:
    """The executor's JSON path would use xgrammar's defaults (any JSON value for json_object, unbounded whitespace,
    always strict): every JSON spec goes as the EBNF we compile on CPU, which the pinned xgrammar accepts back."""
    xgr = pytest.importorskip("xgrammar")
    kwargs = sampling_kwargs(SamplingParams(max_tokens=8, guided=spec), (2,), seed=1)
    assert set(kwargs["guided_decoding"]) == {"grammar"} and set(kwargs) <= SAMPLING_PARAMS
    grammar = xgr.Grammar.from_ebnf(kwargs["guided_decoding"]["grammar"])
    info = xgr.TokenizerInfo([chr(c) for c in range(32, 127)] + ["\n", "</s>"], stop_token_ids=[96])
    compiled = xgr.GrammarCompiler(info).compile_grammar(grammar)
    for text in good:
        assert xgr.GrammarMatcher(compiled).accept_string(text), text
    for text in bad:
        matcher = xgr.GrammarMatcher(compiled)
        assert not (matcher.accept_string(text) and matcher.accept_token(96)), text


def test_a_grammar_on_an_engine_without_xgrammar_is_a_400() -> None:
    sp = SamplingParams(max_tokens=8, guided=GrammarSpec("regex", "a+"))
    with pytest.raises(InvalidRequest) as info:
        sampling_kwargs(sp, (2,), seed=1, guided=False)
    assert info.value.param == "guided_regex"


def test_llm_serves_with_xgrammar_and_optional_generation_logits(tmp_path: Path) -> None:
    from aisandbox.artifacts import DeviceInfo, EngineManifest, LibraryVersions, ModelSummary

    p = load_profile(list_profiles()[0])
    manifest = EngineManifest(
        engine_hash="0",
        created_at="",
        aisandbox_version="",
        gpu=DeviceInfo(0, "x", p.compute_capability, 1),
        model=ModelSummary("MistralForCausalLM", "bfloat16", 1, 1, 1, 1, 1, 1, 1, 1, 1, "0"),
        profile=p.to_engine_profile(),
        versions=LibraryVersions("1.2.1", "10.13.3.9"),
    )
    kwargs = llm_runtime_kwargs(tmp_path, manifest)
    # No Hugging Face tokenizer in the folder: xgrammar would fail the LLM's start, so it stays off.
    assert "guided_decoding_backend" not in kwargs and "gather_generation_logits" not in kwargs
    (tmp_path / "tokenizer.json").write_text("{}")
    with_logits = llm_runtime_kwargs(tmp_path, manifest, gather_generation_logits=True)
    assert with_logits["guided_decoding_backend"] == "xgrammar"
    assert with_logits["gather_generation_logits"] is True and set(with_logits) <= TRT_LLM_ARGS


def test_token_logprobs_from_the_executor_dicts() -> None:
    class Logprob:  # executor/result.py Logprob(logprob, rank)
        def __init__(self, logprob: float, rank: int) -> None:
            self.logprob, self.rank = logprob, rank

    diff = [
        {5: Logprob(-0.1, 1), 9: Logprob(-2.5, 2)},
        {4: Logprob(-0.3, 1), 8: Logprob(-1.9, 2), 6: Logprob(-4.0, 17)},  # the sampled 6 is outside the top-2
    ]
    out = token_logprobs(diff, [5, 6], top=2)
    assert [e.token_id for e in out] == [5, 6]
    assert out[0].logprob == -0.1 and out[0].top == ((5, -0.1), (9, -2.5))
    assert out[1].logprob == -4.0 and out[1].top == ((4, -0.3), (8, -1.9))
    assert token_logprobs(diff, [5, 6], top=0)[1].top == ()
