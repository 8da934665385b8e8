"""An independent judge for the synthetic faces: a classifier that cannot read a label from its correlates.

The pipeline's classifier is the paper's judge of edits, but it learned from faces whose attributes are
correlated (men rarely wear makeup, bald faces are mostly old men), so it partly reads a label from what
usually comes with it: a perfectly drawn mustache on a woman's face is accepted on few faces. This judge is
trained on faces the generator draws with every attribute independent of every other (each present with
probability one half), so the only evidence of a label it can learn is the label's own drawing. It is
trained from the generator alone, on its own seed: no OLR model ever sees its faces, and it never sees the
run's.

It depends on nothing of a run but the labels and the image size, so it is trained once and kept
beside the runs (``<output>/_judges/``, one file per generator version and recipe): every later run and every
ablation run with that output reads it instead of training it again.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from olr_ray import storage
from olr_ray.data import synthetic
from olr_ray.models.inference import actor_resources, inference_device
from olr_ray.models.nets import Classifier
from olr_ray.models.precision import resolve_precision, set_precision

log = logging.getLogger("olr_ray.analysis")

# The judge's faces come from their own seed, never the run's: the run's (seed, index) pairs and the judge's
# do not meet for any run seed below the offset.
_SEED_OFFSET = 1_000_003
# One judge for every run of a label set and size, whatever the run's seed: it is an instrument, and runs of
# different seeds compared under one judge differ by their own noise only.
JUDGE_SEED = 0
LR = 3e-3


# Each attribute's rate: CelebA's, kept within [0.2, 0.5]. Rare enough that what hides another attribute (a hat,
# a bald head, bangs over a hairline, one hair colour drawn over another) leaves that one visible on most faces,
# common enough that every label has thousands of positives.
JUDGE_RATES = np.clip([synthetic.CELEBA_RATES[a] for a in synthetic.ATTRIBUTES], 0.2, 0.5)


def independent_faces(names: list[str], n: int, seed: int, size: int, start: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` faces with every attribute drawn independently (``JUDGE_RATES``): (uint8 NHWC images, (n, L)
    labels in ``names`` order). Indices ``start .. start + n - 1`` of the judge's own stream."""
    idx = np.arange(start, start + n, dtype=np.int64)
    judge_seed = seed + _SEED_OFFSET
    attrs = synthetic.sample_independent_attributes(judge_seed, idx, JUDGE_RATES)
    images = synthetic.render(attrs, judge_seed, idx, size)
    cols = [synthetic.ATTRIBUTE_INDEX[name] for name in names]
    return images, attrs[:, cols]


