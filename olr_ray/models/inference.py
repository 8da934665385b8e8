"""Trained models run on batches inside Ray Data actors (pair labelling, embedding)."""

from __future__ import annotations

import numpy as np
import torch

from olr_ray.models.nets import load_checkpoint


def inference_device(use_gpu: bool) -> torch.device:
    """The device a model actor runs on: CUDA when the stage was given a GPU, which must then exist."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("this stage was given a GPU (use_gpu) but torch finds no CUDA device here "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); it will not run on the CPU")
    return torch.device("cuda")


class ModelActor:
    """Base of the Ray Data actors that run trained models: checkpoints loaded once per actor, on one device."""

    def __init__(self, threads: int = 1, use_gpu: bool = False):
        torch.set_num_threads(max(1, threads))
        self.device = inference_device(use_gpu)

    def load(self, uri: str) -> torch.nn.Module:
        model, _ = load_checkpoint(uri)
        return model.to(self.device)

    def run(self, model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
        """``model`` on a uint8 NHWC batch, without gradients; the output stays on the device."""
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
