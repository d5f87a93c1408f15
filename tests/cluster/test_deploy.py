"""deploy/: every YAML parses, and the fields that make a repair cluster work are set.

Parse tests only: nothing here runs Kubernetes or docker (CI has neither)."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from importlib.metadata import metadata, requires, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import dgrepair
from dgrepair import cluster, engine, kernels
from dgrepair.cli import build_parser, config_from_args
from dgrepair.engine.config import RepairConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted(p.relative_to(DEPLOY).as_posix() for p in (DEPLOY / "kuberay").glob("*.yaml"))
OBJSTORE_JOBS = ("kuberay/rayjob-s3.yaml", "kuberay/rayjob-s3-irsa.yaml")  # RayJobs on object storage, no PVC


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def load_all(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


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


# -- every manifest, the image recipe and the runtime_env --------------------------------------------

def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def documented_image() -> str:
    """The image name deploy/Dockerfile tells the operator to build; the manifests must pull that one."""
    match = re.search(r"docker build -f deploy/Dockerfile -t (\S+) \.", dockerfile())
    assert match, "deploy/Dockerfile must say how to build and tag the image"
    return match[1]


def ray_base_image() -> tuple[str, int, int]:
    """(Ray version, Python major, minor) of the Dockerfile's official Ray base image."""
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile(), re.M)
    assert len(froms) == 1, froms
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", froms[0])
    assert match, f"{froms[0]}: expected the official GPU image rayproject/ray:X.Y.Z-pyXY-gpu (or -cuXYZ)"
    return match[1], int(match[2]), int(match[3])


def ray_pods(doc: dict) -> list[dict]:
    """The pod templates of a RayCluster or RayJob: head, worker groups, and a RayJob's submitter."""
    if doc["kind"] == "RayCluster":
        spec = doc["spec"]
    elif doc["kind"] == "RayJob":
        spec = doc["spec"]["rayClusterSpec"]
    else:
        return []
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    return pods + ([doc["spec"]["submitterPodTemplate"]] if "submitterPodTemplate" in doc["spec"] else [])


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_parses(name):
    docs = load_all(name)
    assert docs and all(isinstance(d, dict) and d["apiVersion"] and d["kind"] and d["metadata"]["name"]
                        for d in docs), name
    for doc in docs:
        if doc["kind"] in ("RayCluster", "RayJob"):
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            assert spec["rayVersion"] == ray_base_image()[0], name  # one Ray version in deploy/
            for pod in ray_pods(doc):
                assert {c["image"] for c in pod["spec"]["containers"]} == {documented_image()}, name


def test_objstore_manifests_are_among_the_parsed_ones():
    assert set(OBJSTORE_JOBS) <= set(MANIFESTS)


def requirement(package: str, dependency: str) -> Requirement:
    reqs = [Requirement(r) for r in requires(package) or []]
    return next(r for r in reqs if r.name == dependency and not r.marker)


def test_dockerfile_builds_on_the_projects_ray_with_the_pinned_cuda_torch():
    text = dockerfile()
    ray_version, py_major, py_minor = ray_base_image()
    assert ray_version in requirement("dgrepair", "ray").specifier  # the Ray the project depends on
    assert f"{py_major}.{py_minor}.0" in SpecifierSet(metadata("dgrepair")["Requires-Python"])
    assert f"ray.__version__ == '{ray_version}'" in text  # the build fails if pip replaced that Ray
    torch_pin = re.search(r'"torch==([^"]+)"', text)[1]
    assert torch_pin == version("torch").split("+")[0]  # the torch the project pins and tests with
    cuda = re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu(\d+)(\d)\b", text)
    assert cuda and f"torch.version.cuda == '{cuda[1]}.{cuda[2]}'" in text  # the CUDA build, checked at build
    image, tag = documented_image().rsplit(":", 1)
    assert image.endswith("/dgrepair") and tag == version("dgrepair")
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:] and "!pyproject.toml" in ignore and "!README.md" in ignore
    for module in (dgrepair, cluster, engine, kernels):
        assert f"!{Path(module.__file__).resolve().parent.name}/" in ignore  # every source folder in the context


def test_runtime_env_for_ray_job_submit():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(DEPLOY / "runtime_env.yaml"))  # as `ray job submit --runtime-env`
    RuntimeEnv(**env)  # Ray's own validation of pip, env_vars and config
    reqs = {r.name: r for r in (Requirement(line) for line in env["pip"] if not line.startswith("-"))}
    assert str(reqs["torch"].specifier) == f"=={version('torch').split('+')[0]}"
    assert "dgrepair" in reqs and str(reqs["dgrepair"].specifier) in ("", f"=={version('dgrepair')}")
    cuda_index = re.search(r"TORCH_INDEX_URL=(\S+)", dockerfile())[1]
    assert f"--extra-index-url {cuda_index}" in env["pip"]  # the same CUDA build as the image
    assert not any(re.search(r"SECRET|ACCESS_KEY|SESSION_TOKEN|PASSWORD|TOKEN$", k) for k in env["env_vars"])
    assert env["config"]["setup_timeout_seconds"] > 600  # Ray's default is too short for CUDA wheels


# -- the RayJobs on object storage ----------------------------------------------------------------------

def entrypoint_argv(job: dict) -> list[str]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["dgrepair", "repair"], argv
    return argv[1:]


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


