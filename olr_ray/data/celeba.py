"""Read a dataset in CelebA's on-disk format, from a local folder or ``s3://``, into Ray Data.

The format (``list_attr_celeba.txt`` header naming the attributes, ``img_align_celeba/*.jpg``,
optional ``list_eval_partition.txt``) is all that is assumed: any multi-label image dataset
written this way works, whatever its labels or image size.

Bad input policy:
- a malformed attribute or partition file fails at once, naming the file and line;
- a missing or undecodable image never stops the job: its row carries an ``error`` reason
  and the pipeline records it in the run's ``errors/`` table.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from olr_ray import storage
from olr_ray.images import decode_image, decode_images, encode_png  # noqa: F401 - part of this module's API

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
SPLIT_NAMES = {0: "train", 1: "valid", 2: "test"}


class DatasetFormatError(ValueError):
    """The dataset's text files are not in CelebA's format; the message names file and line."""


@dataclass
class AttributeTable:
    """Parsed ``list_attr_celeba.txt``: names from the header, labels as 0/1."""

    label_names: list[str]
    image_ids: list[str]
    labels: np.ndarray  # (N, L) int8 0/1


def parse_attr_file(text: str, source: str = ATTR_FILE, max_rows: int = 0) -> AttributeTable:
    """Parse CelebA's attribute file strictly.

    Args:
        text: file contents.
        source: the file's name or URI, used in error messages.
        max_rows: stop after this many image rows (0: all).

    Raises:
        DatasetFormatError: naming the line of the first problem found.
    """
    lines = text.splitlines()
    if len(lines) < 2:
        raise DatasetFormatError(f"{source}: expected a count line and a header line, found {len(lines)} line(s)")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise DatasetFormatError(f"{source}:1: expected the number of images, got {lines[0].strip()[:60]!r}") from None
    names = lines[1].split()
    if not names:
        raise DatasetFormatError(f"{source}:2: expected attribute names in the header, found none")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DatasetFormatError(f"{source}:2: duplicate attribute name {name!r} in the header")
        seen.add(name)
    n_labels = len(names)
    rows = [(i + 3, ln) for i, ln in enumerate(lines[2:]) if ln.strip()]
    if len(rows) != declared:
        raise DatasetFormatError(f"{source}:1: header says {declared} images but the file has {len(rows)} rows")
    if max_rows and max_rows < len(rows):
        # Evenly spread, not the first rows: CelebA's rows run train, then valid, then test, so its
        # head alone would hold no test image.
        rows = [rows[i] for i in np.unique(np.linspace(0, len(rows) - 1, max_rows).round().astype(int))]
    ids: list[str] = []
    labels = np.empty((len(rows), n_labels), dtype=np.int8)
    seen_ids: set[str] = set()
    for r, (lineno, line) in enumerate(rows):
        parts = line.split()
        if len(parts) != n_labels + 1:
            raise DatasetFormatError(
                f"{source}:{lineno}: expected an image name and {n_labels} values (header has {n_labels} names), "
                f"got {len(parts) - 1} values"
            )
        image_id = parts[0]
        if image_id in seen_ids:
            raise DatasetFormatError(f"{source}:{lineno}: duplicate image name {image_id!r}")
        seen_ids.add(image_id)
        for j, v in enumerate(parts[1:]):
            if v == "1":
                labels[r, j] = 1
            elif v == "-1":
                labels[r, j] = 0
            else:
                raise DatasetFormatError(f"{source}:{lineno}: value for {names[j]!r} must be 1 or -1, got {v!r}")
        ids.append(image_id)
    return AttributeTable(names, ids, labels)


def parse_partition_file(text: str, source: str = PARTITION_FILE) -> dict[str, str]:
    """Parse ``list_eval_partition.txt`` (``name 0|1|2``) into image_id -> train|valid|test."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DatasetFormatError(f"{source}:{lineno}: expected '<image name> 0|1|2', got {line.strip()[:80]!r}")
        if parts[0] in out:
            raise DatasetFormatError(f"{source}:{lineno}: duplicate image name {parts[0]!r}; each image "
                                     f"needs exactly one split")
        out[parts[0]] = SPLIT_NAMES[int(parts[1])]
    return out


def seeded_split(image_ids: list[str], seed: int, test_fraction: float, valid_fraction: float = 0.0) -> list[str]:
    """A random train/valid/test split, stable per image: a hash of (seed, image_id), not of the order.

    An image goes to test with probability ``test_fraction``, to valid with ``valid_fraction``, else to
    train; an image's split does not depend on the other images, so a folder that grows keeps its splits.
    """
    out = []
    for image_id in image_ids:
        h = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
        u = int.from_bytes(h, "little") / 2**64
        out.append("test" if u < test_fraction else "valid" if u < test_fraction + valid_fraction else "train")
    return out


