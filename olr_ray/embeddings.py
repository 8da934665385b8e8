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
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

import olr_ray
from olr_ray import storage

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
STAGING = "_staging"
SCHEMA_VERSION = 2
"""1: uid, image_id, split, labels, embedding, norms, probs, norm_<Name>. 2 adds label_<Name> (int8,
null where the image has no labels) and prob_<Name>, and sorts each file by split in row groups of
ROW_GROUP_ROWS."""
ROW_GROUP_ROWS = 10_000


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
    ]
    fields += [pa.field(f"norm_{name}", pa.float32()) for name in label_names]
    fields += [pa.field(f"label_{name}", pa.int8()) for name in label_names]
    fields += [pa.field(f"prob_{name}", pa.float32()) for name in label_names]
    return pa.schema(fields, metadata=metadata)


def file_metadata(label_names: list[str], k: int, run_id: str, model_uri: str) -> dict[str, str]:
    return {
        "olr.label_names": json.dumps(label_names),
        "olr.k": str(k),
        "olr.run_id": run_id,
        "olr.model": model_uri,
        "olr.version": olr_ray.__version__,
        "olr.schema_version": str(SCHEMA_VERSION),
    }


def to_table(uids, image_ids, splits, labels, E, probs, schema: pa.Schema) -> pa.Table:
    """Arrow table of one batch in the committed schema.

    ``labels``: (N, L) 0/1, where a row with a negative value is an image without labels (its
    ``labels`` and ``label_<Name>`` are null).
    """
    n, L, k = E.shape
    E = np.ascontiguousarray(E, dtype=np.float32)
    norms = np.linalg.norm(E, axis=-1).astype(np.float32)
    probs = np.asarray(probs, np.float32).reshape(n, L)
    labels = np.asarray(labels, dtype=np.int8).reshape(n, L)
    unlabelled = (labels < 0).any(axis=1)
    label_names = json.loads(schema.metadata[b"olr.label_names"]) if schema.metadata else None
    cols = {
        "uid": pa.array(np.asarray(uids, dtype=np.int64)),
        "image_id": pa.array([str(s) for s in image_ids], pa.string()),
        "split": pa.array([str(s) for s in splits], pa.string()),
        "labels": pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * L, L, dtype=np.int32)),
                                           pa.array(np.where(labels < 0, 0, labels).reshape(-1)),
                                           mask=pa.array(unlabelled) if unlabelled.any() else None),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(E.reshape(-1)), L * k),
        "norms": pa.FixedSizeListArray.from_arrays(pa.array(norms.reshape(-1)), L),
        "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), L),
    }
    for j, name in enumerate(label_names or []):
        cols[f"norm_{name}"] = pa.array(norms[:, j])
        cols[f"label_{name}"] = pa.array(labels[:, j], pa.int8(), mask=unlabelled)
        cols[f"prob_{name}"] = pa.array(probs[:, j])
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema if f.name in cols}, schema=schema)


# The Ray node that embedded a row: a column the embedding actors add and write_part takes off (into the manifest).
NODE_COLUMN = "_olr_node"


def write_part(table: pa.Table, staging_uri: str, schema_metadata: dict[str, str]) -> pa.Table:
    """Write one batch to ``staging/part-<min uid>.parquet`` with the file metadata.

    Returns its name, rows, the storage retries the write needed and the nodes that embedded it (for the manifest).
    """
    nodes = ""
    if NODE_COLUMN in table.column_names:
        nodes = ",".join(sorted(set(table[NODE_COLUMN].to_pylist()) - {None}))
        table = table.drop_columns([NODE_COLUMN])
    if table.num_rows == 0:
        return pa.table({"file": pa.array([], pa.string()), "rows": pa.array([], pa.int64()),
                         "retries": pa.array([], pa.int64()), "nodes": pa.array([], pa.string())})
    # Sorted by split, so a split filter skips the other splits' row groups by their statistics.
    table = table.replace_schema_metadata(schema_metadata).sort_by([("split", "ascending"), ("uid", "ascending")])
    name = f"part-{int(pa.compute.min(table['uid']).as_py()):010d}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    before = storage.retry_count()
    storage.write_bytes(storage.join(staging_uri, name), sink.getvalue().to_pybytes())
    return pa.table({"file": [name], "rows": [table.num_rows], "retries": [storage.retry_count() - before],
                     "nodes": [nodes]})


