"""Open the configured image source as one Ray Dataset, whatever it is.

Columns: ``uid`` (int64, stable per image), ``image_id``, ``split``, ``labels`` (L int8),
``image`` (uint8 HxWx3) and ``error`` ("" for a readable image, else the reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from olr_ray.config import DataConfig
from olr_ray.data import celeba, synthetic


@dataclass
class Source:
    dataset: object  # ray.data.Dataset
    label_names: list[str]
    num_rows: int
    image_size: int
    kind: str  # "synthetic" | "celeba-format"


def synthetic_batch(batch: dict[str, np.ndarray], seed: int, size: int, label_noise: float,
                    keep: list[int], test_fraction: float, valid_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """Draw the synthetic faces for a batch of indices (Ray Data ``map_batches`` function)."""
    idx = np.asarray(batch["id"], dtype=np.int64)
    drawn = synthetic.generate(idx, seed=seed, size=size, label_noise=label_noise)
    ids = [f"{i + 1:06d}.jpg" for i in idx]
    return {
        "uid": idx,
        "image_id": np.array(ids),
        "split": np.array(celeba.seeded_split(ids, seed, test_fraction, valid_fraction)),
        "labels": drawn["labels"][:, keep].astype(np.int8),
        "image": drawn["image"],
        "error": np.full(len(idx), "", dtype=object).astype(str),
    }


def open_source(cfg: DataConfig, seed: int) -> Source:
    """The dataset named by ``cfg.source``: built-in synthetic faces or a CelebA-format folder."""
    import ray

    if cfg.source == "synthetic":
        keep = celeba.select_labels(list(synthetic.ATTRIBUTES), cfg.drop_labels)
        names = [synthetic.ATTRIBUTES[i] for i in keep]
        n_blocks = max(2, min(64, cfg.n_images // 1000))
        ds = ray.data.range(cfg.n_images, override_num_blocks=n_blocks).map_batches(
            synthetic_batch, batch_size=500,
            fn_kwargs=dict(seed=seed, size=cfg.image_size, label_noise=cfg.label_noise, keep=keep,
                           test_fraction=cfg.test_fraction, valid_fraction=cfg.valid_fraction),
        )
        return Source(ds, names, cfg.n_images, cfg.image_size, "synthetic")
    # Sizes follow the data: images are cropped and scaled down to data.image_size, never up, so a
    # folder of smaller images trains at its own size with any preset.
    native = celeba.native_size(cfg.source)
    size = min(cfg.image_size, native) if native else cfg.image_size
    ds, names, n = celeba.read_celeba(cfg.source, size, cfg.drop_labels, seed, cfg.test_fraction, cfg.max_images,
                                     valid_fraction=cfg.valid_fraction, partition_file=cfg.partition_file)
    return Source(ds, names, n, size, "celeba-format")
