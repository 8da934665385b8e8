"""What the training stages share: the task arguments every stage config sets alike."""

from __future__ import annotations

from typing import Any

from olr_ray.run import Run
from olr_ray.runtime import ResourcePlan


def task_args(run: Run, plan: ResourcePlan, stage: str) -> dict[str, Any]:
    """Arguments of every :class:`olr_ray.train.tasks.BaseTask`, from the stage's config section."""
    c = getattr(run.cfg, stage)
    return dict(name=stage, model_name=stage, label_names=run.data["label_names"], epochs=c.epochs,
                batch_size=c.batch_size, lr=c.lr, seed=run.cfg.seed, threads=plan.threads_per_worker,
                lr_schedule=c.lr_schedule, precision=run.cfg.precision, checkpoint_dir=run.path("checkpoints", stage))
