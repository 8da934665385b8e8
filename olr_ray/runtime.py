"""Joining or starting Ray, sizing work from the cluster's resources, seeding."""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass

import numpy as np

from olr_ray.config import UsageError

log = logging.getLogger("olr_ray")


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (or the one ``ray job submit`` runs under); else start one here.

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
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = bars == "0"  # travels with each dataset
    log.info("ray: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))


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


def plan_resources(num_workers: int, use_gpu: str | bool = "auto") -> ResourcePlan:
    """Size training workers and data actors from what the cluster has.

    On a 2-CPU machine an actor pool or a trainer that takes every CPU starves Ray Data's
    read tasks and the job hangs. Ray Data 2.60's file-listing task (``ListFiles``) always
    asks for a whole CPU and shuffles and actor pools need room beside it, so training leaves
    at least 1.5 CPUs to Ray Data; Ray Data's own tasks
    and actors ask for fractional CPUs on small machines.
    """
    import ray

    res = ray.cluster_resources()
    cpus = float(res.get("CPU", os.cpu_count() or 1))
    gpus = float(res.get("GPU", 0))
    gpu = (gpus >= 1) if use_gpu == "auto" else (use_gpu in (True, "true"))
    if gpu and use_gpu == "auto" and num_workers > gpus:
        log.info("use_gpu=auto: the cluster has %g GPU(s), so %d training worker(s) instead of %d",
                 gpus, int(gpus), num_workers)
        num_workers = int(gpus)
    if gpu and gpus < max(1, num_workers):
        raise UsageError(f"--use-gpu true needs {max(1, num_workers)} GPU(s) for {num_workers} training worker(s); "
                         f"the cluster has {gpus:g}: add GPU nodes, lower --num-workers, or use --use-gpu auto")
    reserve = max(1.5, cpus * 0.25)
    if num_workers == 0:
        per_worker, threads = 0.0, max(1, int(cpus))
    else:
        per_worker = max(0.25, min(8.0, (cpus - reserve) / num_workers))
        threads = max(1, int(round(cpus / num_workers))) if cpus <= 4 else max(1, int(per_worker))
    data_cpus = cpus - per_worker * num_workers
    task_cpus = 0.25 if cpus <= 8 else 1.0
    actors = max(1, min(8, int(data_cpus / max(task_cpus, 0.5))))
    return ResourcePlan(num_workers, gpu, per_worker, threads, data_cpus, task_cpus, actors)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; each rank gets its own stream."""
    import torch

    s = (seed * 1_000_003 + rank) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
