"""The data stage keeps each image encoded: a CelebA-format file's own bytes, or a lossless PNG, and every read
gives back exactly the pixels the source decodes to."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from olr_ray import storage
from olr_ray.config import DataConfig
from olr_ray.data import synthetic
from olr_ray.data.celeba import decode_image, read_celeba
from olr_ray.data.sources import open_source
from olr_ray.run import prepared_images, read_prepared
from olr_ray.runtime import plan_resources
from olr_ray.stages.data import prepare

PNG = b"\x89PNG"


def _prepare(tmp_path, ds, n):
    data = str(tmp_path / "data")
    plan = plan_resources(2, "false")
    counts = prepare(ds, n, data, str(tmp_path / "errors" / "read_errors.parquet"), plan)
    dirs = [os.path.join(data, f"part={s}") for s in counts if s != "errors" and counts[s]]
    return data, dirs, plan, counts


def _stored(data):
    files = [f for f in storage.list_files(data, ".parquet") if "part=errors" not in f]
    t = pq.ParquetDataset(files).read(columns=["image_id", "image_bytes"])
    return dict(zip(t["image_id"].to_pylist(), t["image_bytes"].to_pylist())), files


def test_drawn_faces_are_stored_as_png_and_read_back_exactly(ray_local, tmp_path):
    src = open_source(DataConfig(n_images=150, image_size=32), seed=4)
    data, dirs, plan, _ = _prepare(tmp_path, src.dataset, 150)
    stored, files = _stored(data)
    assert len(stored) == 150 and all(b.startswith(PNG) for b in stored.values())
    assert "image" not in pq.read_schema(files[0]).names  # no second, raw copy
    assert sum(map(len, stored.values())) < 150 * 32 * 32 * 3
    rows = sorted(read_prepared(dirs, plan, ["uid", "image"], 32).take_all(), key=lambda r: int(r["uid"]))
    np.testing.assert_array_equal(np.stack([r["image"] for r in rows]),
                                  synthetic.generate(np.arange(150), seed=4, size=32)["image"])
    # The driver's reader (figures, the edit command) gives the same pixels.
    some = prepared_images(files, "uid", [3, 77], 32)
    np.testing.assert_array_equal(some[77], rows[77]["image"])


def test_a_celeba_folder_keeps_its_own_bytes_and_is_cropped_on_read(ray_local, tmp_path):
    root = tmp_path / "celeba"
    synthetic.write_celeba_folder(str(root), n=12, size=48, seed=5)
    # One file far larger than the decoded face: stored as the decoded pixels' PNG instead.
    big = root / "img_align_celeba" / "000003.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 500, 3), dtype=np.uint8)).save(big, quality=98)
    ds, _, n = read_celeba(str(root), image_size=32)
    data, dirs, plan, _ = _prepare(tmp_path, ds, n)
    stored, _ = _stored(data)
    for image_id, blob in stored.items():
        source = (root / "img_align_celeba" / image_id).read_bytes()
        assert blob == source if image_id != "000003.jpg" else blob.startswith(PNG), image_id
    for r in read_prepared(dirs, plan, ["image_id", "image"], 32).take_all():
        expected = decode_image((root / "img_align_celeba" / r["image_id"]).read_bytes(), 32)
        np.testing.assert_array_equal(r["image"], expected, err_msg=r["image_id"])
