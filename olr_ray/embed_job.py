"""Embed new images with a trained run, without training: the same committed Parquet, the same
guarantees (exactly one row per readable image, unreadable ones recorded with their reason).

Layout under the output:
- ``part-*.parquet``, ``manifest.json``, ``_SUCCESS``: the committed embeddings (:mod:`olr_ray.embeddings`);
- ``_errors/read_errors.parquet``: image_id and reason of every image that could not be read.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from olr_ray import storage
from olr_ray.data import celeba
from olr_ray.embeddings import SUCCESS
from olr_ray.run import UsageError
from olr_ray.runtime import init_ray, plan_resources
from olr_ray.stages.data import prepare
from olr_ray.stages.embed import embed_dataset
from olr_ray.trained import TrainedRun

log = logging.getLogger("olr_ray")
PREPARED = "_prepared"
ERRORS = "_errors"


def embed_images(model: str, data: str, output: str, num_workers: int = 2, use_gpu: str = "auto",
                 batch_size: int = 256, rows_per_file: int = 50_000, split: str = "all",
                 progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed every image of ``data`` (a CelebA-format folder, or any folder or ``s3://`` prefix of
    images) with the trained run ``model`` (``<output>/<run-id>``) and commit them under ``output``.

    Images of another size are centre-cropped and resized to the model's. Returns the manifest.
    """
    trained = TrainedRun.open(model)
    if storage.exists(storage.join(output, SUCCESS)):
        log.info("%s already holds committed embeddings; they are replaced when this commit lands", output)
    if storage.is_s3(output) != storage.is_s3(model) and not storage.is_s3(output):
        log.info("output %s is local: on a cluster of several nodes, use s3://", output)
    index, note = celeba.index_for_labels(data, trained.label_names, split)
    progress(f"[embed] {note}; model {model} ({len(trained.label_names)} labels, {trained.image_size} px)")
    init_ray()
    plan = plan_resources(num_workers, use_gpu)
    t0 = time.time()
    prepared = storage.join(output, PREPARED)
    counts = prepare(celeba.decode_index(index, trained.image_size), index.num_rows, prepared,
                     storage.join(output, ERRORS, "read_errors.parquet"), plan)
    errors = counts.pop("errors")
    progress(f"[embed] {sum(counts.values())} images read, {errors} unreadable ({time.time() - t0:.1f}s)")
    fs, _ = storage.resolve(output)
    parts = [storage.resolve(storage.join(prepared, f"part={s}"))[1] for s in counts if counts[s]]
    if not parts:
        raise UsageError(f"{data}: none of its {index.num_rows} images could be read; reasons in "
                         f"{storage.join(output, ERRORS, 'read_errors.parquet')}")
    import ray

    images = ray.data.read_parquet(parts, filesystem=fs, num_cpus=plan.task_cpus).select_columns(
        ["uid", "image_id", "split", "labels", "image"])
    manifest = embed_dataset(images, output, trained.checkpoint("siamese"), trained.checkpoint("classifier"),
                             trained.label_names, trained.k, trained.manifest["run_id"], plan, batch_size,
                             rows_per_file, config=trained.config,
                             extra={"source": data, "trained_run": model, "errors": errors})
    storage.delete_dir(prepared)
    if manifest["rows"] != sum(counts.values()):
        raise RuntimeError(f"committed {manifest['rows']} rows but {sum(counts.values())} images were readable")
    progress(f"[embed] committed {manifest['rows']} rows in {len(manifest['files'])} file(s) under {output} "
             f"({time.time() - t0:.1f}s)")
    return manifest
