"""Stage 3: the memory plan — what the weights take, what is left for the paged KV cache, what that allows.

The arithmetic is per rank: with tensor parallelism (tp_size = T GPUs of `M` bytes each) every rank holds 1/T
of the attention and MLP projections and 1/T of the KV heads, and sizes its own KV pool the same way:

* weights = linear parameters x bytes per weight at the chosen precision / T + other parameters (embeddings,
  lm_head, norms) x 2 (they stay bf16/fp16; counted whole on every rank, which over-counts lm_head's split);
* activations (estimate) = max_num_tokens x (3 x intermediate / T + 3 x hidden) x 2 bytes — the widest MLP
  intermediates of one engine step — plus max_batch_size x vocab x 4 bytes of fp32 logits;
* runtime overhead (estimate) = 1 GiB for the CUDA context, cuBLAS/TensorRT workspaces and decoder buffers,
  plus 0.5 GiB per rank for NCCL / all-reduce buffers when T > 1;
* KV pool = kv_cache_free_gpu_memory_fraction x (M - weights - activations - overhead), which is how the
  TensorRT-LLM runtime sizes it (KvCacheConfig.free_gpu_memory_fraction of the memory free after loading);
* KV bytes per token = 2 (K and V) x layers x KV heads / T x head_dim x bytes per KV element;
* KV tokens = the pool / bytes per token, rounded down to whole 32-token blocks (tokens_per_block). The ranks
  hold the same tokens (each its share of the heads), so this is also the engine's capacity.

For Mistral-7B (32 layers, 8 KV heads of 128) that is 128 KiB per token in bf16 and 64 KiB in FP8 at TP1, half
that per rank at TP2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from aisandbox.artifacts import ModelSummary
from aisandbox.build_engine.checkpoint import Checkpoint
from aisandbox.build_engine.errors import PlanError
from aisandbox.build_engine.profiles import KV_PRECISIONS, WEIGHT_PRECISIONS, GpuProfile

__all__ = [
    "ACTIVATION_BYTES",
    "RUNTIME_OVERHEAD_BYTES",
    "TP_OVERHEAD_BYTES",
    "TOKENS_PER_BLOCK",
    "MemoryPlan",
    "check_tp",
    "compute_dtype",
    "fit_profile_to_model",
    "format_plan",
    "human_count",
    "kv_bytes_per_token",
    "plan_memory",
]

GiB = 2**30
RUNTIME_OVERHEAD_BYTES = 1 * GiB
TP_OVERHEAD_BYTES = GiB // 2
"""Extra per rank with tensor parallelism: NCCL communicators and the custom all-reduce workspace (estimate)."""
ACTIVATION_BYTES = 2
"""Bytes per activation element (bf16/fp16 compute)."""
TOKENS_PER_BLOCK = 32
"""tensorrt_llm 1.2 PluginConfig.tokens_per_block default: the KV cache is allocated in blocks of this many tokens."""
_LIMITS = ("max_seq_len", "max_input_len", "max_num_tokens")


def compute_dtype(profile: GpuProfile, checkpoint_dtype: str) -> str:
    """The dtype of everything not quantized (activations, embeddings, norms, lm_head)."""
    weights = profile.quantization.weights
    if weights == "bf16":
        return "bfloat16"
    if weights == "fp16":
        return "float16"
    if checkpoint_dtype in ("bfloat16", "float16"):
        return checkpoint_dtype
    major, minor = (int(x) for x in profile.compute_capability.split("."))
    return "bfloat16" if (major, minor) >= (8, 0) else "float16"


def kv_bytes_per_token(model: ModelSummary, kv_cache: str, tp_size: int = 1) -> int:
    """KV-cache bytes one token takes across all layers (K and V), on one of `tp_size` ranks."""
    heads = model.num_kv_heads // tp_size
    return int(2 * model.num_layers * heads * model.head_dim * KV_PRECISIONS[kv_cache].bytes_per_value)


def check_tp(model: ModelSummary, tp_size: int) -> None:
    """Raise PlanError unless the model's heads split evenly over `tp_size` ranks."""
    if model.num_attention_heads % tp_size or model.num_kv_heads % tp_size:
        raise PlanError(
            f"--tp {tp_size} does not divide the model's {model.num_attention_heads} attention heads and "
            f"{model.num_kv_heads} KV heads; use a tp size that divides both (e.g. 1, 2, 4 or 8 for Mistral-7B)"
        )


