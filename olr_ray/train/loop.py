"""One training loop for every model, run by each Ray Train worker.

A small task object (:mod:`olr_ray.train.tasks`) supplies the model, the loss on a batch
and the validation; this loop owns seeding, DDP, the per-epoch checkpoint, resume and
reporting. Checkpoints go to ``task.checkpoint_dir`` (local or S3) as ``epoch-NNNN.pt`` plus a
``latest.json`` pointer; a worker restarted by ``FailureConfig`` and a re-run of the same run
id both start from that pointer, so resuming works the same in-process and on a cluster. Every worker calls ``ray.train.report`` once per epoch; only rank 0 logs,
validates and writes the checkpoint.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import torch

from olr_ray import storage
from olr_ray.models import save_checkpoint
from olr_ray.models.precision import resolve_precision, set_precision
from olr_ray.runtime import node_id, seed_everything

log = logging.getLogger("olr_ray.train")
LATEST = "latest.json"


def _all_mean(value: float, count: int) -> float:
    """Mean of a per-worker average over all workers, weighted by their sample counts."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value * count, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / max(t[1], 1.0))


def _all_nodes() -> list[str]:
    """The Ray nodes of every worker of the group, for the manifest (``stages.<name>.nodes``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [node_id()]
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, node_id())
    return sorted({g for g in gathered if g})


def epoch_file(epoch: int) -> str:
    return f"epoch-{epoch + 1:04d}.pt"


def save_epoch(checkpoint_dir: str, epoch: int, blob: bytes, keep: int = 2) -> str:
    """Write this epoch's checkpoint, then point ``latest.json`` at it, then prune old epochs.

    The pointer is written after the file, so a crash mid-write never leaves it pointing at
    a partial checkpoint.
    """
    uri = storage.join(checkpoint_dir, epoch_file(epoch))
    storage.write_bytes(uri, blob)
    storage.write_json(storage.join(checkpoint_dir, LATEST), {"epoch": epoch + 1, "file": epoch_file(epoch)})
    for old in range(max(0, epoch + 1 - keep - 3), epoch + 1 - keep):
        storage.delete_file(storage.join(checkpoint_dir, epoch_file(old)))
    return uri


def latest_checkpoint_uri(checkpoint_dir: str) -> str | None:
    pointer = storage.join(checkpoint_dir, LATEST)
    if not storage.exists(pointer):
        return None
    return storage.join(checkpoint_dir, storage.read_json(pointer)["file"])


def load_latest(checkpoint_dir: str) -> dict[str, Any] | None:
    """The newest complete checkpoint of a stage, or None on a fresh start."""
    uri = latest_checkpoint_uri(checkpoint_dir)
    if uri is None:
        return None
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=False)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config["task"]`` is a picklable task from :mod:`olr_ray.train.tasks`."""
    import ray.train
    import ray.train.torch

    task = config["task"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(task.threads)
    seed_everything(task.seed, rank)

    distributed = world > 1 or torch.cuda.is_available()
    device = ray.train.torch.get_device() if distributed else torch.device("cpu")
    task.precision = resolve_precision(task.precision, device)
    model = set_precision(task.build_model(), task.precision)
    start_epoch, history = 0, []
    state = load_latest(task.checkpoint_dir)
    if state is not None:
        model.load_state_dict(state["state_dict"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            log.info("[%s] resuming after epoch %d from %s", task.name, state["epoch"] + 1, task.checkpoint_dir)
    if rank == 0:
        log.info("[%s] precision %s on %s", task.name, task.precision, device)
    model = ray.train.torch.prepare_model(model) if distributed else model
    nodes = _all_nodes()
    # The optimizer comes after the model is on its device: load_state_dict puts the saved moments on
    # the parameters' device as it loads, and a later move of the model would leave them on the CPU,
    # so a resumed GPU run would fail at its first step.
    optimizer = task.build_optimizer(model)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler = task.build_scheduler(optimizer, start_epoch)
    # Ranks seed identically for the model init above (DDP broadcasts rank 0's anyway), then diverge here.
    torch.manual_seed(task.seed * 7 + rank + 1000 * start_epoch)

    if start_epoch >= task.epochs and history:
        # Already trained to the end (a re-run after the last checkpoint): report the final
        # metrics again so the driver gets them, and train nothing.
        ray.train.report(history[-1])
    for epoch in range(start_epoch, task.epochs):
        t0 = time.time()
        model.train()
        task.begin_epoch(epoch, world)
        shard = ray.train.get_dataset_shard(task.train_dataset(epoch))
        total, count, wait = 0.0, 0, 0.0
        batches = iter(shard.iter_torch_batches(batch_size=task.batch_size, drop_last=True,
                                                local_shuffle_buffer_size=task.shuffle_buffer))
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)  # the time spent here is the data pipeline's, not the model's
            wait += time.perf_counter() - t_wait
            if batch is None:
                break
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(next(iter(batch.values())))
            total += float(loss.detach()) * n
            count += n
        train_seconds = time.time() - t0
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        train_loss = _all_mean(total / max(count, 1), count)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "train_samples": count * world,
                                   "lr": lr, "precision": task.precision, "nodes": nodes}
        if state is not None:
            # This attempt resumed (a re-run, or a restart after a lost worker): say from where.
            metrics["resumed_after_epoch"] = state["epoch"] + 1
        if rank == 0:
            model.eval()
            t_val = time.time()
            with torch.inference_mode():
                metrics.update(task.validate(getattr(model, "module", model), device, final=epoch + 1 == task.epochs))
            # Where the epoch went (rank 0): waiting for batches, the training steps, validation.
            metrics.update(epoch_seconds=time.time() - t0, data_wait_seconds=wait, step_seconds=train_seconds - wait,
                           validate_seconds=time.time() - t_val)
            if device.type == "cuda":  # rank 0's peak GPU memory so far (benchmarks/gpu_check.sh reports it)
                metrics["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            history.append(metrics)
            log.info("[%s] epoch %d/%d %s", task.name, epoch + 1, task.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
            metrics["storage_retries"] = storage.retry_count()  # this process's, cumulative
            blob = save_checkpoint(model, task.model_name, extra={
                "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                "label_names": task.label_names,
            })
            save_epoch(task.checkpoint_dir, epoch, blob)
            ray.train.report(metrics)
        else:
            ray.train.report(metrics)
