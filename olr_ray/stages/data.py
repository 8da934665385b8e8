"""Data stage: draw or read every image once into ``<run>/data/part=<split>/``.

Unreadable images go to ``errors/read_errors.parquet`` with their reason; the row count is
checked against the source, so nothing is dropped silently.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from olr_ray import storage
from olr_ray.data import celeba
from olr_ray.data.sources import open_source
from olr_ray.run import Run
from olr_ray.runtime import ResourcePlan

NAME = "data"
REQUIRES: tuple[str, ...] = ()
log = logging.getLogger("olr_ray")


def precheck(run: Run) -> None:
    """Before Ray starts: a CelebA-format source must have its attribute file."""
    if run.cfg.data.source != "synthetic":
        celeba.require_attr_file(run.cfg.data.source)


def _tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The partition a row is written to: its split, or ``errors`` when it could not be read."""
    err = batch["error"].astype(str)
    batch["part"] = np.where(err == "", batch["split"].astype(str), "errors")
    return batch


def _count_parts(data_uri: str) -> dict[str, int]:
    fs, _ = storage.resolve(data_uri)
    counts: dict[str, int] = {}
    for f in storage.list_files(data_uri, ".parquet"):
        part = f.split("part=")[-1].split("/")[0]
        counts[part] = counts.get(part, 0) + pq.read_metadata(storage.resolve(f)[1], filesystem=fs).num_rows
    return counts


def _write_errors(run: Run, data_uri: str, errors: int) -> None:
    """``errors/read_errors.parquet``: image_id and reason of every image that could not be read."""
    fs, _ = storage.resolve(data_uri)
    table = pa.table({"image_id": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    if errors:
        t = pq.read_table(storage.resolve(storage.join(data_uri, "part=errors"))[1], filesystem=fs,
                          columns=["image_id", "error"])
        table = pa.table({"image_id": t["image_id"], "reason": t["error"]}).sort_by("image_id")
    storage.makedirs(run.path("errors"))
    efs, epath = storage.resolve(run.path("errors", "read_errors.parquet"))
    pq.write_table(table, epath, filesystem=efs)


def run(run: Run, plan: ResourcePlan) -> dict[str, Any]:
    cfg = run.cfg
    src = open_source(cfg.data, cfg.seed)
    data_uri = run.path("data")
    storage.delete_dir(data_uri)  # a half-written earlier attempt
    fs, path = storage.resolve(data_uri)
    src.dataset.map_batches(_tag, batch_format="numpy", num_cpus=plan.task_cpus).write_parquet(
        path, filesystem=fs, partition_cols=["part"], ray_remote_args={"num_cpus": plan.task_cpus},
        min_rows_per_file=2000)
    counts = _count_parts(data_uri)
    errors = counts.pop("errors", 0)
    _write_errors(run, data_uri, errors)
    total = sum(counts.values()) + errors
    if total != src.num_rows:
        raise RuntimeError(f"data stage lost rows: {src.num_rows} in the source, {total} written + errors")
    if errors:
        log.warning("%d of %d images could not be read; reasons in %s", errors, total,
                    run.path("errors", "read_errors.parquet"))
    return {"rows": total, "rows_ok": total - errors, "errors": errors, "splits": counts,
            "label_names": src.label_names, "image_size": src.image_size, "source": cfg.data.source,
            "kind": src.kind}
