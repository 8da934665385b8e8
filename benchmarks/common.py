"""What the benchmarks share: the machine's matmul peak and a model's FLOPs, per precision."""

from __future__ import annotations

import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(threads: int, precision: str = "fp32", device: str = "cpu", sizes: tuple[int, ...] = (2048, 4096),
                tries: int = 5) -> float:
    """The machine's matmul FLOP/s at ``precision``: the best single large square product of several.

    Measure it before Ray starts: measured after the Ray passes, actors still holding the cores brought
    the float32 figure to 126 GFLOP/s on a machine whose matmuls reach about 420.
    """
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=DTYPES[precision]) for _ in range(2))
        a @ b  # warm-up
        for _ in range(tries):
            sync()
            t = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def model_flops(model, x, train: bool = False) -> int:
    """FLOPs per image of one forward pass of ``model`` on the batch ``x`` (with ``train``: forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        if train:
            model(x).float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                model(x)
    return fc.get_total_flops() // len(x)
