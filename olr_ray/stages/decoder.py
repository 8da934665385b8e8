"""Decoder stage: learn to reconstruct the image from its committed embedding (paper 4.4, Table 1).

Training streams the prepared images, each given its committed embedding by ``uid`` from the
embedding Parquet, so the decoder sees exactly what analysts read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from olr_ray.analysis.metrics import fit_label_gaussians
from olr_ray.embeddings import Embeddings, find_rows, load_embeddings
from olr_ray.run import Run
from olr_ray.runtime import ResourcePlan
from olr_ray.stages.common import task_args
from olr_ray.train.driver import fit
from olr_ray.train.tasks import DecoderTask

NAME = "decoder"
REQUIRES = ("data", "classifier", "siamese", "embed")


_TABLES: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _attach_embeddings(batch: dict[str, np.ndarray], table) -> dict[str, np.ndarray]:
    """Each image's committed embedding and labels, found by uid in ``table`` (an object ref to uid-sorted
    arrays, fetched once per worker process)."""
    import ray

    if table.hex() not in _TABLES:
        _TABLES.clear()
        _TABLES[table.hex()] = ray.get(table)
    uids, E, labels = _TABLES[table.hex()]
    at = find_rows(uids, batch["uid"])
    return {"uid": batch["uid"], "embedding": E[at], "labels": labels[at], "image": batch["image"]}


def split_embeddings(run: Run, split: str) -> Embeddings:
    """The committed embeddings and labels of one split, uid-sorted."""
    return load_embeddings(run.path("embeddings"), columns=["labels", "embedding"], split=split)


def embedding_image_pairs(run: Run, plan: ResourcePlan, split: str, limit: int | None = None,
                          emb: Embeddings | None = None):
    """Ray Dataset of (embedding, labels, image) for one split: the prepared images, each given its committed
    embedding by uid.

    The split's embeddings (``emb``, read here when not given; N x L x k float32: 92 MB on the demo, about
    1 GB for CelebA's train split) go into the object store once and every task looks its rows up there; a
    Ray Data hash join of the two took 28 s on the demo against a 130 s epoch.
    """
    import ray
    from ray.data.expressions import col

    emb = emb if emb is not None else split_embeddings(run, split)
    uids, E, labels = emb.uids, emb.E.reshape(len(emb), -1), emb.labels
    img = run.read_images([split], plan, ["uid", "image"])
    if limit:
        # Only the first ``limit`` rows (by uid), and only their images are read into the pipeline.
        uids, E, labels = uids[:limit], E[:limit], labels[:limit]
        img = img.filter(expr=col("uid").is_in(uids.tolist()))
    table = ray.put((uids, np.ascontiguousarray(E, dtype=np.float32), labels.astype(np.int8)))
    return img.map_batches(_attach_embeddings, fn_kwargs={"table": table}, batch_format="numpy",
                           num_cpus=plan.task_cpus)


def edit_distributions(train: Embeddings) -> tuple[np.ndarray, np.ndarray]:
    """Per-label Gaussians of the training embeddings over every image with the label (the paper's rule;
    the analysis may fit its own on the confirmed images only, ``analysis.edit_gaussians``): (L, k) means and
    (L, k, k) Cholesky factors, zeros for a label no training image has."""
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
        siamese_uri=run.stage("siamese")["checkpoint"], edit_warmup=d.edit_warmup, **task_args(run, plan, NAME))
    train = split_embeddings(run, "train")  # read once: for the edit Gaussians and the training pairs
    task.train_rows = len(train)
    if d.edit_weight > 0:
        task.edit_mean, task.edit_chol = edit_distributions(train)
    # Paired once and kept in the object store where that takes at most its cache share (pairing every epoch
    # re-reads the images each time); larger splits (CelebA's: about 19 GB at 178 px) pair again every epoch.
    row_bytes = 3 * info["image_size"] ** 2 + 4 * train.E[0].size + train.labels.shape[1] + 64
    datasets = {
        "train": run.cache(embedding_image_pairs(run, plan, "train", emb=train), len(train), row_bytes,
                           "decoder pairs (train)"),
        "valid": embedding_image_pairs(run, plan, run.eval_split(), limit=512).materialize(),
    }
    res = fit(task, datasets, plan, run.path("checkpoints"), run.cfg.max_failures)
    m = res.metrics
    run.record(NAME, {"decoder.val_loss": m["val_loss"], "decoder.val_ssim": m["val_ssim"],
                      "decoder.val_psnr": m["val_psnr"], "decoder.epochs": m["epoch"],
                      "decoder.val_label_accuracy": m.get("val_label_accuracy", float("nan"))})
    return {"checkpoint": res.checkpoint_uri, "epochs": m["epoch"], **res.summary}