def fit_profile_to_model(
    profile: GpuProfile, model: ModelSummary, explicit: frozenset[str] = frozenset()
) -> tuple[GpuProfile, list[str]]:
    """Cap the profile's sequence limits at the model's context window.

    Profiles are tuned for Mistral-7B's 32k window; a model with a shorter one gets the limits capped, with a
    note. A limit the operator set explicitly (named in `explicit`) is never changed: too large is an error.

    Returns:
        The fitted profile and notes on what changed.
    """
    window = model.max_position_embeddings
    if "max_seq_len" in explicit and profile.max_seq_len > window:
        raise PlanError(
            f"--max-seq-len {profile.max_seq_len} exceeds the model's context window "
            f"(max_position_embeddings = {window})"
        )
    if profile.max_seq_len <= window:
        return profile, []
    updates = {"max_seq_len": window}
    if profile.max_input_len >= window:
        if "max_input_len" in explicit:
            raise PlanError(f"--max-input-len {profile.max_input_len} leaves no room in the model's {window} window")
        updates["max_input_len"] = window // 2
    notes = [f"max_seq_len capped from {profile.max_seq_len} to the model's window {window}"]
    if "max_input_len" in updates:
        notes.append(f"max_input_len capped from {profile.max_input_len} to {updates['max_input_len']}")
    return profile.with_overrides(updates), notes


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Where the GPU's memory goes, and the limits that follow."""

    profile: GpuProfile
    model: ModelSummary
    gpu_name: str
    gpu_memory_bytes: int
    """Memory of one GPU (one rank)."""
    compute_dtype: str
    weights_bytes: int
    activation_bytes: int
    overhead_bytes: int
    kv_pool_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int
    """Tokens the paged KV cache holds, in whole blocks (per rank, which is also the engine's capacity)."""
    needs_calibration: bool
    notes: tuple[str, ...] = field(default=())

    @property
    def tp_size(self) -> int:
        """Ranks (GPUs) the plan is for."""
        return self.profile.tp_size

    @property
    def free_bytes(self) -> int:
        """Memory left after weights, activations and overhead."""
        return self.gpu_memory_bytes - self.weights_bytes - self.activation_bytes - self.overhead_bytes

    @property
    def full_length_sequences(self) -> int:
        """How many sequences of the full max_seq_len the KV cache holds at once."""
        return self.kv_tokens // self.profile.max_seq_len

    @property
    def tokens_per_sequence_at_max_batch(self) -> int:
        """KV tokens each sequence can have when max_batch_size sequences run (at most max_seq_len)."""
        return min(self.kv_tokens // self.profile.max_batch_size, self.profile.max_seq_len)


def plan_memory(
    checkpoint: Checkpoint,
    profile: GpuProfile,
    *,
    gpu_name: str,
    gpu_memory_bytes: int,
    notes: tuple[str, ...] = (),
) -> MemoryPlan:
    """Compute the memory plan.

    Raises:
        PlanError: The weights do not fit, or the KV cache cannot hold one max_seq_len sequence.
    """
    model = checkpoint.summary
    weights = profile.quantization.weights
    kv = profile.quantization.kv_cache
    tp = profile.tp_size
    check_tp(model, tp)
    weights_bytes = math.ceil(checkpoint.linear_parameters * WEIGHT_PRECISIONS[weights].bytes_per_value / tp) + (
        checkpoint.other_parameters * ACTIVATION_BYTES
    )
    activation_bytes = (
        profile.max_num_tokens * (3 * model.intermediate_size // tp + 3 * model.hidden_size) * ACTIVATION_BYTES
        + profile.max_batch_size * model.vocab_size * 4
    )
    overhead = RUNTIME_OVERHEAD_BYTES + (TP_OVERHEAD_BYTES if tp > 1 else 0)
    free = gpu_memory_bytes - weights_bytes - activation_bytes - overhead
    if free <= 0:
        ranks = f" per rank at --tp {tp}" if tp > 1 else ""
        raise PlanError(
            f"{model.architecture} does not fit a {gpu_name} ({gpu_memory_bytes / GiB:.1f} GiB) with {weights} "
            f"weights{ranks}: weights {weights_bytes / GiB:.2f} GiB + activations {activation_bytes / GiB:.2f} GiB + "
            f"overhead {overhead / GiB:.2f} GiB. Use smaller weights (--weights int4_awq or int8_wo), more GPUs "
            "(--tp), or a lower --max-num-tokens."
        )
    kv_pool = int(free * profile.kv_cache_free_gpu_memory_fraction)
    per_token = kv_bytes_per_token(model, kv, tp)
    kv_tokens = kv_pool // per_token // TOKENS_PER_BLOCK * TOKENS_PER_BLOCK
    if kv_tokens < profile.max_seq_len:
        raise PlanError(
            f"the KV cache holds {kv_tokens} tokens ({kv_pool / GiB:.2f} GiB at {per_token // 1024} KiB per token), "
            f"less than one max_seq_len sequence ({profile.max_seq_len}). Lower --max-seq-len, use smaller weights "
            "(on Ada/Hopper --weights fp8 --kv-cache-dtype fp8 halves both), more GPUs (--tp), or a higher "
            "--kv-cache-fraction."
        )
    plan_notes = list(notes) + [f"unverified: {caveat}" for caveat in profile.caveats]
    if profile.default_max_tokens is None and profile.scheduler_policy == "guaranteed_no_evict":
        plan_notes.append(
            f"requests without max_tokens reserve KV for the whole rest of the context (up to {profile.max_seq_len} "
            f"tokens each) under guaranteed_no_evict: only {kv_tokens // profile.max_seq_len} of them run at once"
        )
    if profile.max_batch_size > profile.max_num_tokens:
        plan_notes.append("max_batch_size exceeds max_num_tokens: not every sequence can decode in one step")
    needs_calibration = WEIGHT_PRECISIONS[weights].needs_calibration or KV_PRECISIONS[kv].needs_calibration
    return MemoryPlan(
        profile=profile,
        model=model,
        gpu_name=gpu_name,
        gpu_memory_bytes=gpu_memory_bytes,
        compute_dtype=compute_dtype(profile, model.dtype),
        weights_bytes=weights_bytes,
        activation_bytes=activation_bytes,
        overhead_bytes=overhead,
        kv_pool_bytes=kv_pool,
        kv_bytes_per_token=per_token,
        kv_tokens=kv_tokens,
        needs_calibration=needs_calibration,
        notes=tuple(plan_notes),
    )


def human_count(n: int) -> str:
    """7248023552 -> '7.25 B', 4260416 -> '4.26 M'."""
    return f"{n / 1e9:.2f} B" if n >= 10**9 else f"{n / 1e6:.2f} M"


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as the lines build-engine prints."""
    p = plan.profile
    w = WEIGHT_PRECISIONS[p.quantization.weights]
    kv = KV_PRECISIONS[p.quantization.kv_cache]
    per_rank = f" (per GPU; every line below is per rank, {plan.tp_size} ranks)" if plan.tp_size > 1 else ""
    lines = [
        f"  GPU memory          {_gib(plan.gpu_memory_bytes)}  {plan.gpu_name}{per_rank}",
        f"  weights             {_gib(plan.weights_bytes)}  {human_count(plan.model.num_parameters)} parameters: "
        f"projections {w.label}, embeddings/lm_head/norms {plan.compute_dtype}",
        f"  activations (est.)  {_gib(plan.activation_bytes)}  max_num_tokens {p.max_num_tokens}, "
        f"logits for max_batch_size {p.max_batch_size}",
        f"  runtime overhead    {_gib(plan.overhead_bytes)}  CUDA context, workspaces"
        + (", NCCL / all-reduce" if plan.tp_size > 1 else "")
        + " (estimate)",
        f"  free                {_gib(plan.free_bytes)}",
        f"  paged KV cache      {_gib(plan.kv_pool_bytes)}  {p.kv_cache_free_gpu_memory_fraction:.2f} of free, "
        f"{kv.label}",
        f"  KV per token        {plan.kv_bytes_per_token / 1024:8.2f} KiB  ({plan.kv_bytes_per_token} B) "
        f"2 x {plan.model.num_layers} layers x {plan.model.num_kv_heads // plan.tp_size} KV heads x "
        f"{plan.model.head_dim} dims x {kv.bytes_per_value:g} B",
        f"  KV capacity         {plan.kv_tokens:>8} tokens  ({TOKENS_PER_BLOCK}-token blocks)",
        f"  limits              max_batch_size {p.max_batch_size}, max_num_tokens {p.max_num_tokens}, "
        f"max_input_len {p.max_input_len}, max_seq_len {p.max_seq_len}",
        f"  => {plan.full_length_sequences} sequences of the full {p.max_seq_len} tokens fit at once; "
        f"with {p.max_batch_size} running, each can hold {plan.tokens_per_sequence_at_max_batch} tokens",
        f"  scheduler           {p.scheduler_policy}, default max_tokens "
        + (str(p.default_max_tokens) if p.default_max_tokens is not None else "the rest of the context"),
    ]
    if plan.needs_calibration:
        lines.append("  calibration         needed (ModelOpt): pass a local --calib-dataset for the real build")
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)
