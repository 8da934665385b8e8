"""The analysis' model work on Ray, where the job's resources are (a GPU share each when the job has GPUs):

- :func:`decode_split`: a split decoded from its committed embeddings and read by the judges, streamed through
  Ray Data actors; the driver keeps per-image numbers only (SSIM, squared error, each judge's L
  probabilities), never the split's images.
- :class:`EditJudges`: a pool of :class:`EditJudge` actors that decode edited embeddings and read them with every
  judge, for :func:`olr_ray.analysis.editing.edit_success`, and read the exact edits' redrawn faces.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from olr_ray.analysis import editing
from olr_ray.embeddings import Embeddings, find_rows
from olr_ray.models.inference import ModelActor, actor_pool, actor_resources
from olr_ray.models.nets import ssim_window
from olr_ray.runtime import ResourcePlan

log = logging.getLogger("olr_ray.analysis")

BATCH = 256
"""Images per actor call: at 178 px a batch's float maps (originals, reconstructions, their resized copies)
take about 0.5 GB."""


class SplitJudge(ModelActor):
    """Ray Data actor: a batch of prepared images, each given its committed embedding by uid, decoded and judged.

    Returns per image: ``ssim`` (``pytorch_msssim.ssim`` per image, the window of
    :func:`olr_ray.models.nets.ssim_window`), ``sq_err`` (the summed squared error, float64), the classifier's
    probabilities on the reconstruction (``rec_probs``) and on the original through the reconstruction's path
    (``crop_probs``: centre crop, resized back), and with an independent judge its probabilities on the
    reconstruction and on the original (``judge_rec_probs``, ``judge_probs``). Without a decoder (a run that has
    not trained one) only ``judge_probs``.
    """

    def __init__(self, decoder: str | None, classifier: str, judge: bytes | None, table, size: int, threads: int = 1,
                 use_gpu: bool = False, precision: str = "auto"):
        import ray

        super().__init__(threads, use_gpu, precision)
        self.decoder = self.load(decoder) if decoder else None
        self.classifier = self.load(classifier)
        self.judge = self.load(judge) if judge else None
        self.uids, self.E = ray.get(table[0]) if isinstance(table, list) else table
        self.size = size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pytorch_msssim import ssim

        dev = self.device
        at = find_rows(self.uids, batch["uid"])
        with torch.inference_mode():
            images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"])).to(dev)
            if self.decoder is None:
                return {"uid": batch["uid"], "judge_probs": torch.sigmoid(self.judge(images)).float().cpu().numpy()}
            x = self.decoder.target(images)
            rec = self.decoder.reconstruct(torch.from_numpy(self.E[at]).to(dev)).float()
            win = ssim_window(min(x.shape[-2:]))
            out = {
                "uid": batch["uid"],
                "ssim": ssim(rec, x, data_range=1.0, size_average=False, win_size=win).float().cpu().numpy(),
                "sq_err": ((rec.double() - x.double()) ** 2).flatten(1).sum(1).cpu().numpy(),
                "rec_probs": editing.classify_reconstruction(self.classifier, rec, self.size),
                "crop_probs": editing.classify_reconstruction(self.classifier, x, self.size),
            }
            if self.judge is not None:
                out["judge_rec_probs"] = editing.classify_reconstruction(self.judge, rec, self.size)
                out["judge_probs"] = torch.sigmoid(self.judge(images)).float().cpu().numpy()
        return out


@dataclass
class DecodedSplit:
    """Per-image results of :func:`decode_split`, sorted by uid."""

    uids: np.ndarray
    ssim: np.ndarray | None
    """None without a decoder, as ``sq_err``."""
    sq_err: np.ndarray | None
    pixels: int
    """Values per decoded image (3 x out x out): the PSNR's MSE is ``sq_err.sum() / (N * pixels)``."""
    probs: dict[str, np.ndarray]

    def ssim_psnr(self) -> tuple[float, float]:
        """The split's SSIM (mean over images) and PSNR (10 log10(1 / MSE), the MSE pooled over the split):
        the values :func:`olr_ray.analysis.metrics.ssim_psnr` gives on the whole split at once."""
        mse = float(self.sq_err.sum() / (len(self.sq_err) * self.pixels))
        return float(self.ssim.mean()), float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def decode_split(images, emb: Embeddings, decoder: str | None, classifier: str, judge: bytes | None, size: int,
                 out_size: int, plan: ResourcePlan, precision: str) -> DecodedSplit:
    """Every image of ``images`` (a Ray Dataset with ``uid`` and ``image``) decoded from its row of ``emb`` and
    judged by actors of ``plan``, at ``precision`` (resolved); with no ``decoder``, read by ``judge`` alone. An
    image with no row in ``emb``, or a row of ``emb`` with no image, is an error."""
    import ray

    table = ray.put((emb.uids, np.ascontiguousarray(emb.E, dtype=np.float32)))
    out = images.map_batches(
        SplitJudge,
        fn_constructor_kwargs=dict(decoder=decoder, classifier=classifier, judge=judge, table=[table], size=size,
                                   threads=max(1, plan.threads_per_worker), use_gpu=plan.use_gpu,
                                   precision=precision),
        batch_size=BATCH, compute=actor_pool(plan), batch_format="numpy", **actor_resources(plan))
    parts: dict[str, list[np.ndarray]] = {}
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise RuntimeError("the split to decode has no images")
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cols["uid"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    if not np.array_equal(cols["uid"], emb.uids):
        extra = np.setdiff1d(emb.uids, cols["uid"])
        if len(extra):
            raise RuntimeError(f"{len(extra)} embedding row(s) of the split have no prepared image (uid "
                               f"{int(extra[0])}, ...)")
        raise RuntimeError("the split's images and embeddings disagree on uids (a uid read twice?)")
    return DecodedSplit(cols.pop("uid"), cols.pop("ssim", None), cols.pop("sq_err", None), 3 * out_size ** 2, cols)


class EditJudge(ModelActor):
    """Decodes embeddings and reads the decoded faces with every judge (see
    :func:`olr_ray.analysis.editing.judge_decoded`): the classifier's probabilities, the Siamese network's
    re-embedding, then each other judge's probabilities. Run as a Ray actor with the job's model-actor
    resources; the driver sends it each edit's embeddings."""

    def __init__(self, decoder: str, classifier: str, siamese: str, others: list[bytes], size: int,
                 threads: int = 1, use_gpu: bool = False, precision: str = "auto"):
        super().__init__(threads, use_gpu, precision)
        self.decoder, self.classifier, self.siamese = self.load(decoder), self.load(classifier), self.load(siamese)
        self.others = [self.load(b) for b in others]
        self.size = size

    def judge(self, E: np.ndarray) -> tuple[np.ndarray, ...]:
        """Embeddings (N, L, k) decoded, then read by every judge."""
        with torch.inference_mode():
            rec = editing.batched(self.decoder.reconstruct, torch.from_numpy(np.require(E, requirements=["C", "W"]))
                                  .to(self.device))
            return editing.judge_decoded(self.classifier, self.siamese, rec, self.size, *self.others)

    def classify(self, images: np.ndarray) -> list[np.ndarray]:
        """uint8 NHWC faces read by the classifier, then by each other judge: (N, L) probabilities each."""
        x = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device)
        return [torch.sigmoid(editing.batched(m, x)).float().cpu().numpy() for m in (self.classifier, *self.others)]


