"""Every file in cluster/ loads, has what a cluster run needs, and carries no secret."""

import glob
import re
import shlex

import pytest
import yaml

import olr_ray.cli as cli

FILES = sorted(glob.glob("cluster/*.yaml"))
SECRET = re.compile(r"(?i)(aws_secret_access_key|aws_access_key_id|aws_session_token|secret_key|password)\s*[:=]")


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
    cfg = yaml.safe_load(open("cluster/aws-gpu.yaml"))
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all("IamInstanceProfile" in t["node_config"] for t in types.values())
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "RAY_AUTH_MODE=disabled" not in yaml.safe_dump(cfg)


def test_rayjob_runs_our_entrypoint_with_valid_options_and_token_auth():
    docs = [d for d in yaml.safe_load_all(open("cluster/kuberay-rayjob.yaml")) if d]
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


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(open("cluster/runtime_env.yaml"))
    RuntimeEnv(**env)  # raises on unknown fields
    assert not any(re.search(r"(?i)secret|key|token|password", k) for k in env.get("env_vars", {}))
