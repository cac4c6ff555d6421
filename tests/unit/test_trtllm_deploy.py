"""The Docker image and compose file keep the shape docs/deploy.md describes."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_the_image_is_the_pinned_tensorrt_llm_release_and_adds_no_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tensorrt-llm/release:1.2.1\n" in text
    install_lines = [line for line in text.splitlines() if "pip install" in line or line.startswith(" ")]
    assert not any(
        "torch" in line.split("#")[0] or "tensorrt_llm" in line.split("#")[0].split("print")[0]
        for line in install_lines
        if "pip install" in line
    )
    assert "--no-deps -e ." in text and "-c /opt/image-constraints.txt" in text
    assert "--port 8000" in text and "nvidia-smi -L" in text  # one worker per GPU


def test_compose_has_the_api_service_and_a_one_off_build_engine() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    api = compose["services"]["api"]
    assert "/health" in " ".join(api["healthcheck"]["test"])
    assert api["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "./engines:/engines:ro" in api["volumes"]
    build = compose["services"]["build-engine"]
    assert build["profiles"] == ["tools"]
    assert build["entrypoint"][:2] == ["aisandbox", "build-engine"]
    assert {"./models:/models:ro", "./engines:/engines"} <= set(build["volumes"])


def _image_cmd() -> str:
    import json
    import re

    match = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert match is not None
    argv = json.loads(match.group(1))
    assert argv[:2] == ["sh", "-c"]
    return str(argv[2])


def test_the_image_command_serves_a_tp_engine_with_one_worker(tmp_path: Path) -> None:
    """One worker per GPU for single-GPU engines; one worker over all GPUs for a tensor-parallel engine."""
    import dataclasses
    import os
    import subprocess
    import sys

    from aisandbox.artifacts import read_manifest, write_manifest

    from .test_trtllm_backend import make_engine_dir

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {
        "nvidia-smi": "printf 'GPU 0: A\\nGPU 1: B\\nGPU 2: C\\nGPU 3: D\\n'",
        "aisandbox": 'echo "$@"',
        "python3": f'cd {ROOT} && exec {sys.executable} "$@"',
    }
    for name, body in shims.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    workers = {}
    for tp in (1, 2):
        engine = make_engine_dir(tmp_path / f"engine-tp{tp}")
        m = read_manifest(engine)
        write_manifest(engine, dataclasses.replace(m, profile=dataclasses.replace(m.profile, tp_size=tp)))
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "AISANDBOX_ENGINE": str(engine)}
        env |= {"AISANDBOX_MODEL_NAME": "M"}
        env.pop("AISANDBOX_WORKERS", None)
        out = subprocess.run(["sh", "-c", _image_cmd()], env=env, capture_output=True, text=True, check=True).stdout
        workers[tp] = out.split("--workers")[1].split()[0]
    assert workers == {1: "4", 2: "1"}
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in (ROOT / "Dockerfile").read_text()


def test_the_rebuild_steps_free_the_gpu_before_building() -> None:
    """The api container holds ~90% of the GPU for its KV cache; calibration loads the 14.5 GB bf16 model."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text[text.index("## 7. Rebuild") : text.index("## 8.")]
    commands = [line.split("#")[0].strip() for line in section.splitlines() if line.startswith("docker compose")]
    build = next(i for i, c in enumerate(commands) if "run --rm build-engine" in c)
    stop = next(i for i, c in enumerate(commands) if c in ("docker compose stop api", "docker compose down"))
    start = next(i for i, c in enumerate(commands) if c.startswith("docker compose up"))
    assert stop < build < start
    compose = (ROOT / "docker-compose.yml").read_text()
    assert compose.index("docker compose stop api") < compose.index("docker compose run --rm build-engine")


def test_setuptools_is_new_enough_for_the_spdx_license_string() -> None:
    """PEP 639 `license = "Apache-2.0"` needs setuptools >= 77; older ones reject the project table."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(data["project"]["license"], str)
    (setuptools,) = [Requirement(r) for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    oldest = min(Version(s.version) for s in setuptools.specifier if s.operator in (">=", "=="))
    assert oldest >= Version("77")
    assert any(r.startswith("kubernetes-validate") for r in data["project"]["optional-dependencies"]["test"])