def partition_text(image_ids, splits) -> str:
    """``list_eval_partition.txt`` of these images (``000001.jpg 0``; 0 train, 1 valid, 2 test), sorted by id."""
    code = {name: str(k) for k, name in SPLIT_NAMES.items()}
    return "".join(f"{i} {code[s]}\n" for i, s in sorted(zip(image_ids, splits)))


def select_labels(names: list[str], drop: list[str]) -> list[int]:
    """Indices of the labels kept after removing ``drop`` (names absent from the file are ignored)."""
    dropped = set(drop)
    return [i for i, n in enumerate(names) if n not in dropped]


def require_attr_file(uri: str) -> str:
    """The folder's attribute file, which must exist: a clear error names it otherwise (a missing or
    denied bucket raises StorageError instead)."""
    attr_uri = storage.join(uri, ATTR_FILE)
    if not storage.exists(attr_uri):
        raise DatasetFormatError(f"{attr_uri}: not found; a CelebA-format folder needs {ATTR_FILE} and {IMAGE_DIR}/ "
                                 f"(--data takes such a folder, local or s3://, or 'synthetic')")
    return attr_uri


def load_index(uri: str, drop_labels: list[str], seed: int = 0, test_fraction: float = 0.1,
               max_images: int = 0, unsplit: str | None = None, valid_fraction: float = 0.1,
               partition_file: bool = True) -> tuple[pa.Table, list[str]]:
    """Read the text files of a CelebA-format folder into a table of (image_id, path, labels, split).

    Without ``list_eval_partition.txt`` the split is drawn (seeded, ``test_fraction`` to test and
    ``valid_fraction`` to valid), or is
    ``unsplit`` for every image when that is given (new data embedded with a trained run).
    ``partition_file=False`` draws the seeded split even where the folder has the file.

    Returns:
        The index table and the kept label names.
    """
    attr_uri = require_attr_file(uri)
    table = parse_attr_file(storage.read_bytes(attr_uri).decode("utf-8", errors="replace"), attr_uri, max_images)
    keep = select_labels(table.label_names, drop_labels)
    if not keep:
        raise DatasetFormatError(f"{attr_uri}: no labels left after dropping {drop_labels}")
    names = [table.label_names[i] for i in keep]
    labels = table.labels[:, keep]
    part_uri = storage.join(uri, PARTITION_FILE)
    if partition_file and storage.exists(part_uri):
        raw = storage.read_bytes(part_uri)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise DatasetFormatError(f"{part_uri}:{line}: not UTF-8 text "
                                     f"(byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
        partition = parse_partition_file(text, part_uri)
        missing = [i for i in table.image_ids if i not in partition]
        if missing:
            raise DatasetFormatError(
                f"{part_uri}: {len(missing)} image(s) of {ATTR_FILE} have no split, e.g. {missing[0]!r}")
        splits = [partition[i] for i in table.image_ids]
    elif unsplit is not None:
        splits = [unsplit] * len(table.image_ids)
    else:
        splits = seeded_split(table.image_ids, seed, test_fraction, valid_fraction)
    index = pa.table({
        "uid": pa.array(np.arange(len(table.image_ids), dtype=np.int64)),
        "image_id": pa.array(table.image_ids, pa.string()),
        "path": pa.array([storage.join(uri, IMAGE_DIR, i) for i in table.image_ids], pa.string()),
        "labels": pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1), pa.int8()), len(names)),
        "split": pa.array(splits, pa.string()),
    })
    return index, names


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def plain_index(uri: str, num_labels: int, split: str = "all") -> pa.Table:
    """A folder (or ``s3://`` prefix) of images with no attribute file: every image file under it, sorted,
    as the same index table as :func:`load_index`, its labels unknown (-1)."""
    files = [f for f in storage.list_files(uri) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise DatasetFormatError(f"{uri}: no images ({', '.join(IMAGE_SUFFIXES)}) and no {ATTR_FILE}; expected a "
                                 f"folder of images or a CelebA-format folder")
    ids = [storage.relative(f, uri) for f in files]
    return pa.table({
        "uid": pa.array(np.arange(len(files), dtype=np.int64)),
        "image_id": pa.array(ids, pa.string()),
        "path": pa.array(files, pa.string()),
        "labels": pa.FixedSizeListArray.from_arrays(pa.array(np.full(len(files) * num_labels, -1, np.int8)),
                                                    num_labels),
        "split": pa.array([split] * len(files), pa.string()),
    })


def native_size(uri: str, probe: int = 8) -> int | None:
    """Side of the folder's images after the centre crop (the smaller side), from the first
    readable of a few image headers; None if none of them can be read.

    The images are the first rows of the attribute file (its first 64 KB are read): listing the
    image folder would cost one request per 1,000 objects, some 200 on CelebA in S3.
    """

    from PIL import Image

    head = storage.read_bytes(storage.join(uri, ATTR_FILE), limit=64 * 1024).decode("utf-8", errors="replace")
    rows = [ln.split() for ln in head.splitlines()[2:]]
    names = [r[0] for r in rows if r][:probe]
    for f in (storage.join(uri, IMAGE_DIR, n) for n in names):
        try:
            with Image.open(io.BytesIO(storage.read_bytes(f))) as img:
                return min(img.size)
        except Exception:  # noqa: BLE001 - an unreadable image is reported by the reader itself
            continue
    return None


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray Data batch function: read each file through pyarrow and decode it, recording failures.

    A missing or undecodable file becomes an ``error`` reason on its row; a storage failure
    that is not about the file itself (access denied, endpoint down) is raised, naming the URI.
    ``image_bytes`` keeps each file's own bytes (empty where unreadable): the data stage stores those.
    """
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    blobs = np.full(n, b"", dtype=object)
    fs = storage.resolve(paths[0])[0] if n else None
    for i, uri in enumerate(paths):
        path = storage.resolve(uri)[1] if not storage.is_s3(uri) else uri.split("://", 1)[1]
        try:
            with fs.open_input_stream(path) as f:
                data = f.read()
        except FileNotFoundError:
            errors[i] = "missing file"
            continue
        except OSError as exc:
            if "not found" in str(exc).lower() or "no such file" in str(exc).lower():
                errors[i] = "missing file"
                continue
            raise storage.StorageError(storage.redact(f"read {uri} failed: {exc}")) from exc
        try:
            images[i] = decode_image(data, size)
            blobs[i] = data
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's error
            errors[i] = f"undecodable image: {type(exc).__name__}: {str(exc)[:200]}"
    labels = batch["labels"]
    if labels.dtype == object:
        labels = np.stack(labels)
    return {
        "uid": batch["uid"].astype(np.int64),
        "image_id": batch["image_id"],
        "split": batch["split"],
        "labels": labels.astype(np.int8),
        "image": images,
        "image_bytes": blobs,
        "error": errors.astype(str),
    }


def read_celeba(uri: str, image_size: int = 64, drop_labels: list[str] | None = None, seed: int = 0,
                test_fraction: float = 0.1, max_images: int = 0, batch_size: int = 64,
                valid_fraction: float = 0.1, partition_file: bool = True):
    """Open a CelebA-format folder (local or ``s3://``) as a Ray Dataset.

    Columns: ``uid`` (row of the attribute file), ``image_id`` (file name), ``split`` (train|valid|test), ``labels`` (L int8 0/1),
    ``image`` (uint8 HxWx3, zeros where unreadable) and ``error`` ("" when the image was read,
    else the reason).

    Returns:
        (dataset, label_names, number of rows)
    """
    drop = ["Wearing_Necklace", "Wearing_Necktie"] if drop_labels is None else drop_labels
    index, names = load_index(uri, drop, seed, test_fraction, max_images, valid_fraction=valid_fraction,
                              partition_file=partition_file)
    return decode_index(index, image_size, batch_size), names, index.num_rows


def decode_index(index: pa.Table, image_size: int, batch_size: int = 64):
    """The images an index table names, read and decoded in parallel (the columns of :func:`read_celeba`)."""
    import ray

    n_blocks = max(1, min(200, index.num_rows // 256))
    ds = ray.data.from_arrow(index).repartition(n_blocks)
    return ds.map_batches(decode_batch, fn_kwargs={"size": image_size}, batch_size=batch_size, batch_format="numpy")


def index_for_labels(uri: str, label_names: list[str], split: str = "all") -> tuple[pa.Table, str]:
    """New images to embed with a model trained on ``label_names``: a CelebA-format folder (its labels
    when it has every one of them, else unknown) or a plain folder of images (labels unknown).

    Returns the index table and a line saying where the labels come from.
    """
    if not storage.exists(storage.join(uri, ATTR_FILE)):
        index = plain_index(uri, len(label_names), split)
        return index, f"{index.num_rows} images under {uri}, no {ATTR_FILE}: labels left null"
    index, names = load_index(uri, [], unsplit=split)
    L = len(names)
    values = index["labels"].combine_chunks().flatten().to_numpy().reshape(-1, L)
    lacking = [n for n in label_names if n not in names]
    if lacking:
        picked = np.full((index.num_rows, len(label_names)), -1, np.int8)
        note = f"labels left null: {ATTR_FILE} lacks {', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}"
    else:
        picked = values[:, [names.index(n) for n in label_names]].astype(np.int8)
        note = f"labels from {ATTR_FILE}"
    labels = pa.FixedSizeListArray.from_arrays(pa.array(picked.reshape(-1), pa.int8()), len(label_names))
    return index.set_column(index.schema.get_field_index("labels"), "labels", labels), \
        f"{index.num_rows} images in {uri}, {note}"
