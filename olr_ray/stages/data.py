"""Data stage: draw or read every image once into ``<run>/data/part=<split>/``.

Each image is stored encoded (``image_bytes``): a CelebA-format source's own file bytes, or a lossless PNG
of the drawn face; :func:`olr_ray.run.read_prepared` decodes them (crop and resize included) on every read.

The split of every image is also written as ``<run>/data/list_eval_partition.txt`` (CelebA's format), so
a run's train/valid/test assignment can be read, compared or handed to another tool.

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


def _compact(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What is stored of each image: its source's own bytes (a CelebA-format file, cropped and resized again on
    every read) when they take no more than the decoded pixels, else the decoded pixels as PNG (lossless: the
    synthetic faces, or sources far larger than ``image_size``); nothing for an unreadable image."""
    images = batch.pop("image")
    source = batch.pop("image_bytes", None)
    raw = images[0].nbytes if len(images) else 0
    ok = batch["error"].astype(str) == ""
    blobs = np.full(len(images), b"", dtype=object)
    for i in np.flatnonzero(ok):
        own = bytes(source[i]) if source is not None else b""
        blobs[i] = own if own and len(own) <= raw else celeba.encode_png(images[i])
    batch["image_bytes"] = blobs
    return batch


def _pixels(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoded pixels alone (``prepare(encode=False)``)."""
    batch.pop("image_bytes", None)
    return batch


def _count_parts(data_uri: str) -> dict[str, int]:
    fs, _ = storage.resolve(data_uri)
    counts: dict[str, int] = {}
    for f in storage.list_files(data_uri, ".parquet"):
        part = f.split("part=")[-1].split("/")[0]
        counts[part] = counts.get(part, 0) + pq.read_metadata(storage.resolve(f)[1], filesystem=fs).num_rows
    return counts


def _stored_bytes(data_uri: str) -> int:
    """Bytes of the prepared images' Parquet files."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(data_uri)
    return sum(i.size or 0 for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
               if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _write_errors(errors_uri: str, data_uri: str, errors: int) -> None:
    """``errors_uri``: image_id and reason of every image that could not be read."""
    fs, _ = storage.resolve(data_uri)
    table = pa.table({"image_id": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    if errors:
        t = pq.read_table(storage.resolve(storage.join(data_uri, "part=errors"))[1], filesystem=fs,
                          columns=["image_id", "error"])
        table = pa.table({"image_id": t["image_id"], "reason": t["error"]}).sort_by("image_id")
    storage.makedirs(errors_uri.rsplit("/", 1)[0])
    efs, epath = storage.resolve(errors_uri)
    pq.write_table(table, epath, filesystem=efs)


def _write_partition(data_uri: str) -> str:
    """``data_uri/list_eval_partition.txt``: every row's split in CelebA's own format, unreadable images too."""
    fs, _ = storage.resolve(data_uri)
    ids, splits = [], []
    for f in storage.list_files(data_uri, ".parquet"):
        t = pq.read_table(storage.resolve(f)[1], filesystem=fs, columns=["image_id", "split"])
        ids += t["image_id"].to_pylist()
        splits += t["split"].to_pylist()
    uri = storage.join(data_uri, celeba.PARTITION_FILE)
    storage.write_bytes(uri, celeba.partition_text(ids, splits).encode())
    return uri


def prepare(dataset, num_rows: int, data_uri: str, errors_uri: str, plan: ResourcePlan, encode: bool = True
            ) -> dict[str, int]:
    """Write a source's rows to ``data_uri/part=<split>/`` and its unreadable images to ``errors_uri``.

    ``encode=False`` stores decoded pixels (``image``) instead of ``image_bytes``, as runs before the compact
    copy did (``benchmarks/data_copy.py`` compares the two; every reader takes either).

    Returns the rows per split and ``errors``; raises if any row of the source went missing.
    """
    storage.delete_dir(data_uri)  # a half-written earlier attempt
    fs, path = storage.resolve(data_uri)
    tagged = dataset.map_batches(_tag, batch_format="numpy", num_cpus=plan.task_cpus)
    tagged = tagged.map_batches(_compact if encode else _pixels, batch_format="numpy", num_cpus=plan.task_cpus)
    tagged.write_parquet(
        path, filesystem=fs, partition_cols=["part"], ray_remote_args={"num_cpus": plan.task_cpus},
        min_rows_per_file=2000)
    counts = _count_parts(data_uri)
    counts.setdefault("errors", 0)
    _write_errors(errors_uri, data_uri, counts["errors"])
    total = sum(counts.values())
    if total != num_rows:
        raise RuntimeError(f"lost rows: {num_rows} in the source, {total} written + errors under {data_uri}")
    if counts["errors"]:
        log.warning("%d of %d images could not be read; reasons in %s", counts["errors"], total, errors_uri)
    return counts


def run(run: Run, plan: ResourcePlan) -> dict[str, Any]:
    src = open_source(run.cfg.data, run.cfg.seed)
    counts = prepare(src.dataset, src.num_rows, run.path("data"), run.path("errors", "read_errors.parquet"), plan)
    _write_partition(run.path("data"))
    errors = counts.pop("errors")
    total = sum(counts.values()) + errors
    stored = _stored_bytes(run.path("data"))
    log.info("data: %d images stored in %.1f MB (%.0f bytes each; %d as decoded pixels)", total, stored / 1e6,
             stored / max(1, total), 3 * src.image_size ** 2)
    return {"rows": total, "rows_ok": total - errors, "errors": errors, "splits": counts,
            "label_names": src.label_names, "image_size": src.image_size, "source": run.cfg.data.source,
            "kind": src.kind, "stored_bytes": stored, "encoding": "image_bytes"}
