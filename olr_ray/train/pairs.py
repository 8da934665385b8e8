"""Occluded pairs and their joint-probability targets, computed on Ray Data.

Every epoch draws fresh random pairs (a seeded global shuffle, then neighbours are paired)
and fresh occlusions, both deterministic from (seed, epoch, image uid). The trained
classifier runs in an actor pool and labels each pair with p(a) * p(b), element-wise.
Optionally (``siamese.label_pair_share``) a share of each batch is paired by a shared label
instead, so that rare labels meet in pairs where both images have them (:func:`pair_order`).
"""

from __future__ import annotations

import numpy as np
import torch

from olr_ray.models.inference import ModelActor

OCCLUSION_SALT = 0x0C1
PAIRING_SALT = 0x0C3


def occlusion_rects(seed: int, epoch: int, uids: np.ndarray, height: int, width: int,
                    lo: float = 0.33, hi: float = 0.66) -> np.ndarray:
    """One rectangle per image: (top, left, h, w), sides uniform in [lo, hi] of the image's.

    Deterministic from (seed, epoch, uid): the same image gets the same rectangle in the
    same epoch whatever batch it lands in.
    """
    out = np.empty((len(uids), 4), dtype=np.int32)
    for i, uid in enumerate(np.asarray(uids, dtype=np.int64)):
        rng = np.random.default_rng([OCCLUSION_SALT, seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, int(uid)])
        fh, fw, ft, fl = rng.random(4)
        h = min(height, max(1, int(round((lo + (hi - lo) * fh) * height))))
        w = min(width, max(1, int(round((lo + (hi - lo) * fw) * width))))
        top = int(ft * (height - h + 1))
        left = int(fl * (width - w + 1))
        out[i] = (min(top, height - h), min(left, width - w), h, w)
    return out


def occluded_flags(seed: int, epoch: int, uids: np.ndarray, prob: float) -> np.ndarray:
    """Which images of a batch are occluded: each with probability ``prob``, deterministic from
    (seed, epoch, uid) like the rectangles. ``prob`` 1 (the paper) occludes every image."""
    if prob >= 1:
        return np.ones(len(uids), dtype=bool)
    draws = np.array([np.random.default_rng([OCCLUSION_SALT + 1, seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, int(u)]).random()
                      for u in np.asarray(uids, dtype=np.int64)])
    return draws < prob


def pair_order(seed: int, epoch: int, uids: np.ndarray, labels: np.ndarray, label_share: float) -> np.ndarray:
    """Row order of one batch whose neighbours (0-1, 2-3, ...) become the pairs.

    ``label_share`` 0 (the paper) keeps the rows as they come: after the global shuffle they are
    random pairs. Otherwise each row is, with probability ``label_share``, given a key label:
    one of its present labels, drawn with weight 1 / (that label's count in the batch), so a
    rare label is nearly always the one drawn. Rows with the same key are paired with each
    other; the rest pair at random. The pairs are then put in random order, so training batches
    stay mixed.

    Why: a label present in 3% of images meets itself in 0.1% of random pairs, so its target
    p(a) * p(b) is almost always near 0 and its block learns little (measured on the demo: norm
    ratio about 1 for Bald, Blurry, Pale_Skin and Wearing_Hat, whose classifier probability
    ratios are 11-37). The regression target is unchanged; only how often each kind of pair is
    seen changes. Deterministic from (seed, epoch, uid) given the batch's rows.

    Returns:
        int64 indices, of even length (an odd last row is left out).
    """
    uids = np.asarray(uids, dtype=np.int64)
    n = len(uids) // 2 * 2
    if label_share <= 0 or n == 0:
        return np.arange(n, dtype=np.int64)
    y = np.asarray(labels)[: len(uids)].astype(bool)
    u = np.array([np.random.default_rng([PAIRING_SALT, seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, int(x)]).random(4)
                  for x in uids]).reshape(len(uids), 4)
    w = y / np.maximum(y.sum(0), 1)
    cw = np.cumsum(w, axis=1)
    pick = np.minimum((cw < (u[:, 1] * cw[:, -1])[:, None]).sum(1), y.shape[1] - 1)
    key = np.where((u[:, 0] < label_share) & y.any(1), pick, y.shape[1])
    order = np.lexsort((u[:, 2], key))[:n]
    pairs = order.reshape(-1, 2)
    pairs = pairs[np.argsort(u[pairs[:, 0], 3], kind="stable")]
    return pairs.reshape(-1).astype(np.int64)


