"""deploy/kubernetes: every manifest validates offline against Kubernetes' own schemas, and the pieces fit together
(Job output = Deployment engine, GPU counts = the profile's tp_size, probes on /health, grace > drain, HPA on a
gauge /metrics really exports)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from aisandbox.build_engine.profiles import load_profile
from aisandbox.settings import ServerSettings

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"  # the oldest release these manifests target; newer ones accept them too


def _load_all() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


DOCS = _load_all()


def _kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _arg(args: list[str], flag: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    return value


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("kubernetes-validate tried to reach the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, "1.37"])
@pytest.mark.parametrize(("path", "doc"), DOCS, ids=[f"{p.name}:{d['metadata']['name']}" for p, d in DOCS])
def test_every_manifest_validates_offline_and_strictly(
    no_network: None, path: Path, doc: dict[str, Any], version: str
) -> None:
    # strict: unknown fields (a typo such as "terminationGracePeriod") are errors, not silently dropped
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_expected_objects_exist() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in DOCS}
    for gpu_type in ("l4", "h100-sxm", "l4-tp2"):
        assert ("Job", f"aisandbox-build-engine-{gpu_type}") in kinds
        assert ("Deployment", f"aisandbox-{gpu_type}") in kinds
        assert ("HorizontalPodAutoscaler", f"aisandbox-{gpu_type}") in kinds
    assert {("Service", "aisandbox"), ("PodDisruptionBudget", "aisandbox"), ("Secret", "aisandbox-api-key")} <= kinds
    assert ("ConfigMap", "aisandbox-prometheus-adapter-rules") in kinds


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


@pytest.mark.parametrize("deployment", _kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_each_deployment_serves_the_engine_its_job_builds_on_the_same_gpu_type(deployment: dict[str, Any]) -> None:
    gpu_type = deployment["metadata"]["labels"]["aisandbox.dev/gpu-type"]
    (job,) = [j for j in _kind("Job") if j["metadata"]["labels"]["aisandbox.dev/gpu-type"] == gpu_type]
    serve, build = _pod(deployment)["containers"][0], _pod(job)["containers"][0]
    assert _arg(serve["args"], "--engine") == _arg(build["args"], "--output")
    assert _pod(deployment)["nodeSelector"] == _pod(job)["nodeSelector"]
    profile = load_profile(_arg(build["args"], "--gpu"))
    product = _pod(deployment)["nodeSelector"]["nvidia.com/gpu.product"]
    # GPU feature discovery's label is the NVML name with '-' for spaces
    assert profile.matches(product.replace("-", " ")), (product, profile.name)
    for container in (serve, build):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == profile.tp_size
    workers = int(_arg(serve["args"], "--workers"))
    assert workers == 1  # one worker per pod: the GPU(s) of the pod belong to its one engine
    mounts = {m["mountPath"] for m in serve["volumeMounts"]}
    assert "/dev/shm" in mounts  # the executor's MPI workers use shared memory


@pytest.mark.parametrize("deployment", _kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_probes_and_graceful_termination(deployment: dict[str, Any]) -> None:
    pod = _pod(deployment)
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    env = {e["name"]: e for e in container["env"]}
    drain = int(env["AISANDBOX_GRACEFUL_TIMEOUT_S"]["value"])
    assert "graceful_timeout_s" in ServerSettings.model_fields
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 10  # + the engine's own shutdown
    liveness = container["livenessProbe"]
    # a draining pod answers 503 on /health: liveness must not kill it before the drain ends
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain
    key = env["AISANDBOX_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key == {"name": "aisandbox-api-key", "key": "api-key", "optional": True}
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_service_and_pdb_select_every_serving_pod_and_no_build_job() -> None:
    (service,) = _kind("Service")
    (pdb,) = _kind("PodDisruptionBudget")
    for deployment in _kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for job in _kind("Job"):
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert not service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert pdb["spec"]["maxUnavailable"] == 1


def test_hpas_scale_on_the_waiting_gauge_the_server_exports() -> None:
    metrics_source = (ROOT / "aisandbox" / "http" / "metrics.py").read_text()
    assert '"aisandbox_requests_waiting"' in metrics_source
    deployments = {d["metadata"]["name"] for d in _kind("Deployment")}
    for hpa in _kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "aisandbox_requests_waiting"
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    (adapter,) = _kind("ConfigMap")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith("aisandbox_requests_waiting{")
    assert rule["name"]["as"] == "aisandbox_requests_waiting"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    for deployment in _kind("Deployment"):
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/port"] == "8000"


def test_the_offline_validator_catches_mistakes(no_network: None) -> None:
    """Proof that validation is real without a network: a typo and a wrong type are both rejected."""
    (deployment,) = [d for d in _kind("Deployment") if d["metadata"]["name"] == "aisandbox-l4"]
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 75
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong = yaml.safe_load(yaml.safe_dump(deployment))
    wrong["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)
