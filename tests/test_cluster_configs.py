"""Every file in cluster/ loads, has what a cluster run needs, and carries no secret; the launcher file
passes Ray's own config schema, the RayJob passes KubeRay's CRD schema, and both run the Dockerfile's image."""

import copy
import glob
import json
import os
import re
import shlex

import jsonschema
import pytest
import yaml

import olr_ray.cli as cli
from olr_ray.config import PRESETS

FILES = sorted(glob.glob("cluster/*.yaml"))
SECRET = re.compile(r"(?i)(aws_secret_access_key|aws_access_key_id|aws_session_token|secret_key|password)\s*[:=]")

# KubeRay's RayJob CRD, OpenAPI v3 schema of `ray.io/v1`, vendored from the KubeRay release named in the
# file name: ray-operator/config/crd/bases/ray.io_rayjobs.yaml at tag v1.7.0, spec.versions[name=v1]
# .schema.openAPIV3Schema, with its `description` fields removed to keep the file small (its "$comment"
# names the commit). To move to another KubeRay release, extract the same subtree again.
KUBERAY_VERSION = "v1.7.0"
RAYJOB_SCHEMA = os.path.join(os.path.dirname(__file__), "schemas",
                             f"kuberay-{KUBERAY_VERSION}-ray.io_rayjobs.schema.json")

# GPUs per instance type (AWS) for the types the launcher may use.
GPUS_PER_INSTANCE = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.12xlarge": 4, "g6.xlarge": 1,
                     "g6.2xlarge": 1, "g6.12xlarge": 4, "p4d.24xlarge": 8}
# What a pod may ask for on a named Kubernetes GPU node type: EKS allocatable (instance size less kubelet's
# reservations and eviction threshold, rounded down) less room for the node's daemonsets (CNI, kube-proxy,
# NVIDIA device plugin, CSI node).
NODE_ALLOCATABLE = {"g5.2xlarge": {"cpu": 7.9, "memory": 29 * 2**30, "nvidia.com/gpu": 1}}
DAEMONSET_HEADROOM = {"cpu": 0.5, "memory": 2 * 2**30, "nvidia.com/gpu": 0}
# The home directory in Ray's images (user `ray`), where the launcher's commands run.
CONTAINER_HOME = "/home/ray"

PAPER = PRESETS["paper"]


def _launcher() -> dict:
    return yaml.safe_load(open("cluster/aws-gpu.yaml"))


def _rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(open("cluster/kuberay-rayjob.yaml")) if d]


def _rayjob() -> dict:
    return next(d for d in _rayjob_docs() if d["kind"] == "RayJob")


def _quantity(q) -> float:
    """A Kubernetes resource quantity (1, "7", "500m", "26Gi", "32G") as a number (bytes for memory)."""
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(q))
    assert m, f"not a quantity: {q!r}"
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


def _dockerfile_image_name() -> str:
    """The name the Dockerfile's own build line tags the image with."""
    m = re.search(r"docker build -t (\S+) \.", open("Dockerfile").read())
    assert m, "the Dockerfile should say how it is built and tagged"
    return m.group(1)


def test_all_cluster_files_are_present():
    assert {"cluster/aws-gpu.yaml", "cluster/kuberay-rayjob.yaml", "cluster/runtime_env.yaml"} <= set(FILES)


@pytest.mark.parametrize("path", FILES)
def test_loads_and_has_no_secrets(path):
    text = open(path).read()
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert docs
    assert not SECRET.search(text), f"{path} looks like it holds a credential"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)


def test_launcher_has_gpu_workers_iam_role_and_local_dashboard():
    cfg = _launcher()
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all("IamInstanceProfile" in t["node_config"] for t in types.values())
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "RAY_AUTH_MODE=disabled" not in yaml.safe_dump(cfg)