def apply_occlusion(images: np.ndarray, rects: np.ndarray, fill: str = "zero", seed: int | tuple[int, ...] = 0) -> np.ndarray:
    """Copy of ``images`` (N, H, W, 3 uint8) with each rectangle filled.

    fill: ``zero`` (black), ``mean`` (the image's mean colour) or ``noise`` (uniform noise,
    seeded).
    """
    out = images.copy()
    rng = np.random.default_rng(seed)
    for i, (t, l, h, w) in enumerate(rects):
        if fill == "zero":
            out[i, t:t + h, l:l + w] = 0
        elif fill == "mean":
            out[i, t:t + h, l:l + w] = images[i].reshape(-1, 3).mean(0).astype(np.uint8)
        elif fill == "noise":
            out[i, t:t + h, l:l + w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            raise ValueError(f"occlusion fill must be zero, mean or noise, got {fill!r}")
    return out


def random_occlusion(images, prob: float, lo: float = 0.33, hi: float = 0.66, fill: str = "zero",
                     generator=None):
    """Torch twin of :func:`apply_occlusion` for training batches: each image of a uint8
    (N, H, W, 3) tensor gets, with probability ``prob``, one rectangle drawn like the pairs'
    (sides uniform in [lo, hi] of the image's, position uniform). Returns a new tensor.

    The classifier trains on these so that its probabilities stay calibrated on the occluded
    images it later labels: trained on clean images only, it reads a black rectangle as
    evidence (measured on the demo: p(Male) of women rose from 0.07 to 0.62 under occlusion).
    """
    n, h, w = images.shape[:3]
    g = generator
    u = torch.rand(n, 5, generator=g)
    rh = ((lo + (hi - lo) * u[:, 0]) * h).round().clamp(1, h).long()
    rw = ((lo + (hi - lo) * u[:, 1]) * w).round().clamp(1, w).long()
    top = (u[:, 2] * (h - rh + 1)).long().clamp(max=h - rh)
    left = (u[:, 3] * (w - rw + 1)).long().clamp(max=w - rw)
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    mask = ((ys >= top.view(-1, 1, 1)) & (ys < (top + rh).view(-1, 1, 1))
            & (xs >= left.view(-1, 1, 1)) & (xs < (left + rw).view(-1, 1, 1)) & (u[:, 4] < prob).view(-1, 1, 1))
    mask = mask.to(images.device).unsqueeze(-1)
    if fill == "zero":
        value = torch.zeros((), dtype=images.dtype, device=images.device)
    elif fill == "mean":
        value = images.flatten(1, 2).float().mean(1).to(images.dtype).view(n, 1, 1, 3)
    elif fill == "noise":
        value = torch.randint(0, 256, images.shape, generator=g, dtype=torch.uint8).to(images.device)
    else:
        raise ValueError(f"occlusion fill must be zero, mean or noise, got {fill!r}")
    return torch.where(mask, value, images)


def joint_target(p_a: np.ndarray, p_b: np.ndarray) -> np.ndarray:
    """The joint probability of each label over the pair: element-wise product."""
    return (p_a * p_b).astype(np.float32)


def shuffle_seed(seed: int, epoch: int) -> int:
    return (seed * 7919 + epoch * 104_729 + 17) % 2**31


class PairLabeler(ModelActor):
    """Ray Data actor: pairs neighbouring rows, occludes both images, labels with the classifier.

    Loads the classifier once per actor. Input rows: ``uid``, ``image``, ``labels``; output
    rows are pairs: ``image_a``, ``image_b`` (as fed to the Siamese), ``target`` (L float32),
    ``labels_a``, ``labels_b``, ``uid_a``, ``uid_b``.
    """

    def __init__(self, classifier_uri: str, seed: int, epoch: int, target: str = "occlusion",
                 temperature: float = 2.0, lo: float = 0.33, hi: float = 0.66, fill: str = "zero",
                 threads: int = 1, use_gpu: bool = False, prob: float = 1.0, label_share: float = 0.0,
                 precision: str = "auto"):
        super().__init__(threads, use_gpu, precision)
        self.model = self.load(classifier_uri)
        self.seed, self.epoch, self.target = seed, epoch, target
        self.temperature, self.lo, self.hi, self.fill, self.prob = temperature, lo, hi, fill, prob
        self.label_share = label_share

    def probs(self, images: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        return torch.sigmoid(self.run(self.model, images) / temperature).float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = np.asarray(batch["labels"]).astype(np.int8)
        order = pair_order(self.seed, self.epoch, batch["uid"], labels, self.label_share)
        n = len(order)
        uids, images, labels = batch["uid"][order].astype(np.int64), batch["image"][order], labels[order]
        if self.target == "occlusion":
            h, w = images.shape[1:3]
            rects = occlusion_rects(self.seed, self.epoch, uids, h, w, self.lo, self.hi)
            fed = apply_occlusion(images, rects, self.fill, seed=(self.seed & 0xFFFFFFFF, self.epoch & 0xFFFFFFFF))
            if self.prob < 1:
                clean = ~occluded_flags(self.seed, self.epoch, uids, self.prob)
                fed[clean] = images[clean]
            p = self.probs(fed)
        else:  # temperature: un-occluded images, softened probabilities
            fed = images
            p = self.probs(fed, self.temperature)
        a, b = slice(0, n, 2), slice(1, n, 2)
        return {
            "image_a": fed[a], "image_b": fed[b],
            "target": joint_target(p[a], p[b]),
            "labels_a": labels[a], "labels_b": labels[b],
            "uid_a": uids[a], "uid_b": uids[b],
        }


def pair_dataset(base, classifier_uri: str, seed: int, epoch: int, cfg, plan, shuffle: bool = True,
                 label_pairs: bool = True, precision: str = "auto"):
    """The lazy pair pipeline for one epoch: shuffle, pair, occlude, label; nothing is materialised.

    Args:
        base: Ray Dataset of the split's rows (``uid``, ``image``, ``labels``).
        cfg: :class:`olr_ray.config.SiameseConfig`.
        plan: :class:`olr_ray.runtime.ResourcePlan` sizing the actor pool.
        label_pairs: Apply ``cfg.label_pair_share``; False gives random pairs only (validation,
            so that dot R^2 measures the paper's objective whatever the training pairs were).
        precision: the classifier's, resolved on each labelling actor's device.
    """
    import ray

    ds = base.select_columns(["uid", "image", "labels"])
    if shuffle:
        ds = ds.random_shuffle(seed=shuffle_seed(seed, epoch), num_cpus=plan.task_cpus)
    if plan.use_gpu:
        # One labelling actor per training worker, on a share of its GPU (plan.labeler_gpu); the worker has the rest.
        pool, gpu_args = max(1, plan.num_workers), {"num_gpus": plan.labeler_gpu}
    else:
        pool, gpu_args = plan.actors, {}
    return ds.map_batches(
        PairLabeler,
        fn_constructor_kwargs=dict(
            classifier_uri=classifier_uri, seed=seed, epoch=epoch, target=cfg.target,
            temperature=cfg.temperature, lo=cfg.occlusion_min, hi=cfg.occlusion_max,
            fill=cfg.occlusion_fill, threads=1, prob=cfg.occlusion_prob,
            label_share=cfg.label_pair_share if label_pairs else 0.0, precision=precision, use_gpu=plan.use_gpu,
        ),
        batch_size=2 * cfg.labeler_batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
        num_cpus=plan.task_cpus,
        batch_format="numpy",
        **gpu_args,
    )
