"""The committed embedding format: schema, per-file writer, commit, and a reader without Ray.

Layout under ``<run>/embeddings/``:
- ``_staging/<attempt>/part-*.parquet`` while the stage runs (readers never look here:
  pyarrow, Ray and DuckDB's ``*.parquet`` globs skip ``_``-prefixed folders);
- ``part-*.parquet`` + ``manifest.json`` + ``_SUCCESS`` once committed. ``_SUCCESS`` is
  written last: no ``_SUCCESS``, no dataset. :func:`load_embeddings` reads exactly the
  files that the manifest lists.

File names come from the smallest ``uid`` in the file, so a retried task rewrites the same
file instead of adding a second copy of its rows.

This module imports neither torch nor Ray: analysts read embeddings with it alone.

>>> from olr_ray.embeddings import load_embeddings
>>> emb = load_embeddings("runs/<run-id>/embeddings")        # or s3://bucket/runs/<run-id>/embeddings
>>> emb.E.shape, emb.label_names[:3]
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import olr_ray
from olr_ray import storage

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


# --------------------------------------------------------------------------- reading


class NotCommittedError(RuntimeError):
    """The embedding folder has no ``_SUCCESS``: it is being written, or a write failed."""


@dataclass
class Embeddings:
    ids: np.ndarray
    """image_id per row (str)."""
    uids: np.ndarray
    splits: np.ndarray
    E: np.ndarray | None
    """(N, L, k) float32, or None when the ``embedding`` column was not read."""
    labels: np.ndarray | None
    """(N, L) int8 0/1."""
    label_names: list[str]
    k: int
    norms: np.ndarray | None = None
    probs: np.ndarray | None = None
    metadata: dict | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, mask: np.ndarray) -> "Embeddings":
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return Embeddings(self.ids[mask], self.uids[mask], self.splits[mask], pick(self.E), pick(self.labels),
                          self.label_names, self.k, pick(self.norms), pick(self.probs), self.metadata)


def _fixed(col: pa.ChunkedArray, width: int, dtype) -> np.ndarray:
    arr = col.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(arr), width)


def load_embeddings(uri: str, columns: list[str] | None = None, split: str | None = None) -> Embeddings:
    """Read a committed embedding dataset (local or ``s3://``) without Ray.

    Only the files listed in ``manifest.json`` are read, and only once ``_SUCCESS`` exists,
    so a dataset being written or a failed write is never half-read.

    Args:
        uri: ``<run>/embeddings``.
        columns: subset of columns to read (default: all array columns).
        split: keep only this split (train|valid|test).

    Raises:
        NotCommittedError: when there is no committed dataset at ``uri``.
    """
    if not storage.exists(storage.join(uri, SUCCESS)):
        raise NotCommittedError(f"{uri}: no committed embeddings ({SUCCESS} missing); run the embed stage first")
    manifest = storage.read_json(storage.join(uri, MANIFEST))
    fs, _ = storage.resolve(uri)
    want = columns or ["uid", "image_id", "split", "labels", "embedding", "norms", "probs"]
    want = list(dict.fromkeys(["uid", "image_id", "split"] + want))
    tables = [pq.read_table(storage.resolve(storage.join(uri, f["path"]))[1], filesystem=fs, columns=want)
              for f in manifest["files"]]
    table = pa.concat_tables(tables) if tables else None
    names = manifest["label_names"]
    L, k = len(names), int(manifest["k"])
    if table is None or table.num_rows == 0:
        empty = np.zeros(0)
        return Embeddings(empty.astype(str), empty.astype(np.int64), empty.astype(str), None, None, names, k)
    table = table.sort_by("uid")
    if split is not None:
        table = table.filter(pa.compute.equal(table["split"], split))
    meta = {k_.decode(): v.decode() for k_, v in (pq.read_schema(storage.resolve(storage.join(uri, manifest["files"][0]["path"]))[1], filesystem=fs).metadata or {}).items()}
    return Embeddings(
        ids=table["image_id"].to_numpy(zero_copy_only=False).astype(str),
        uids=table["uid"].to_numpy(),
        splits=table["split"].to_numpy(zero_copy_only=False).astype(str),
        E=_fixed(table["embedding"], L * k, np.float32).reshape(-1, L, k) if "embedding" in want else None,
        labels=_fixed(table["labels"], L, np.int8) if "labels" in want else None,
        label_names=names,
        k=k,
        norms=_fixed(table["norms"], L, np.float32) if "norms" in want else None,
        probs=_fixed(table["probs"], L, np.float32) if "probs" in want else None,
        metadata={**meta, "olr.label_names": json.loads(meta.get("olr.label_names", "[]"))},
    )
