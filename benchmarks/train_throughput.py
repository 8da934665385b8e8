"""Training throughput: Ray Train DDP with 2 CPU workers against one plain PyTorch process with the
same total threads, same model (the OLR classifier) and per-step batch, at each precision (bf16 and fp32
side by side). Prints JSON, the bf16/fp32 ratios in its last keys.

    .venv/bin/python benchmarks/train_throughput.py --n 4096 --size 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import matmul_peak, model_flops  # noqa: E402

L = 38


def _model(size: int, width: int, precision: str = "fp32"):
    from olr_ray.models import Classifier
    from olr_ray.models.precision import set_precision

    torch.manual_seed(0)
    return set_precision(Classifier(L, size, width), precision)


def plain(images: np.ndarray, labels: np.ndarray, batch: int, threads: int, size: int, width: int,
          precision: str) -> float:
    torch.set_num_threads(threads)
    model = _model(size, width, precision)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels).float()

    def epoch() -> int:
        n = 0
        for i in range(0, len(x) - batch + 1, batch):
            loss = F.binary_cross_entropy_with_logits(model(x[i:i + batch]), y[i:i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += batch
        return n

    epoch()  # warm-up
    t = time.perf_counter()
    n = epoch()
    return n / (time.perf_counter() - t)


def ddp_train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    model = ray.train.torch.prepare_model(_model(config["size"], config["width"], config["precision"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    shard = ray.train.get_dataset_shard("train")
    rates = []
    for _ in range(2):  # epoch 1 warms up
        t, n = time.perf_counter(), 0
        for b in shard.iter_torch_batches(batch_size=config["batch"], drop_last=True):
            loss = F.binary_cross_entropy_with_logits(model(b["image"]), b["labels"].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(b["image"])
        rates.append(n / (time.perf_counter() - t))
    if ray.train.get_context().get_world_rank() == 0:
        # Ray Train V2 keeps only checkpointed reports in Result.metrics: hand the number back in a file.
        with open(config["out"], "w") as f:
            f.write(str(rates[-1]))
    ray.train.report({"images_per_s": rates[-1]})


def ddp(images: np.ndarray, labels: np.ndarray, batch: int, workers: int, size: int, width: int,
        precision: str) -> float:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ds = ray.data.from_numpy(images).map_batches(
        lambda b: {"image": b["data"], "labels": np.zeros((len(b["data"]), L), np.int8)},
        batch_format="numpy").materialize()
    threads = max(1, (os.cpu_count() or 1) // workers)
    out = f"/tmp/olr-bench-rate-{os.getpid()}.txt"
    trainer = TorchTrainer(
        ddp_train_func,
        train_loop_config={"threads": threads, "batch": batch, "size": size, "width": width, "out": out,
                           "precision": precision},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        datasets={"train": ds},
        run_config=ray.train.RunConfig(storage_path="/tmp/olr-bench"),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    # Each worker saw 1/workers of the data in the same time: the job's rate is workers x rank 0's.
    return float(open(out).read()) * workers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="per step, per worker")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precisions", default="bf16,fp32", help="comma-separated, each measured alike (default bf16,fp32)")
    args = p.parse_args()
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]

    from olr_ray.data import synthetic
    from olr_ray.models.precision import bf16_native

    drawn = synthetic.generate(np.arange(args.n), size=args.size)
    images, labels = drawn["image"], drawn["labels"][:, :L]
    threads = os.cpu_count() or 1
    peaks = {pr: matmul_peak(threads, pr) for pr in precisions}  # before Ray holds the cores
    flops = model_flops(_model(args.size, args.width), torch.from_numpy(images[:8]), train=True)
    plain_rates = {pr: plain(images, labels, args.batch_size, threads, args.size, args.width, pr) for pr in precisions}
    ddp_rates = {pr: ddp(images, labels, args.batch_size, args.workers, args.size, args.width, pr) for pr in precisions}
    out = {
        "benchmark": "train_throughput", "model": "classifier", "n": args.n, "size": args.size,
        "batch_size_per_worker": args.batch_size, "workers": args.workers, "total_threads": threads,
        "bf16_native": bf16_native("cpu"), "train_flops_per_image": flops,
    }
    for pr in precisions:
        out[pr] = {
            "ray_ddp_images_per_s": round(ddp_rates[pr], 1), "plain_images_per_s": round(plain_rates[pr], 1),
            "ratio": round(ddp_rates[pr] / plain_rates[pr], 3), "machine_matmul_flops_per_s": round(peaks[pr]),
            "ray_ddp_fraction_of_matmul": round(ddp_rates[pr] * flops / peaks[pr], 4),
            "plain_fraction_of_matmul": round(plain_rates[pr] * flops / peaks[pr], 4),
        }
    if {"bf16", "fp32"} <= set(precisions):
        for key in ("ray_ddp_images_per_s", "plain_images_per_s", "machine_matmul_flops_per_s"):
            out[f"bf16_over_fp32_{key}"] = round(out["bf16"][key] / out["fp32"][key], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
