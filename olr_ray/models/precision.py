"""Compute precision of the models: bfloat16 autocast where the hardware runs it natively, float32 otherwise.

Only the models' own layers run in bfloat16 (convolutions and linear layers, under ``torch.autocast``);
each model returns float32 (:class:`olr_ray.models.nets.Net`), so losses, the Siamese dot products,
SSIM and the committed embeddings are float32 whatever the setting.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("olr_ray")
PRECISIONS = ("auto", "bf16", "fp32")


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA device that supports it (Ampere and newer),
    or a CPU with AVX-512-BF16 or AMX (without them, CPU bfloat16 is emulated and slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(setting: str, device: torch.device | str) -> str:
    """``bf16`` or ``fp32`` for ``setting`` (``auto``, ``bf16``, ``fp32``) on ``device``.

    ``auto`` is bf16 where :func:`bf16_native` holds; ``bf16`` asked for on a device without it still runs
    (emulated), with a warning.
    """
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    native = bf16_native(device)
    if setting == "bf16" and not native:
        log.warning("precision=bf16 on %s, which has no native bfloat16: emulated, likely slower than fp32", device)
    if setting == "auto":
        return "bf16" if native else "fp32"
    return setting


def set_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Run every OLR model inside ``model`` (a DDP wrapper included) at ``precision``; returns ``model``."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"set_precision takes a resolved precision, bf16 or fp32, got {precision!r}")
    for m in model.modules():
        if hasattr(m, "precision"):
            m.precision = precision
    return model
