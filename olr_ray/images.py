"""Image codecs of the prepared-data copy: what the data stage stores of each image and how every reader decodes it."""

from __future__ import annotations

import io

import numpy as np


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode, centre-crop to a square and resize to ``size`` x ``size`` RGB uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        if side == size:
            img = img.crop(box)
        else:
            img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
        return np.asarray(img, dtype=np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 HxWx3 image as PNG bytes (lossless; what the data stage keeps of a drawn image)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_images(blobs, size: int) -> np.ndarray:
    """Encoded images (any format Pillow reads) as one (N, size, size, 3) uint8 array, each through
    :func:`decode_image`."""
    out = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    for i, b in enumerate(blobs):
        out[i] = decode_image(bytes(b), size)
    return out
