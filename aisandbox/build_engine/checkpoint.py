"""Stage 1: validate a Hugging Face checkpoint folder and describe the model from its config.json."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisandbox.artifacts import TOKENIZER_FILES, ModelSummary
from aisandbox.build_engine.errors import CheckpointError

__all__ = ["SUPPORTED_ARCHITECTURES", "Checkpoint", "count_parameters", "read_checkpoint"]

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("MistralForCausalLM", "LlamaForCausalLM")
"""Architectures tensorrt_llm 1.2 builds through its LLaMA model (models/__init__.py MODEL_MAP)."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A validated Hugging Face checkpoint."""

    path: Path
    summary: ModelSummary
    linear_parameters: int
    """Attention and MLP projection weights: what quantization compresses."""
    other_parameters: int
    """Embeddings, lm_head and norms: kept in the compute dtype."""


_DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
_MISTRAL_TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v7m1", "tokenizer.model.v7", "tokenizer.model.v3")


def _int_field(config: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{path}: '{key}' must be a positive integer, found {value!r}")
    return value


def _weight_files(checkpoint: Path) -> list[Path]:
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{checkpoint} has no *.safetensors weight files; download the model's safetensors weights "
            "(e.g. model-00001-of-00003.safetensors ...)"
        )
    return files


def _fingerprint(config_bytes: bytes, weights: list[Path]) -> str:
    """sha256 of config.json plus the weight files' names and sizes (hashing 14 GB of weights adds minutes)."""
    digest = hashlib.sha256(config_bytes)
    for path in weights:
        digest.update(f"\0{path.name}\0{path.stat().st_size}".encode())
    return digest.hexdigest()


def count_parameters(summary_fields: dict[str, int], tied: bool) -> tuple[int, int]:
    """Count a LLaMA/Mistral model's parameters from its sizes.

    Returns:
        (linear, other): parameters of the attention and MLP projections (what quantization compresses), and of
        the embeddings, lm_head and RMS norms (kept in the compute dtype).
    """
    h = summary_fields["hidden_size"]
    inter = summary_fields["intermediate_size"]
    layers = summary_fields["num_layers"]
    q_dim = summary_fields["num_attention_heads"] * summary_fields["head_dim"]
    kv_dim = summary_fields["num_kv_heads"] * summary_fields["head_dim"]
    vocab = summary_fields["vocab_size"]
    per_layer = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * inter  # q, k, v, o; gate, up, down
    linear = layers * per_layer
    other = vocab * h * (1 if tied else 2) + layers * 2 * h + h  # embeddings (+ lm_head), 2 norms/layer, final norm
    return linear, other


def _check_tokenizer(checkpoint: Path, vocab_size: int) -> None:
    present = [name for name in TOKENIZER_FILES if (checkpoint / name).is_file()]
    if not any(name in present for name in ("tokenizer.json", "tokenizer.model", *_MISTRAL_TOKENIZER_FILES)):
        raise CheckpointError(
            f"{checkpoint} has no tokenizer (tokenizer.json, tokenizer.model, tokenizer.model.v3 or tekken.json)"
        )
    tok_json = checkpoint / "tokenizer.json"
    if tok_json.is_file():
        try:
            data = json.loads(tok_json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {tok_json}: {exc}") from exc
        ids = list((data.get("model") or {}).get("vocab", {}).values()) if isinstance(data, dict) else []
        ids += [t.get("id", 0) for t in data.get("added_tokens", []) if isinstance(t, dict)]
        ids = [i for i in ids if isinstance(i, int)]
        if ids and max(ids) >= vocab_size:
            raise CheckpointError(
                f"{tok_json} has token id {max(ids)}, beyond the model's vocab_size {vocab_size}: "
                "tokenizer and weights do not belong together"
            )


def read_checkpoint(checkpoint: Path) -> Checkpoint:
    """Validate a Hugging Face folder and describe its model.

    Args:
        checkpoint: A local Hugging Face model folder (config.json, *.safetensors, tokenizer files).

    Raises:
        CheckpointError: A file is missing, the architecture is unsupported, or sizes are inconsistent.
    """
    checkpoint = Path(checkpoint)
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{checkpoint} is not a Hugging Face model folder: it has no config.json")
    try:
        config_bytes = config_path.read_bytes()
        config = json.loads(config_bytes)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")

    architectures = config.get("architectures") or []
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(
            f"{config_path}: architectures {architectures} are not supported; build-engine compiles "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Mistral-7B-Instruct-v0.3)"
        )
    if config.get("quantization_config") is not None or (checkpoint / "hf_quant_config.json").is_file():
        raise CheckpointError(
            f"{checkpoint} is a pre-quantized checkpoint; give the original bf16 checkpoint, build-engine quantizes"
        )
    # transformers 5 writes "dtype", earlier versions "torch_dtype".
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    if dtype not in _DTYPES:
        raise CheckpointError(f"{config_path}: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")

    heads = _int_field(config, "num_attention_heads", config_path)
    hidden = _int_field(config, "hidden_size", config_path)
    if hidden % heads:
        raise CheckpointError(f"{config_path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    kv_heads = _int_field(config, "num_key_value_heads", config_path, default=heads)
    if heads % kv_heads:
        raise CheckpointError(f"{config_path}: num_attention_heads {heads} is not a multiple of {kv_heads} KV heads")
    sizes = {
        "vocab_size": _int_field(config, "vocab_size", config_path),
        "hidden_size": hidden,
        "intermediate_size": _int_field(config, "intermediate_size", config_path),
        "num_layers": _int_field(config, "num_hidden_layers", config_path),
        "num_attention_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": _int_field(config, "head_dim", config_path, default=hidden // heads),
        "max_position_embeddings": _int_field(config, "max_position_embeddings", config_path),
    }
    tied = bool(config.get("tie_word_embeddings", False))
    linear, other = count_parameters(sizes, tied)

    weights = _weight_files(checkpoint)
    on_disk = sum(p.stat().st_size for p in weights)
    expected = (linear + other) * _DTYPES[dtype]
    if on_disk < 0.9 * expected:
        raise CheckpointError(
            f"{checkpoint}: the safetensors files hold {on_disk / 2**30:.2f} GiB, but config.json describes "
            f"{(linear + other) / 1e9:.2f} B {dtype} parameters ({expected / 2**30:.2f} GiB): incomplete download?"
        )
    _check_tokenizer(checkpoint, sizes["vocab_size"])
    window = config.get("sliding_window")
    if isinstance(window, int) and window < sizes["max_position_embeddings"]:
        log.warning(
            "%s sets sliding_window=%s; the TensorRT engine attends over the whole context (tensorrt_llm ignores "
            "sliding_window at build time)",
            config_path,
            window,
        )
    summary = ModelSummary(
        architecture=arch,
        dtype=dtype,
        num_parameters=linear + other,
        checkpoint_fingerprint=_fingerprint(config_bytes, weights),
        **sizes,
    )
    return Checkpoint(checkpoint, summary, linear, other)
