"""deploy/: every YAML parses, and the fields that make a repair cluster work are set."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from dgrepair.engine.config import RepairConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def pod_spec_checks(template: dict, gpu: bool) -> None:
    spec = template["spec"]
    mounts = {m["name"]: m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["checkpoints"] == "/mnt/checkpoints"  # the same path on head and workers
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "persistentVolumeClaim" in volumes["checkpoints"]
    limits = spec["containers"][0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == gpu


def token_auth(template: dict) -> None:
    """Ray's token authentication on every container: RAY_AUTH_MODE=token, the token from one Secret."""
    for container in template["spec"]["containers"]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "dgrepair-ray-auth", "key": "token"}, container["name"]
        assert "value" not in env["RAY_AUTH_TOKEN"]  # never a literal token in a manifest


def check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the driver runs on the head; no work there
    pod_spec_checks(head["template"], gpu=False)
    env = {e["name"]: e.get("value") for e in head["template"]["spec"]["containers"][0]["env"]}
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30  # time to commit the manifest on `ray job stop`
    token_auth(head["template"])
    workers = spec["workerGroupSpecs"]
    assert len(workers) == 1 and workers[0]["groupName"] == "gpu"
    pod_spec_checks(workers[0]["template"], gpu=True)
    token_auth(workers[0]["template"])
    assert any(t["key"] == "nvidia.com/gpu" for t in workers[0]["template"]["spec"]["tolerations"])


def test_raycluster():
    doc = load("kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster_spec(doc["spec"])


def test_rayjob():
    doc = load("kuberay/rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m dgrepair.cluster.job --config /mnt/checkpoints/")
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0
    check_cluster_spec(spec["rayClusterSpec"])
    token_auth(spec["submitterPodTemplate"])  # `ray job submit` in the submitter pod needs the token too


def test_nightly_cronjob_creates_a_dated_rayjob():
    doc = load("kuberay/cronjob.yaml")
    assert doc["kind"] == "CronJob" and doc["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(doc["spec"]["schedule"].split()) == 5
    container = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container["args"])
    assert "kubectl create -f -" in script and "date -u +%Y%m%d" in script


def test_example_config_is_a_valid_repair_config():
    cfg = RepairConfig.from_mapping(load("repair.example.yaml"), "repair.example.yaml")
    assert cfg.output.out and cfg.cluster.workers == 0 and cfg.execution.kernel == "auto"


def test_nightly_submit_script_is_valid_bash_and_uses_fresh_submission_ids():
    script = DEPLOY / "nightly-submit.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "--submission-id" in text and "python -m dgrepair.cluster.job --config" in text
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode != 0 and "usage" in usage.stderr
