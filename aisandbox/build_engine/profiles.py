"""GPU profiles: one YAML file per GPU type under `configs/gpu/`, loaded into a validated pydantic model.

A profile says how to compile Mistral-7B-Instruct-v0.3 for one GPU type: which precision the weights and the
KV cache use, how many GPUs one engine spans (tensor parallelism), the engine's batch and sequence limits, and
how the runtime schedules (capacity scheduler policy, default completion length). Precisions the GPU cannot run
are refused here, with the reason (FP8 needs Ada or Hopper, compute capability 8.9+; bf16 needs Ampere, 8.0+),
and so are weight / KV-cache pairs TensorRT-LLM 1.2 cannot build (`check_kv_cache_combination`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aisandbox.artifacts import EngineProfile
from aisandbox.build_engine.errors import ProfileError

__all__ = [
    "DEFAULT_PROFILES_DIR",
    "KV_PRECISIONS",
    "WEIGHT_PRECISIONS",
    "GpuProfile",
    "Precision",
    "Quantization",
    "SCHEDULER_POLICIES",
    "check_kv_cache_combination",
    "check_precision_supported",
    "list_profiles",
    "load_profile",
    "load_profiles",
]

DEFAULT_PROFILES_DIR = Path(__file__).resolve().parents[2] / "configs" / "gpu"
"""`configs/gpu` of the source tree (the Docker image installs aisandbox in editable mode, so it is there)."""

WeightPrecision = Literal["bf16", "fp16", "fp8", "int8_wo", "int4_wo", "int4_awq", "int8_sq"]
KvPrecision = Literal["bf16", "fp16", "fp8", "int8"]


@dataclass(frozen=True, slots=True)
class Precision:
    """What one precision costs and needs."""

    bytes_per_value: float
    """Storage per weight (or per KV element), scales included."""
    min_compute_capability: tuple[int, int]
    quant_algo: str | None
    """tensorrt_llm QuantAlgo member name (None: unquantized)."""
    needs_calibration: bool
    """Whether tensorrt_llm runs a calibration pass (ModelOpt) for it; see QuantConfig._requires_calibration."""
    label: str


# bytes_per_value for int4_awq: 4-bit weights plus one fp16 scale per group of 128 (QuantConfig.group_size).
WEIGHT_PRECISIONS: dict[str, Precision] = {
    "bf16": Precision(2.0, (8, 0), None, False, "bf16 (unquantized)"),
    "fp16": Precision(2.0, (7, 0), None, False, "fp16 (unquantized)"),
    "fp8": Precision(1.0, (8, 9), "FP8", True, "FP8 weights and activations"),
    "int8_wo": Precision(1.0, (7, 0), "W8A16", False, "INT8 weight-only"),
    "int4_wo": Precision(0.5, (7, 0), "W4A16", False, "INT4 weight-only"),
    "int4_awq": Precision(0.5 + 2 / 128, (8, 0), "W4A16_AWQ", True, "INT4 AWQ (group 128)"),
    "int8_sq": Precision(1.0, (7, 0), "W8A8_SQ_PER_CHANNEL", True, "INT8 SmoothQuant"),
}
"""Weight precisions: what the linear layers (attention and MLP projections) are stored in."""

KV_PRECISIONS: dict[str, Precision] = {
    "bf16": Precision(2.0, (8, 0), None, False, "bf16"),
    "fp16": Precision(2.0, (7, 0), None, False, "fp16"),
    "fp8": Precision(1.0, (8, 9), "FP8", True, "FP8"),
    "int8": Precision(1.0, (7, 0), "INT8", True, "INT8"),
}
"""KV-cache precisions (tensorrt_llm QuantConfig.kv_cache_quant_algo)."""


SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
"""Profile values of tensorrt_llm's CapacitySchedulerPolicy (GUARANTEED_NO_EVICT, MAX_UTILIZATION)."""
SchedulerPolicy = Literal["guaranteed_no_evict", "max_utilization"]


