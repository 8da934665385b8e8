"""Siamese stage: per-label embeddings whose row-wise dot products match the joint probability of
two occluded images (paper 3.2-3.3); pairs are labelled by the classifier on Ray Data."""

from __future__ import annotations

from typing import Any

from olr_ray.run import Run
from olr_ray.runtime import ResourcePlan
from olr_ray.stages.common import task_args
from olr_ray.train.driver import fit
from olr_ray.train.pairs import pair_dataset
from olr_ray.train.tasks import SiameseTask

NAME = "siamese"
REQUIRES = ("data", "classifier")


def run(run: Run, plan: ResourcePlan) -> dict[str, Any]:
    s, info = run.cfg.siamese, run.data
    clf = run.stage("classifier")["checkpoint"]
    task = SiameseTask(model_args=dict(num_labels=len(info["label_names"]), k=s.k, image_size=info["image_size"],
                                       width=s.width, label_kernel=s.label_kernel, activation=s.activation,
                                       floor=s.block_floor),
                       init_trunk_from=clf if s.init_from_classifier else "", grad_floor=s.grad_floor,
                       weight_decay=s.weight_decay, shuffle_buffer=None, **task_args(run, plan, NAME))
    cols = ["uid", "image", "labels"]
    train = run.read_images(["train"], plan, cols, cache=True)
    datasets = {f"pairs_{e}": pair_dataset(train, clf, run.cfg.seed, e, s, plan, precision=run.cfg.precision)
                for e in range(s.epochs)}
    val = run.read_images([run.eval_split()], plan, cols).limit(2 * s.val_pairs)
    # Validation pairs are fixed (epoch -1, no shuffle) so every epoch is measured on the same pairs.
    # Materialised once: re-running the pipeline (and starting a labelling actor) every epoch
    # cost ~10 s an epoch.
    datasets["valid"] = pair_dataset(val, clf, run.cfg.seed, -1, s, plan, shuffle=False,
                                     label_pairs=False, precision=run.cfg.precision).materialize()
    # On GPUs the labelling actors share the training workers' GPUs (plan.labeler_gpu each).
    res = fit(task, datasets, plan, run.path("checkpoints"), run.cfg.max_failures,
              split=[f"pairs_{e}" for e in range(s.epochs)], gpu_per_worker=1.0 - plan.labeler_gpu)
    m = res.metrics
    run.record(NAME, {
        "siamese.val_mse": m["val_loss"],
        "siamese.dot_r2": m["val_dot_r2"],
        "siamese.val_norm_ratio_present_absent": m["val_norm_ratio_present_absent"],
        "siamese.target": s.target,
        "siamese.epochs": m["epoch"],
    })
    return {"checkpoint": res.checkpoint_uri, "eval_split": run.eval_split(), "epochs": m["epoch"], "pairs_last_epoch": m["train_samples"],
            **res.summary}
