"""Driver side of training: build a ``TorchTrainer`` for a task and run it to completion.

DDP over gloo on CPU and NCCL on GPU comes from Ray Train's ``TorchConfig`` default, so the
same code runs on a laptop and a GPU cluster. Checkpoints go to ``<run>/checkpoints/<stage>``
(local or S3); a re-run with the same run id, or a worker failure, resumes from the last one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from olr_ray import storage
from olr_ray.models import checkpoint_state
from olr_ray.runtime import ResourcePlan
from olr_ray.train.loop import latest_checkpoint_uri, train_func

log = logging.getLogger("olr_ray.train")
CONTROLLER_FAILURE_LIMIT = 3


@dataclass
class FitResult:
    metrics: dict[str, Any]
    checkpoint_uri: str
    """URI of the final ``checkpoint.pt`` (model weights with constructor args)."""
    history: list[dict[str, Any]]

    @property
    def precision(self) -> str:
        """The precision the training workers ran at (``bf16`` or ``fp32``), as rank 0 resolved it."""
        return str(self.metrics.get("precision") or (self.history[-1].get("precision") if self.history else "fp32"))

    @property
    def nodes(self) -> list[str]:
        """The Ray nodes the training workers ran on, over every attempt (a resumed stage adds its new ones)."""
        return sorted({n for h in self.history for n in h.get("nodes", [])})

    @property
    def summary(self) -> dict[str, Any]:
        """What every training stage records in the manifest besides its checkpoint: storage retries, the nodes
        it ran on, its precision and, on a GPU, rank 0's peak GPU memory."""
        out = {"storage_retries": self.storage_retries, "nodes": self.nodes, "precision": self.precision}
        peaks = [h["gpu_peak_mb"] for h in self.history if "gpu_peak_mb" in h]
        if peaks:
            out["gpu_peak_mb"] = round(max(peaks), 1)
        return out

    @property
    def storage_retries(self) -> int:
        """Storage retries of rank 0 over every attempt of the stage, from its checkpoint history.

        Each epoch records its process's running count, which starts again at 0 in a restarted worker,
        so a fall marks a new attempt. Retries after an attempt's last checkpoint were never recorded.
        """
        total = prev = 0
        for h in self.history:
            count = int(h.get("storage_retries", 0))
            total += count - prev if count >= prev else count
            prev = count
        return total


def fit(task, datasets: dict[str, Any], plan: ResourcePlan, checkpoints_uri: str, max_failures: int = 1,
        split: list[str] | None = None, gpu_per_worker: float = 1.0) -> FitResult:
    """Train ``task`` with Ray Train and return its final metrics and checkpoint.

    Args:
        task: a task from :mod:`olr_ray.train.tasks`.
        datasets: Ray Datasets by name; those in ``split`` are sharded across workers, the
            others are read whole by rank 0 for validation.
        plan: workers, CPUs and GPU use.
        checkpoints_uri: ``<run>/checkpoints`` (local path or ``s3://``).
        max_failures: worker failures to recover from (from the last checkpoint).
        gpu_per_worker: each worker's GPU share when the plan uses GPUs (less than 1 where Ray Data actors of the
            same stage share the workers' GPUs).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, path = storage.resolve(checkpoints_uri)
    if not storage.is_s3(checkpoints_uri):
        os.makedirs(path, exist_ok=True)
    resources = {"CPU": plan.cpus_per_worker} if plan.num_workers else None
    if plan.use_gpu and resources is not None:
        resources["GPU"] = gpu_per_worker
    scaling = ray.train.ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                      resources_per_worker=resources, placement_strategy=plan.placement)
    run_config = ray.train.RunConfig(
        name=task.name,
        storage_path=path,
        storage_filesystem=fs,
        # A worker group that cannot be placed (its node is gone) times out (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
        # 60 s) as a controller failure, which Ray Train would retry forever: after a few, fit fails and the
        # pipeline plans the stage again on the nodes left (olr_ray.pipeline).
        failure_config=ray.train.FailureConfig(max_failures=max_failures,
                                               controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
    )
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"task": task},
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=split or ["train"]),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    ckpt_uri = latest_checkpoint_uri(task.checkpoint_dir)
    if ckpt_uri is None:
        raise RuntimeError(f"{task.name}: training finished without a checkpoint under {task.checkpoint_dir}")
    state = checkpoint_state(ckpt_uri)  # its history only: the weights stay on disk
    history = state.get("history", [])
    metrics = dict(result.metrics or (history[-1] if history else {}))
    return FitResult(metrics, ckpt_uri, history)
