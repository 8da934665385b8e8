"""The CelebA-format reader: round trips from disk and S3, any label set, and every bad-input case."""

import os

import numpy as np
import pytest
from PIL import Image

from olr_ray.data import synthetic
from olr_ray.data.celeba import (DatasetFormatError, decode_image, load_index, native_size, parse_attr_file,
                                 read_celeba)
from tests.conftest import upload_dir


@pytest.fixture(scope="module")
def celeba_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("celeba")
    synthetic.write_celeba_folder(str(out), n=40, size=48, seed=3)
    return str(out)


def _rows(ds):
    rows = ds.take_all()
    return {r["image_id"]: r for r in rows}


def test_round_trip_local(ray_local, celeba_dir):
    ds, names, n = read_celeba(celeba_dir, image_size=32)
    assert n == 40
    assert len(names) == 38 and "Wearing_Necklace" not in names and "Wearing_Necktie" not in names
    rows = _rows(ds)
    assert len(rows) == 40 and all(r["error"] == "" for r in rows.values())
    r = rows["000001.jpg"]
    assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
    # Labels match what the generator drew (observed labels, the 38 kept columns).
    truth = synthetic.generate(np.array([0]), seed=3, size=48)["labels"][0]
    keep = [i for i, a in enumerate(synthetic.ATTRIBUTES) if a in names]
    assert r["labels"].tolist() == truth[keep].tolist()
    # The partition file decides the split.
    part = dict(line.split() for line in open(os.path.join(celeba_dir, "list_eval_partition.txt")))
    assert r["split"] == {"0": "train", "1": "valid", "2": "test"}[part["000001.jpg"]]


def test_round_trip_s3_matches_local(ray_local, celeba_dir, s3_bucket):
    uri = f"{s3_bucket}/datasets/celeba"
    upload_dir(celeba_dir, uri)
    local = _rows(read_celeba(celeba_dir, image_size=32)[0])
    remote = _rows(read_celeba(uri, image_size=32)[0])
    assert local.keys() == remote.keys()
    for k in local:
        assert np.array_equal(local[k]["image"], remote[k]["image"])
        assert np.array_equal(local[k]["labels"], remote[k]["labels"])