def commit(embeddings_uri: str, staging_uri: str, parts: list[tuple[str, int]], manifest: dict[str, Any]) -> dict:
    """Make the staged files the dataset: remove the old marker, move files in, manifest, then ``_SUCCESS``.

    Readers go through ``_SUCCESS`` and the manifest's file list, so until the marker is back
    nothing half-moved is visible to them; a commit interrupted here is redone by a re-run.
    """
    before = storage.retry_count()
    success = storage.join(embeddings_uri, SUCCESS)
    storage.delete_file(success)
    keep = {name for name, _ in parts}
    for old in storage.list_files(embeddings_uri, ".parquet"):
        rel = storage.relative(old, embeddings_uri)
        if "/" not in rel and rel.startswith("part-") and rel not in keep:  # an earlier commit's leftover
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
    """Committed embeddings as NumPy arrays, rows sorted by ``uid``."""

    ids: np.ndarray
    """image_id per row (str)."""
    uids: np.ndarray
    splits: np.ndarray
    E: np.ndarray | None
    """(N, L, k) float32, or None when the ``embedding`` column was not read."""
    labels: np.ndarray | None
    """(N, L) int8 0/1 (-1 where the image had no labels)."""
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


def find_rows(uids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each ``wanted`` uid in the sorted ``uids`` (an embedding table); a uid that is not there stops
    the caller: a prepared image with no committed embedding is an error, never a dropped row."""
    at = np.minimum(np.searchsorted(uids, wanted), len(uids) - 1)
    missing = uids[at] != wanted
    if missing.any():
        raise RuntimeError(f"{int(missing.sum())} prepared image(s) have no committed embedding "
                           f"(uid {int(wanted[missing][0])}, ...): re-run the embed stage")
    return at


def _fixed(col: pa.ChunkedArray, width: int, dtype, missing: float = 0) -> np.ndarray:
    """A list column as an (N, width) array; null rows become ``missing``."""
    arr = col.combine_chunks()
    if arr.null_count:
        arr = arr.fill_null(pa.scalar([missing] * width, arr.type))
    return arr.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(arr), width)


class EmbeddingSet:
    """A committed embedding dataset (local or ``s3://``), read through its manifest, never by a glob.

    Filters are pushed down to Parquet (row-group statistics): files are sorted by split within
    each part, so ``split="test"`` skips the other splits' row groups.

    >>> es = EmbeddingSet("runs/<run-id>/embeddings")
    >>> es.to_pandas(columns=["image_id", "prob_Smiling"], split="test", where={"Eyeglasses": 1})
    >>> es.nearest("000123.jpg", "Smiling", n=5)

    Raises:
        NotCommittedError: when there is no committed dataset at ``uri``.
    """

    def __init__(self, uri: str):
        if not storage.exists(storage.join(uri, SUCCESS)):
            raise NotCommittedError(f"{uri}: no committed embeddings ({SUCCESS} missing); run the embed stage first")
        self.uri = uri
        self.manifest = storage.read_json(storage.join(uri, MANIFEST))
        self.label_names: list[str] = list(self.manifest["label_names"])
        self.k = int(self.manifest["k"])
        self._fs, _ = storage.resolve(uri)
        self.paths = [storage.resolve(storage.join(uri, f["path"]))[1] for f in self.manifest["files"]]

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    @property
    def schema_version(self) -> int:
        return int(self.manifest.get("schema_version", 1))

    def dataset(self) -> pads.Dataset:
        """The committed files as a ``pyarrow.dataset.Dataset`` (for scans of your own)."""
        return pads.dataset(self.paths, filesystem=self._fs, format="parquet")

    def label_index(self, label: str) -> int:
        if label not in self.label_names:
            raise KeyError(f"{label!r} is not a label of {self.uri}; expected one of: {', '.join(self.label_names)}")
        return self.label_names.index(label)

    def _filter(self, split: str | None, where: dict[str, int] | None):
        expr = None
        conds = [pc.field("split") == split] if split is not None else []
        for label, value in (where or {}).items():
            self.label_index(label)
            if self.schema_version < 2:
                raise ValueError(f"{self.uri}: label filters need the label_<Name> columns of schema 2; "
                                 f"this dataset has schema {self.schema_version} (re-run its embed stage)")
            conds.append(pc.field(f"label_{label}") == int(value))
        for c in conds:
            expr = c if expr is None else expr & c
        return expr

    def table(self, columns: list[str] | None = None, split: str | None = None,
              where: dict[str, int] | None = None) -> pa.Table:
        """The rows of one split (or all) whose labels are as ``where`` says ({label: 0 or 1})."""
        if not self.paths:
            schema = embedding_schema(self.label_names, self.k)
            return schema.empty_table().select(columns or schema.names)
        return self.dataset().to_table(columns=columns, filter=self._filter(split, where))

    def to_pandas(self, columns: list[str] | None = None, split: str | None = None,
                  where: dict[str, int] | None = None):
        return self.table(columns, split, where).to_pandas()

    def to_polars(self, columns: list[str] | None = None, split: str | None = None,
                  where: dict[str, int] | None = None):
        import polars as pl

        return pl.from_arrow(self.table(columns, split, where))

    def _embeddings(self, table: pa.Table) -> Embeddings:
        """An :class:`Embeddings` of a table's rows, from whichever array columns it holds."""
        L, k = len(self.label_names), self.k

        def fixed(name: str, width: int, dtype, missing: float = 0) -> np.ndarray | None:
            return _fixed(table[name], width, dtype, missing) if name in table.column_names else None

        E = fixed("embedding", L * k, np.float32)
        return Embeddings(
            ids=table["image_id"].to_numpy(zero_copy_only=False).astype(str),
            uids=table["uid"].to_numpy(),
            splits=table["split"].to_numpy(zero_copy_only=False).astype(str),
            E=None if E is None else E.reshape(-1, L, k),
            labels=fixed("labels", L, np.int8, missing=-1),
            label_names=self.label_names, k=k,
            norms=fixed("norms", L, np.float32),
            probs=fixed("probs", L, np.float32),
            metadata={"schema_version": self.schema_version, "run_id": self.manifest.get("run_id"),
                      "model": self.manifest.get("model")},
        )

    def to_numpy(self, columns: list[str] | None = None, split: str | None = None,
                 where: dict[str, int] | None = None) -> Embeddings:
        """The array columns as an :class:`Embeddings`, rows sorted by uid."""
        want = columns or ["labels", "embedding", "norms", "probs"]
        want = list(dict.fromkeys(["uid", "image_id", "split"] + want))
        return self._embeddings(self.table(want, split, where).sort_by("uid"))

    def lookup(self, image_ids: list[str]) -> Embeddings:
        """The rows of some image ids, in the order given."""
        if not self.paths:
            raise KeyError(f"image_id(s) {', '.join(map(repr, list(image_ids)[:5]))} not in {self.uri} (it is empty)")
        table = self.dataset().to_table(filter=pc.field("image_id").isin(list(image_ids)),
                                        columns=["uid", "image_id", "split", "labels", "embedding", "norms", "probs"])
        found = {v: i for i, v in enumerate(table["image_id"].to_pylist())}
        missing = [i for i in image_ids if i not in found]
        if missing:
            raise KeyError(f"image_id(s) {', '.join(map(repr, missing[:5]))} not in {self.uri}")
        return self._embeddings(table.take([found[i] for i in image_ids]))

    def to_torch(self, split: str | None = None, where: dict[str, int] | None = None):
        """The embeddings as a float32 (N, L, k) tensor, rows sorted by uid (torch is imported here only)."""
        import torch

        return torch.from_numpy(self.to_numpy(["embedding"], split, where).E)

    def block(self, label: str, split: str | None = None, where: dict[str, int] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids, (N, k) vectors) of one label's block, rows sorted by uid."""
        j = self.label_index(label)
        emb = self.to_numpy(["embedding"], split, where)
        return emb.ids, np.ascontiguousarray(emb.E[:, j, :])

    def nearest(self, image_id: str, label: str, n: int = 10, split: str | None = None) -> list[tuple[str, float]]:
        """The ``n`` images whose ``label`` block is closest (cosine) to that of ``image_id``, best first.

        Streams the files batch by batch, so memory stays at one batch plus ``n`` candidates.
        """
        j, L, k = self.label_index(label), len(self.label_names), self.k
        q = self.lookup([image_id]).E[0, j]
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        best_ids, best_sim = np.array([], dtype=object), np.array([], dtype=np.float32)
        for batch in self.dataset().to_batches(columns=["image_id", "embedding"], filter=self._filter(split, None)):
            ids = batch.column("image_id").to_numpy(zero_copy_only=False)
            block = _fixed(pa.chunked_array([batch.column("embedding")]), L * k, np.float32).reshape(-1, L, k)[:, j]
            sim = block @ q / np.maximum(np.linalg.norm(block, axis=1), 1e-12)
            keep = ids != image_id
            best_ids, best_sim = np.concatenate([best_ids, ids[keep]]), np.concatenate([best_sim, sim[keep]])
            if len(best_sim) > n:
                top = np.argpartition(-best_sim, n)[:n]
                best_ids, best_sim = best_ids[top], best_sim[top]
        order = np.argsort(-best_sim, kind="stable")
        return [(str(best_ids[i]), float(best_sim[i])) for i in order]


def load_embeddings(uri: str, columns: list[str] | None = None, split: str | None = None) -> Embeddings:
    """Read a committed embedding dataset (local or ``s3://``) without Ray, as NumPy arrays.

    Only the files listed in ``manifest.json`` are read, and only once ``_SUCCESS`` exists,
    so a dataset being written or a failed write is never half-read.

    Args:
        uri: ``<run>/embeddings``.
        columns: subset of the array columns to read (default: labels, embedding, norms, probs).
        split: keep only this split (train|valid|test); pushed down to the Parquet reader.

    Raises:
        NotCommittedError: when there is no committed dataset at ``uri``.
    """
    return EmbeddingSet(uri).to_numpy(columns, split)
