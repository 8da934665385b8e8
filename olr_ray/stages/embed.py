"""Embed stage: every readable image through the Siamese network (and the classifier, for ``probs``)
on Ray Data, committed once as Parquet (:mod:`olr_ray.embeddings`)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

import olr_ray
from olr_ray import storage
from olr_ray.analysis.metrics import norm_ratio, norm_ratios
from olr_ray.embeddings import (
    NODE_COLUMN,
    SCHEMA_VERSION,
    STAGING,
    commit,
    embedding_schema,
    file_metadata,
    load_embeddings,
    to_table,
    write_part,
)
from olr_ray.models.inference import (
    ModelActor,
    actor_pool,
    actor_resources,
    pool_precision,
)
from olr_ray.run import Run
from olr_ray.runtime import ResourcePlan, node_id

NAME = "embed"
REQUIRES = ("data", "classifier", "siamese")


class Embedder(ModelActor):
    """Ray Data actor: loads the Siamese network and the classifier once, embeds batches.

    Returns Arrow tables in :func:`olr_ray.embeddings.embedding_schema`, so nothing passes through
    Ray's tensor extension types.
    """

    def __init__(self, siamese_uri: str, classifier_uri: str, metadata: dict[str, str], threads: int = 1,
                 use_gpu: bool = False, precision: str = "auto"):
        super().__init__(threads, use_gpu, precision)
        self.node = node_id()
        self.siamese = self.load(siamese_uri)
        self.classifier = self.load(classifier_uri)
        self.schema = embedding_schema(json.loads(metadata["olr.label_names"]), self.siamese.k, metadata)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        E = self.run(self.siamese, batch["image"]).float().cpu().numpy()
        probs = torch.sigmoid(self.run(self.classifier, batch["image"])).float().cpu().numpy()
        labels = batch["labels"]
        if labels.dtype == object:
            labels = np.stack(labels)
        table = to_table(batch["uid"], batch["image_id"], batch["split"], labels, E, probs, self.schema)
        # Where this batch was embedded, for the manifest; write_part takes the column off before writing.
        return table.append_column(NODE_COLUMN, pa.array([self.node] * table.num_rows, pa.string()))


def embed_dataset(images_ds, embeddings_uri: str, siamese_uri: str, classifier_uri: str, label_names: list[str],
                  k: int, run_id: str, plan: ResourcePlan, batch_size: int = 256, rows_per_file: int = 50_000,
                  config: dict[str, Any] | None = None, actors: int = 0,
                  extra: dict[str, Any] | None = None, precision: str = "auto") -> dict[str, Any]:
    """Embed every row of ``images_ds`` and commit the result under ``embeddings_uri``.

    Args:
        images_ds: Ray Dataset with ``uid``, ``image_id``, ``split``, ``labels``, ``image``.
        plan: the actor pool is sized from it so read tasks always keep a CPU.
        actors: the most inference actors (0: ``plan.actors``).
        extra: more fields for the manifest.
        precision: of both models (``auto``, ``bf16``, ``fp32``), resolved on a worker with the actors'
            resources; the manifest names the result.

    Returns:
        The committed manifest.
    """
    metadata = file_metadata(label_names, k, run_id, siamese_uri)
    staging = storage.join(embeddings_uri, STAGING, uuid.uuid4().hex[:12])
    # The models are small: GPU actors take a share of a GPU each (plan.gpus_per_actor), so several embed at once.
    actor_args = actor_resources(plan)
    precision = pool_precision(precision, plan)
    if max(1, min(actors or plan.actors, plan.actor_nodes)) > 1:
        # Blocks of one batch: Ray Data reads a few small files as one block, which one actor would embed alone.
        images_ds = images_ds.repartition(target_num_rows_per_block=batch_size)
        images_ds.context.wait_for_min_actors_s = 600
    embedded = images_ds.map_batches(
        Embedder,
        fn_constructor_kwargs=dict(siamese_uri=siamese_uri, classifier_uri=classifier_uri, metadata=metadata,
                                   threads=max(1, plan.threads_per_worker), use_gpu=plan.use_gpu,
                                   precision=precision),
        batch_size=batch_size,
        # One actor per node that can hold one (up to the pool's size), spread over the nodes (Ray Data's default
        # scheduling strategy, SPREAD) and all started before the first block is handed out: every node embeds,
        # not just the first whose actor is up.
        compute=actor_pool(plan, actors),
        batch_format="numpy",
        **actor_args,
    )
    written = embedded.map_batches(
        write_part, fn_kwargs=dict(staging_uri=staging, schema_metadata=metadata),
        batch_size=rows_per_file, batch_format="pyarrow", num_cpus=plan.task_cpus,
    )
    rows = written.take_all()
    parts = [(r["file"], int(r["rows"])) for r in rows]
    names = [p[0] for p in parts]
    if len(names) != len(set(names)):
        raise RuntimeError(f"embedding write produced duplicate file names under {staging}")
    manifest = {
        "schema_version": SCHEMA_VERSION, "run_id": run_id, "model": siamese_uri, "classifier": classifier_uri, "label_names": label_names, "k": k,
        "schema": embedding_schema(label_names, k, metadata).to_string(show_schema_metadata=False),
        "olr_ray_version": olr_ray.__version__, "config": config or {},
        "storage_retries": int(sum(int(r["retries"]) for r in rows)), "precision": precision,
        "nodes": sorted({n for r in rows for n in str(r.get("nodes") or "").split(",") if n}), **(extra or {}),
    }
    return commit(embeddings_uri, staging, parts, manifest)


def norm_metrics(norms: np.ndarray, labels: np.ndarray, splits: np.ndarray, names: list[str], floor_norm: float
                 ) -> dict[str, Any]:
    """How the committed blocks' norms follow the labels: present over absent, per label, dead blocks."""
    ratios = norm_ratios(norms, labels)
    # Dead: a block that stays at its floor (block_floor on every coordinate, norm floor*sqrt(k))
    # on 99% of the images, i.e. carries nothing.
    dead = np.quantile(norms, 0.99, axis=0) <= floor_norm * 1.05 + 1e-6
    out = {
        "embed.norm_ratio_present_absent": norm_ratio(norms, labels),
        # The mean of ratios is pulled up by nearly dead blocks (absent norm ~0): the median and
        # the dead-block count say whether it is a few labels or all of them.
        "embed.norm_ratio_present_absent_median": float(np.nanmedian(ratios)),
        "embed.norm_ratio_per_label": {n: float(r) for n, r in zip(names, ratios)},
        "embed.dead_blocks": int(dead.sum()),
        "embed.dead_block_labels": [n for n, d in zip(names, dead) if d],
    }
    for split in ("valid", "test"):
        if (splits == split).any():
            out[f"embed.norm_ratio_present_absent_{split}"] = norm_ratio(norms[splits == split], labels[splits == split])
    return out


