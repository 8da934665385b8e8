"""The real training function on tiny data, in-process and with 2 CPU workers (DDP over gloo)."""

import numpy as np
import pytest

from olr_ray import storage
from olr_ray.data import synthetic
from olr_ray.runtime import plan_resources
from olr_ray.train.driver import fit
from olr_ray.train.tasks import ClassifierTask

L = 6


@pytest.fixture(scope="module")
def tiny(ray_local):
    drawn = synthetic.generate(np.arange(384), seed=5, size=32)
    rows = [{"image": drawn["image"][i], "labels": drawn["labels"][i, :L].astype(np.int8)} for i in range(384)]
    ds = ray_local.data.from_items(rows[:320])
    val = ray_local.data.from_items(rows[320:])
    return ds, val


def _task(tmp_path, epochs, name="classifier"):
    return ClassifierTask(name=name, model_name="classifier", model_args=dict(num_labels=L, image_size=32, width=8),
                          label_names=[f"l{i}" for i in range(L)], epochs=epochs, batch_size=32, lr=3e-3, seed=0,
                          checkpoint_dir=str(tmp_path / "checkpoints" / name))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_real_train_func_loss_falls(tiny, tmp_path, num_workers):
    ds, val = tiny
    res = fit(_task(tmp_path, 3), {"train": ds, "valid": val, "test": val}, plan_resources(num_workers),
              str(tmp_path / "checkpoints"))
    losses = [h["train_loss"] for h in res.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert res.metrics["epoch"] == 3
    assert 0.0 <= res.metrics["test_mean_accuracy"] <= 1.0
    assert storage.exists(res.checkpoint_uri) and res.checkpoint_uri.endswith("epoch-0003.pt")
    if num_workers == 2:
        # Both workers trained on disjoint shards: the reported sample count covers both.
        assert res.metrics["train_samples"] == 2 * (160 // 32) * 32


def test_rerun_resumes_at_the_next_epoch(tiny, tmp_path):
    ds, val = tiny
    data = {"train": ds, "valid": val, "test": val}
    first = fit(_task(tmp_path, 2), data, plan_resources(0), str(tmp_path / "checkpoints"))
    assert [h["epoch"] for h in first.history] == [1, 2]
    # Same stage, same checkpoint folder, more epochs: continues from epoch 2's checkpoint.
    second = fit(_task(tmp_path, 3), data, plan_resources(0), str(tmp_path / "checkpoints"))
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    assert second.history[0] == first.history[0]  # epochs 1-2 were not retrained
    # Nothing left to do: a re-run trains nothing and returns the same final metrics.
    third = fit(_task(tmp_path, 3), data, plan_resources(0), str(tmp_path / "checkpoints"))
    assert third.metrics["epoch"] == 3 and len(third.history) == 3


def test_cosine_schedule_decays_per_epoch_and_resumes_where_it_left(tiny, tmp_path):
    import math

    import torch

    ds, val = tiny
    task = _task(tmp_path, 3)
    task.lr_schedule = "cosine"
    res = fit(task, {"train": ds, "valid": val, "test": val}, plan_resources(0), str(tmp_path / "checkpoints"))
    expected = [3e-3 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    assert [h["lr"] for h in res.history] == pytest.approx(expected)
    # Interrupted after epoch 2: the resumed epoch 3 trains at the uninterrupted run's rate. The loaded
    # optimizer's rate is already annealed, so stepping a cosine from it would anneal it twice.
    ckpt = tmp_path / "checkpoints" / "classifier"
    storage.write_json(str(ckpt / "latest.json"), {"epoch": 2, "file": "epoch-0002.pt"})
    resumed = fit(task, {"train": ds, "valid": val, "test": val}, plan_resources(0), str(tmp_path / "checkpoints"))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["lr"] for h in resumed.history] == pytest.approx(expected)
    # A fresh optimizer started at a later epoch is set to the schedule's value there, not the base rate.
    opt = torch.optim.AdamW(task.build_model().parameters(), lr=3e-3)
    task.build_scheduler(opt, start_epoch=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected[2])
    # The default keeps the rate constant.
    assert _task(tmp_path, 3).build_scheduler(opt, 0) is None