def test_launcher_passes_rays_own_schema():
    """What `ray up` checks before it calls AWS: ray-schema.json (shipped in the ray package, Ray's
    jsonschema validator) on the file as written and after Ray fills in its defaults."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _launcher()
    validate_config(copy.deepcopy(cfg))
    validate_config(prepare_config(copy.deepcopy(cfg)))
    # The check can fail: a wrong type and an unknown key in `docker:` are both rejected.
    for key, value in [("pull_before_run", "yes"), ("run_option", ["--gpus all"])]:
        bad = copy.deepcopy(cfg)
        bad["docker"][key] = value
        with pytest.raises(jsonschema.ValidationError):
            validate_config(bad)


def test_launcher_runs_the_image_on_current_gpu_hosts():
    cfg = _launcher()
    docker = cfg["docker"]
    assert docker["image"] == _dockerfile_image_name()
    assert docker["container_name"] and docker["pull_before_run"] is True
    assert "--gpus all" in docker.get("worker_run_options", [])
    assert "--gpus all" not in docker.get("run_options", []) + docker.get("head_run_options", [])  # CPU head
    for name, t in cfg["available_node_types"].items():
        ami = t["node_config"]["ImageId"]
        # Ray 2.60's `latest_dlami` is an Ubuntu 18.04 / CUDA 11 image: an explicit current one instead.
        assert ami.lower() != "latest_dlami", name
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                            r"base-oss-nvidia-driver-gpu-ubuntu-2[24]\.04/latest/ami-id", ami), (name, ami)
    # Everything is in the image: nothing installed at setup, no project mounted from the launching machine.
    assert not cfg.get("setup_commands") and not cfg.get("file_mounts")
    assert not re.search(r"pip install|conda install", yaml.safe_dump(cfg))


def test_launcher_hands_the_heads_token_to_workers():
    """The head makes the token; the autoscaler syncs it to each worker (cluster_synced_files) into
    Ray's docker mount folder on the worker's host, which the workers' container mounts and whose token
    the worker setup commands install; every `ray start` enforces token mode."""
    from ray.autoscaler.sdk import get_docker_host_mount_location

    cfg = _launcher()
    head_setup = " ".join(cfg["head_setup_commands"])
    assert "ray get-auth-token --generate" in head_setup
    assert "~/.ray/auth_token" in cfg["cluster_synced_files"]
    token_on_head = os.path.join(CONTAINER_HOME, ".ray", "auth_token")
    synced_dir = get_docker_host_mount_location(cfg["cluster_name"]) + os.path.dirname(token_on_head)
    mounts = [o.split()[1] for o in cfg["docker"]["worker_run_options"] if o.startswith("-v ")]
    mount = next((m for m in mounts if m.split(":")[0] == synced_dir), None)
    assert mount, f"the workers' container should mount {synced_dir} (where the synced token lands)"
    container_dir = mount.split(":")[1]
    assert container_dir.startswith(CONTAINER_HOME)
    worker_setup = " ".join(cfg["worker_setup_commands"])
    container_dir_home = container_dir.replace(CONTAINER_HOME, "~", 1)
    assert re.search(rf"({re.escape(container_dir)}|{re.escape(container_dir_home)})/auth_token\s+~/\.ray/auth_token",
                     worker_setup), worker_setup
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert re.search(r"\bRAY_AUTH_MODE=token ray start\b", cmd), cmd
    # No token is copied from the machine running `ray up`.
    assert not any("auth_token" in k + v for k, v in (cfg.get("file_mounts") or {}).items())


def test_launcher_lets_the_paper_preset_get_its_gpus():
    """`--preset paper` asks for num_workers GPU workers and checks the cluster's GPUs as it starts."""
    assert PAPER["use_gpu"] == "true"
    need = PAPER["num_workers"]
    cfg = _launcher()
    gpu_types = {name: t for name, t in cfg["available_node_types"].items()
                 if GPUS_PER_INSTANCE.get(t["node_config"]["InstanceType"], 0) > 0}
    assert gpu_types
    for name, t in gpu_types.items():
        assert t["resources"].get("GPU") == GPUS_PER_INSTANCE[t["node_config"]["InstanceType"]], name
    reachable = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types.values())
    at_start = sum(t.get("min_workers", 0) * t["resources"]["GPU"] for t in gpu_types.values())
    assert reachable >= need and at_start >= need, (reachable, at_start, need)
    assert cfg["max_workers"] >= sum(t.get("min_workers", 0) for t in gpu_types.values())


def test_rayjob_runs_our_entrypoint_with_valid_options_and_token_auth():
    docs = _rayjob_docs()
    job = next(d for d in docs if d["kind"] == "RayJob")
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        assert group["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"]
               for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/full_pipeline.py"]
    args = cli.parse_args(argv[2:])  # the entrypoint's options are ones the job accepts
    assert args.preset == "paper" and args.data.startswith("s3://") and args.output.startswith("s3://")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert not any(re.search(r"(?i)secret|key|token|password", k) for k in env.get("env_vars", {}))


