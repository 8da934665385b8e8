"""The three trainable stages as small task objects: model, optimizer, loss, validation.

Tasks are plain picklable objects sent to every Ray Train worker; they read their data
through ``ray.train.get_dataset_shard`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from olr_ray.analysis.metrics import norm_ratio
from olr_ray.models import Decoder, create_model, load_checkpoint
from olr_ray.models.nets import pair_dots, ssim_window
from olr_ray.models.precision import resolve_precision, set_precision
from olr_ray.train.pairs import random_occlusion


@dataclass
class BaseTask:
    name: str
    model_name: str
    model_args: dict[str, Any]
    label_names: list[str]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1
    shuffle_buffer: int | None = 1024
    optimizer: str = "adamw"
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (per-epoch cosine decay to 0 over ``epochs``)."""
    checkpoint_dir: str = ""
    """``<run>/checkpoints/<stage>``: where each epoch's checkpoint and ``latest.json`` go."""
    precision: str = "auto"
    """``auto``, ``bf16`` or ``fp32``; the training loop resolves it on the worker's device."""

    def begin_epoch(self, epoch: int, world: int) -> None:
        """Called by the training loop before each training epoch (0-based) with the number of workers."""

    def build_model(self) -> torch.nn.Module:
        return create_model(self.model_name, **self.model_args)

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        if self.optimizer == "rmsprop":
            return torch.optim.RMSprop(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, start_epoch: int):
        """The per-epoch learning-rate schedule, set to its value at ``start_epoch`` (None: constant).

        Cosine from the base rate to 0 over ``epochs``, in closed form from the base rate, so a resumed
        optimizer (whose loaded rate is already annealed) lands on the same rate as an uninterrupted
        run. ``CosineAnnealingLR`` steps recursively from the current rate and would anneal it twice.
        """
        if self.lr_schedule != "cosine":
            return None
        for group in optimizer.param_groups:  # a loaded optimizer keeps the base rate here
            group.setdefault("initial_lr", group["lr"])
        epochs = self.epochs
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: (1 + math.cos(math.pi * min(e, epochs) / epochs)) / 2, last_epoch=start_epoch - 1)

    def train_dataset(self, epoch: int) -> str:
        return "train"

    def eval_batches(self, name: str, device):
        import ray.train

        for batch in ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=256):
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class ClassifierTask(BaseTask):
    """Multi-label CNN trained with BCE on the observed labels.

    A share ``occlusion_prob`` of the training images carries one random rectangle drawn like
    the Siamese pairs' (:func:`olr_ray.train.pairs.random_occlusion`), so the probabilities that
    later label occluded pairs are calibrated on occluded images; validation stays clean.
    """

    occlusion_prob: float = 0.0
    occlusion_min: float = 0.33
    occlusion_max: float = 0.66
    occlusion_fill: str = "zero"

    def loss(self, model, batch) -> torch.Tensor:
        images = batch["image"]
        if self.occlusion_prob > 0:
            images = random_occlusion(images, self.occlusion_prob, self.occlusion_min, self.occlusion_max,
                                      self.occlusion_fill)
        return F.binary_cross_entropy_with_logits(model(images), batch["labels"].float())

    def _evaluate(self, model, name: str, device) -> dict[str, Any]:
        probs, labels = [], []
        for batch in self.eval_batches(name, device):
            probs.append(torch.sigmoid(model(batch["image"])).cpu())
            labels.append(batch["labels"].cpu())
        p, y = torch.cat(probs), torch.cat(labels).float()
        acc = ((p >= 0.5).float() == y).float().mean(0)
        majority = torch.maximum(y.mean(0), 1 - y.mean(0))
        return {
            "loss": float(F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), y)),
            "mean_accuracy": float(acc.mean()),
            "majority_baseline": float(majority.mean()),
            "accuracy_per_label": {n: float(a) for n, a in zip(self.label_names, acc)},
        }

    def validate(self, model, device, final: bool) -> dict[str, Any]:
        val = self._evaluate(model, "valid", device)
        out = {"val_loss": val["loss"], "val_mean_accuracy": val["mean_accuracy"]}
        if final:
            test = self._evaluate(model, "test", device)
            out.update({
                "test_mean_accuracy": test["mean_accuracy"],
                "test_mean_accuracy_per_label": test["accuracy_per_label"],
                "majority_baseline": test["majority_baseline"],
            })
        return out


