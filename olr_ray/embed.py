"""Batch embedding with Ray Data into a Parquet dataset that is committed exactly once.

Layout under ``<run>/embeddings/``:
- ``_staging/<attempt>/part-*.parquet`` while the stage runs (readers never look here:
  pyarrow, Ray and DuckDB's ``*.parquet`` globs skip ``_``-prefixed folders);
- ``part-*.parquet`` + ``manifest.json`` + ``_SUCCESS`` once committed. ``_SUCCESS`` is
  written last: no ``_SUCCESS``, no dataset. :func:`olr_ray.analysis.load_embeddings`
  reads exactly the files that the manifest lists.

File names come from the smallest ``uid`` in the file, so a retried task rewrites the same
file instead of adding a second copy of its rows.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import olr_ray
from olr_ray import storage

log = logging.getLogger("olr_ray.embed")
SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
STAGING = "_staging"


def embedding_schema(label_names: list[str], k: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    """The committed schema: plain Arrow types only, readable without Ray."""
    L = len(label_names)
    fields = [
        pa.field("uid", pa.int64()),
        pa.field("image_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("labels", pa.list_(pa.int8())),
        pa.field("embedding", pa.list_(pa.float32(), L * k)),
        pa.field("norms", pa.list_(pa.float32(), L)),
        pa.field("probs", pa.list_(pa.float32(), L)),
    ] + [pa.field(f"norm_{name}", pa.float32()) for name in label_names]
    return pa.schema(fields, metadata=metadata)


def file_metadata(label_names: list[str], k: int, run_id: str, model_uri: str) -> dict[str, str]:
    return {
        "olr.label_names": json.dumps(label_names),
        "olr.k": str(k),
        "olr.run_id": run_id,
        "olr.model": model_uri,
        "olr.version": olr_ray.__version__,
    }


def to_table(uids, image_ids, splits, labels, E, probs, schema: pa.Schema) -> pa.Table:
    """Arrow table of one batch in the committed schema."""
    n, L, k = E.shape
    E = np.ascontiguousarray(E, dtype=np.float32)
    norms = np.linalg.norm(E, axis=-1).astype(np.float32)
    label_names = json.loads(schema.metadata[b"olr.label_names"]) if schema.metadata else None
    cols = {
        "uid": pa.array(np.asarray(uids, dtype=np.int64)),
        "image_id": pa.array([str(s) for s in image_ids], pa.string()),
        "split": pa.array([str(s) for s in splits], pa.string()),
        "labels": pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * L, L, dtype=np.int32)),
                                           pa.array(np.asarray(labels, dtype=np.int8).reshape(-1))),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(E.reshape(-1)), L * k),
        "norms": pa.FixedSizeListArray.from_arrays(pa.array(norms.reshape(-1)), L),
        "probs": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(probs, np.float32).reshape(-1)), L),
    }
    for j, name in enumerate(label_names or []):
        cols[f"norm_{name}"] = pa.array(norms[:, j])
    return pa.Table.from_pydict(cols, schema=schema)


class Embedder:
    """Ray Data actor: loads the Siamese network and the classifier once, embeds batches.

    Returns Arrow tables in :func:`embedding_schema`, so nothing passes through Ray's tensor
    extension types.
    """

    def __init__(self, siamese_uri: str, classifier_uri: str, metadata: dict[str, str], threads: int = 1,
                 use_gpu: bool = False):
        import torch

        from olr_ray.models import load_checkpoint

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.siamese, state = load_checkpoint(siamese_uri)
        self.classifier, _ = load_checkpoint(classifier_uri)
        self.siamese.to(self.device)
        self.classifier.to(self.device)
        label_names = json.loads(metadata["olr.label_names"])
        self.schema = embedding_schema(label_names, self.siamese.k, metadata)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        with torch.inference_mode():
            E = self.siamese(images).float().cpu().numpy()
            probs = torch.sigmoid(self.classifier(images)).float().cpu().numpy()
        labels = batch["labels"]
        if labels.dtype == object:
            labels = np.stack(labels)
        return to_table(batch["uid"], batch["image_id"], batch["split"], labels, E, probs, self.schema)


def write_part(table: pa.Table, staging_uri: str, schema_metadata: dict[str, str]) -> pa.Table:
    """Write one batch to ``staging/part-<min uid>.parquet`` with the file metadata.

    Returns its name, rows and the storage retries the write needed (for the manifest).
    """
    if table.num_rows == 0:
        return pa.table({"file": pa.array([], pa.string()), "rows": pa.array([], pa.int64()),
                         "retries": pa.array([], pa.int64())})
    table = table.replace_schema_metadata(schema_metadata)
    name = f"part-{int(pa.compute.min(table['uid']).as_py()):010d}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    before = storage.retry_count()
    storage.write_bytes(storage.join(staging_uri, name), sink.getvalue().to_pybytes())
    return pa.table({"file": [name], "rows": [table.num_rows], "retries": [storage.retry_count() - before]})


def commit(embeddings_uri: str, staging_uri: str, parts: list[tuple[str, int]], manifest: dict[str, Any]) -> dict:
    """Make the staged files the dataset: remove the old marker, move files in, manifest, then ``_SUCCESS``.

    Readers go through ``_SUCCESS`` and the manifest's file list, so until the marker is back
    nothing half-moved is visible to them; a commit interrupted here is redone by a re-run.
    """
    before = storage.retry_count()
    success = storage.join(embeddings_uri, SUCCESS)
    storage.delete_file(success)
    keep = {name for name, _ in parts}
    # Compare resolved paths: list_files returns absolute local paths, whatever ./, ~ or file:// the URI had.
    _, base = storage.resolve(embeddings_uri)
    for old in storage.list_files(embeddings_uri, ".parquet"):
        rel = storage.resolve(old)[1][len(base) + 1:]
        if "/" not in rel and rel not in keep:  # a leftover of an earlier, different commit
            storage.delete_file(old)
    for name, _ in parts:
        storage.move(storage.join(staging_uri, name), storage.join(embeddings_uri, name))
    manifest = {**manifest, "files": [{"path": n, "rows": r} for n, r in sorted(parts)],
                "rows": int(sum(r for _, r in parts)), "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    manifest["storage_retries"] = int(manifest.get("storage_retries", 0)) + storage.retry_count() - before
    storage.write_json(storage.join(embeddings_uri, MANIFEST), manifest)
    storage.write_bytes(success, b"")
    storage.delete_dir(storage.join(embeddings_uri, STAGING))
    return manifest


def is_committed(embeddings_uri: str) -> bool:
    return storage.exists(storage.join(embeddings_uri, SUCCESS)) and storage.exists(storage.join(embeddings_uri, MANIFEST))


def embed_dataset(images_ds, embeddings_uri: str, siamese_uri: str, classifier_uri: str, label_names: list[str],
                  k: int, run_id: str, plan, batch_size: int = 256, rows_per_file: int = 50_000,
                  config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Embed every row of ``images_ds`` and commit the result under ``embeddings_uri``.

    Args:
        images_ds: Ray Dataset with ``uid``, ``image_id``, ``split``, ``labels``, ``image``.
        plan: :class:`olr_ray.runtime.ResourcePlan`; the actor pool is sized from it so read
            tasks always keep a CPU.

    Returns:
        The committed manifest.
    """
    import ray

    metadata = file_metadata(label_names, k, run_id, siamese_uri)
    staging = storage.join(embeddings_uri, STAGING, uuid.uuid4().hex[:12])
    actor_args: dict[str, Any] = {"num_gpus": 1} if plan.use_gpu else {"num_cpus": plan.task_cpus}
    embedded = images_ds.map_batches(
        Embedder,
        fn_constructor_kwargs=dict(siamese_uri=siamese_uri, classifier_uri=classifier_uri, metadata=metadata,
                                   threads=max(1, plan.threads_per_worker), use_gpu=plan.use_gpu),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors),
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
    schema = embedding_schema(label_names, k, metadata)
    manifest = {
        "run_id": run_id, "model": siamese_uri, "classifier": classifier_uri, "label_names": label_names, "k": k,
        "schema": schema.to_string(show_schema_metadata=False), "olr_ray_version": olr_ray.__version__,
        "config": config or {},
        "storage_retries": int(sum(int(r["retries"]) for r in rows)),
    }
    return commit(embeddings_uri, staging, parts, manifest)