def _cc(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def check_precision_supported(weights: str, kv_cache: str, compute_capability: str, gpu: str) -> None:
    """Raise ProfileError if the GPU cannot run this weight or KV-cache precision."""
    cc = _cc(compute_capability)
    for kind, table, value in (("weights", WEIGHT_PRECISIONS, weights), ("KV cache", KV_PRECISIONS, kv_cache)):
        need = table[value].min_compute_capability
        if cc < need:
            hint = (
                "FP8 needs an Ada (8.9) or Hopper (9.0) GPU; on Ampere use bf16, int8_wo or int4_awq weights and a "
                "bf16 KV cache"
                if value == "fp8"
                else f"{value} needs compute capability {need[0]}.{need[1]} or newer"
            )
            raise ProfileError(f"{gpu} (compute capability {compute_capability}) cannot run {value} {kind}: {hint}.")


def check_kv_cache_combination(weights: str, kv_cache: str) -> None:
    """Raise ProfileError for a weight / KV-cache pair that TensorRT-LLM 1.2 cannot build.

    The engine keeps KV block reuse (prefix caching), which needs `PluginConfig.use_paged_context_fmha` (on by
    default). With it, tensorrt_llm/builder.py `build()` raises "Paged Context FMHA doesn't work with int8 kv
    cache currently" for any INT8 KV cache, and "FP8 Paged Context FMHA only works with fp8 quantization
    workflow currently" for an FP8 KV cache without FP8 weights. (Before that, an INT8/FP8 KV cache with weights
    that ModelOpt does not quantize, `QuantConfig._requires_modelopt_quantization` in models/modeling_utils.py,
    takes the legacy calibration path, which fails on a local dataset folder.)
    """
    if kv_cache == "int8":
        raise ProfileError(
            "an INT8 KV cache cannot be built: TensorRT-LLM 1.2's paged context FMHA (needed for KV block reuse) "
            "refuses it ('Paged Context FMHA doesn't work with int8 kv cache'). Use --kv-cache-dtype bf16 "
            "(fp16 on pre-Ampere), or fp8 together with --weights fp8 on Ada/Hopper."
        )
    if kv_cache == "fp8" and weights != "fp8":
        raise ProfileError(
            f"an FP8 KV cache needs FP8 weights in TensorRT-LLM 1.2 ('FP8 Paged Context FMHA only works with fp8 "
            f"quantization workflow'); with {weights} weights use --kv-cache-dtype bf16 (or fp16), or choose "
            "--weights fp8 --kv-cache-dtype fp8 on Ada/Hopper."
        )


class Quantization(BaseModel):
    """Precision of the weights and of the KV cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: WeightPrecision
    """Linear-layer weights; embeddings, lm_head and norms stay in the compute dtype (bf16)."""
    kv_cache: KvPrecision
    """Paged KV cache."""


class GpuProfile(BaseModel):
    """How to compile and run the engine on one GPU type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    """Profile id, also the file name (`<name>.yaml`) and the `--gpu` value."""
    display_name: str
    """Human name of the GPU type."""
    match: tuple[str, ...] = Field(min_length=1)
    """Regular expressions matched (whole name, case-insensitive) against the NVML device name for `--gpu auto`."""
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    """SM version the GPU type has; the engine binds to it."""
    memory_gib: float = Field(gt=0)
    """Device memory of ONE GPU as NVML reports it (used for the plan when no GPU is present, e.g. --dry-run)."""
    quantization: Quantization
    tp_size: int = Field(default=1, ge=1, le=8)
    """Tensor parallelism: GPUs one engine spans (one rank per GPU); the memory plan is per rank."""
    max_batch_size: int = Field(ge=1, le=4096)
    """Most sequences decoded together (build limit; the in-flight batch)."""
    max_num_tokens: int = Field(ge=16)
    """Most tokens one engine step processes (prefill chunk + decodes); sizes the activation memory."""
    max_input_len: int = Field(ge=1)
    """Longest prompt the engine accepts."""
    max_seq_len: int = Field(ge=2)
    """Longest prompt + completion."""
    kv_cache_free_gpu_memory_fraction: float = Field(gt=0.0, le=0.98)
    """Share of the GPU memory left after weights and activations that the runtime gives to the paged KV cache."""
    scheduler_policy: SchedulerPolicy = "guaranteed_no_evict"
    """Runtime capacity scheduler. guaranteed_no_evict reserves KV for prompt + max_tokens at admission (a request
    never stalls mid-stream, but a large max_tokens admits fewer requests); max_utilization admits while blocks are
    free and pauses (evicts, later recomputes) requests when the cache runs out."""
    default_max_tokens: int | None = Field(default=None, ge=1)
    """max_tokens for requests that omit it (capped at the rest of the context). None: the rest of the context,
    which under guaranteed_no_evict reserves max_seq_len tokens of KV per such request."""
    runtime_max_num_tokens: int = Field(default=2048, ge=64)
    """Runtime only: most tokens the executor runs in one step, with chunked prefill on (a long prompt is prefilled
    in chunks of this many tokens between decode steps, so it never freezes running streams for its whole
    prefill). Latency-oriented, as vLLM's default token budget for online serving: 2048, 4096 on Hopper and on
    two-GPU profiles, where a step of that size still takes tens of milliseconds. Capped at max_num_tokens."""
    gather_generation_logits: bool = False
    """Serve with `LLM(gather_generation_logits=True)`, so requests may ask for logprobs (top-k included):
    tensorrt_llm 1.2 refuses logprobs without it (llmapi/llm.py `_check_arguments`). Costs a copy of the
    generation logits per step; off by default."""
    caveats: tuple[str, ...] = ()
    """What about this profile is not verified on hardware; printed with the plan."""

    @field_validator("match")
    @classmethod
    def _valid_regexes(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad match pattern {pattern!r}: {exc}") from exc
        return patterns

    @model_validator(mode="after")
    def _consistent(self) -> GpuProfile:
        if self.max_input_len >= self.max_seq_len:
            raise ValueError(
                f"max_input_len ({self.max_input_len}) must be below max_seq_len ({self.max_seq_len}), "
                "leaving room for at least one generated token"
            )
        if self.max_input_len > self.max_num_tokens:
            raise ValueError(
                f"max_input_len ({self.max_input_len}) exceeds max_num_tokens ({self.max_num_tokens}): a whole "
                "prompt must fit one engine step (chunked prefill is off)"
            )
        try:
            check_precision_supported(
                self.quantization.weights, self.quantization.kv_cache, self.compute_capability, self.display_name
            )
            check_kv_cache_combination(self.quantization.weights, self.quantization.kv_cache)
        except ProfileError as exc:
            raise ValueError(str(exc)) from exc
        return self

    def matches(self, device_name: str) -> bool:
        """Whether an NVML device name belongs to this GPU type."""
        return any(re.fullmatch(p, device_name.strip(), flags=re.IGNORECASE) for p in self.match)

    def with_overrides(self, overrides: dict[str, Any]) -> GpuProfile:
        """Return a copy with some fields replaced, validated again (None values are ignored).

        Keys are field names; `weights` and `kv_cache` replace the quantization's parts.
        """
        data = self.model_dump()
        for key, value in overrides.items():
            if value is None:
                continue
            if key in ("weights", "kv_cache"):
                data["quantization"][key] = value
            elif key in data:
                data[key] = value
            else:
                raise ProfileError(f"unknown profile field {key!r}")
        return _validate(data, f"profile {self.name} with overrides")

    def to_engine_profile(self) -> EngineProfile:
        """The manifest's copy of the resolved profile."""
        return EngineProfile(
            name=self.name,
            weights=self.quantization.weights,
            kv_cache=self.quantization.kv_cache,
            max_batch_size=self.max_batch_size,
            max_num_tokens=self.max_num_tokens,
            max_input_len=self.max_input_len,
            max_seq_len=self.max_seq_len,
            kv_cache_free_gpu_memory_fraction=self.kv_cache_free_gpu_memory_fraction,
            tp_size=self.tp_size,
            scheduler_policy=self.scheduler_policy,
            default_max_tokens=self.default_max_tokens,
            gather_generation_logits=self.gather_generation_logits,
            runtime_max_num_tokens=min(self.runtime_max_num_tokens, self.max_num_tokens),
        )


def _validate(data: object, where: str) -> GpuProfile:
    try:
        return GpuProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(profile)'}: {err['msg']}" for err in exc.errors()
        )
        raise ProfileError(f"{where} is invalid: {problems}") from exc


def _load_file(path: Path) -> GpuProfile:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"cannot read GPU profile {path}: {exc}") from exc
    profile = _validate(data, f"GPU profile {path}")
    if profile.name != path.stem:
        raise ProfileError(f"GPU profile {path} is named {profile.name!r}; the file must be {profile.name}.yaml")
    return profile


def list_profiles(profiles_dir: Path = DEFAULT_PROFILES_DIR) -> list[str]:
    """Names of the profiles in a directory, sorted."""
    if not profiles_dir.is_dir():
        raise ProfileError(f"GPU profile directory {profiles_dir} does not exist (pass --profiles-dir)")
    return sorted(p.stem for p in profiles_dir.glob("*.yaml"))


def load_profiles(profiles_dir: Path = DEFAULT_PROFILES_DIR) -> list[GpuProfile]:
    """Load and validate every profile in a directory."""
    return [_load_file(profiles_dir / f"{name}.yaml") for name in list_profiles(profiles_dir)]


def load_profile(name: str, profiles_dir: Path = DEFAULT_PROFILES_DIR) -> GpuProfile:
    """Load one profile by name."""
    path = profiles_dir / f"{name}.yaml"
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name) or not path.is_file():
        known = ", ".join(list_profiles(profiles_dir))
        raise ProfileError(f"unknown GPU profile {name!r}; known profiles: {known} (or --gpu auto)")
    return _load_file(path)