def train_independent_judge(names: list[str], size: int, seed: int, images: int, epochs: int, precision: str,
                            width: int = 32, batch_size: int = 128, held_out: int = 1024,
                            device: torch.device | str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Train the judge on ``images`` independent faces and measure it on ``held_out`` more, on ``device``.

    Returns the model (on the CPU, eval mode, at ``precision``) and ``judge.independent.*`` metrics: its mean
    accuracy on held-out independent faces, per label, and the seconds its faces and its training took.
    """
    t0 = time.perf_counter()
    x, y = independent_faces(names, images, seed, size)
    xv, yv = independent_faces(names, held_out, seed, size, start=images)
    t_draw = time.perf_counter() - t0
    with torch.random.fork_rng(devices=[]):  # the driver's own random state stays as it was
        torch.manual_seed(seed)
        model = set_precision(Classifier(len(names), size, width), precision).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    steps = epochs * math.ceil(images / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.15)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).float()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(images, generator=gen)
        total = 0.0
        for i in range(0, images, batch_size):
            b = order[i:i + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(xt[b].to(device)), yt[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(b)
        log.info("independent judge: epoch %d/%d, loss %.4f", epoch + 1, epochs, total / images)
    model.eval()
    with torch.inference_mode():
        pv = torch.cat([torch.sigmoid(model(torch.from_numpy(xv[i:i + 256]).to(device))).cpu()
                        for i in range(0, held_out, 256)])
    model.cpu()
    seen = pv.numpy() >= 0.5
    acc = (seen == (yv == 1)).mean(axis=0)
    recall = np.array([seen[yv[:, j] == 1, j].mean() for j in range(len(names))])
    metrics = {
        "judge.independent.heldout_mean_accuracy": float(acc.mean()),
        "judge.independent.heldout_min_accuracy": float(acc.min()),
        "judge.independent.heldout_accuracy_per_label": {n: float(a) for n, a in zip(names, acc)},
        # What an exact add needs: the label seen where it is drawn.
        "judge.independent.heldout_recall": float(recall.mean()),
        "judge.independent.heldout_recall_per_label": {n: float(r) for n, r in zip(names, recall)},
        "judge.independent.images": images,
        "judge.independent.draw_seconds": round(t_draw, 2),
        "judge.independent.train_seconds": round(time.perf_counter() - t0 - t_draw, 2),
    }
    log.info("independent judge: held-out accuracy %.4f (lowest %s %.3f), %.0f s to draw, %.0f s to train",
             acc.mean(), names[int(acc.argmin())], acc.min(), t_draw, metrics["judge.independent.train_seconds"])
    return model, metrics


def judge_file(names: list[str], size: int, images: int, epochs: int, width: int, seed: int = JUDGE_SEED) -> str:
    """File name of a judge: the recipe, and the generator's and this module's source, hashed (a changed
    generator or recipe trains a new judge rather than reading a stale one)."""
    recipe = json.dumps([names, size, seed, images, epochs, width, LR, JUDGE_RATES.tolist()])
    source = inspect.getsource(synthetic) + inspect.getsource(train_independent_judge)
    digest = hashlib.sha256((recipe + source).encode()).hexdigest()[:16]
    return f"judge-{size}px-{digest}.pt"


def _train_on_device(names: list[str], size: int, seed: int, images: int, epochs: int, precision: str,
                     width: int, use_gpu: bool) -> tuple[bytes, dict[str, Any]]:
    """:func:`train_independent_judge` where it runs (a Ray task's GPU, see :func:`independent_judge`), at
    ``precision`` (a setting, resolved on that device): its weights, saved, and its metrics."""
    device = inference_device(use_gpu)
    model, metrics = train_independent_judge(names, size, seed, images, epochs,
                                             resolve_precision(precision, device), width, device=device)
    metrics["judge.independent.device"] = device.type
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue(), metrics


def independent_judge(cache_dir: str, names: list[str], size: int, images: int, epochs: int, precision: str,
                      width: int = 32, seed: int = JUDGE_SEED, plan=None, setting: str | None = None
                      ) -> tuple[Classifier, dict[str, Any]]:
    """The independent judge of this recipe: read from ``cache_dir`` (local or ``s3://``) when trained before,
    else trained now and written there. Returns the model (eval mode, at ``precision``) and its metrics
    (``judge.independent.cached`` says which).

    With a ``plan`` (:class:`olr_ray.runtime.ResourcePlan`) whose job has GPUs it trains in a Ray task holding a
    model actor's GPU share (:func:`olr_ray.models.inference.actor_resources`), at the precision ``setting``
    (``auto``, ``bf16``, ``fp32``; default ``precision``) resolved on that GPU; otherwise here, on this
    process' CPU at ``precision``.
    """
    uri = storage.join(cache_dir, judge_file(names, size, images, epochs, width, seed))
    if storage.exists(uri):
        blob = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
        model = Classifier(len(names), size, width)
        model.load_state_dict(blob["state_dict"])
        metrics, cached = dict(blob["metrics"]), True
        log.info("independent judge: read from %s (held-out accuracy %.4f)", uri,
                 metrics["judge.independent.heldout_mean_accuracy"])
    else:
        log.info("independent judge: training on %d independent faces, %d epochs (once per output folder: "
                 "kept in %s)", images, epochs, uri)
        if plan is not None and plan.use_gpu:
            import ray

            task = ray.remote(_train_on_device).options(**actor_resources(plan))
            state, metrics = ray.get(task.remote(names, size, seed, images, epochs, setting or precision, width, True))
            model = Classifier(len(names), size, width)
            model.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=True))
        else:
            model, metrics = train_independent_judge(names, size, seed, images, epochs, precision, width)
            metrics["judge.independent.device"] = "cpu"
        cached = False
        buf = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "metrics": metrics}, buf)
        storage.makedirs(cache_dir)
        storage.write_bytes(uri, buf.getvalue())
    metrics["judge.independent.cached"] = cached
    return set_precision(model.eval(), precision), metrics
