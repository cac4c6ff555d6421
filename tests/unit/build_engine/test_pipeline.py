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
from aisandbox.build_engine.pipeline import BuildRequest, build_memory_need, check_gpus_free, run_build
from aisandbox.build_engine.trt_build import BuildSpec, cuda_device_env
from aisandbox.cli import main

VERSIONS = LibraryVersions(tensorrt_llm="1.2.1", tensorrt="10.13.3.9", cuda="13.0")


def fake_builder(calls: list[BuildSpec]) -> object:
    def build(spec: BuildSpec, engine_dir: Path, say: object) -> str:
        calls.append(spec)
        (engine_dir / "config.json").write_text(json.dumps({"pretrained_config": {}, "build_config": {}}))
        for rank in range(spec.tp_size):
            (engine_dir / f"rank{rank}.engine").write_bytes(b"plan")
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


# ---- issue 8: the GPU the build runs on, a busy GPU, tensor parallelism ----

MIXED = [
    dataclasses.replace(L4, index=0, uuid="GPU-aaaa-l4"),
    dataclasses.replace(H100_SXM, index=1, uuid="GPU-bbbb-h100"),
]


def test_the_build_runs_on_the_gpu_device_names_not_cuda_device_0(tiny_mistral: Path, tmp_path: Path) -> None:
    """NVML index 1 is the H100 here; CUDA's fastest-first order would make it CUDA device 0 or 1, so the build
    must pin it by UUID, and the manifest must record the H100 it ran on."""
    calls: list[BuildSpec] = []
    request = BuildRequest(
        checkpoint=tiny_mistral,
        output=tmp_path / "e",
        gpu="auto",
        device_index=1,
        overrides={"weights": "bf16", "kv_cache": "bf16"},
    )
    result = run_build(
        request, devices=lambda: MIXED, versions=lambda: VERSIONS, builder=fake_builder(calls), say=lambda _: None
    )
    (spec,) = calls
    assert [d.uuid for d in spec.devices] == ["GPU-bbbb-h100"]
    assert cuda_device_env(spec.devices) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "GPU-bbbb-h100"}
    assert result.manifest is not None
    assert result.manifest.gpu.compute_capability == "9.0" and result.manifest.gpu.index == 1
    assert result.manifest.profile.name == "h100-sxm"


def test_cuda_device_env_without_uuids_uses_pci_order_indices() -> None:
    devices = (dataclasses.replace(L4, index=2), dataclasses.replace(L4, index=3))
    assert cuda_device_env(devices) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert cuda_device_env(()) == {}


def test_a_gpu_held_by_a_running_server_is_refused_before_building(tiny_mistral: Path, tmp_path: Path) -> None:
    """docs/deploy.md used to rebuild while the api container held ~90% of the GPU for its KV cache."""
    busy = dataclasses.replace(L4, memory_used_bytes=22 * 2**30)  # 22 of 22.5 GiB held by another process
    calls: list[BuildSpec] = []
    request = BuildRequest(checkpoint=tiny_mistral, output=tmp_path / "e", gpu="auto", calib_dataset=None)
    request = dataclasses.replace(request, overrides={"weights": "bf16", "kv_cache": "bf16"})
    with pytest.raises(BuildEngineError, match=r"GPU 0 \(NVIDIA L4\) has 22.0 GiB in use.*docker compose stop api"):
        run_build(request, devices=lambda: [busy], versions=lambda: VERSIONS, builder=fake_builder(calls), say=print)
    assert calls == []
    idle = dataclasses.replace(L4, memory_used_bytes=512 * 2**20)  # the driver's own share: fine
    run_build(request, devices=lambda: [idle], versions=lambda: VERSIONS, builder=fake_builder(calls), say=print)
    assert len(calls) == 1


def test_calibration_needs_the_whole_16_bit_checkpoint_free() -> None:
    from test_plan import mistral_7b

    from aisandbox.build_engine.plan import plan_memory
    from aisandbox.build_engine.profiles import load_profile

    ckpt = mistral_7b()
    plan = plan_memory(ckpt, load_profile("l4"), gpu_name="L4", gpu_memory_bytes=L4.memory_bytes)
    assert plan.needs_calibration
    assert build_memory_need(ckpt, plan) >= 7_248_023_552 * 2  # 14.5 GB of bf16 weights on one GPU
    half_busy = dataclasses.replace(L4, memory_used_bytes=10 * 2**30)
    with pytest.raises(BuildEngineError, match="calibration loads the whole checkpoint"):
        check_gpus_free(ckpt, plan, (half_busy,))


def test_tp2_dry_run_plans_per_rank(tiny_mistral: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["build-engine", "--checkpoint", str(tiny_mistral), "--gpu", "h100-sxm", "--tp", "2", "--dry-run"])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "tensor parallel over 2 GPUs" in text and "every line below is per rank, 2 ranks" in text
    assert "KV per token            0.06 KiB  (64 B) 2 x 2 layers x 1 KV heads x 16 dims x 1 B" in text
    assert "tensor_parallel_size=2" in text


def test_tp2_build_uses_two_gpus_and_records_them(tiny_mistral: Path, tmp_path: Path) -> None:
    gpus = [dataclasses.replace(H100_SXM, index=i, uuid=f"GPU-{i}") for i in range(4)]
    calls: list[BuildSpec] = []
    out = tmp_path / "e"
    request = BuildRequest(
        checkpoint=tiny_mistral,
        output=out,
        gpu="auto",
        device_indices=(2, 3),
        overrides={"weights": "bf16", "kv_cache": "bf16", "tp_size": 2},
    )
    result = run_build(
        request, devices=lambda: gpus, versions=lambda: VERSIONS, builder=fake_builder(calls), say=lambda _: None
    )
    (spec,) = calls
    assert spec.tp_size == 2 and [d.index for d in spec.devices] == [2, 3]
    manifest = read_manifest(out)
    assert manifest == result.manifest
    assert manifest.tp_size == 2 and [g.uuid for g in manifest.gpus] == ["GPU-2", "GPU-3"]
    assert {p.name for p in out.glob("rank*.engine")} == {"rank0.engine", "rank1.engine"}


def test_tp_needs_matching_gpus_and_enough_of_them(tiny_mistral: Path, tmp_path: Path) -> None:
    request = BuildRequest(
        checkpoint=tiny_mistral, output=tmp_path / "e", gpu="auto", overrides={"weights": "bf16", "kv_cache": "bf16"}
    )
    two = dataclasses.replace(request, overrides={**request.overrides, "tp_size": 2})
    with pytest.raises(BuildEngineError, match="--tp 2 needs 2 GPUs; this machine has 1"):
        run_build(two, devices=lambda: [H100_SXM], versions=lambda: VERSIONS, builder=fake_builder([]), say=print)
    with pytest.raises(BuildEngineError, match="same GPU type"):
        run_build(
            two,
            devices=lambda: [dataclasses.replace(H100_SXM, index=0), dataclasses.replace(L4, index=1)],
            versions=lambda: VERSIONS,
            builder=fake_builder([]),
            say=print,
        )
    three = dataclasses.replace(request, overrides={**request.overrides, "tp_size": 3})
    with pytest.raises(BuildEngineError, match="--tp 3 does not divide"):
        run_build(
            three,
            devices=lambda: [dataclasses.replace(H100_SXM, index=i) for i in range(3)],
            versions=lambda: VERSIONS,
            builder=fake_builder([]),
            say=print,
        )