class EditJudges:
    """A pool of :class:`EditJudge` actors with a model actor's resources under a plan: as many as the plan's actor
    pool on GPUs (a share each), else as many as the job's CPUs hold at ``plan.threads_per_worker`` threads each
    (the analysis trains nothing, so every CPU is free; at least one, at most the plan's actor pool)."""

    def __init__(self, plan: ResourcePlan, precision: str, **kwargs):
        import ray

        threads = max(1, plan.threads_per_worker)
        cpus = plan.data_cpus + plan.cpus_per_worker * plan.num_workers
        n = plan.actors if plan.use_gpu else max(1, min(plan.actors, int(cpus // threads)))
        self.actors = [ray.remote(EditJudge).options(**actor_resources(plan)).remote(
            threads=threads, use_gpu=plan.use_gpu, precision=precision, **kwargs) for _ in range(n)]

    def map(self, method: str, items: Iterable) -> Iterator:
        """``method`` of the actors on each of ``items``, results yielded in ``items``' order. Each item is taken
        (and so made, for a generator) when an actor can take it: at most two calls per actor in flight."""
        import ray

        pending: deque = deque()
        for i, item in enumerate(items):
            pending.append(getattr(self.actors[i % len(self.actors)], method).remote(item))
            if len(pending) >= 2 * len(self.actors):
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