def run(run: Run, plan: ResourcePlan) -> dict[str, Any]:
    info, s = run.data, run.cfg.siamese
    images = run.read_images(None, plan, ["uid", "image_id", "split", "labels", "image"])
    manifest = embed_dataset(
        images, run.path("embeddings"), run.stage("siamese")["checkpoint"], run.stage("classifier")["checkpoint"],
        info["label_names"], s.k, run.run_id, plan, run.cfg.embed.batch_size,
        run.cfg.embed.rows_per_file, config=run.cfg.to_dict(), actors=run.cfg.embed.num_actors,
        precision=run.cfg.precision)
    if manifest["rows"] != info["rows_ok"]:
        raise RuntimeError(f"embedding committed {manifest['rows']} rows but {info['rows_ok']} images were readable")
    emb = load_embeddings(run.path("embeddings"), columns=["uid", "split", "labels", "norms"])
    if len(np.unique(emb.uids)) != len(emb.uids):
        raise RuntimeError("embedding output has duplicate uids")
    run.record(NAME, norm_metrics(emb.norms, emb.labels, emb.splits, info["label_names"],
                                  s.block_floor * np.sqrt(s.k)))
    return {"rows": manifest["rows"], "files": len(manifest["files"]), "uri": run.path("embeddings"),
            "storage_retries": manifest.get("storage_retries", 0), "precision": manifest["precision"],
            "nodes": manifest.get("nodes", [])}
