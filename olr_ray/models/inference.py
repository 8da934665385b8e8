"""Trained models run on batches inside Ray Data actors (pair labelling, embedding, the analysis' judges)."""

from __future__ import annotations

import numpy as np
import torch

from olr_ray.models.nets import load_checkpoint
from olr_ray.models.precision import resolve_precision, set_precision


def inference_device(use_gpu: bool) -> torch.device:
    """The device a model actor runs on: CUDA when the stage was given a GPU, which must then exist."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("this stage was given a GPU (use_gpu) but torch finds no CUDA device here "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); it will not run on the CPU")
    return torch.device("cuda")


def for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """A loaded model (eval mode) made ready for inference only: its trunk's BatchNorms folded into its
    convolutions. Its outputs match the unfused model's to float rounding; it can no longer be trained."""
    trunk = getattr(model, "trunk", None)
    if trunk is not None and hasattr(trunk, "fuse_batchnorm"):
        trunk.fuse_batchnorm()
    return model


def load_for_inference(uri: str | bytes, precision: str, device: torch.device | str = "cpu"
                       ) -> tuple[torch.nn.Module, dict]:
    """A trained checkpoint ready to run: BatchNorm folded (:func:`for_inference`), on ``device``, at a resolved
    ``precision``; with the checkpoint dict (its training history, say)."""
    model, state = load_checkpoint(uri)
    return set_precision(for_inference(model).to(device), precision), state


def actor_precision(setting: str, use_gpu: bool) -> str:
    """``setting`` resolved on the device a model actor would get (run it as a Ray task with the actor's
    resources, so the answer is the worker node's, not the driver's)."""
    return resolve_precision(setting, inference_device(use_gpu))


def actor_resources(plan) -> dict:
    """Ray resources of one model actor under a :class:`olr_ray.runtime.ResourcePlan`: a GPU share when the job
    has GPUs (the models are small, so several actors share one), else ``plan.task_cpus``."""
    if plan.use_gpu:
        return {"num_gpus": plan.gpus_per_actor or 1, "num_cpus": plan.task_cpus}
    return {"num_cpus": plan.task_cpus}


def pool_precision(setting: str, plan) -> str:
    """``setting`` resolved once where the actors of ``plan`` will run (a Ray task with their resources), so
    every actor of a stage computes at the one precision its manifest names."""
    import ray

    return ray.get(ray.remote(actor_precision).options(**actor_resources(plan)).remote(setting, plan.use_gpu))


def actor_pool(plan, actors: int = 0):
    """A Ray Data actor pool of up to ``actors`` (0: ``plan.actors``) model actors, one started on each node
    that can hold one (``plan.actor_nodes``) before the first block is handed out."""
    import ray

    low = max(1, min(actors or plan.actors, plan.actor_nodes))
    return ray.data.ActorPoolStrategy(min_size=low, initial_size=low, max_size=max(low, actors or plan.actors))


class ModelActor:
    """Base of the Ray Data actors that run trained models: checkpoints loaded once per actor, on one device,
    at one precision (``auto``, ``bf16`` or ``fp32``, resolved on that device)."""

    def __init__(self, threads: int = 1, use_gpu: bool = False, precision: str = "auto"):
        torch.set_num_threads(max(1, threads))
        self.device = inference_device(use_gpu)
        self.precision = resolve_precision(precision, self.device)

    def load(self, uri: str | bytes) -> torch.nn.Module:
        """A checkpoint (a file URI, or its bytes) on this actor's device at its precision."""
        return load_for_inference(uri, self.precision, self.device)[0]

    def run(self, model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
        """``model`` on a uint8 NHWC batch, without gradients; the output stays on the device."""
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
