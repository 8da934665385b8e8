"""Classifier, Siamese embedder and decoder (paper Section 3 and Table 1)."""

from __future__ import annotations

import io
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from olr_ray import storage


def num_stages(image_size: int) -> int:
    """Stride-2 stages that bring the image down to about 4-6 pixels (178 -> 6, 64 -> 4, 32 -> 4)."""
    return max(2, math.ceil(math.log2(image_size / 6)))


def _conv_bn(ci: int, co: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]


class ConvTrunk(nn.Sequential):
    """Conv trunk whose depth follows the image size: stage i halves the resolution.

    Channels double from ``width`` up to ``4 * width``; stages past the second add a second
    conv at the same resolution, where it is cheap.
    """

    def __init__(self, image_size: int, width: int):
        layers: list[nn.Module] = []
        ci = 3
        for i in range(num_stages(image_size)):
            co = width * 2 ** min(i, 2)
            layers += _conv_bn(ci, co, 2)
            if i >= 2:
                layers += _conv_bn(co, co, 1)
            ci = co
        super().__init__(*layers)
        self.out_channels = ci

    def fuse_batchnorm(self) -> "ConvTrunk":
        """For inference only: each BatchNorm folded into the convolution before it (the same function, one
        pass over the maps fewer; BatchNorm was a fifth of the classifier's inference time on CPU)."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        if self.training:
            raise RuntimeError("fuse_batchnorm folds the running statistics: call it on a model in eval mode")
        for i in range(len(self) - 1):
            if isinstance(self[i], nn.Conv2d) and isinstance(self[i + 1], nn.BatchNorm2d):
                self[i], self[i + 1] = fuse_conv_bn_eval(self[i], self[i + 1]), nn.Identity()
        return self


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (as stored) -> float NCHW in [-1, 1]; float NCHW passes through."""
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


class Net(nn.Module):
    """Base of the three models: ``forward`` is ``forward_head(forward_features(x))`` at the model's
    ``precision``.

    ``bf16`` runs both under bfloat16 autocast (:mod:`olr_ray.models.precision`) and returns float32,
    so whatever takes the output (losses, dot products, SSIM, the committed embeddings) is float32.
    ``precision`` is not saved with the weights: whoever runs a model sets it.
    """

    precision = "fp32"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision != "bf16":
            return self.forward_head(self.forward_features(x))
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = self.forward_head(self.forward_features(x))
        return out.float()


class Classifier(Net):
    """Multi-label CNN: L sigmoid outputs (``forward`` returns logits)."""

    def __init__(self, num_labels: int, image_size: int = 64, width: int = 32):
        super().__init__()
        self.num_labels, self.image_size, self.width = num_labels, image_size, width
        self.trunk = ConvTrunk(image_size, width)
        self.head = nn.Linear(self.trunk.out_channels, num_labels)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(normalize_images(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))
        return pooled if pre_logits else self.head(pooled)


ACTIVATIONS = ("relu", "abs", "relu_leaky_grad")


def relu_leaky_grad(x: torch.Tensor, slope: float = 0.1) -> torch.Tensor:
    """ReLU forward, leaky-ReLU backward: the value is max(x, 0), the gradient below 0 is ``slope``."""
    leaky = F.leaky_relu(x, slope)
    return leaky + (F.relu(x) - leaky).detach()


