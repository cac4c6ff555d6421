"""The build stages end to end, with the tensorrt_llm compile step replaced by a fake (no GPU here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from gpu_samples import H100_SXM, L4

from aisandbox.artifacts import (
    MANIFEST_FILE,
    EngineIncompatible,
    LibraryVersions,
    check_compatibility,
    read_manifest,
)
from aisandbox.build_engine.errors import BuildEngineError
from aisandbox.build_engine.pipeline import BuildRequest, run_build
from aisandbox.build_engine.trt_build import BuildSpec
from aisandbox.cli import main

VERSIONS = LibraryVersions(tensorrt_llm="1.2.1", tensorrt="10.13.3.9", cuda="13.0")


def fake_builder(calls: list[BuildSpec]) -> object:
    def build(spec: BuildSpec, engine_dir: Path, say: object) -> str:
        calls.append(spec)
        (engine_dir / "config.json").write_text(json.dumps({"pretrained_config": {}, "build_config": {}}))
        (engine_dir / "rank0.engine").write_bytes(b"plan")
        return "1.2.1"

    return build


def failing_builder(spec: BuildSpec, engine_dir: Path, say: object) -> str:
    (engine_dir / "rank0.engine").write_bytes(b"half")
    raise RuntimeError("TensorRT: out of memory")


def test_dry_run_on_h100_sxm_prints_the_plan_and_writes_nothing(
    tiny_mistral: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "engine"
    status = main(
        ["build-engine", "--checkpoint", str(tiny_mistral), "--gpu", "h100-sxm", "--dry-run", "--output", str(out)]
    )
    text = capsys.readouterr().out
    assert status == 0
    assert "[1/7] checkpoint" in text and "MistralForCausalLM, float32, vocab 32768, 2 layers" in text
    assert "profile h100-sxm" in text and "weights fp8, KV cache fp8" in text
    assert "79.60 GiB" in text
    assert "KV per token            0.12 KiB  (128 B) 2 x 2 layers x 2 KV heads x 16 dims x 1 B" in text
    assert "max_seq_len 2048" in text  # capped at the tiny model's window
    assert "QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8)" in text
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_real_build_publishes_a_complete_engine_dir(tiny_mistral: Path, tmp_path: Path) -> None:
    calls: list[BuildSpec] = []
    out = tmp_path / "engines" / "tiny-h100"
    request = BuildRequest(
        checkpoint=tiny_mistral, output=out, gpu="auto", overrides={"weights": "bf16", "kv_cache": "bf16"}
    )
    result = run_build(
        request, devices=lambda: [H100_SXM], versions=lambda: VERSIONS, builder=fake_builder(calls), say=lambda _: None
    )
    assert result.engine_dir == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "rank0.engine", "tokenizer.model.v3", "generation_config.json", MANIFEST_FILE]
    )
    assert [p.name for p in out.parent.iterdir()] == ["tiny-h100"]  # no temporary directory left
    (spec,) = calls
    assert (spec.weights, spec.kv_cache, spec.max_seq_len, spec.dtype) == ("bf16", "bf16", 2048, "bfloat16")
    manifest = read_manifest(out)
    assert manifest == result.manifest
    assert manifest.gpu == H100_SXM
    assert manifest.versions == VERSIONS
    assert manifest.profile.name == "h100-sxm" and manifest.profile.max_seq_len == 2048
    assert check_compatibility(manifest, out, H100_SXM, VERSIONS) == []
    with pytest.raises(EngineIncompatible, match="compute capability 8.9"):
        check_compatibility(manifest, out, L4, VERSIONS)


def test_fp8_without_a_calibration_dataset_is_refused_before_building(tiny_mistral: Path, tmp_path: Path) -> None:
    calls: list[BuildSpec] = []
    request = BuildRequest(checkpoint=tiny_mistral, output=tmp_path / "e", gpu="h100-sxm")
    with pytest.raises(BuildEngineError, match="--calib-dataset"):
        run_build(
            request,
            devices=lambda: [H100_SXM],
            versions=lambda: VERSIONS,
            builder=fake_builder(calls),
            say=lambda _: None,
        )
    assert calls == []


def test_fp8_with_a_local_calibration_dataset_builds(tiny_mistral: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "train.jsonl").write_text('{"text": "hello"}\n')
    calls: list[BuildSpec] = []
    request = BuildRequest(checkpoint=tiny_mistral, output=tmp_path / "e", gpu="h100-sxm", calib_dataset=calib)
    run_build(
        request, devices=lambda: [H100_SXM], versions=lambda: VERSIONS, builder=fake_builder(calls), say=lambda _: None
    )
    assert calls[0].calib_dataset == calib


def test_a_failed_build_leaves_nothing_behind(tiny_mistral: Path, tmp_path: Path) -> None:
    request = BuildRequest(
        checkpoint=tiny_mistral, output=tmp_path / "e", gpu="auto", overrides={"weights": "bf16", "kv_cache": "bf16"}
    )
    with pytest.raises(RuntimeError, match="out of memory"):
        run_build(
            request, devices=lambda: [H100_SXM], versions=lambda: VERSIONS, builder=failing_builder, say=lambda _: None
        )
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_needs_force(tiny_mistral: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    out.mkdir()
    (out / "old").write_text("x")
    request = BuildRequest(
        checkpoint=tiny_mistral, output=out, gpu="auto", overrides={"weights": "bf16", "kv_cache": "bf16"}
    )
    with pytest.raises(BuildEngineError, match="--force"):
        run_build(
            request, devices=lambda: [H100_SXM], versions=lambda: VERSIONS, builder=fake_builder([]), say=lambda _: None
        )
    forced = dataclasses.replace(request, force=True)
    run_build(
        forced, devices=lambda: [H100_SXM], versions=lambda: VERSIONS, builder=fake_builder([]), say=lambda _: None
    )
    assert not (out / "old").exists() and (out / MANIFEST_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_a_real_build_without_tensorrt_llm_fails_clearly(tiny_mistral: Path, tmp_path: Path) -> None:
    request = BuildRequest(
        checkpoint=tiny_mistral, output=tmp_path / "e", gpu="auto", overrides={"weights": "bf16", "kv_cache": "bf16"}
    )
    with pytest.raises(EngineIncompatible, match="tensorrt_llm is not installed"):
        run_build(
            request,
            devices=lambda: [H100_SXM],
            versions=lambda: LibraryVersions(None, None),
            builder=fake_builder([]),
            say=lambda _: None,
        )
    assert list(tmp_path.iterdir()) == []


def test_the_cli_reports_errors_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["build-engine", "--checkpoint", str(tmp_path), "--gpu", "h100-sxm", "--dry-run"])
    assert status == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["build-engine", "--checkpoint", str(tmp_path)]) == 2  # --output missing
