"""Classifier stage: the multi-label CNN whose probabilities label the Siamese pairs (paper 3.1)."""

from __future__ import annotations

from typing import Any

from olr_ray.run import Run
from olr_ray.runtime import ResourcePlan
from olr_ray.stages.common import task_args
from olr_ray.train.driver import fit
from olr_ray.train.tasks import ClassifierTask

NAME = "classifier"
REQUIRES = ("data",)


def run(run: Run, plan: ResourcePlan) -> dict[str, Any]:
    c, s, info = run.cfg.classifier, run.cfg.siamese, run.data
    task = ClassifierTask(model_args=dict(num_labels=len(info["label_names"]), image_size=info["image_size"],
                                          width=c.width),
                          weight_decay=c.weight_decay, occlusion_prob=c.occlusion_prob,
                          occlusion_min=s.occlusion_min, occlusion_max=s.occlusion_max,
                          occlusion_fill=s.occlusion_fill, **task_args(run, plan, NAME))
    cols = ["image", "labels"]
    # Validation and test sets are read once and kept in the object store: rank 0 evaluates on
    # them every epoch, and re-reading them cost ~7 s an epoch on the demo.
    datasets = {
        "train": run.read_images(["train"], plan, cols, cache=True),
        "valid": run.read_images([run.eval_split()], plan, cols).materialize(),
        "test": run.read_images(["test"], plan, cols).materialize(),
    }
    res = fit(task, datasets, plan, run.path("checkpoints"), run.cfg.max_failures)
    m = res.metrics
    run.record(NAME, {
        "classifier.test_mean_accuracy": m["test_mean_accuracy"],
        "classifier.test_mean_accuracy_per_label": m["test_mean_accuracy_per_label"],
        "classifier.majority_baseline": m["majority_baseline"],
        "classifier.val_loss": m["val_loss"],
        # On run.eval_split(): valid where the data has one (the stage's manifest names it), else test.
        "classifier.val_mean_accuracy": m["val_mean_accuracy"],
        "classifier.epochs": m["epoch"],
    })
    return {"checkpoint": res.checkpoint_uri, "eval_split": run.eval_split(), "epochs": m["epoch"], "train_samples_last_epoch": m["train_samples"],
            **res.summary}
