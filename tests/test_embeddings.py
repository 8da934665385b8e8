"""The committed embedding format and its reader, without Ray: columns an analyst can name, row groups a
split filter can skip, filters pushed down, blocks and nearest neighbours, and the README's examples."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from olr_ray import storage
from olr_ray.data.synthetic import ATTRIBUTES
from olr_ray.embeddings import (ROW_GROUP_ROWS, SCHEMA_VERSION, STAGING, EmbeddingSet, NotCommittedError, commit,
                                embedding_schema, file_metadata, load_embeddings, to_table, write_part)

NAMES = [a for a in ATTRIBUTES if a not in ("Wearing_Necklace", "Wearing_Necktie")]
L, K, N = len(NAMES), 32, 12_500
README = open(__import__("os").path.join(__import__("os").path.dirname(__file__), "..", "README.md")).read()


def _commit(uri: str, n: int = N, unlabelled: int = 0, seed: int = 0) -> dict:
    """A committed dataset of n rows in two files, as the embed stage writes it (random vectors)."""
    rng = np.random.default_rng(seed)
    meta = file_metadata(NAMES, K, "t", "model.pt")
    schema = embedding_schema(NAMES, K, meta)
    E = rng.random((n, L, K), dtype=np.float32)
    labels = rng.integers(0, 2, (n, L)).astype(np.int8)
    labels[n - unlabelled:] = -1
    splits = np.array(["train", "valid", "test"])[rng.integers(0, 3, n)]
    probs = rng.random((n, L), dtype=np.float32)
    staging = storage.join(uri, STAGING, "a")
    parts = []
    for lo in (0, n // 2):
        hi = n if lo else n // 2
        t = to_table(np.arange(lo, hi), [f"{i + 1:06d}.jpg" for i in range(lo, hi)], splits[lo:hi], labels[lo:hi],
                     E[lo:hi], probs[lo:hi], schema)
        r = write_part(t, staging, meta).to_pylist()[0]
        parts.append((r["file"], r["rows"]))
    commit(uri, staging, parts, {"label_names": NAMES, "k": K, "schema_version": SCHEMA_VERSION})
    return {"E": E, "labels": labels, "splits": splits, "probs": probs}


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("run") / "embeddings")
    return uri, _commit(uri)


def test_named_columns_row_groups_and_schema_version(committed):
    uri, data = committed
    es = EmbeddingSet(uri)
    f = es.paths[0]
    schema = pq.read_schema(f)
    assert schema.field("label_Smiling").type == pa.int8() and schema.field("prob_Smiling").type == pa.float32()
    assert schema.metadata[b"olr.schema_version"] == str(SCHEMA_VERSION).encode() and es.schema_version == 2
    meta = pq.read_metadata(f)
    assert meta.num_row_groups == -(-meta.num_rows // ROW_GROUP_ROWS) >= 1
    t = es.table(["uid", "label_Smiling", "prob_Smiling", "norm_Smiling"]).sort_by("uid")
    j = NAMES.index("Smiling")
    np.testing.assert_array_equal(t["label_Smiling"].to_numpy(), data["labels"][:, j])
    np.testing.assert_allclose(t["prob_Smiling"].to_numpy(), data["probs"][:, j])
    np.testing.assert_allclose(t["norm_Smiling"].to_numpy(), np.linalg.norm(data["E"][:, j], axis=-1), rtol=1e-6)


def test_a_split_filter_skips_the_other_splits_row_groups(tmp_path):
    """Files are sorted by split, so row-group statistics let a reader skip whole groups."""
    uri = str(tmp_path / "embeddings")
    _commit(uri, n=4 * ROW_GROUP_ROWS)
    groups = skippable = 0
    for f in EmbeddingSet(uri).paths:
        meta = pq.read_metadata(f)
        col = meta.schema.to_arrow_schema().get_field_index("split")
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(col).statistics
            groups += 1
            skippable += not (stats.min <= "test" <= stats.max)
    assert groups >= 4 and skippable >= groups // 2


def test_filters_block_and_nearest(committed):
    uri, data = committed
    es = EmbeddingSet(uri)
    j = NAMES.index("Eyeglasses")
    want = (data["splits"] == "test") & (data["labels"][:, j] == 1)
    emb = es.to_numpy(split="test", where={"Eyeglasses": 1})
    np.testing.assert_array_equal(emb.uids, np.flatnonzero(want))
    np.testing.assert_array_equal(emb.E, data["E"][want])
    ids, block = es.block("Smiling", split="test")
    np.testing.assert_array_equal(block, data["E"][data["splits"] == "test"][:, NAMES.index("Smiling")])
    # nearest agrees with brute-force cosine over every other image's Smiling block
    s = NAMES.index("Smiling")
    B = data["E"][:, s]
    q = B[0]
    cos = B @ q / (np.linalg.norm(B, axis=1) * np.linalg.norm(q))
    cos[0] = -np.inf
    top = np.argsort(-cos)[:5]
    got = es.nearest("000001.jpg", "Smiling", n=5)
    assert [g[0] for g in got] == [f"{i + 1:06d}.jpg" for i in top]
    np.testing.assert_allclose([g[1] for g in got], cos[top], rtol=1e-5)
    with pytest.raises(KeyError, match="not a label"):
        es.block("Mouth_Open")
    with pytest.raises(KeyError, match="not in"):
        es.nearest("nope.jpg", "Smiling")
    assert es.to_torch(split="valid").shape == (int((data["splits"] == "valid").sum()), L, K)
    assert es.to_polars(columns=["image_id"]).height == N


def test_images_without_labels_have_null_labels(tmp_path):
    uri = str(tmp_path / "embeddings")
    _commit(uri, n=100, unlabelled=40)
    t = EmbeddingSet(uri).table(["uid", "labels", "label_Smiling"]).sort_by("uid")
    assert t["labels"].null_count == 40 == t["label_Smiling"].null_count
    assert load_embeddings(uri).labels[60:].tolist() == [[-1] * L] * 40


def test_an_uncommitted_folder_is_refused(tmp_path):
    with pytest.raises(NotCommittedError, match="_SUCCESS missing"):
        EmbeddingSet(str(tmp_path))


def _example(tag: str) -> str:
    m = re.search(r"```\w+\n(?:--|#) example: " + tag + r"\n(.*?)```", README, re.S)
    assert m, f"README has no '{tag}' example"
    return m.group(1)


def test_readme_duckdb_example_runs(committed):
    import duckdb

    uri, data = committed
    con = duckdb.connect()
    results = [con.execute(stmt).fetchall() for stmt in _example("duckdb").replace("runs/<run-id>/embeddings", uri)
               .split(";") if stmt.strip()]
    glasses, nearest = results[-2], results[-1]
    j = NAMES.index("Eyeglasses")
    assert len(glasses) == 10 and all(r[1] >= glasses[-1][1] for r in glasses)
    want = (data["splits"] == "test") & (data["labels"][:, j] == 1)
    assert glasses[0][1] == pytest.approx(np.linalg.norm(data["E"][want][:, j], axis=-1).max(), rel=1e-6)
    ours = EmbeddingSet(uri).nearest("000001.jpg", "Smiling", n=4)
    assert [r[0] for r in nearest] == ["000001.jpg"] + [i for i, _ in ours]  # itself first, at cosine 1


@pytest.mark.parametrize("tag", ["pandas", "polars"])
def test_readme_python_examples_run(committed, tag):
    uri, _ = committed
    code = _example(tag).replace("runs/<run-id>/embeddings", uri)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Smiling" in out.stdout or "norm_Goatee" in out.stdout
