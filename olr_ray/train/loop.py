"""One training loop for every model, run by each Ray Train worker.

A small task object (:mod:`olr_ray.train.tasks`) supplies the model, the loss on a batch
and the validation; this loop owns seeding, DDP, the per-epoch checkpoint, resume and
reporting. Every worker calls ``ray.train.report`` once per epoch; only rank 0 logs,
validates and writes the checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import torch

from olr_ray.models import save_checkpoint
from olr_ray.runtime import seed_everything

log = logging.getLogger("olr_ray.train")
CHECKPOINT_FILE = "checkpoint.pt"


def _all_mean(value: float, count: int) -> float:
    """Mean of a per-worker average over all workers, weighted by their sample counts."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value * count, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / max(t[1], 1.0))


def train_func(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config["task"]`` is a picklable task from :mod:`olr_ray.train.tasks`."""
    import ray.train
    import ray.train.torch

    task = config["task"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(task.threads)
    seed_everything(task.seed, rank)

    model = task.build_model()
    optimizer = task.build_optimizer(model)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            log.info("[%s] resuming from the checkpoint of epoch %d", task.name, state["epoch"] + 1)
    model = ray.train.torch.prepare_model(model) if world > 1 or torch.cuda.is_available() else model
    device = ray.train.torch.get_device() if (world > 1 or torch.cuda.is_available()) else torch.device("cpu")
    # Ranks seed identically for the model init above (DDP broadcasts rank 0's anyway), then diverge here.
    torch.manual_seed(task.seed * 7 + rank + 1000 * start_epoch)

    for epoch in range(start_epoch, task.epochs):
        t0 = time.time()
        model.train()
        shard = ray.train.get_dataset_shard(task.train_dataset(epoch))
        total, count = 0.0, 0
        for batch in shard.iter_torch_batches(batch_size=task.batch_size, drop_last=True,
                                              local_shuffle_buffer_size=task.shuffle_buffer):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(next(iter(batch.values())))
            total += float(loss.detach()) * n
            count += n
        train_loss = _all_mean(total / max(count, 1), count)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "train_samples": count * world}
        if rank == 0:
            model.eval()
            with torch.inference_mode():
                metrics.update(task.validate(getattr(model, "module", model), device, final=epoch + 1 == task.epochs))
            metrics["epoch_seconds"] = time.time() - t0
            history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            log.info("[%s] epoch %d/%d %s", task.name, epoch + 1, task.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
            with tempfile.TemporaryDirectory() as tmp:
                blob = save_checkpoint(model, task.model_name, extra={
                    "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                    "label_names": task.label_names,
                })
                with open(os.path.join(tmp, CHECKPOINT_FILE), "wb") as f:
                    f.write(blob)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
