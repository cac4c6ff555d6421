"""Tensor parallelism at serve time: the GPUs a TP engine needs, and gunicorn's one-GPU-per-worker mode refused."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from aisandbox.artifacts import DeviceInfo, EngineIncompatible, EngineManifest, LibraryVersions, read_manifest
from aisandbox.runtime.trtllm.backend import check_engine_dir, visible_gpus
from aisandbox.serve import add_arguments, check_gpu_mode, run

from .test_trtllm_backend import H100, VERSIONS, make_engine_dir

GPUS = [dataclasses.replace(H100, index=i, uuid=f"GPU-{i}") for i in range(4)]


def tp_engine_dir(path: Path, tp_size: int) -> Path:
    d = make_engine_dir(path)
    manifest = read_manifest(d)
    from aisandbox.artifacts import write_manifest

    write_manifest(d, dataclasses.replace(manifest, profile=dataclasses.replace(manifest.profile, tp_size=tp_size)))
    return d


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus(GPUS, None) == GPUS
    assert [d.index for d in visible_gpus(GPUS, "2,3")] == [2, 3]
    assert [d.index for d in visible_gpus(GPUS, "GPU-3,GPU-1")] == [3, 1]
    assert [d.index for d in visible_gpus(GPUS, "1,9,2")] == [1]  # CUDA stops at the first invalid entry


def test_a_tp2_engine_needs_two_visible_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tp_engine_dir(tmp_path / "engine", 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert check_engine_dir(d, devices=lambda: GPUS, versions=lambda: VERSIONS).tp_size == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # e.g. a gunicorn worker pinned to one GPU
    with pytest.raises(EngineIncompatible, match="tensor parallel over 2 GPUs, but this process sees 1"):
        check_engine_dir(d, devices=lambda: GPUS, versions=lambda: VERSIONS)
    mixed = [GPUS[0], dataclasses.replace(GPUS[1], compute_capability="8.9", name="NVIDIA L4")]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(EngineIncompatible, match="different types"):
        check_engine_dir(d, devices=lambda: mixed, versions=lambda: VERSIONS)


def test_check_gpu_mode() -> None:
    assert check_gpu_mode(workers=4, tp_size=1) is None
    assert check_gpu_mode(workers=1, tp_size=2) is None
    problem = check_gpu_mode(workers=2, tp_size=2)
    assert problem is not None and "--workers 1" in problem and "tensor parallel over 2 GPUs" in problem


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_serve_refuses_workers_with_a_tp_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)  # restored afterwards: serve sets it in os.environ
    d = tp_engine_dir(tmp_path / "engine", 2)
    manifest = read_manifest(d)
    monkeypatch.setattr("aisandbox.runtime.trtllm.backend.check_engine_dir", lambda engine_dir: manifest)
    execs: list[Any] = []
    monkeypatch.setattr("os.execve", lambda *a: execs.append(a))
    assert run(_serve_args("--engine", str(d), "--workers", "2")) == 2
    assert "--workers 1" in capsys.readouterr().err
    assert execs == []
    assert run(_serve_args("--engine", str(d), "--workers", "1")) == 0
    (argv_env,) = execs
    env = argv_env[2]
    assert "AISANDBOX_PIN_GPUS" not in env  # the one worker sees every GPU; its executor spawns the ranks
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_manifest_round_trips_tp_and_gpus(tmp_path: Path) -> None:
    d = tp_engine_dir(tmp_path / "engine", 2)
    m = read_manifest(d)
    from aisandbox.artifacts import write_manifest

    m2 = dataclasses.replace(m, gpus=tuple(GPUS[:2]))
    write_manifest(d, m2)
    assert read_manifest(d) == m2 and read_manifest(d).tp_size == 2
    assert isinstance(m2, EngineManifest) and isinstance(VERSIONS, LibraryVersions)
    assert all(isinstance(g, DeviceInfo) for g in read_manifest(d).gpus)
