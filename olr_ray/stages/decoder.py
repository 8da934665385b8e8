"""Decoder stage: learn to reconstruct the image from its committed embedding (paper 4.4, Table 1).

Training streams from the embedding Parquet: the committed embeddings of the training split
are joined on ``uid`` with the prepared images by Ray Data (a hash join), so the decoder sees
exactly what analysts read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from olr_ray import storage
from olr_ray.analysis.metrics import fit_label_gaussians
from olr_ray.embeddings import MANIFEST, load_embeddings
from olr_ray.run import Run
from olr_ray.runtime import ResourcePlan
from olr_ray.stages.common import task_args
from olr_ray.train.driver import fit
from olr_ray.train.tasks import DecoderTask

NAME = "decoder"
REQUIRES = ("data", "classifier", "siamese", "embed")


def _dense(column: np.ndarray) -> np.ndarray:
    """A list column as one 2-D array (Ray hands variable-size lists over as an object array)."""
    return np.stack(column) if column.dtype == object else column


def _stack_embedding(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"embedding": _dense(batch["embedding"]).astype(np.float32),
            "labels": _dense(batch["labels"]).astype(np.int8), "image": batch["image"]}


def embedding_image_pairs(run: Run, plan: ResourcePlan, split: str, limit: int | None = None):
    """Ray Dataset of (embedding, labels, image) for one split, joined on uid from the committed Parquet."""
    import ray

    manifest = storage.read_json(run.path("embeddings", MANIFEST))
    fs, _ = storage.resolve(run.uri)
    files = [storage.resolve(run.path("embeddings", f["path"]))[1] for f in manifest["files"]]
    emb = ray.data.read_parquet(files, filesystem=fs, num_cpus=plan.task_cpus).select_columns(
        ["uid", "split", "labels", "embedding"])
    emb = emb.filter(lambda r: r["split"] == split)
    img = run.read_images([split], plan, ["uid", "image"])
    if limit:
        emb = emb.limit(limit)
    joined = emb.join(img, join_type="inner", num_partitions=max(2, plan.actors), on=("uid",),
                      aggregator_ray_remote_args={"num_cpus": plan.task_cpus})
    return joined.map_batches(_stack_embedding, batch_format="numpy", num_cpus=plan.task_cpus)


def edit_distributions(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Per-label Gaussians of the training embeddings, as the analysis fits them for editing:
    (L, k) means and (L, k, k) Cholesky factors, zeros for a label no training image has."""
    train = load_embeddings(run.path("embeddings"), columns=["labels", "embedding"], split="train")
    g = fit_label_gaussians(train.E, train.labels)
    chol = np.zeros_like(g["cov"])
    for l in np.flatnonzero(~g["empty"]):
        chol[l] = np.linalg.cholesky(g["cov"][l])
    return g["mean"].astype(np.float32), chol.astype(np.float32)


def run(run: Run, plan: ResourcePlan) -> dict[str, Any]:
    d, info = run.cfg.decoder, run.data
    task = DecoderTask(
        model_args=dict(num_labels=len(info["label_names"]), k=run.cfg.siamese.k, image_size=info["image_size"],
                        width=d.width, channels=d.channels),
        optimizer=d.optimizer, alpha=d.alpha, label_weight=d.label_weight,
        classifier_uri=run.stage("classifier")["checkpoint"], edit_weight=d.edit_weight,
        siamese_uri=run.stage("siamese")["checkpoint"], **task_args(run, plan, NAME))
    if d.edit_weight > 0:
        task.edit_mean, task.edit_chol = edit_distributions(run)
    datasets = {
        # Joined once and kept in the object store: re-joining every epoch costs more than the epoch.
        "train": embedding_image_pairs(run, plan, "train").materialize(),
        "valid": embedding_image_pairs(run, plan, run.eval_split(), limit=512).materialize(),
    }
    res = fit(task, datasets, plan, run.path("checkpoints"), run.cfg.max_failures)
    m = res.metrics
    run.record(NAME, {"decoder.val_loss": m["val_loss"], "decoder.val_ssim": m["val_ssim"],
                      "decoder.val_psnr": m["val_psnr"], "decoder.epochs": m["epoch"],
                      "decoder.val_label_accuracy": m.get("val_label_accuracy", float("nan"))})
    return {"checkpoint": res.checkpoint_uri, "epochs": m["epoch"], "storage_retries": res.storage_retries,
            "precision": res.precision}
