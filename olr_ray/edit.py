"""Edit images of a trained run: add or remove labels in their embeddings and decode (paper 4.5).

>>> from olr_ray.edit import edit, edit_grid
>>> res = edit("runs/<run-id>", ["000001.jpg"], add=["Eyeglasses"], remove=["Smiling"], scale=1.5)
>>> res.edits["+Eyeglasses"].shape          # (1, 3, S, S) float in [0, 1]
>>> edit_grid(res, "grid.png")

Adding label l replaces its block with a sample of the label's Gaussian (fitted on the training
embeddings, ``analysis/gaussians.npz``) times ``scale``; removing zeroes the block. Every other block
is left bit for bit.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from olr_ray import storage
from olr_ray.analysis import metrics as M
from olr_ray.analysis import plots as P
from olr_ray.embeddings import EmbeddingSet
from olr_ray.models.inference import load_for_inference
from olr_ray.models.precision import resolve_precision
from olr_ray.run import UsageError
from olr_ray.trained import TrainedRun


@dataclass
class EditResult:
    """Decoded images, (N, 3, S, S) float in [0, 1], one row per image id."""

    image_ids: list[str]
    originals: np.ndarray
    """The images as the decoder is trained against them (centre crop of the prepared image)."""
    reconstructions: np.ndarray
    edits: dict[str, np.ndarray] = field(default_factory=dict)
    """``+Label`` / ``-Label`` (one edit each) and ``all`` (every edit at once, when there are several)."""


def label_gaussians(run: TrainedRun, es: EmbeddingSet) -> dict[str, np.ndarray]:
    """The per-label Gaussians the analysis fitted (``analysis/gaussians.npz``), else fitted here on train."""
    path = run.path("analysis", "gaussians.npz")
    if storage.exists(path):
        g = dict(np.load(io.BytesIO(storage.read_bytes(path))))
        g["empty"] = g["count"] == 0
        return g
    train = es.to_numpy(["labels", "embedding", "probs"], split="train")
    return M.fit_label_gaussians(train.E, M.gaussian_images(train.labels, train.probs, run.cfg.analysis.edit_gaussians))


def _check_labels(names: list[str], labels: list[str], option: str) -> None:
    bad = [l for l in labels if l not in names]
    if bad:
        raise UsageError(f"{option} {', '.join(bad)}: not a label of this run; expected one of: {', '.join(names)}")


def edit(run_uri: str, image_ids: list[str], add: list[str] = (), remove: list[str] = (), scale: float = 1.0,
         seed: int = 0) -> EditResult:
    """Decode each image with each label added (at ``scale``) or removed, beside its reconstruction."""
    run = TrainedRun.open(run_uri, needs=("data", "classifier", "siamese", "embed", "decoder"))
    names = run.label_names
    _check_labels(names, list(add), "--add")
    _check_labels(names, list(remove), "--remove")
    if scale <= 0:
        raise UsageError(f"--scale {scale}: expected a positive number")
    es = EmbeddingSet(run.path("embeddings"))
    try:
        rows = es.lookup(list(image_ids))
        images = run.images(list(image_ids))
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    g = label_gaussians(run, es)
    for label in add:
        if g["empty"][names.index(label)]:
            raise UsageError(f"--add {label}: no training image has it, so there is nothing to sample")
    precision = resolve_precision(run.config.get("precision", "auto"), "cpu")
    decoder, _ = load_for_inference(run.checkpoint("decoder"), precision)
    decode = lambda E: decoder.reconstruct(torch.from_numpy(E)).numpy()  # noqa: E731
    changes = [(f"+{l}", names.index(l), "add") for l in add] + [(f"-{l}", names.index(l), "remove") for l in remove]
    with torch.inference_mode():
        res = EditResult(list(image_ids), decoder.target(np.stack([images[i] for i in image_ids])).numpy(),
                         decode(rows.E))
        E_all = rows.E
        for title, l, mode in changes:
            kw = {"scale": scale, "seed": seed + l} if mode == "add" else {}
            res.edits[title] = decode(M.edit_embeddings(rows.E, l, mode, g, **kw))
            E_all = M.edit_embeddings(E_all, l, mode, g, **kw)
        if len(changes) > 1:
            res.edits["all"] = decode(E_all)
    return res


def edit_grid(res: EditResult, path: str, title: str | None = None) -> str:
    """One row per image: original, reconstruction, then each edit. Writes a PNG (local or ``s3://``)."""
    cols = ["original", "reconstruction", *res.edits]
    rows = [[res.originals[i], res.reconstructions[i], *(e[i] for e in res.edits.values())]
            for i in range(len(res.image_ids))]
    with tempfile.TemporaryDirectory() as tmp:
        local = P.plot_image_grid(rows, os.path.join(tmp, "grid.png"), row_titles=res.image_ids, col_titles=cols,
                                  title=title)
        storage.write_bytes(path if storage.is_s3(path) else os.path.abspath(path), open(local, "rb").read())
    return path
