"""Analyst access to committed embeddings, and the paper's analyses on them.

>>> from olr_ray.analysis import load_embeddings
>>> emb = load_embeddings("runs/<run-id>/embeddings")        # or s3://bucket/runs/<run-id>/embeddings
>>> emb.E.shape, emb.label_names[:3]
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from olr_ray import storage


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
    from olr_ray.embed import MANIFEST, SUCCESS

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
