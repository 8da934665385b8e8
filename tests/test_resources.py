"""How the work is sized from the cluster's nodes: every plan leaves Ray Data room on a node."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from olr_ray.config import UsageError
from olr_ray.runtime import Node, acquire_resources, plan_resources
from tests.raycluster import ray_cluster


def _nodes(*shape: tuple[float, float]) -> list[Node]:
    return [Node(f"n{i}", f"10.0.0.{i}", cpus, gpus) for i, (cpus, gpus) in enumerate(shape)]


def _bundles_per_node(plan, nodes) -> dict[str, int]:
    """Where Ray would put the workers' bundles: one per node under STRICT_SPREAD/SPREAD, packed under PACK."""
    hosts = [n for n in nodes if (n.gpus >= 1 if plan.use_gpu else n.cpus > 0)]
    count = {n.node_id: 0 for n in hosts}
    for i in range(plan.num_workers):
        if plan.placement == "PACK":
            host = next(h for h in hosts if (count[h.node_id] + 1) * plan.cpus_per_worker <= h.cpus
                        and (not plan.use_gpu or count[h.node_id] + 1 <= h.gpus))
        else:
            host = hosts[i % len(hosts)]
        count[host.node_id] += 1
    return count


def test_one_node_keeps_its_plan():
    """On one 2-CPU machine: two workers of a quarter CPU, a thread each, 1.5 CPUs left to Ray Data."""
    plan = plan_resources(2, "auto", _nodes((2, 0)))
    assert (plan.num_workers, plan.use_gpu, plan.cpus_per_worker, plan.threads_per_worker) == (2, False, 0.25, 1)
    assert plan.data_cpus == 1.5 and plan.placement == "PACK" and plan.node_ids == ["n0"]


@pytest.mark.parametrize("shape, workers", [
    (((2, 0), (2, 0)), 2),  # the two-raylet test cluster
    (((2, 0), (2, 0)), 3),
    (((4, 0), (2, 0), (2, 0)), 2),
    (((16, 0), (16, 0), (16, 0), (16, 0)), 4),
    (((0, 0), (8, 0), (8, 0)), 2),  # a head that runs no work (KubeRay's num-cpus 0)
])
def test_several_cpu_nodes_keep_a_whole_cpu_beside_the_workers(shape, workers):
    """The hang this fixes: 1.25-CPU workers on two 2-CPU nodes left 0.75 CPU on each, and Ray Data's
    file listing, which asks for a whole CPU, waited forever."""
    nodes = _nodes(*shape)
    plan = plan_resources(workers, "false", nodes)
    assert plan.placement in ("STRICT_SPREAD", "SPREAD")
    for n in nodes:
        used = _bundles_per_node(plan, nodes).get(n.node_id, 0) * plan.cpus_per_worker
        if n.cpus:
            assert n.cpus - used >= 1.0, (n, plan)
    assert plan.data_cpus >= 1.5


def test_gpu_nodes_pack_workers_and_leave_cpus_for_the_actors():
    """Four 1-GPU nodes and a CPU head: a GPU worker on each GPU node, a CPU left on each, GPU actors share."""
    nodes = _nodes((8, 0), (8, 1), (8, 1), (8, 1), (8, 1))
    plan = plan_resources(4, "true", nodes)
    assert plan.use_gpu and plan.placement == "PACK" and plan.cpus_per_worker <= 7.0
    assert 0 < plan.gpus_per_actor <= 1.0
    assert 0 < plan.labeler_gpu < 1.0  # pair labelling shares the Siamese workers' GPUs


def test_auto_caps_gpu_workers_to_the_cluster_s():
    plan = plan_resources(4, "auto", _nodes((8, 0), (8, 1), (8, 1)))
    assert plan.use_gpu and plan.num_workers == 2


def test_gpus_nobody_can_add_fail_at_once(ray_local):
    """--use-gpu true on a local Ray (no autoscaler): a usage error in seconds, not a wait."""
    t0 = time.time()
    with pytest.raises(UsageError, match=r"needs 2 GPU\(s\).*no autoscaler can add them"):
        acquire_resources(2, "true", wait_s=600)
    assert time.time() - t0 < 20


@pytest.mark.slow
def test_a_gpu_stage_without_cuda_fails_clearly(tmp_path):
    """A head that announces a GPU on a machine without CUDA: the training stage fails naming the problem; it
    never trains on the CPU instead. (The model actors' own check is below.)"""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with ray_cluster(str(tmp_path / "nodes"), gpus=1) as cluster:
        res = subprocess.run([sys.executable, "jobs/full_pipeline.py", "--preset", "smoke", "--use-gpu", "true",
                              "--num-workers", "1", "--output", str(tmp_path / "runs"), "--run-id", "g",
                              "--stages", "data,classifier", "max_failures=0"],
                             cwd=repo, env=cluster.job_env(), capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    # Ray Train sets up NCCL for GPU workers, and NCCL finds no GPU.
    assert "ProcessGroupNCCL is only supported with GPUs, no GPUs found" in out, out[-3000:]
    assert not list((tmp_path / "runs" / "g" / "checkpoints").rglob("*.pt")), "nothing was trained on the CPU"


def test_a_model_actor_given_a_gpu_without_cuda_refuses_to_run_on_the_cpu():
    import torch

    from olr_ray.models.inference import ModelActor

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="given a GPU .* finds no CUDA device here .* will not run on the CPU"):
        ModelActor(use_gpu=True)
