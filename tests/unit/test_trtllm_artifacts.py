"""The engine manifest: write / read / compatibility, and the environment probes behind it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from aisandbox.artifacts import (
    MANIFEST_FILE,
    DeviceInfo,
    EngineDirError,
    EngineIdentity,
    EngineIncompatible,
    EngineManifest,
    EngineProfile,
    LibraryVersions,
    ModelSummary,
    check_compatibility,
    check_trtllm_version,
    engine_hash,
    read_manifest,
    write_manifest,
)

H100 = DeviceInfo(0, "NVIDIA H100 80GB HBM3", "9.0", 81559 * 2**20, "580.65.06", "13.0")
H100_PCIE = DeviceInfo(0, "NVIDIA H100 PCIe", "9.0", 81559 * 2**20, "580.65.06", "13.0")
L40S = DeviceInfo(0, "NVIDIA L40S", "8.9", 46068 * 2**20, "580.65.06", "13.0")
BUILT = LibraryVersions(tensorrt_llm="1.2.1", tensorrt="10.13.3.9", cuda="13.0")


def sample_manifest() -> EngineManifest:
    model = ModelSummary(
        architecture="MistralForCausalLM",
        dtype="bfloat16",
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_attention_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        num_parameters=7_248_023_552,
        checkpoint_fingerprint="ab" * 32,
    )
    profile = EngineProfile("h100-sxm", "fp8", "fp8", 256, 16384, 16384, 32768, 0.9)
    return EngineManifest(
        engine_hash="cd" * 32,
        created_at="2026-05-01T12:00:00+00:00",
        aisandbox_version="0.1.0",
        model=model,
        profile=profile,
        gpu=H100,
        versions=BUILT,
    )


def engine_dir(tmp_path: Path, manifest: EngineManifest | None = None) -> Path:
    d = tmp_path / "engine"
    d.mkdir()
    (d / "config.json").write_text("{}")
    write_manifest(d, manifest or sample_manifest())
    return d


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    d = engine_dir(tmp_path)
    assert read_manifest(d) == sample_manifest()
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []  # no temp file left
    data = json.loads((d / MANIFEST_FILE).read_text())
    assert data["gpu"]["compute_capability"] == "9.0" and data["versions"]["tensorrt"] == "10.13.3.9"


def test_missing_or_broken_manifests_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EngineDirError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineDirError, match="not built by `aisandbox build-engine`.*aisandbox build-engine"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(EngineDirError, match="cannot read"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(EngineDirError, match="schema 99"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"schema_version": 1, "engine_hash": "x"}))
    with pytest.raises(EngineDirError, match="unexpected shape"):
        read_manifest(tmp_path)


def test_an_engine_dir_without_trtllm_config_is_incomplete(tmp_path: Path) -> None:
    d = engine_dir(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(EngineDirError, match="incomplete"):
        read_manifest(d)


def test_same_gpu_and_versions_load_without_warnings(tmp_path: Path) -> None:
    assert check_compatibility(sample_manifest(), tmp_path, H100, BUILT) == []


def test_a_sibling_gpu_of_the_same_architecture_only_warns(tmp_path: Path) -> None:
    warnings = check_compatibility(sample_manifest(), tmp_path, H100_PCIE, BUILT)
    assert len(warnings) == 1 and "same architecture 9.0" in warnings[0]


@pytest.mark.parametrize(
    ("gpu", "versions", "message"),
    [
        (L40S, BUILT, "compute capability 8.9, the engine was built for 9.0"),
        (
            H100,
            dataclasses.replace(BUILT, tensorrt="10.14.1"),
            "TensorRT is 10.14.1 here, the engine was built with 10.13.3.9",
        ),
        (H100, dataclasses.replace(BUILT, tensorrt=None), "TensorRT is not installed"),
        (H100, dataclasses.replace(BUILT, tensorrt_llm="1.2.0"), "tensorrt_llm is 1.2.0 here"),
        (H100, dataclasses.replace(BUILT, tensorrt_llm="1.3.0rc12"), "removed in 1.3"),
        (H100, dataclasses.replace(BUILT, tensorrt_llm="1.1.0"), "older than 1.2"),
        (None, dataclasses.replace(BUILT, tensorrt_llm=None), "tensorrt_llm is not installed"),
    ],
)
def test_mismatches_refuse_with_what_to_rebuild(
    tmp_path: Path, gpu: DeviceInfo | None, versions: LibraryVersions, message: str
) -> None:
    with pytest.raises(EngineIncompatible, match=message) as err:
        check_compatibility(sample_manifest(), tmp_path, gpu, versions)
    if "not installed" not in message and "1.3" not in message and "older" not in message:
        assert "aisandbox build-engine" in str(err.value)


def test_all_mismatches_are_listed_at_once(tmp_path: Path) -> None:
    with pytest.raises(EngineIncompatible) as err:
        check_compatibility(sample_manifest(), tmp_path, L40S, dataclasses.replace(BUILT, tensorrt="10.14.1"))
    assert "TensorRT is 10.14.1" in str(err.value) and "compute capability 8.9" in str(err.value)


def test_trtllm_version_gate() -> None:
    check_trtllm_version("1.2.1")
    check_trtllm_version("1.2.0rc6.post3")
    for bad in ("1.3.0", "1.3.0rc21", "2.0.0", "1.1.0", "0.21.0"):
        with pytest.raises(EngineIncompatible):
            check_trtllm_version(bad)


def identity(**changes: object) -> EngineIdentity:
    base = EngineIdentity(
        checkpoint_fingerprint="ab" * 32,
        architecture="MistralForCausalLM",
        dtype="bfloat16",
        weights="fp8",
        kv_cache="fp8",
        max_batch_size=256,
        max_num_tokens=16384,
        max_input_len=16384,
        max_seq_len=32768,
        compute_capability="9.0",
        tensorrt_llm="1.2.1",
        tensorrt="10.13.3.9",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_the_engine_hash_covers_exactly_what_changes_the_plan() -> None:
    h = engine_hash(identity())
    assert h == engine_hash(identity()) and len(h) == 64
    for change in (
        {"compute_capability": "8.9"},
        {"tensorrt": "10.14"},
        {"tensorrt_llm": "1.2.0"},
        {"weights": "bf16"},
        {"kv_cache": "bf16"},
        {"max_seq_len": 16384},
        {"checkpoint_fingerprint": "0"},
        {"tp_size": 2},  # one rank{N}.engine per rank: another artifact
    ):
        assert engine_hash(identity(**change)) != h, change
