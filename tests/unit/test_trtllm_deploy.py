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