@dataclass
class SiameseTask(BaseTask):
    """Siamese network: MSE between row-wise dot products <E1[l], E2[l]> and the joint probability."""

    init_trunk_from: str = ""
    """Classifier checkpoint whose trunk initialises the Siamese trunk (skipped if shapes differ)."""
    grad_floor: float = 0.0
    """Backward-only floor on the dot products' gradient: d<E1, E2>/dE1 = E2 + grad_floor (the
    loss value is unchanged). 0: the exact gradient, which vanishes where both blocks are zero."""

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        if self.init_trunk_from:
            clf, _ = load_checkpoint(self.init_trunk_from)
            src, dst = clf.trunk.state_dict(), model.trunk.state_dict()
            if src.keys() == dst.keys() and all(src[k].shape == dst[k].shape for k in src):
                model.trunk.load_state_dict(src)
        return model

    def train_dataset(self, epoch: int) -> str:
        # One lazily built pair pipeline per epoch: fresh pairs and occlusions, seeded by the epoch.
        return f"pairs_{epoch}"

    def loss(self, model, batch) -> torch.Tensor:
        n = batch["image_a"].shape[0]
        # One forward over both images: DDP expects one forward per backward.
        e = model(torch.cat([batch["image_a"], batch["image_b"]]))
        return F.mse_loss(pair_dots(e[:n], e[n:], self.grad_floor), batch["target"].float())

    def validate(self, model, device, final: bool) -> dict[str, Any]:
        dots, targets, norms, labels = [], [], [], []
        for batch in self.eval_batches("valid", device):
            n = batch["image_a"].shape[0]
            e = model(torch.cat([batch["image_a"], batch["image_b"]]))
            dots.append(pair_dots(e[:n], e[n:]).cpu())
            targets.append(batch["target"].float().cpu())
            norms.append(e.norm(dim=-1).cpu())
            labels.append(torch.cat([batch["labels_a"], batch["labels_b"]]).cpu())
        d, t = torch.cat(dots), torch.cat(targets)
        mse = float(F.mse_loss(d, t))
        r2 = 1.0 - float(((d - t) ** 2).sum() / ((t - t.mean()) ** 2).sum().clamp_min(1e-12))
        return {"val_loss": mse, "val_dot_r2": r2,
                "val_norm_ratio_present_absent": norm_ratio(torch.cat(norms).numpy(), torch.cat(labels).numpy())}


