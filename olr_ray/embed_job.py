"""Embed new images with a trained run, without training: the same committed Parquet, the same
guarantees (exactly one row per readable image, unreadable ones recorded with their reason).

Layout under the output:
- ``part-*.parquet``, ``manifest.json``, ``_SUCCESS``: the committed embeddings (:mod:`olr_ray.embeddings`);
- ``_errors/read_errors.parquet``: image_id and reason of every image that could not be read.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from olr_ray import storage
from olr_ray.data import celeba
from olr_ray.embeddings import STAGING, SUCCESS
from olr_ray.run import UsageError, read_prepared
from olr_ray.runtime import init_ray, plan_resources
from olr_ray.stages.data import prepare
from olr_ray.stages.embed import embed_dataset
from olr_ray.trained import TrainedRun

log = logging.getLogger("olr_ray")
PREPARED = "_prepared"
ERRORS = "_errors"


def _check_output(output: str, model: str) -> None:
    """The output is a new folder or an earlier embedding commit, never a place holding other files or the
    trained run itself: a commit removes the earlier commit's parts."""
    _, out_path = storage.resolve(output)
    _, run_path = storage.resolve(model)
    if (out_path.rstrip("/") + "/").startswith(run_path.rstrip("/") + "/"):
        raise UsageError(f"--output {output} is inside the trained run {model}; name a folder outside it")

    def ours(rel: str) -> bool:
        return rel in ("manifest.json", SUCCESS) or (rel.startswith("part-") and rel.endswith(".parquet")) \
            or rel.split("/", 1)[0] in (PREPARED, ERRORS, STAGING)

    others = [f for f in storage.list_files(output) if not ours(storage.relative(f, output))]
    if others:
        raise UsageError(f"--output {output} holds files that are not an embedding commit (e.g. {others[0]}); "
                         f"name an empty folder or an earlier jobs/embed.py output")


def embed_images(model: str, data: str, output: str, num_workers: int = 2, use_gpu: str = "auto",
                 batch_size: int = 256, rows_per_file: int = 50_000, split: str = "all",
                 progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed every image of ``data`` (a CelebA-format folder, or any folder or ``s3://`` prefix of
    images) with the trained run ``model`` (``<output>/<run-id>``) and commit them under ``output``.

    Images of another size are centre-cropped and resized to the model's. Returns the manifest.
    """
    trained = TrainedRun.open(model)
    # Local paths absolute: Ray's workers read and write them from working directories of their own.
    output, data = storage.absolute(output), storage.absolute(data)
    _check_output(output, trained.uri)
    if split in ("", "errors"):
        raise UsageError(f"--split {split!r}: 'errors' holds the unreadable images; name another split")
    if os.environ.get("RAY_ADDRESS"):
        local = [f"{name} {uri}" for name, uri in (("--data", data), ("--output", output)) if not storage.is_s3(uri)]
        if local:
            log.warning("%s: a local path on a Ray cluster must be shared by every node (else images read as "
                        "missing and outputs land on one node); s3:// is", ", ".join(local))
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
    parts = [storage.join(prepared, f"part={s}") for s in counts if counts[s]]
    if not parts:
        raise UsageError(f"{data}: none of its {index.num_rows} images could be read; reasons in "
                         f"{storage.join(output, ERRORS, 'read_errors.parquet')}")
    images = read_prepared(parts, plan, ["uid", "image_id", "split", "labels", "image"], trained.image_size)
    manifest = embed_dataset(images, output, trained.checkpoint("siamese"), trained.checkpoint("classifier"),
                             trained.label_names, trained.k, trained.manifest["run_id"], plan, batch_size,
                             rows_per_file, config=trained.config,
                             extra={"source": data, "trained_run": model, "errors": errors},
                             # As the run embedded its own images, so both sets compare alike.
                             precision=trained.stage("embed").get("precision") or trained.config.get("precision", "auto"))
    storage.delete_dir(prepared)
    if manifest["rows"] != sum(counts.values()):
        raise RuntimeError(f"committed {manifest['rows']} rows but {sum(counts.values())} images were readable")
    progress(f"[embed] committed {manifest['rows']} rows in {len(manifest['files'])} file(s) under {output} "
             f"({time.time() - t0:.1f}s)")
    return manifest
