"""Checkpoint validation: architecture, dtype, vocab and sizes from config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aisandbox.build_engine.checkpoint import read_checkpoint
from aisandbox.build_engine.errors import CheckpointError


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_the_tiny_mistral_is_described(tiny_mistral: Path) -> None:
    ckpt = read_checkpoint(tiny_mistral)
    m = ckpt.summary
    assert (m.architecture, m.dtype, m.vocab_size, m.num_layers) == ("MistralForCausalLM", "float32", 32768, 2)
    assert (m.hidden_size, m.num_attention_heads, m.num_kv_heads, m.head_dim) == (64, 4, 2, 16)
    # 2 x 32768 x 64 embeddings + 2 layers x (q,o 64x64 + k,v 64x32 + 3 x 64x128) + norms
    assert ckpt.linear_parameters == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    size = (tiny_mistral / "model.safetensors").stat().st_size  # float32 weights + a JSON header
    assert m.num_parameters * 4 <= size < m.num_parameters * 4 + 64 * 1024
    assert len(m.checkpoint_fingerprint) == 64


def test_the_fingerprint_follows_config_and_weights(tiny_mistral: Path, tmp_path: Path) -> None:
    ckpt = copy_of(tiny_mistral, tmp_path / "c")
    before = read_checkpoint(ckpt).summary.checkpoint_fingerprint
    assert read_checkpoint(ckpt).summary.checkpoint_fingerprint == before
    edit_config(ckpt, rms_norm_eps=1e-5)
    assert read_checkpoint(ckpt).summary.checkpoint_fingerprint != before


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        read_checkpoint(tmp_path)


def test_an_unsupported_architecture_is_refused(tiny_mistral: Path, tmp_path: Path) -> None:
    ckpt = copy_of(tiny_mistral, tmp_path / "c")
    edit_config(ckpt, architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match="not supported.*MistralForCausalLM"):
        read_checkpoint(ckpt)


def test_a_bad_dtype_or_size_is_refused(tiny_mistral: Path, tmp_path: Path) -> None:
    ckpt = copy_of(tiny_mistral, tmp_path / "c")
    edit_config(ckpt, dtype="int8")
    with pytest.raises(CheckpointError, match="dtype 'int8'"):
        read_checkpoint(ckpt)
    edit_config(ckpt, dtype="bfloat16", num_key_value_heads=3)
    with pytest.raises(CheckpointError, match="not a multiple of 3 KV heads"):
        read_checkpoint(ckpt)


def test_weights_smaller_than_the_config_describes_are_refused(tiny_mistral: Path, tmp_path: Path) -> None:
    ckpt = copy_of(tiny_mistral, tmp_path / "c")
    edit_config(ckpt, num_hidden_layers=400)
    with pytest.raises(CheckpointError, match="incomplete download"):
        read_checkpoint(ckpt)


def test_missing_weights_or_tokenizer_are_refused(tiny_mistral: Path, tmp_path: Path) -> None:
    ckpt = copy_of(tiny_mistral, tmp_path / "c")
    (ckpt / "tokenizer.model.v3").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        read_checkpoint(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        read_checkpoint(ckpt)


def test_a_tokenizer_larger_than_the_vocab_is_refused(tiny_mistral: Path, tmp_path: Path) -> None:
    ckpt = copy_of(tiny_mistral, tmp_path / "c")
    (ckpt / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 40000}}, "added_tokens": []}))
    with pytest.raises(CheckpointError, match="beyond the model's vocab_size 32768"):
        read_checkpoint(ckpt)


def test_pre_quantized_checkpoints_are_refused(tiny_mistral: Path, tmp_path: Path) -> None:
    ckpt = copy_of(tiny_mistral, tmp_path / "c")
    edit_config(ckpt, quantization_config={"quant_method": "fp8"})
    with pytest.raises(CheckpointError, match="pre-quantized"):
        read_checkpoint(ckpt)