@dataclass
class DecoderTask(BaseTask):
    """Decoder: alpha * (1 - SSIM)(x, out) + (1 - alpha) * MSE(x, minmax(out)) (paper eq. 3), plus two
    optional terms the paper does not have.

    ``edit_weight`` * MSE(siamese(decode(E')), E'): E' is the batch's embeddings with one random block
    per image edited as the analysis edits (half replaced by a sample of its label's Gaussian,
    ``edit_mean``/``edit_chol``, half zeroed), and the frozen Siamese network (``siamese_uri``)
    re-embeds the decoded face. SSIM and MSE alone favour the average face for each label pattern,
    so a cue whose look varies (a hat of any colour, glasses) averages away and its block is barely
    read; this term asks that whatever is put in a block come back out of the face drawn from it.
    It needs no target image, so it trains on exactly the edits the analysis makes.

    ``label_weight`` * BCE(classifier(minmax(out)), labels): the frozen classifier
    (``classifier_uri``) reads the decoded face. It trains through the judge of editing, and on the
    demo it taught the decoder blotches the classifier reads, so it is off by default.
    """

    alpha: float = 0.5
    label_weight: float = 0.0
    classifier_uri: str = ""
    edit_weight: float = 0.0
    siamese_uri: str = ""
    edit_mean: np.ndarray | None = None
    """(L, k) per-label Gaussian means over the training images that have the label."""
    edit_chol: np.ndarray | None = None
    """(L, k, k) Cholesky factors of the per-label covariances (zeros for a label no image has)."""
    edit_warmup: float = 0.0
    """Epochs over which the edit term's weight rises linearly from 0 to ``edit_weight`` (0: full from the start)."""
    train_rows: int = 0
    """Rows of the training split: with the batch size and the workers, the steps of an epoch (the warm-up's clock)."""
    shuffle_buffer: int | None = 1024

    def begin_epoch(self, epoch: int, world: int) -> None:
        self._clock = [epoch, 0, max(1, self.train_rows // (world * self.batch_size))]  # epoch, step, steps/epoch

    def edit_ramp(self) -> float:
        """The share of ``edit_weight`` the current training step gives the edit term, counting the step."""
        clock = self.__dict__.get("_clock")
        if self.edit_warmup <= 0 or clock is None:
            return 1.0
        epoch, step, per_epoch = clock
        clock[1] += 1
        return min(1.0, (epoch + (step + 1) / per_epoch) / self.edit_warmup)

    def _frozen(self, uri: str, device) -> torch.nn.Module:
        """A frozen trained model (classifier or Siamese), loaded once per worker, off the optimizer."""
        cache = self.__dict__.setdefault("_frozen_models", {})
        if uri not in cache:
            net, _ = load_checkpoint(uri)
            cache[uri] = set_precision(net.eval().requires_grad_(False), resolve_precision(self.precision, device))
        return cache[uri].to(device)

    @staticmethod
    def as_input(rec: torch.Tensor, image_size: int) -> torch.Tensor:
        """Decoded images in [0, 1] as the trained networks take images: resized to the input size, in [-1, 1]."""
        x = F.interpolate(rec, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return x * 2.0 - 1.0

    def label_logits(self, rec: torch.Tensor, image_size: int) -> torch.Tensor:
        """Classifier logits on decoded images in [0, 1]."""
        return self._frozen(self.classifier_uri, rec.device)(self.as_input(rec, image_size))

    def _edit_tensors(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``edit_mean`` and ``edit_chol`` as tensors, made once per worker and device (copies: arrays
        that arrive through Ray's object store are read-only views)."""
        cache = self.__dict__.setdefault("_edit_cache", {})
        if (device, dtype) not in cache:
            cache[device, dtype] = tuple(torch.tensor(np.array(a), dtype=dtype, device=device)
                                         for a in (self.edit_mean, self.edit_chol))
        return cache[device, dtype]

    def random_edits(self, E: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One random block per row edited: half the rows get a sample of that label's Gaussian, half a zero block.

        ``generator`` (on ``E``'s device) makes the edits repeatable; validation passes a freshly
        seeded one, so every epoch's ``val_loss`` is measured on the same edits.
        """
        n, L, k = E.shape
        mean, chol = self._edit_tensors(E.device, E.dtype)
        rows = torch.arange(n, device=E.device)
        label = torch.randint(0, L, (n,), device=E.device, generator=generator)
        z = torch.randn(n, k, device=E.device, dtype=E.dtype, generator=generator)
        sample = mean[label] + torch.einsum("nij,nj->ni", chol[label], z)
        add = torch.rand(n, device=E.device, generator=generator) < 0.5
        out = E.clone()
        out[rows, label] = torch.where(add[:, None], sample, torch.zeros_like(sample))
        return out

    def edit_loss(self, edited: torch.Tensor, out: torch.Tensor, image_size: int) -> torch.Tensor:
        """MSE between edited embeddings and the Siamese network's embeddings of their decoded faces."""
        rec = Decoder.rescale(out)
        return F.mse_loss(self._frozen(self.siamese_uri, rec.device)(self.as_input(rec, image_size)), edited)

    def _losses(self, model, batch, generator: torch.Generator | None = None, edit_share: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, SSIM, MSE, the decoded images minmax-scaled to [0, 1]); ``generator`` draws the edits, whose
        term gets ``edit_share`` of ``edit_weight``."""
        from pytorch_msssim import ssim

        m = getattr(model, "module", model)
        x = m.target(batch["image"])
        E = batch["embedding"].float().view(len(x), m.num_labels, m.k)
        edited = self.random_edits(E, generator) if self.edit_weight > 0 else None
        # One forward pass for the batch and its edits: DDP expects one forward per backward.
        out = model(E if edited is None else torch.cat([E, edited]))
        out, out_edited = out[:len(E)], out[len(E):]
        s = ssim(out, x, data_range=1.0, size_average=True, win_size=ssim_window(m.output_size))
        rec = Decoder.rescale(out)
        mse = F.mse_loss(rec, x)
        loss = self.alpha * (1 - s) + (1 - self.alpha) * mse
        if self.label_weight > 0:
            logits = self.label_logits(rec, m.image_size)
            loss = loss + self.label_weight * F.binary_cross_entropy_with_logits(logits, batch["labels"].float())
        if edited is not None:
            loss = loss + edit_share * self.edit_weight * self.edit_loss(edited, out_edited, m.image_size)
        return loss, s, mse, rec

    def loss(self, model, batch) -> torch.Tensor:
        return self._losses(model, batch, edit_share=self.edit_ramp())[0]

    def validate(self, model, device, final: bool) -> dict[str, Any]:
        from pytorch_msssim import ssim

        loss_sum = ssim_sum = psnr_sum = acc_sum = 0.0
        count = acc_count = 0
        edits = torch.Generator(device=device).manual_seed(0)  # the same edits every epoch
        for batch in self.eval_batches("valid", device):
            loss, _, _, rec = self._losses(model, batch, edits)
            x = model.target(batch["image"])
            n = len(x)
            ssim_sum += float(ssim(rec, x, data_range=1.0, size_average=True, win_size=ssim_window(model.output_size))) * n
            mse = ((rec - x) ** 2).flatten(1).mean(1).clamp_min(1e-10)
            psnr_sum += float((10 * torch.log10(1.0 / mse)).sum())
            loss_sum += float(loss) * n
            if self.classifier_uri and "labels" in batch:
                # The classifier on the decoded faces: how many labels it still reads there.
                seen = self.label_logits(rec, model.image_size) >= 0
                acc_sum += float((seen == (batch["labels"] == 1)).float().mean()) * n
                acc_count += n
            count += n
        count = max(count, 1)
        out = {"val_loss": loss_sum / count, "val_ssim": ssim_sum / count, "val_psnr": psnr_sum / count}
        if acc_count:
            out["val_label_accuracy"] = acc_sum / acc_count
        return out
