"""The deployment files: cluster.yaml through Ray's own cluster-launcher validator, and the KubeRay manifests
(deploy/rayjob.yaml, deploy/raycronjob.yaml) for the fields KubeRay requires. Versions are checked against
pyproject.toml so that a bump there cannot leave a stale pin here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster.yaml"
RAYJOB = REPO / "deploy" / "rayjob.yaml"
RAYCRONJOB = REPO / "deploy" / "raycronjob.yaml"
TORCH_PIN = "torch==2.13.0"
# what a credential looks like in a config file: AWS key ids, secret keys, tokens, passwords
SECRET = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|AWS_SECRET|AWS_ACCESS_KEY|"
                    r"RAY_AUTH_TOKEN\s*[:=]|password\s*[:=]|secretKeyRef|ssh_private_key", re.IGNORECASE)


def project_ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d.replace(" ", "")))]
    assert len(pins) == 1, deps
    return pins[0]


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("path", [CLUSTER, RAYJOB, RAYCRONJOB], ids=lambda p: p.name)
def test_no_credentials_in_deployment_files(path: Path) -> None:
    assert not SECRET.search(path.read_text()), f"{path.name} looks like it holds a credential"


def test_cluster_yaml_passes_rays_validator_with_the_pools_we_need() -> None:
    config = prepare_config(load(CLUSTER))
    validate_config(config)  # raises on anything Ray's launcher would refuse
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    gpu = [t for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    cpu = [t for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1  # the autoscaling DR2 pool
    assert cpu and all(t["resources"].get("CPU", 0) > 0 for t in cpu)  # decode/detect/encode
    assert config["max_workers"] >= sum(t["max_workers"] for t in [*gpu, *cpu])


def test_cluster_yaml_pins_ray_and_torch_and_installs_this_package() -> None:
    config = load(CLUSTER)
    version = project_ray_version()
    assert version == ray.__version__ == "2.60.0"
    setup = "\n".join(config["setup_commands"])
    assert f'"ray[data,default]=={version}"' in setup and TORCH_PIN in setup
    assert "--no-deps facenet-pytorch==2.6.0" in setup
    assert re.search(r"pip install -q ~/dr2-pipeline\b", setup)
    assert "/home/ubuntu/dr2-pipeline" in config["file_mounts"]
    assert setup.index(TORCH_PIN) < setup.index("~/dr2-pipeline")  # torch first: the project cannot pull another
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start and "--num-cpus=0" in head_start


def check_ray_job_spec(spec: dict[str, Any], command: str) -> None:
    """The RayJob fields KubeRay needs, and ours: a dr2 entrypoint, the cluster deleted after the job, the pinned
    Ray, images and resources on every container, a GPU group that scales from zero."""
    assert spec["entrypoint"].split()[:2] == ["dr2", command]
    assert spec["shutdownAfterJobFinishes"] is True and int(spec["ttlSecondsAfterFinished"]) >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == project_ray_version()
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay: map[string]string
        containers = group["template"]["spec"]["containers"]
        assert containers
        for c in containers:
            assert c["name"] and c["image"]
            assert c["resources"]["requests"] and c["resources"]["limits"]
    workers = cluster["workerGroupSpecs"]
    assert len({w["groupName"] for w in workers}) == len(workers)
    for w in workers:
        assert 0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
    gpu = [w for w in workers if "nvidia.com/gpu" in w["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu) == 1 and gpu[0]["minReplicas"] == 0
    cpu = [w for w in workers if w not in gpu]
    assert cpu, "a CPU group for decode/detect/encode"


def test_rayjob_runs_dr2_restore() -> None:
    job = load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    check_ray_job_spec(job["spec"], "restore")


def test_raycronjob_schedules_the_nightly_run_and_says_it_is_alpha() -> None:
    text = RAYCRONJOB.read_text()
    cron = load(RAYCRONJOB)
    assert cron["apiVersion"] == "ray.io/v1" and cron["kind"] == "RayCronJob" and cron["metadata"]["name"]
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,\-]+", f) for f in fields)
    template = cron["spec"]["jobTemplate"]
    check_ray_job_spec(template, "nightly")
    assert "--state s3://" in template["entrypoint"]
    assert "ALPHA" in text and "KubeRay >= 1.6" in text and "RayCronJob` feature gate" in text