def _strict(schema):
    """The schema with unknown fields rejected, as the API server's strict field validation (kubectl's
    default) does: every object schema that lists its properties and says nothing else about others."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def test_rayjob_passes_kuberays_crd_schema():
    """The RayJob against the RayJob CRD's OpenAPI v3 schema (Draft 7 reads its structural subset; the
    x-kubernetes-* keywords and CEL rules are not checked), then with unknown fields rejected."""
    schema = json.load(open(RAYJOB_SCHEMA))
    assert KUBERAY_VERSION in schema["$comment"]
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    validator = jsonschema.Draft7Validator(schema)
    strict = jsonschema.Draft7Validator(_strict(schema))
    assert not list(validator.iter_errors(job)), [e.message for e in validator.iter_errors(job)]
    assert not list(strict.iter_errors(job)), [f"{list(e.path)}: {e.message}" for e in strict.iter_errors(job)]
    # The check can fail: a wrong type, a wrong enum value and a misspelled field are each rejected.
    bad_type = copy.deepcopy(job)
    bad_type["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] = "yes"
    assert list(validator.iter_errors(bad_type))
    bad_enum = copy.deepcopy(job)
    bad_enum["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "on"
    assert list(validator.iter_errors(bad_enum))
    misspelled = copy.deepcopy(job)
    misspelled["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert list(strict.iter_errors(misspelled))


def test_rayjob_autoscales_gpu_pods_that_fit_their_node_type():
    job = _rayjob()
    spec = job["spec"]["rayClusterSpec"]
    # min/maxReplicas only act with KubeRay's in-tree autoscaler; idle GPU pods go after a short while.
    assert spec["enableInTreeAutoscaling"] is True
    assert 0 < spec["autoscalerOptions"]["idleTimeoutSeconds"] <= 300
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"].get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    gpus_at_start = 0
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        pod = g["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" and t.get("effect") in (None, "NoSchedule")
                   and (t.get("operator") == "Exists" or "value" in t) for t in pod.get("tolerations", []))
        node_type = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
        assert node_type in NODE_ALLOCATABLE, f"no allocatable recorded for {node_type}"
        room = NODE_ALLOCATABLE[node_type]
        for res in ("requests", "limits"):
            asked = {}
            for c in pod["containers"]:
                for k, v in c["resources"][res].items():
                    asked[k] = asked.get(k, 0) + _quantity(v)
            for k, v in asked.items():
                assert v + DAEMONSET_HEADROOM[k] <= room[k], \
                    f"{g['groupName']} {res} {k}={v} does not fit a {node_type}"
        gpus = sum(_quantity(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in pod["containers"])
        gpus_at_start += g["replicas"] * gpus
        assert g["maxReplicas"] * gpus >= PAPER["num_workers"]
    # The job is submitted once the cluster's pods run: the paper preset finds its GPUs then.
    assert gpus_at_start >= PAPER["num_workers"]


def test_rayjob_runs_the_pinned_image_with_the_code_in_it():
    job = _rayjob()
    spec = job["spec"]["rayClusterSpec"]
    images = {c["image"] for g in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
              for c in g["template"]["spec"]["containers"]}
    assert images == {_dockerfile_image_name()} == {_launcher()["docker"]["image"]}
    (image,) = images
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    assert tag and tag != "latest", image  # the tag pins the code
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"]) or {}
    assert "working_dir" not in env and "archive/" not in job["spec"]["runtimeEnvYAML"]
    assert not {"pip", "uv", "conda"} & set(env), "the image has every dependency"


def test_dockerfile_builds_ray_260_with_torchs_cuda_build_and_the_project():
    from packaging.requirements import Requirement
    from packaging.version import Version

    text = open("Dockerfile").read()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    assert len(froms) == 1 and re.fullmatch(r"rayproject/ray:2\.60\.\d+-py3\d+-(cu\d+|gpu)", froms[0]), froms
    pins = dict(re.findall(r"\b(torch|torchvision)==([0-9][0-9.]*)", text))
    assert pins == {"torch": "2.14.1", "torchvision": "0.29.1"}
    # The CUDA build: PyPI's default wheels, never the CPU index or a +cpu local version.
    assert not re.search(r"download\.pytorch\.org/whl/cpu|\+cpu|--index-url", text)
    # The pins are versions the project accepts.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = [Requirement(d) for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]]
    for req in deps:
        if req.name in pins:
            assert Version(pins[req.name]) in req.specifier, (req, pins[req.name])
    assert "WORKDIR /home/ray/olr_ray" in lines
    assert any(re.fullmatch(r"RUN pip install (--no-cache-dir )?\.( .*)?", ln) for ln in lines)
    assert any(ln.startswith("COPY") and "jobs/" in ln for ln in lines)
    ignored = open(".dockerignore").read().split()
    assert {".venv", ".git", "runs"} <= set(ignored)


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(open("cluster/runtime_env.yaml"))
    RuntimeEnv(**env)  # raises on unknown fields
    assert not any(re.search(r"(?i)secret|key|token|password", k) for k in env.get("env_vars", {}))
    # Nothing installed per job (torch's CUDA wheels are GBs): the code and its dependencies are the image's.
    assert not {"pip", "uv", "conda", "working_dir"} & set(env)