class SiameseEmbedder(Net):
    """One branch of the Siamese network; both images share it.

    Shared conv trunk, then the label-specific layer of L*k feature maps (L groups of k),
    global average pooling and a reshape to E of shape (L, k). Every block is non-negative,
    so a dot product near zero means a block near zero: the paper's "absent label ->
    near-zero vector". ``activation`` picks how:

    - ``relu``: ReLU on the maps, then pooling. A block whose maps all go negative gets no
      gradient again; on the demo 13 of 38 blocks died this way, mostly rare labels.
    - ``abs``: pooling, then the absolute value. Same non-negative output, but the gradient
      never vanishes, so no block can die. A block is then |linear function| of the pooled
      trunk features, which cannot be zero on every absent image: blocks keep a floor
      (measured: about 0.1 where present blocks reach 0.9).
    - ``relu_leaky_grad``: ReLU on the maps in the forward pass (exact zeros, as ``relu``),
      with a leaky-ReLU gradient (slope 0.1 below 0) in the backward pass, so a block whose
      maps all went negative still learns and cannot die.

    ``floor`` (default 0) is added to every coordinate after pooling. With ``relu`` or
    ``relu_leaky_grad`` a pair of exactly-zero blocks gets no gradient from the dot-product loss
    (d<E1, E2>/dE1 = E2 = 0), so a label whose blocks all reached zero on the images that have
    it is stuck there; a small floor keeps that gradient alive.
    """

    def __init__(self, num_labels: int, k: int = 32, image_size: int = 64, width: int = 32, label_kernel: int = 3,
                 activation: str = "relu", floor: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.num_labels, self.k, self.image_size, self.width, self.label_kernel = num_labels, k, image_size, width, label_kernel
        self.activation, self.floor = activation, floor
        self.trunk = ConvTrunk(image_size, width)
        # No bias and a small initial scale: embeddings start near zero, so a block grows only
        # where its label's targets ask for it. With a bias, every block starts with a shared
        # offset that the dot-product loss must first unlearn (measured: R^2 0.07 vs 0.39 after
        # one epoch of 3,000 pairs).
        self.label_layer = nn.Conv2d(self.trunk.out_channels, num_labels * k, label_kernel,
                                     padding=label_kernel // 2, bias=False)
        with torch.no_grad():
            self.label_layer.weight.mul_(0.3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(normalize_images(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # The label layer may run in bfloat16; its maps are pooled in float32, so the embedding keeps
        # float32's resolution (bfloat16 holds about 3 significant digits).
        maps = self.label_layer(features).float()
        if self.activation == "relu":
            pooled = F.relu(maps).mean(dim=(2, 3))
        elif self.activation == "relu_leaky_grad":
            pooled = relu_leaky_grad(maps).mean(dim=(2, 3))
        else:
            pooled = maps.mean(dim=(2, 3)).abs()
        if self.floor:
            pooled = pooled + self.floor
        return pooled if pre_logits else pooled.view(-1, self.num_labels, self.k)


def pair_dots(e1: torch.Tensor, e2: torch.Tensor, grad_floor: float = 0.0) -> torch.Tensor:
    """Row-wise dot products <E1[l], E2[l]>: (N, L, k) x (N, L, k) -> (N, L).

    ``grad_floor`` g > 0 changes only the backward pass: the gradient with respect to E1 is
    E2 + g (and to E2, E1 + g) instead of E2. The exact gradient vanishes where both blocks are
    zero, so a block that has shrunk to zero on every image stays there even when its targets ask
    for more; with the floor, a pair whose dot product is below its target still pushes both
    blocks up. Where the dot product equals its target the extra term is zero.
    """
    dots = (e1 * e2).sum(-1)
    if grad_floor:
        s = grad_floor * (e1.sum(-1) + e2.sum(-1))
        dots = dots + (s - s.detach())
    return dots


def decoder_geometry(image_size: int) -> tuple[int, int, int]:
    """(start side, number of ConvTranspose stages, output side) for an image size.

    Table 1 at 178: 6 -> 12 -> 24 -> 22 (valid conv) -> 44 -> 88 -> 176, i.e. output
    (4*s0 - 2) * 2**(n_up - 2). We pick the largest output not above ``image_size - 2``
    (the paper crops one pixel per side), a start side of 3..8 (6 at 178) and at least three
    upsampling stages, so the dense layer stays proportionate (64 -> 8, 3 stages, 60).
    """
    best = None
    target = image_size - 2
    for n_up in range(3, 8):
        s0 = min(8, int(((target / 2 ** (n_up - 2)) + 2) // 4))
        if s0 < 3:
            continue
        out = (4 * s0 - 2) * 2 ** (n_up - 2)
        if best is None or out > best[2]:
            best = (s0, n_up, out)
    if best is None:
        raise ValueError(f"image_size {image_size} too small for the decoder (need >= 22)")
    return best


class Decoder(Net):
    """Reconstruction model after the paper's Table 1, scaled to the image size.

    Flatten -> Dense -> reshape (width, s0, s0) -> ConvTranspose/Conv stack -> 3 channels.
    ``forward`` returns the raw ``Conv2D_out`` map (where the SSIM loss applies);
    :meth:`rescale` is the per-image min-max layer (where the MSE applies and what is shown).
    """

    def __init__(self, num_labels: int, k: int, image_size: int = 64, width: int = 512, channels: int = 64):
        super().__init__()
        self.num_labels, self.k, self.image_size, self.width, self.channels = num_labels, k, image_size, width, channels
        s0, n_up, out = decoder_geometry(image_size)
        self.start, self.output_size = s0, out
        c_first = max(channels * 2, 8)
        self.dense = nn.Linear(num_labels * k, width * s0 * s0)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(width, c_first, 3, 2, 1, output_padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c_first, channels, 3, 1, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(channels, channels, 3, 2, 1, output_padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 0), nn.ReLU(inplace=True),  # the one 'valid' conv
        ]
        for _ in range(n_up - 2):
            layers += [
                nn.ConvTranspose2d(channels, channels, 3, 2, 1, output_padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU(inplace=True),
            ]
        # Table 1 ends with Conv2D(32) then Conv2D_out(3); the last stage's Conv(64) above is its Conv(32).
        layers[-2] = nn.Conv2d(channels, max(channels // 2, 4), 3, 1, 1)
        layers += [nn.Conv2d(max(channels // 2, 4), 3, 3, 1, 1)]
        self.net = nn.Sequential(*layers)
        # Channels-last weights and maps: oneDNN's convolutions take them without a reorder at every layer
        # (a training step 1.18x faster in bf16 on CPU, 1.09x in fp32; docs/speed.md). Loaded weights keep it.
        self.net.to(memory_format=torch.channels_last)

    def forward_features(self, e: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dense(e.flatten(1)))
        return x.view(-1, self.width, self.start, self.start).contiguous(memory_format=torch.channels_last)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.net(features)

    @staticmethod
    def rescale(x: torch.Tensor) -> torch.Tensor:
        """Per-image min-max to [0, 1] (paper eq. 2)."""
        flat = x.flatten(1)
        lo = flat.min(1).values.view(-1, 1, 1, 1)
        hi = flat.max(1).values.view(-1, 1, 1, 1)
        return (x - lo) / (hi - lo).clamp_min(1e-6)

    def reconstruct(self, e: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (N, 3, out, out)."""
        return self.rescale(self.forward(e))

    def target(self, images: Any) -> torch.Tensor:
        """uint8 (N, H, W, 3) images (tensor or array) as this decoder is trained against and its
        reconstructions are compared with: [0, 1], (N, 3, out, out), centre-cropped."""
        x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
        return crop_to(x, self.output_size)


def ssim_window(side: int) -> int:
    """The SSIM Gaussian window for images of ``side`` pixels, in training and in the report alike:
    11 (the usual, the paper's at 176) from 44 pixels up, 7 below, and the largest odd size that fits
    under 7 pixels."""
    win = 11 if side >= 44 else 7
    return win if win <= side else max(1, side - (1 - side % 2))


def crop_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop NCHW images to ``size`` (the decoder's output side)."""
    h = x.shape[-1]
    off = (h - size) // 2
    return x[..., off:off + size, off:off + size]


MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "classifier": Classifier,
    "siamese": SiameseEmbedder,
    "decoder": Decoder,
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](**kwargs)


def model_args(model: nn.Module) -> dict[str, Any]:
    import inspect

    params = inspect.signature(type(model).__init__).parameters
    return {p: getattr(model, p) for p in params if p != "self"}


def save_checkpoint(model: nn.Module, name: str, extra: dict[str, Any] | None = None) -> bytes:
    """Serialise a model with its constructor args (and e.g. optimizer state, epoch) to bytes."""
    model = getattr(model, "module", model)  # unwrap DDP
    state = {
        "model_name": name,
        "model_args": model_args(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def checkpoint_state(data: bytes | str) -> dict[str, Any]:
    """A :func:`save_checkpoint` dict (bytes or a local/``s3://`` file URI) without its weights in memory: every
    tensor lands on the meta device. For its history and metadata: the driver reads a training stage's curves
    this way (the decoder's 80 MB checkpoint, with its optimizer state, cost the driver about 230 MB loaded whole).
    A local file is opened in place, so only its pickled metadata is read; an ``s3://`` one is downloaded."""
    if isinstance(data, str) and not storage.is_s3(data):
        return torch.load(storage.resolve(data)[1], map_location="meta", weights_only=False)
    if isinstance(data, str):
        data = storage.read_bytes(data)
    return torch.load(io.BytesIO(data), map_location="meta", weights_only=False)


def load_checkpoint(data: bytes | str, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from :func:`save_checkpoint` bytes or a local/``s3://`` file URI.

    Returns:
        (model in eval mode, the whole checkpoint dict)
    """
    if isinstance(data, str):
        data = storage.read_bytes(data)
    state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    model = create_model(state["model_name"], **state["model_args"])
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, state
