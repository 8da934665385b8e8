"""Joining or starting Ray, sizing work from the cluster's nodes, waiting for an autoscaler, seeding."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from olr_ray import storage
from olr_ray.config import UsageError

log = logging.getLogger("olr_ray")

# Storage settings that are not secrets: a job hands them to every Ray worker it starts, on every node, so
# workers on another node reach the same S3 endpoint as the driver. Credentials are never passed on: each
# node's own (an instance or pod role, or its environment) are used.
STORAGE_SETTINGS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                    "OLR_S3_MAX_ATTEMPTS", "AWS_EC2_METADATA_DISABLED")


# The GPU share of a pair-labelling actor: the classifier it runs is small next to the Siamese network.
LABELER_GPU_SHARE = 0.25

# Ray Data settings this project sets unless the user has. Ray Data 2.60 reads every Parquet dataset's footers in
# a pool of 32 actors (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS), each started as its own worker process and each
# needing a whole free CPU to be placed. On two 2-CPU nodes, the decoder's read started 32 of them at once, they
# kept dying at startup and the read never finished (the job hung with "Pending Demands: {'CPU': 1.0}: 16+").
# The prepared data and the embeddings are a few files per split: 4 readers are plenty.
RAY_DATA_DEFAULTS = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "4"}


def _job_env_vars() -> dict[str, str]:
    """Environment variables the submitted job's runtime env already sets (``ray job submit --runtime-env``)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    try:
        cfg = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}"))
        return dict((cfg.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


def storage_env() -> dict[str, str]:
    """The non-secret storage settings of this process that every worker of the job should see."""
    taken = _job_env_vars()
    return {k: os.environ[k] for k in STORAGE_SETTINGS if os.environ.get(k) and k not in taken}


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (or the one ``ray job submit`` runs under); else start one here.

    A joined cluster's workers get this process' storage settings (:data:`STORAGE_SETTINGS`, never
    credentials) through the job's runtime env, so a worker on another node writes where the driver does.

    A local Ray binds its dashboard to 127.0.0.1 (the next free port from 8265) and keeps Ray's
    token authentication on. The dashboard also serves the state API, which Ray Train 2.60's
    placement-group cleaner asks once a second whether the train controller is alive: without
    it the cleaner cannot do its job and warns at every try (1,114 warnings in one demo run).
    It costs about 7 s on the smoke preset (142 s against 135 s).

    Ray Data's progress bars are drawn only when stdout is a terminal: in a job log they are
    thousands of lines; the stages say each step in one line instead. ``RAY_DATA_DISABLE_PROGRESS_BARS``
    set by the user wins.
    """
    import ray

    if ray.is_initialized():
        return
    bars = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0" if sys.stdout.isatty() else "1")
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = bars  # inherited by a local Ray's workers
    for k, v in RAY_DATA_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if os.environ.get("RAY_ADDRESS"):
        env = {**storage_env(), "RAY_DATA_DISABLE_PROGRESS_BARS": bars,
               **{k: os.environ[k] for k in RAY_DATA_DEFAULTS}}
        env = {k: v for k, v in env.items() if k not in _job_env_vars()}
        ray.init(log_to_driver=True, runtime_env={"env_vars": env} if env else None)
        if env:
            log.info("ray: workers get this job's settings: %s", ", ".join(sorted(env)))
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = bars == "0"  # travels with each dataset
    nodes = cluster_nodes()
    log.info("ray: %d node(s), %g CPUs, %g GPUs", len(nodes), sum(n.cpus for n in nodes),
             sum(n.gpus for n in nodes))


@dataclass(frozen=True)
class Node:
    """One alive Ray node and its logical resources."""

    node_id: str
    ip: str
    cpus: float
    gpus: float


def cluster_nodes() -> list[Node]:
    """The cluster's alive nodes."""
    import ray

    return [Node(n["NodeID"], n.get("NodeManagerAddress", ""), float(n.get("Resources", {}).get("CPU", 0)),
                 float(n.get("Resources", {}).get("GPU", 0)))
            for n in ray.nodes() if n.get("Alive")]


@dataclass
class ResourcePlan:
    """How a stage splits the cluster between Ray Train workers and Ray Data tasks/actors."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    threads_per_worker: int
    data_cpus: float
    """CPUs left for Ray Data while training runs."""
    task_cpus: float
    """CPUs requested by each Ray Data task and actor (fractional on small machines)."""
    actors: int
    """Size of inference actor pools."""
    placement: str = "PACK"
    """Ray Train's placement strategy: one worker per node (``STRICT_SPREAD``) on a cluster of several CPU
    nodes with a node for each worker, ``SPREAD`` when there are more workers than nodes, else ``PACK``."""
    gpus_per_actor: float = 0.0
    """GPU share of each model actor (pair labelling, embedding, the analysis' judges) when the job has GPUs."""
    labeler_gpu: float = 0.0
    """GPU share of each pair-labelling actor, which runs beside the Siamese training: its workers take the rest of
    their GPUs (1 - labeler_gpu each), one labelling actor shares each worker's GPU."""
    node_ids: list[str] = field(default_factory=list)
    """The nodes the plan was made for: a stage that fails after one of them is lost is planned again."""
    actor_nodes: int = 1
    """Nodes that can hold a model actor (those with GPUs when the plan uses them): embedding starts one on each."""


def plan_resources(num_workers: int, use_gpu: str | bool = "auto", nodes: list[Node] | None = None) -> ResourcePlan:
    """Size training workers and data actors from the cluster's nodes.

    On a 2-CPU machine an actor pool or a trainer that takes every CPU starves Ray Data's
    read tasks and the job hangs. Ray Data 2.60's file-listing task (``ListFiles``) always
    asks for a whole CPU and shuffles and actor pools need room beside it, so training leaves
    at least 1.5 CPUs to Ray Data; Ray Data's own tasks and actors ask for fractional CPUs on
    small machines.

    That room must be on one node, not scattered: on two 2-CPU nodes, two workers of 1.25 CPUs each
    land one per node and leave 0.75 on each, and a read that asks for a whole CPU waits forever. On
    several nodes every worker's node keeps at least one whole CPU for Ray Data beside its workers.
    """
    if nodes is None:
        nodes = cluster_nodes()
    nodes = [n for n in nodes if n.cpus > 0 or n.gpus > 0]
    cpus = float(sum(n.cpus for n in nodes)) or float(os.cpu_count() or 1)
    gpus = float(sum(n.gpus for n in nodes))
    gpu = (gpus >= 1) if use_gpu == "auto" else (use_gpu in (True, "true"))
    if gpu and use_gpu == "auto" and num_workers > gpus:
        log.info("use_gpu=auto: the cluster has %g GPU(s), so %d training worker(s) instead of %d",
                 gpus, int(gpus), num_workers)
        num_workers = int(gpus)
    if gpu and gpus < max(1, num_workers):
        raise UsageError(f"--use-gpu true needs {max(1, num_workers)} GPU(s) for {num_workers} training worker(s); "
                         f"the cluster has {gpus:g}: add GPU nodes, lower --num-workers, or use --use-gpu auto")
    reserve = max(1.5, cpus * 0.25)
    placement = "PACK"
    if num_workers == 0:
        per_worker, threads = 0.0, max(1, int(cpus))
    else:
        per_worker = max(0.25, min(8.0, (cpus - reserve) / num_workers))
        hosts = [n for n in nodes if (n.gpus >= 1 if gpu else n.cpus > 0)]
        if len(hosts) > 1:
            if gpu:  # GPU workers pack (NCCL within a node); a node holds at most its GPUs' worth
                per_node = max(1, min(num_workers, int(max(h.gpus for h in hosts))))
            else:
                per_node = math.ceil(num_workers / len(hosts))
                placement = "STRICT_SPREAD" if num_workers <= len(hosts) else "SPREAD"
            node_cpus = min(h.cpus for h in hosts)
            per_worker = max(0.25, min(per_worker, (node_cpus - 1.0) / per_node))
        else:
            node_cpus, per_node = cpus, num_workers
        threads = max(1, int(round(node_cpus / per_node))) if node_cpus <= 4 else max(1, int(per_worker))
    data_cpus = cpus - per_worker * num_workers
    task_cpus = 0.25 if cpus <= 8 else 1.0
    actors = max(1, min(8, int(data_cpus / max(task_cpus, 0.5))))
    if gpu:  # the inference models are small: several actors share a GPU
        actors = max(actors, min(8, 2 * int(gpus)))
    gpus_per_actor = round(min(1.0, max(0.1, gpus / actors)) if gpu else 0.0, 2) if gpu else 0.0
    return ResourcePlan(num_workers, gpu, per_worker, threads, data_cpus, task_cpus, actors, placement,
                        gpus_per_actor, LABELER_GPU_SHARE if gpu else 0.0, [n.node_id for n in nodes],
                        max(1, sum(1 for n in nodes if (n.gpus >= 1 if gpu else n.cpus >= task_cpus))))


def autoscaler_running() -> bool:
    """Whether the cluster has an autoscaler that could add nodes.

    Autoscaler v2 reports a state version above 0. Every v1 head runs a monitor that reports a status, but
    on a cluster started without an autoscaling config (``ray start``, a local Ray) its read-only node
    provider names each node's type after the node itself (``node_<id>``); a real provider uses the config's
    node type names.
    """
    import ray

    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
        if str(status.stats.autoscaler_version or "0") not in ("", "0", "None"):
            return True
    except Exception:  # noqa: BLE001 - an API that moved says nothing either way
        pass
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        types = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {} if raw else {}
        return any(t != f"node_{n}" for n, t in types.items())
    except Exception:  # noqa: BLE001
        return False


def acquire_resources(num_workers: int, use_gpu: str | bool, wait_s: float,
                      progress: Callable[[str], None] = print, poll_s: float = 5.0) -> ResourcePlan:
    """The plan for the cluster as it is, or, when it lacks the GPUs ``use_gpu=true`` needs and an autoscaler
    could add them, the plan once they have come: asks the autoscaler for them
    (``ray.autoscaler.sdk.request_resources``) and waits up to ``wait_s``, saying every 30 s what it waits for.
    A request no cluster here can meet is a :class:`UsageError` at once (no autoscaler) or after ``wait_s``.
    """
    try:
        return plan_resources(num_workers, use_gpu)
    except UsageError as exc:
        if wait_s <= 0 or not autoscaler_running():
            raise UsageError(f"{exc} (no autoscaler can add them)" if wait_s > 0 else str(exc)) from None
    from ray.autoscaler.sdk import request_resources

    need = max(1, num_workers)
    request_resources(bundles=[{"GPU": 1}] * need)
    t0 = last = time.time()
    progress(f"asked the autoscaler for {need} GPU(s); waiting up to {wait_s:.0f}s (resources.wait_s)")
    while True:
        time.sleep(poll_s)
        try:
            return plan_resources(num_workers, use_gpu)
        except UsageError:
            pass
        now = time.time()
        have = sum(n.gpus for n in cluster_nodes())
        if now - t0 >= wait_s:
            request_resources(bundles=[])
            raise UsageError(f"--use-gpu true needs {need} GPU(s); the cluster had {have:g} after waiting "
                             f"{wait_s:.0f}s for the autoscaler: check its node types and limits "
                             f"(`ray status`), or lower --num-workers")
        if now - last >= 30:
            last = now
            progress(f"waiting for {need} GPU(s): the cluster has {have:g} ({now - t0:.0f}s of {wait_s:.0f}s)")


def check_shared_output(uri: str, nodes: list[Node] | None = None) -> None:
    """On a cluster of several nodes, a local ``--output`` must be one folder every node sees (NFS, EFS, ...):
    a marker written here is read by a task pinned to each node. Any node that cannot read it is a
    :class:`UsageError` naming it. ``s3://`` and one-node clusters pass without a check."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = cluster_nodes() if nodes is None else nodes
    if storage.is_s3(uri) or len(nodes) < 2:
        return
    _, path = storage.resolve(uri)
    created = not os.path.exists(path)
    os.makedirs(path, exist_ok=True)
    token = uuid.uuid4().hex
    marker = os.path.join(path, f".olr-shared-{token[:12]}")
    with open(marker, "w") as f:
        f.write(token)

    def _sees(p: str, t: str) -> bool:
        try:
            with open(p) as fh:
                return fh.read() == t
        except OSError:
            return False

    probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
    try:
        refs = {n: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote(
            marker, token) for n in nodes}
        blind = [n for n, ref in refs.items() if not ray.get(ref, timeout=120)]
    finally:
        os.remove(marker)
    if blind and created:
        os.rmdir(path)  # nothing of a refused run is left behind
    if blind:
        shown = ", ".join(f"{n.ip} ({n.node_id[:8]})" for n in blind)
        raise UsageError(f"--output {uri}: a local folder that {len(blind)} of the cluster's {len(nodes)} nodes "
                         f"cannot see ({shown}); use s3://bucket/prefix or a folder shared by every node")


def node_id() -> str:
    """The Ray node this process runs on ('' outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001
        return ""


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; each rank gets its own stream."""
    import torch

    s = (seed * 1_000_003 + rank) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