def parse_entrypoint(argv: list[str]) -> argparse.Namespace:
    """The entry point's command line through dgrepair's own parser: every flag must parse."""
    return build_parser().parse_args(argv)


def inside(uri: str, prefix: str) -> bool:
    return (uri.rstrip("/") + "/").startswith(prefix.rstrip("/") + "/")


def job_doc(name: str) -> tuple[dict, dict[str, dict]]:
    """(the RayJob, the other documents by kind/name) of one manifest file."""
    docs = load_all(name)
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    assert len(jobs) == 1, name
    return jobs[0], {f"{d['kind']}/{d['metadata']['name']}": d for d in docs if d["kind"] != "RayJob"}


def keys_anywhere(node, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            found.add(key)
            keys_anywhere(value, found)
    elif isinstance(node, list):
        for value in node:
            keys_anywhere(value, found)
    return found


def quantity_bytes(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|k)?", q)
    assert match, q
    return float(match[1]) * units.get(match[2] or "", 1)


def bucket_credentials(pod: dict, others: dict[str, dict]) -> str:
    """How a pod gets bucket credentials: 'serviceaccount' (a ServiceAccount defined in the same file) or
    'secret' (envFrom secretRef on every container); never a literal key in the manifest."""
    spec = pod["spec"]
    for container in spec["containers"]:
        for e in container.get("env", []):
            if re.match(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)$", e["name"]):
                assert "value" not in e, e["name"]
    if "serviceAccountName" in spec:
        assert f"ServiceAccount/{spec['serviceAccountName']}" in others
        return "serviceaccount"
    refs = [[s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s] for c in spec["containers"]]
    assert all(refs), "every container needs the bucket Secret (envFrom secretRef) or a serviceAccountName"
    return "secret"


@pytest.mark.parametrize("name", OBJSTORE_JOBS)
def test_objstore_rayjob(name):
    job, others = job_doc(name)
    spec = job["spec"]
    keys = keys_anywhere(job, set())
    assert not keys & {"persistentVolumeClaim", "volumeClaimTemplates", "claimName"}  # no shared volume at all
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1  # each retry: a new cluster
    assert spec["activeDeadlineSeconds"] > 0

    argv = entrypoint_argv(job)
    args = parse_entrypoint(argv)
    assert all(getattr(args, k).startswith("s3://") for k in ("base", "ft", "out"))
    assert not any(inside(args.out, p) or inside(p, args.out) for p in (args.base, args.ft))
    scratch = flag_value(argv, "--scratch")

    cluster = spec["rayClusterSpec"]
    head, (workers,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0" and workers["groupName"] == "gpu"
    head_env = {e["name"]: e.get("value") for e in head["template"]["spec"]["containers"][0]["env"]}
    assert int(head_env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30
    # the driver gets to commit and release the bucket lock before Kubernetes kills the head
    assert head["template"]["spec"]["terminationGracePeriodSeconds"] > int(head_env["RAY_JOB_STOP_WAIT_TIME_S"])
    for pod in (head["template"], workers["template"], spec["submitterPodTemplate"]):
        token_auth(pod)
    ways = {bucket_credentials(p, others) for p in (head["template"], workers["template"])}
    assert len(ways) == 1  # head and workers alike
    submitter = spec["submitterPodTemplate"]["spec"]
    assert "serviceAccountName" not in submitter and not any(c.get("envFrom") for c in submitter["containers"])

    for pod in (head["template"], workers["template"]):  # the scratch folder exists on every node
        pspec = pod["spec"]
        mounts = {m["name"]: m["mountPath"] for c in pspec["containers"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pspec["volumes"]}
        assert mounts["scratch"] == scratch and "medium" not in volumes["scratch"]["emptyDir"]  # node disk, not RAM
        assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    wspec = workers["template"]["spec"]
    gpus = int(wspec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert any(t["key"] == "nvidia.com/gpu" for t in wspec["tolerations"])
    size = quantity_bytes(next(v for v in wspec["volumes"] if v["name"] == "scratch")["emptyDir"]["sizeLimit"])
    assert size >= gpus * 2 * 5e9  # two output shards per worker (one per GPU), HF shards up to 5 GB
    requested = quantity_bytes(wspec["containers"][0]["resources"]["requests"]["ephemeral-storage"])
    assert requested >= size  # scheduled only where the node's disk holds the scratch


def test_the_two_objstore_jobs_use_a_secret_and_a_service_account():
    ways = {}
    for name in OBJSTORE_JOBS:
        job, others = job_doc(name)
        ways[name] = bucket_credentials(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"], others)
    assert sorted(ways.values()) == ["secret", "serviceaccount"]
    _, others = job_doc(OBJSTORE_JOBS[1])
    account = others["ServiceAccount/dgrepair-s3"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


@pytest.mark.parametrize("name", OBJSTORE_JOBS)
def test_objstore_entrypoint_scratch_flag(name):
    job, _ = job_doc(name)
    argv = entrypoint_argv(job)
    assert build_parser().parse_args(argv).scratch == flag_value(argv, "--scratch")


@pytest.mark.parametrize("name", OBJSTORE_JOBS)
def test_objstore_entrypoint_is_a_valid_repair_config(name):
    job, _ = job_doc(name)
    argv = entrypoint_argv(job)
    cfg = config_from_args(parse_entrypoint(argv))
    assert cfg.output.out.startswith("s3://") and cfg.execution.progress_interval_s == 60
    assert cfg.output.scratch == flag_value(argv, "--scratch")