def _write_folder(root, names, rows, sizes=(30, 40)):
    os.makedirs(os.path.join(root, "img_align_celeba"), exist_ok=True)
    lines = [str(len(rows)), " ".join(names)]
    rng = np.random.default_rng(0)
    for image_id, values in rows:
        lines.append(image_id + " " + " ".join(str(v) for v in values))
        arr = rng.integers(0, 255, (sizes[0], sizes[1], 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, "img_align_celeba", image_id))
    with open(os.path.join(root, "list_attr_celeba.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def test_any_label_set_and_size_and_seeded_split(ray_local, tmp_path):
    names = ["Cat", "Dog", "Outdoor"]
    rows = [(f"img{i:03d}.jpg", [1 if (i >> j) & 1 else -1 for j in range(3)]) for i in range(60)]
    _write_folder(str(tmp_path), names, rows, sizes=(50, 30))
    ds, got_names, n = read_celeba(str(tmp_path), image_size=24, seed=1, test_fraction=0.2)
    assert got_names == names and n == 60
    got = _rows(ds)
    assert got["img005.jpg"]["labels"].tolist() == [1, 0, 1]
    assert got["img005.jpg"]["image"].shape == (24, 24, 3)
    splits = [r["split"] for r in got.values()]
    assert set(splits) == {"train", "valid", "test"} and 2 <= splits.count("test") <= 25
    # Seeded: the same seed gives the same split.
    again = _rows(read_celeba(str(tmp_path), image_size=24, seed=1, test_fraction=0.2)[0])
    assert [again[k]["split"] for k in sorted(got)] == [got[k]["split"] for k in sorted(got)]


def test_seeded_split_is_80_10_10_stable_per_image_and_written_in_celeba_s_format():
    from olr_ray.data.celeba import parse_partition_file, partition_text, seeded_split

    ids = [f"{i:06d}.jpg" for i in range(1, 5001)]
    splits = seeded_split(ids, seed=3, test_fraction=0.1, valid_fraction=0.1)
    share = {s: splits.count(s) / len(ids) for s in ("train", "valid", "test")}
    assert share["train"] == pytest.approx(0.8, abs=0.02) and share["valid"] == pytest.approx(0.1, abs=0.015)
    assert share["test"] == pytest.approx(0.1, abs=0.015)
    # An image keeps its split when the folder grows or is read in another order.
    assert seeded_split(ids[::-1][:100], 3, 0.1, 0.1) == splits[::-1][:100]
    # Without a validation share the test images stay the same ones (the paper's 95/5-style split).
    no_valid = seeded_split(ids, 3, 0.1)
    assert set(no_valid) == {"train", "test"} and [s == "test" for s in no_valid] == [s == "test" for s in splits]
    text = partition_text(ids[::-1], splits[::-1])
    assert text.splitlines()[0] == f"000001.jpg {'012'[('train', 'valid', 'test').index(splits[0])]}"
    assert parse_partition_file(text, "x") == dict(zip(ids, splits))


def test_partition_file_is_used_unless_the_config_says_otherwise(tmp_path):
    rows = [(f"{i:06d}.jpg", [1, -1]) for i in range(1, 41)]
    _write_folder(str(tmp_path), ["A", "B"], rows)
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg 1\n" for i in range(1, 41)))
    index, _ = load_index(str(tmp_path), [])
    assert set(index["split"].to_pylist()) == {"valid"}
    index, _ = load_index(str(tmp_path), [], seed=0, test_fraction=0.25, valid_fraction=0.0, partition_file=False)
    assert set(index["split"].to_pylist()) == {"train", "test"}


def test_missing_and_undecodable_images_are_recorded_not_dropped(ray_local, tmp_path):
    names = ["A", "B"]
    rows = [(f"{i:06d}.jpg", [1, -1]) for i in range(1, 11)]
    _write_folder(str(tmp_path), names, rows)
    os.remove(tmp_path / "img_align_celeba" / "000003.jpg")
    (tmp_path / "img_align_celeba" / "000007.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    got = _rows(read_celeba(str(tmp_path), image_size=16)[0])
    assert len(got) == 10
    assert got["000003.jpg"]["error"] == "missing file"
    assert got["000007.jpg"]["error"].startswith("undecodable image")
    assert sum(1 for r in got.values() if r["error"]) == 2


def test_centre_crop_keeps_the_middle():
    img = np.zeros((218, 178, 3), np.uint8)
    img[20:198, :, 0] = 255  # the central 178x178 square is red, top/bottom bands black
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 178)
    assert out.shape == (178, 178, 3) and out[..., 0].min() == 255


@pytest.mark.parametrize("text,message", [
    ("2\nA B\nx.jpg 1 -1\n", "header says 2 images but the file has 1 rows"),
    ("1\nA B\nx.jpg 1\n", "list_attr_celeba.txt:3: expected an image name and 2 values"),
    ("1\nA B\nx.jpg 1 0\n", "list_attr_celeba.txt:3: value for 'B' must be 1 or -1, got '0'"),
    ("1\nA A\nx.jpg 1 1\n", "list_attr_celeba.txt:2: duplicate attribute name 'A'"),
    ("2\nA\nx.jpg 1\nx.jpg -1\n", "list_attr_celeba.txt:4: duplicate image name 'x.jpg'"),
    ("two\nA\n", "list_attr_celeba.txt:1: expected the number of images"),
])
def test_malformed_attribute_file_fails_with_line(text, message):
    with pytest.raises(DatasetFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_attr_file(text, "list_attr_celeba.txt")


def test_folder_without_attribute_file(tmp_path):
    with pytest.raises(DatasetFormatError, match="list_attr_celeba.txt: not found"):
        read_celeba(str(tmp_path))


def test_max_images_keeps_every_split(tmp_path):
    """CelebA's rows run train, valid, test in that order: a trial on a few rows still has a test split."""
    folder = tmp_path / "ordered"
    (folder / "img_align_celeba").mkdir(parents=True)
    ids = [f"{i:06d}.jpg" for i in range(1, 101)]
    codes = [0] * 80 + [1] * 10 + [2] * 10
    (folder / "list_attr_celeba.txt").write_text("100\nA B\n" + "".join(f"{i} 1 -1\n" for i in ids))
    (folder / "list_eval_partition.txt").write_text("".join(f"{i} {c}\n" for i, c in zip(ids, codes)))
    index, _ = load_index(str(folder), [], max_images=20)
    splits = index["split"].to_pylist()
    assert len(splits) == 20 and splits.count("test") == 2 and splits.count("valid") == 2
    assert index["image_id"][0].as_py() == "000001.jpg" and index["image_id"][19].as_py() == "000100.jpg"


@pytest.mark.parametrize("content,message", [
    (b"000001.jpg 0\n000002.jpg 2\n000001.jpg 2\n", r"list_eval_partition.txt:3: duplicate image name '000001.jpg'"),
    (b"000001.jpg 0\n00000\xff.jpg 2\n", r"list_eval_partition.txt:2: not UTF-8 text \(byte 18"),
])
def test_bad_partition_file_names_its_line(tmp_path, content, message):
    (tmp_path / "img_align_celeba").mkdir()
    (tmp_path / "list_attr_celeba.txt").write_text("2\nA\n000001.jpg 1\n000002.jpg -1\n")
    (tmp_path / "list_eval_partition.txt").write_bytes(content)
    with pytest.raises(DatasetFormatError, match=message):
        load_index(str(tmp_path), [])


def test_native_size_reads_the_attribute_file_not_a_listing(celeba_dir, monkeypatch):
    """The size probe opens a few of the listed images; it never lists img_align_celeba/ (on CelebA
    in S3, about 200 list requests)."""
    from olr_ray import storage

    def no_listing(*a, **k):
        raise AssertionError("native_size listed a folder")

    monkeypatch.setattr(storage, "list_files", no_listing)
    assert native_size(celeba_dir) == 48
