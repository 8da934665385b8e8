"""Synthetic CelebA-like faces: the default dataset when CelebA itself cannot be downloaded.

Every image is a procedurally drawn face carrying CelebA's 40 binary attributes, each drawn as a
visible pixel cue, so a model has to learn the same kind of per-label features as on CelebA.

Attribute model
---------------
A small Bayesian network of conditional Bernoullis (``MODEL``, printable with
``describe_model()``). Three roots carry most of CelebA's correlation structure:

- ``Male`` (P=0.42), ``Young`` given Male (0.86 female / 0.65 male), ``Smiling`` (0.48).

Every other attribute is a Bernoulli whose probability is read from an ordered rule list over
attributes sampled before it (the first rule whose condition holds wins). The main effects:

- Male -> against Heavy_Makeup, Wearing_Lipstick, Earrings, Necklace, Arched_Eyebrows,
  Rosy_Cheeks; only men grow beards (No_Beard=0), Mustache, Goatee, Sideburns, 5_o_Clock_Shadow
  (mostly given a beard); men get Big_Nose, Bushy_Eyebrows, Necktie, Receding_Hairline, Bald.
- Young -> against Gray_Hair, Bald, Bags_Under_Eyes, Chubby, Double_Chin, Eyeglasses; for
  Attractive and Heavy_Makeup.
- Smiling -> High_Cheekbones, Mouth_Slightly_Open, Narrow_Eyes.
- Hair colour is one categorical choice written as a chain (Gray, then Black, Blond, Brown, each
  conditioned on the earlier ones being 0), so at most one hair colour is ever set; Bald sets no
  hair colour, no Bangs, no Straight/Wavy hair and no Receding_Hairline. Straight and Wavy hair
  exclude each other; Bangs make a receding hairline rare.
- Heavy_Makeup -> Wearing_Lipstick, Attractive, Arched_Eyebrows, Earrings, Necklace, Rosy_Cheeks.
- Chubby -> Double_Chin, against Oval_Face; Attractive -> Oval_Face; Big_Nose against Pointy_Nose.

The resulting marginals are within 0.025 of CelebA's (``CELEBA_RATES``); ``label_correlation``
gives the model's 40x40 correlation matrix by sampling.

Rendering
---------
Faces are drawn analytically in face units (u right, v down, face centre at 0, face half-width
about 1) and mapped to pixels by a per-image similarity transform; like CelebA's aligned crops the
face fills about half the image width, with neck, shoulders and any tie or necklace below it.
Men have a square jaw and a thick neck. Every attribute changes the
drawing: hair colour, hair cap / bangs / receding hairline / bald dome with a side fringe, straight
or wavy long hair with matching texture, a hat, glasses, eyebrow arch and thickness, eye size and
opening, eye shadow and eyeliner (Heavy_Makeup), bags, nose shape, mouth curvature, opening, lip
thickness and colour, beard / mustache / goatee / sideburns / stubble, face outline (Chubby,
Oval_Face, Double_Chin), cheek highlights and shadows (High_Cheekbones), blush (Rosy_Cheeks), pale
skin, earrings, necklace, shirt collar and tie, blur (Blurry), wrinkles (not Young) and, for
Attractive, larger bright eyes with a catch-light while unattractive faces carry skin blemishes.

Nuisance: face position, scale and rotation, skin tone, hair shade, eye, clothes, hat, lipstick,
makeup and jewellery colours, background colours and gradient, directional lighting, exposure,
colour temperature and Gaussian pixel noise. All of it is drawn from (seed, index) only, never
from the attributes, so re-rendering an index with one attribute flipped draws the same face with
only that attribute changed (``flip_and_render``).

Determinism
-----------
All randomness comes from a counter-based hash of (seed, stream, index, slot) (SplitMix64), so
image ``i`` is identical whichever batch or range it is generated in, and generation vectorises
over a batch with plain numpy. Per-pixel math uses only IEEE-exact operations (no transcendental
functions per pixel), so results do not depend on how numpy chunks its loops.

CLI: ``python -m olr_ray.data.synthetic --out DIR --n N --size S --seed X [--label-noise F]``
writes CelebA's on-disk layout (see ``write_celeba_folder``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

ATTRIBUTES: list[str] = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
]
ATTRIBUTE_INDEX: dict[str, int] = {name: i for i, name in enumerate(ATTRIBUTES)}

# Positive rate of each attribute in CelebA (all 202,599 images), the target of MODEL's marginals.
CELEBA_RATES: dict[str, float] = {
    "5_o_Clock_Shadow": 0.111, "Arched_Eyebrows": 0.267, "Attractive": 0.513,
    "Bags_Under_Eyes": 0.205, "Bald": 0.022, "Bangs": 0.152, "Big_Lips": 0.241,
    "Big_Nose": 0.235, "Black_Hair": 0.239, "Blond_Hair": 0.148, "Blurry": 0.051,
    "Brown_Hair": 0.205, "Bushy_Eyebrows": 0.142, "Chubby": 0.058, "Double_Chin": 0.047,
    "Eyeglasses": 0.065, "Goatee": 0.063, "Gray_Hair": 0.042, "Heavy_Makeup": 0.387,
    "High_Cheekbones": 0.455, "Male": 0.417, "Mouth_Slightly_Open": 0.483, "Mustache": 0.042,
    "Narrow_Eyes": 0.115, "No_Beard": 0.835, "Oval_Face": 0.284, "Pale_Skin": 0.043,
    "Pointy_Nose": 0.277, "Receding_Hairline": 0.080, "Rosy_Cheeks": 0.066, "Sideburns": 0.056,
    "Smiling": 0.482, "Straight_Hair": 0.208, "Wavy_Hair": 0.320, "Wearing_Earrings": 0.189,
    "Wearing_Hat": 0.048, "Wearing_Lipstick": 0.472, "Wearing_Necklace": 0.123,
    "Wearing_Necktie": 0.073, "Young": 0.774,
}


@dataclass(frozen=True)
class Node:
    """One conditional Bernoulli of the attribute model.

    Attributes:
        attribute: the attribute this node samples.
        rules: ``(condition, p)`` pairs in priority order; the first whose condition holds gives
            P(attribute = 1). A condition maps attributes sampled earlier to required 0/1 values;
            the empty condition always holds and ends every list.
    """

    attribute: str
    rules: tuple[tuple[Mapping[str, int], float], ...]


def _node(attribute: str, *rules: tuple[Mapping[str, int], float]) -> Node:
    return Node(attribute, tuple(rules))


_M, _F, _Y, _OLD = {"Male": 1}, {"Male": 0}, {"Young": 1}, {"Young": 0}
_OLD_MAN = {"Male": 1, "Young": 0}
_BALD, _HM, _BEARD = {"Bald": 1}, {"Heavy_Makeup": 1}, {"No_Beard": 0}

# Sampled top to bottom; every condition refers only to attributes above it.
MODEL: tuple[Node, ...] = (
    _node("Male", ({}, 0.42)),
    _node("Young", (_M, 0.65), ({}, 0.86)),
    _node("Smiling", ({}, 0.48)),
    _node("Blurry", ({}, 0.05)),
    _node("Heavy_Makeup", (_M, 0.01), (_Y, 0.72), ({}, 0.45)),
    _node("Wearing_Lipstick", (_M, 0.01), (_HM, 0.95), ({}, 0.55)),
    _node("No_Beard", (_F, 1.0), (_Y, 0.70), ({}, 0.50)),
    _node("Goatee", (_F, 0.0), (_BEARD, 0.35), ({}, 0.02)),
    _node("Mustache", (_F, 0.0), (_BEARD, 0.25), ({}, 0.005)),
    _node("Sideburns", (_F, 0.0), (_BEARD, 0.30), ({}, 0.03)),
    _node("5_o_Clock_Shadow", (_F, 0.003), (_BEARD, 0.15), ({}, 0.33)),
    _node("Bald", (_F, 0.001), (_Y, 0.02), ({}, 0.10)),
    # Hair colour: one categorical choice written as a chain, so at most one colour is set.
    _node("Gray_Hair", (_BALD, 0.0), (_Y, 0.003), (_M, 0.25), ({}, 0.12)),
    _node("Black_Hair", (_BALD, 0.0), ({"Gray_Hair": 1}, 0.0), (_M, 0.28), ({}, 0.25)),
    _node("Blond_Hair", (_BALD, 0.0), ({"Gray_Hair": 1}, 0.0), ({"Black_Hair": 1}, 0.0),
          (_M, 0.042), ({}, 0.347)),
    _node("Brown_Hair", (_BALD, 0.0), ({"Gray_Hair": 1}, 0.0), ({"Black_Hair": 1}, 0.0),
          ({"Blond_Hair": 1}, 0.0), (_M, 0.29), ({}, 0.49)),
    _node("Bangs", (_BALD, 0.0), (_M, 0.06), ({}, 0.22)),
    _node("Receding_Hairline", (_BALD, 0.0), ({"Bangs": 1}, 0.02), (_OLD_MAN, 0.25), (_M, 0.07),
          (_OLD, 0.10), ({}, 0.03)),
    _node("Wavy_Hair", (_BALD, 0.0), (_M, 0.14), ({}, 0.45)),
    _node("Straight_Hair", (_BALD, 0.0), ({"Wavy_Hair": 1}, 0.0), (_M, 0.233), ({}, 0.40)),
    _node("High_Cheekbones", ({"Smiling": 1}, 0.80), ({}, 0.13)),
    _node("Mouth_Slightly_Open", ({"Smiling": 1}, 0.72), ({}, 0.26)),
    _node("Narrow_Eyes", ({"Smiling": 1}, 0.17), ({}, 0.07)),
    _node("Attractive", ({"Male": 1, "Young": 1}, 0.36), (_M, 0.12), (_OLD, 0.30), (_HM, 0.82),
          ({}, 0.62)),
    _node("Arched_Eyebrows", (_M, 0.03), (_HM, 0.50), ({}, 0.28)),
    _node("Bushy_Eyebrows", (_M, 0.24), ({}, 0.07)),
    _node("Bags_Under_Eyes", (_OLD_MAN, 0.50), (_M, 0.25), (_OLD, 0.25), ({}, 0.07)),
    _node("Big_Lips", (_M, 0.20), ({}, 0.27)),
    _node("Big_Nose", (_OLD_MAN, 0.55), (_M, 0.38), (_OLD, 0.20), ({}, 0.07)),
    _node("Pointy_Nose", ({"Big_Nose": 1}, 0.08), (_M, 0.22), ({}, 0.40)),
    _node("Chubby", (_OLD_MAN, 0.20), (_M, 0.07), (_OLD, 0.08), ({}, 0.015)),
    _node("Double_Chin", ({"Chubby": 1, "Young": 0}, 0.55), ({"Chubby": 1}, 0.35), (_OLD, 0.06),
          ({}, 0.005)),
    _node("Oval_Face", ({"Chubby": 1}, 0.05), ({"Attractive": 1}, 0.40), ({}, 0.18)),
    _node("Eyeglasses", (_OLD_MAN, 0.20), (_M, 0.07), (_OLD, 0.10), ({}, 0.025)),
    _node("Pale_Skin", (_M, 0.02), ({}, 0.06)),
    _node("Rosy_Cheeks", (_M, 0.005), (_HM, 0.14), ({}, 0.05)),
    _node("Wearing_Earrings", (_M, 0.01), (_HM, 0.38), ({}, 0.18)),
    _node("Wearing_Hat", (_M, 0.06), ({}, 0.04)),
    _node("Wearing_Necklace", (_M, 0.01), (_HM, 0.25), ({}, 0.15)),
    _node("Wearing_Necktie", (_F, 0.003), (_OLD, 0.28), ({}, 0.12)),
)


def _check_model() -> None:
    seen: set[str] = set()
    for node in MODEL:
        for condition, p in node.rules:
            unknown = [a for a in condition if a not in seen]
            if unknown or not 0.0 <= p <= 1.0:
                raise ValueError(f"MODEL node {node.attribute}: condition on {unknown} or p={p}")
        if node.rules[-1][0]:
            raise ValueError(f"MODEL node {node.attribute}: last rule must be unconditional")
        seen.add(node.attribute)
    if sorted(seen) != sorted(ATTRIBUTES):
        raise ValueError(f"MODEL covers {sorted(set(ATTRIBUTES) ^ seen)} wrongly")


_check_model()


def describe_model() -> str:
    """The attribute model as a readable table, one line per node.

    Returns:
        Lines like ``Wearing_Lipstick: P=0.01 if Male=1; 0.95 if Heavy_Makeup=1; else 0.55``.
    """
    lines = []
    for node in MODEL:
        parts = []
        for condition, p in node.rules:
            if condition:
                parts.append(f"{p:g} if " + " & ".join(f"{a}={v}" for a, v in condition.items()))
            else:
                parts.append(f"else {p:g}" if parts else f"{p:g}")
        lines.append(f"{node.attribute}: P=" + "; ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Counter-based randomness: value k of stream s for image i depends only on (seed, s, i, k).

_STREAM_ATTRIBUTES, _STREAM_NUISANCE, _STREAM_LABEL_NOISE, _STREAM_PARTITION = 1, 2, 3, 4
_STREAM_INDEPENDENT = 5
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 step on a uint64 array (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _as_indices(indices: np.ndarray | list[int] | range) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and idx.min() < 0:
        raise ValueError(f"indices must be >= 0, got min {idx.min()}")
    return idx


def _uniforms(seed: int, indices: np.ndarray, stream: int, k: int) -> np.ndarray:
    """(N, k) float64 uniforms in [0, 1), a pure function of (seed, stream, index, column)."""
    key = _mix(np.array([(seed & 0xFFFFFFFFFFFFFFFF) ^ (stream << 56)], dtype=np.uint64))
    h = _mix(indices.astype(np.uint64) ^ key)
    z = _mix(h[:, None] + np.arange(k, dtype=np.uint64)[None, :] * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def sample_attributes(seed: int, indices: np.ndarray) -> np.ndarray:
    """Sample the true attributes of the given images from ``MODEL``.

    Args:
        seed: dataset seed.
        indices: image indices (>= 0); row i depends only on (seed, indices[i]).

    Returns:
        (N, 40) int8 array of 0/1 in ``ATTRIBUTES`` order.
    """
    idx = _as_indices(indices)
    u = _uniforms(seed, idx, _STREAM_ATTRIBUTES, len(ATTRIBUTES))
    attrs = np.zeros((len(idx), len(ATTRIBUTES)), dtype=np.int8)
    for node in MODEL:
        p = np.empty(len(idx))
        # Apply rules from last to first so the first matching rule ends up winning.
        for condition, prob in reversed(node.rules):
            hold = np.ones(len(idx), dtype=bool)
            for parent, value in condition.items():
                hold &= attrs[:, ATTRIBUTE_INDEX[parent]] == value
            p[hold] = prob
        j = ATTRIBUTE_INDEX[node.attribute]
        attrs[:, j] = u[:, j] < p
    return attrs


def sample_independent_attributes(seed: int, indices: np.ndarray, p: float | np.ndarray = 0.5) -> np.ndarray:
    """Attributes with no correlations at all: attribute j present with probability ``p`` (or ``p[j]``),
    independently of the others (``MODEL`` is not used). For a judge that cannot read a label from its
    correlates.

    Returns:
        (N, 40) int8 array of 0/1 in ``ATTRIBUTES`` order.
    """
    idx = _as_indices(indices)
    return (_uniforms(seed, idx, _STREAM_INDEPENDENT, len(ATTRIBUTES)) < p).astype(np.int8)


def label_correlation(n: int = 50_000, seed: int = 0) -> np.ndarray:
    """Pearson correlation of the true attributes under ``MODEL``, estimated by sampling.

    Args:
        n: number of sampled faces.
        seed: sampling seed.

    Returns:
        (40, 40) float64 matrix in ``ATTRIBUTES`` order; constant columns give 0 off-diagonal.
    """
    a = sample_attributes(seed, np.arange(n)).astype(np.float64)
    a -= a.mean(axis=0)
    sd = np.sqrt((a * a).mean(axis=0))
    cov = a.T @ a / n
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd, sd)
    corr = np.nan_to_num(corr)
    np.fill_diagonal(corr, 1.0)
    return corr


# ---------------------------------------------------------------------------------------------
# Nuisance parameters: a fixed list of uniform slots per image, drawn whatever the attributes.

_NUISANCE_SLOTS = (
    "cx", "cy", "scale", "angle", "aspect", "skin_tone", "skin_hue", "hair_shade", "other_hair",
    "bg0_r", "bg0_g", "bg0_b", "bg1_r", "bg1_g", "bg1_b", "bg_angle",
    "light_angle", "light_strength", "gain", "temperature", "noise_sigma", "noise_offset",
    "eye_colour", "clothes_h", "clothes_v", "hat_h", "hat_v", "lipstick", "shadow_colour",
    "metal", "tie_colour", "frame_colour", "sunglasses",
    "spot1_u", "spot1_v", "spot2_u", "spot2_v", "spot3_u", "spot3_v",
)
_SLOT = {name: k for k, name in enumerate(_NUISANCE_SLOTS)}

# Jitter ranges, in fractions of the image side (scale: pixels per face unit / size).
_CX, _CY, _SCALE, _ANGLE = (0.44, 0.56), (0.37, 0.43), (0.25, 0.29), 0.1
_NOISE_BANK = 1 << 20


def _lerp(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


def _hue_colour(h: np.ndarray, v: np.ndarray, sat: float) -> np.ndarray:
    """(N, 3) RGB from hue in [0, 1) and value, with a fixed saturation (piecewise-linear hue)."""
    k = (h[:, None] * 6.0 + np.array([0.0, 4.0, 2.0])) % 6.0
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[:, None] * (1.0 - sat * ramp)


_EYE_COLOURS = np.array([[0.30, 0.17, 0.08], [0.20, 0.35, 0.55], [0.25, 0.38, 0.20],
                         [0.12, 0.08, 0.05]])
_LIPSTICKS = np.array([[0.80, 0.05, 0.15], [0.86, 0.12, 0.42], [0.62, 0.02, 0.12],
                       [0.92, 0.28, 0.30]])
_EYE_SHADOWS = np.array([[0.45, 0.22, 0.60], [0.20, 0.35, 0.70], [0.55, 0.25, 0.30],
                         [0.25, 0.45, 0.40]])
_METALS = np.array([[0.98, 0.82, 0.30], [0.92, 0.93, 0.97], [0.90, 0.10, 0.20], [0.10, 0.80, 0.80]])
_TIES = np.array([[0.60, 0.05, 0.10], [0.10, 0.15, 0.50], [0.10, 0.35, 0.15], [0.35, 0.10, 0.40]])
_FRAMES = np.array([[0.05, 0.05, 0.05], [0.30, 0.15, 0.05], [0.55, 0.55, 0.60]])
_HAIR = {
    "Black_Hair": (0.07, 0.06, 0.06), "Blond_Hair": (0.90, 0.76, 0.42),
    "Brown_Hair": (0.40, 0.23, 0.11), "Gray_Hair": (0.72, 0.72, 0.74),
}
# Hair with none of the four colour labels: auburn or ash, both distinct from the labelled ones.
_OTHER_HAIR = np.array([[0.62, 0.20, 0.10], [0.36, 0.34, 0.30]])
_SKIN_DARK, _SKIN_LIGHT = np.array([0.42, 0.27, 0.19]), np.array([0.90, 0.70, 0.57])
_PALE = np.array([0.98, 0.93, 0.91])


def _pick(palette: np.ndarray, u: np.ndarray) -> np.ndarray:
    return palette[np.minimum((u * len(palette)).astype(np.int64), len(palette) - 1)]


@lru_cache(maxsize=4)
def _noise_bank(seed: int) -> np.ndarray:
    # A per-seed bank of Gaussian noise; each image reads a window at its own offset, which is far
    # cheaper than hashing every pixel and still a pure function of (seed, index).
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x5EED])
    return rng.standard_normal(_NOISE_BANK, dtype=np.float32)


@dataclass
class _Frame:
    """Face coordinates of every pixel of a batch, plus the per-image parameters drawn from them.

    Attributes:
        u: (N, H, W) float32 horizontal face coordinate (right is positive).
        v: (N, H, W) float32 vertical face coordinate (down is positive).
        px: (N, 1, 1) float32 pixels per face unit, used for one-pixel soft edges.
        size: image side in pixels.
    """

    u: np.ndarray
    v: np.ndarray
    px: np.ndarray
    size: int

    def window(self, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
        return _window(self.size, u0, u1, v0, v1)


@lru_cache(maxsize=4096)
def _window(size: int, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
    # The pixel box that can contain face-box [u0,u1]x[v0,v1] under ANY allowed jitter, so the
    # window never depends on the batch and drawing outside it would have been exactly zero.
    xs, ys = [], []
    for cx in _CX:
        for cy in _CY:
            for s in _SCALE:
                for a in (-_ANGLE, 0.0, _ANGLE):
                    for u in (u0, u1):
                        for v in (v0, v1):
                            xs.append(cx + s * (u * np.cos(a) - v * np.sin(a)))
                            ys.append(cy + s * (u * np.sin(a) + v * np.cos(a)))
    x0 = max(0, int(np.floor(min(xs) * size)) - 2)
    x1 = min(size, int(np.ceil(max(xs) * size)) + 2)
    y0 = max(0, int(np.floor(min(ys) * size)) - 2)
    y1 = min(size, int(np.ceil(max(ys) * size)) + 2)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _ellipse(U: np.ndarray, V: np.ndarray, cu: float | np.ndarray, cv: float | np.ndarray,
             ru: float | np.ndarray, rv: float | np.ndarray, px: np.ndarray) -> np.ndarray:
    """Coverage (0..1) of an axis-aligned ellipse, soft over about one pixel, exactly 0 outside."""
    # In-place steps: these arrays are large and allocation is a real share of the cost.
    q = U - cu
    q *= 1.0 / ru
    np.square(q, out=q)
    t = V - cv
    t *= 1.0 / rv
    np.square(t, out=t)
    q += t
    np.subtract(1.0, q, out=q)
    q *= np.minimum(ru, rv) * px * 0.5
    return np.clip(q, 0.0, 1.0, out=q)


def _between(x: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray,
             px: np.ndarray) -> np.ndarray:
    """Soft indicator of lo < x < hi with one-pixel edges."""
    a = x - lo
    np.minimum(a, hi - x, out=a)
    a *= px
    return np.clip(a, 0.0, 1.0, out=a)


def _tri(x: np.ndarray) -> np.ndarray:
    """Triangle wave in [0, 1] with period 1: an exact, cheap stand-in for a sine."""
    f = x - np.floor(x)
    f *= 2.0
    f -= 1.0
    return np.abs(f, out=f)


def _blend(img: np.ndarray, sel: slice | np.ndarray, ys: slice, xs: slice, m: np.ndarray,
           colour: np.ndarray, alpha: float = 1.0) -> None:
    """Paint ``colour`` over ``img[sel, :, ys, xs]`` with coverage ``m`` (in place).

    Args:
        img: (N, 3, H, W) float32 canvas.
        sel: the images drawn on: ``slice(None)`` or an index array.
        ys, xs: the window.
        m: (k, h, w) coverage.
        colour: (k, 3) per image or (k, 3, h, w) per pixel.
        alpha: opacity.
    """
    if colour.ndim == 2:
        colour = colour[:, :, None, None]
    m = m[:, None] if alpha == 1.0 else m[:, None] * np.float32(alpha)
    region = img[sel, :, ys, xs]
    step = np.subtract(colour, region, dtype=np.float32)
    step *= m
    region += step
    if not isinstance(sel, slice):  # fancy indexing gave a copy: write it back
        img[sel, :, ys, xs] = region


class _Painter:
    """Draws on one batch: holds the canvas, face frame and per-image parameters."""

    def __init__(self, attrs: np.ndarray, nz: np.ndarray, size: int):
        n = len(attrs)
        self.n, self.size = n, size
        self.a = {name: attrs[:, j].astype(bool) for j, name in enumerate(ATTRIBUTES)}
        g = {name: nz[:, k] for name, k in _SLOT.items()}
        self.g = g
        f32 = np.float32
        cx = _lerp(g["cx"], *_CX) * size
        cy = _lerp(g["cy"], *_CY) * size
        s = _lerp(g["scale"], *_SCALE) * size
        ang = _lerp(g["angle"], -_ANGLE, _ANGLE)
        c, sn = np.cos(ang), np.sin(ang)
        grid = np.arange(size, dtype=np.float64) + 0.5
        dx = (grid[None, :] - cx[:, None]) / s[:, None]  # (N, W)
        dy = (grid[None, :] - cy[:, None]) / s[:, None]  # (N, H)
        # u = dx*cos + dy*sin, v = -dx*sin + dy*cos, built as (N,1,W) + (N,H,1) broadcasts.
        self.fr = _Frame(
            u=((dx * c[:, None])[:, None, :] + (dy * sn[:, None])[:, :, None]).astype(f32),
            v=((-dx * sn[:, None])[:, None, :] + (dy * c[:, None])[:, :, None]).astype(f32),
            px=s.astype(f32)[:, None, None],
            size=size,
        )
        self.img = np.empty((n, 3, size, size), dtype=f32)

        a = self.a
        # Face outline: Chubby is wide and round, Oval_Face narrow and long.
        aspect = _lerp(g["aspect"], 0.97, 1.03)
        rx = np.where(a["Chubby"], 1.17, np.where(a["Oval_Face"], 0.86, 1.0)) * aspect
        ry = np.where(a["Chubby"], 1.24, np.where(a["Oval_Face"], 1.40, 1.30)) / aspect
        rx = np.where(a["Chubby"] & a["Oval_Face"], 1.04, rx)
        self.rx, self.ry = rx.astype(f32)[:, None, None], ry.astype(f32)[:, None, None]

        tone = g["skin_tone"][:, None] ** 0.8
        skin = _SKIN_DARK + (_SKIN_LIGHT - _SKIN_DARK) * tone
        skin = skin + np.array([1.0, 0.0, -1.0]) * _lerp(g["skin_hue"], -0.03, 0.03)[:, None]
        pale = _PALE + np.array([-0.02, 0.0, 0.01]) * g["skin_hue"][:, None]
        self.skin = np.where(a["Pale_Skin"][:, None], pale, skin).astype(f32)

        # Hair shows the mean of the colours set (the model sets at most one; a flipped attribute
        # may set two, which must still look different from either alone).
        flags = np.stack([a[name] for name in _HAIR], axis=1).astype(np.float64)
        count = flags.sum(axis=1, keepdims=True)
        mixed = flags @ np.array(list(_HAIR.values())) / np.maximum(count, 1.0)
        hair = np.where(count > 0, mixed, _pick(_OTHER_HAIR, g["other_hair"]))
        self.hair = (hair * _lerp(g["hair_shade"], 0.9, 1.08)[:, None]).clip(0, 1).astype(f32)
        self.beard = (self.hair * 0.72).astype(f32)
        wv = a["Wavy_Hair"]
        col = lambda x: np.asarray(x, dtype=f32)[:, None, None]
        self.strand_freq = col(np.where(wv, 4.0, 7.0))
        self.strand_wave = col(np.where(wv, 0.7, 0.0))

    # -- helpers -----------------------------------------------------------------------------
    def _sel(self, flag: np.ndarray | None) -> slice | np.ndarray | None:
        if flag is None:
            return slice(None)
        idx = np.flatnonzero(flag)
        return idx if len(idx) else None

    def paint(self, flag: np.ndarray | None, box: tuple[float, float, float, float],
              mask: Callable[[np.ndarray, np.ndarray, np.ndarray, slice | np.ndarray], np.ndarray],
              colour: np.ndarray | Callable[..., np.ndarray], alpha: float = 1.0,
              mirror: bool = False) -> None:
        """Draw one element on the images where ``flag`` holds (all when None).

        Args:
            flag: (N,) bool, which images get the element.
            box: (u0, u1, v0, v1) face-unit box that contains the element for every image.
            mask: ``mask(U, V, px, sel)`` -> coverage; ``sel`` indexes per-image parameters.
            colour: (N, 3) per image, or ``colour(U, V, sel)`` -> (k, 3, h, w) per pixel.
            alpha: opacity.
            mirror: draw the element on both sides (the mask sees |u|); box is the right side.
        """
        sel = self._sel(flag)
        if sel is None:
            return
        u0, u1, v0, v1 = box
        # A mirrored element is drawn as two windows (right side, then left with u negated), each
        # keeping only its own half-plane so that no pixel is blended twice.
        for sign in ((1.0, -1.0) if mirror else (1.0,)):
            ys, xs = self.fr.window(*sorted((sign * u0, sign * u1)), v0, v1)
            if ys.stop <= ys.start or xs.stop <= xs.start:
                continue
            U = self.fr.u[sel, ys, xs]
            if sign < 0:
                U = -U
            V = self.fr.v[sel, ys, xs]
            px = self.fr.px[sel]
            m = mask(U, V, px, sel)
            if mirror and u0 <= 0.0:  # elements with u0 > 0 are zero on the other half anyway
                m = m * ((U >= 0.0) if sign > 0 else (U > 0.0))
            col = colour(U, V, sel) if callable(colour) else colour[sel]
            _blend(self.img, sel, ys, xs, m, col, alpha)

    # -- layers ------------------------------------------------------------------------------
    def background(self) -> None:
        g, size = self.g, self.size
        c0 = np.stack([g["bg0_r"], g["bg0_g"], g["bg0_b"]], 1) * 0.8 + 0.1
        c1 = np.stack([g["bg1_r"], g["bg1_g"], g["bg1_b"]], 1) * 0.8 + 0.1
        ang = g["bg_angle"] * 2 * np.pi
        grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        t = (grid[None, None, :] * np.cos(ang).astype(np.float32)[:, None, None]
             + grid[None, :, None] * np.sin(ang).astype(np.float32)[:, None, None]) + 0.5
        np.clip(t, 0.0, 1.0, out=t)
        c0 = c0.astype(np.float32)[:, :, None, None]
        d = c1.astype(np.float32)[:, :, None, None] - c0
        for c in range(3):
            np.multiply(t, d[:, c], out=self.img[:, c])
            self.img[:, c] += c0[:, c]

    def body(self) -> None:
        a, g = self.a, self.g
        clothes = _hue_colour(g["clothes_h"], _lerp(g["clothes_v"], 0.25, 0.85), 0.6)
        # Shoulders: everything below a parabola (cheaper than an ellipse over a large area).
        self.paint(None, (-3.0, 3.0, 1.5, 5.0),
                   lambda U, V, px, s: np.clip((V - 1.55 - 0.22 * np.square(U)) * px, 0.0, 1.0),
                   clothes)
        neck = self.skin * 0.82
        # Men get a thick neck (and a square jaw, drawn in ``jaw``).
        nw = np.where(a["Male"], 0.58, 0.36).astype(np.float32)[:, None, None]
        self.paint(None, (-0.62, 0.62, 0.5, 2.0),
                   lambda U, V, px, s: np.maximum(
                       _between(U, -nw[s], nw[s], px) * _between(V, 0.5, 1.62, px),
                       _ellipse(U, V, 0.0, 1.62, nw[s], 0.14, px)), neck)

    def jaw(self) -> None:
        rx, ry = self.rx, self.ry
        self.paint(self.a["Male"], (-1.1, 1.1, 0.0, 1.5),
                   lambda U, V, px, s: _between(U, -0.86 * rx[s], 0.86 * rx[s], px)
                   * _between(V, 0.0, ry[s] - 0.04, px), self.skin * 0.86)

    def long_hair(self) -> None:
        a, rx = self.a, self.rx
        # Back of the head for everyone with hair; long straight or wavy hair hangs at the sides.
        has_hair = ~a["Bald"]
        textured = a["Straight_Hair"] | a["Wavy_Hair"]
        for flag, colour in ((has_hair & textured, self._hair_texture),
                             (has_hair & ~textured, self.hair)):
            self.paint(flag, (-1.5, 1.5, -1.7, 0.3),
                       lambda U, V, px, s: _ellipse(U, V, 0.0, -0.3, rx[s] + 0.2, 1.3, px), colour)
        self.paint(has_hair & a["Straight_Hair"], (0.4, 1.6, -0.5, 2.0),
                   lambda U, V, px, s: _between(U, 0.5, rx[s] + 0.3, px)
                   * _between(V, -0.4, 1.95, px),
                   self._hair_texture, mirror=True)
        self.paint(has_hair & a["Wavy_Hair"], (0.4, 1.75, -0.5, 1.9),
                   lambda U, V, px, s: _between(U, 0.5, rx[s] + 0.32 + 0.14 * _tri(V * 2.5), px)
                   * _between(V, -0.4, 1.75, px),
                   self._hair_texture, mirror=True)

    def _hair_texture(self, U: np.ndarray, V: np.ndarray, sel: slice | np.ndarray) -> np.ndarray:
        # Straight hair shows vertical strands, wavy hair wavy strands (used only for those).
        pattern = _tri(U * self.strand_freq[sel] + self.strand_wave[sel] * _tri(V * 2.2))
        pattern *= 0.36
        pattern += 0.72
        return self.hair[sel][:, :, None, None] * pattern[:, None]

    def ears(self) -> None:
        rx = self.rx
        self.paint(None, (0.7, 1.35, -0.4, 0.4),
                   lambda U, V, px, s: _ellipse(U, V, rx[s] - 0.03, 0.0, 0.16, 0.27, px),
                   self.skin * 0.9, mirror=True)

    def double_chin(self) -> None:
        ry = self.ry
        self.paint(self.a["Double_Chin"], (-0.7, 0.7, 0.8, 1.75),
                   lambda U, V, px, s: _ellipse(U, V, 0.0, ry[s] + 0.08, 0.75, 0.38, px),
                   self.skin * 0.8)

    def chin_crease(self) -> None:
        rx, ry = self.rx, self.ry
        # The fold between chin and double chin, just inside the face outline.
        self.paint(self.a["Double_Chin"], (-0.7, 0.7, 0.9, 1.5),
                   lambda U, V, px, s: _between(U, -0.55, 0.55, px) * _between(
                       V, ry[s] * (0.97 - 0.5 * np.square(U / rx[s])) - 0.06,
                       ry[s] * (0.97 - 0.5 * np.square(U / rx[s])) + 0.06, px), self.skin * 0.35)

    def face(self) -> None:
        rx, ry, skin = self.rx, self.ry, self.skin
        ys, xs = self.fr.window(-1.3, 1.3, -1.6, 1.6)
        U, V, px = self.fr.u[:, ys, xs], self.fr.v[:, ys, xs], self.fr.px
        q = np.square(U / rx)
        q += np.square(V / ry)
        np.subtract(1.0, q, out=q)
        m = q * (rx * px * 0.5)
        np.clip(m, 0.0, 1.0, out=m)
        # Radial shading makes the outline (and so Chubby / Oval_Face) visible against any skin.
        np.clip(q, 0.0, 1.0, out=q)
        dull = np.where(self.a["Attractive"], 1.0, 0.94).astype(np.float32)[:, None, None]
        q *= 0.2 * dull
        q += 0.8 * dull
        _blend(self.img, slice(None), ys, xs, m, skin[:, :, None, None] * q[:, None])

    def skin_marks(self) -> None:
        a, g, skin = self.a, self.g, self.skin
        dark = skin * 0.55
        old = ~a["Young"]
        # Age: forehead lines, crow's feet and naso-labial folds.
        self.paint(old, (-0.6, 0.6, -1.05, -0.5),
                   lambda U, V, px, s: _between(U, -0.5, 0.5, px) * np.maximum.reduce([
                       _between(V, c - 0.035 + 0.1 * np.square(U), c + 0.035 + 0.1 * np.square(U),
                                px) for c in (-0.93, -0.8, -0.67)]), dark)
        self.paint(old, (0.0, 0.62, 0.15, 0.85),
                   lambda U, V, px, s: _between(V, 0.2, 0.8, px)
                   * _between(U, 0.17 + 0.42 * (V - 0.2) - 0.045, 0.17 + 0.42 * (V - 0.2) + 0.045,
                              px), dark, mirror=True)
        self.paint(old, (0.6, 0.9, -0.35, 0.05),
                   lambda U, V, px, s: _between(U, 0.64, 0.86, px) * np.maximum(
                       _between(V, -0.17 - 0.5 * (U - 0.64) - 0.03, -0.17 - 0.5 * (U - 0.64) + 0.03,
                                px),
                       _between(V, -0.12 + 0.5 * (U - 0.64) - 0.03, -0.12 + 0.5 * (U - 0.64) + 0.03,
                                px)), dark, mirror=True)
        # High cheekbones: a highlight on the cheekbone over a shadow below it.
        hc = a["High_Cheekbones"]
        self.paint(hc, (0.25, 0.85, 0.2, 0.5),
                   lambda U, V, px, s: _ellipse(U, V, 0.58, 0.36, 0.24, 0.09, px),
                   skin * 0.55, alpha=0.9, mirror=True)
        self.paint(hc, (0.25, 0.8, -0.05, 0.22),
                   lambda U, V, px, s: _ellipse(U, V, 0.52, 0.1, 0.24, 0.09, px),
                   np.ones_like(skin), alpha=0.45, mirror=True)
        self.paint(a["Rosy_Cheeks"], (0.25, 0.8, 0.1, 0.5),
                   lambda U, V, px, s: _ellipse(U, V, 0.52, 0.28, 0.25, 0.17, px),
                   np.broadcast_to(np.array([0.95, 0.22, 0.32], np.float32), skin.shape),
                   alpha=0.8, mirror=True)
        # Unattractive faces carry blemishes at jittered spots on the forehead and both cheeks.
        spot = np.broadcast_to(np.array([0.42, 0.16, 0.12], np.float32), skin.shape)
        for k, (cu, cv) in enumerate(((0.0, -0.62), (-0.5, 0.45), (0.55, 0.5)), start=1):
            du = (_lerp(g[f"spot{k}_u"], -0.12, 0.12) + cu).astype(np.float32)[:, None, None]
            dv = (_lerp(g[f"spot{k}_v"], -0.1, 0.1) + cv).astype(np.float32)[:, None, None]
            self.paint(~a["Attractive"], (cu - 0.25, cu + 0.25, cv - 0.22, cv + 0.22),
                       lambda U, V, px, s, du=du, dv=dv: _ellipse(U, V, du[s], dv[s], 0.075, 0.075,
                                                                  px), spot, alpha=0.9)
        # Bags: dark purple-brown crescents under both eyes, visible on any skin tone.
        self.paint(a["Bags_Under_Eyes"], (0.1, 0.75, -0.1, 0.22),
                   lambda U, V, px, s: _ellipse(U, V, 0.4, 0.07, 0.25, 0.1, px)
                   * (1.0 - _ellipse(U, V, 0.4, -0.03, 0.25, 0.1, px)),
                   np.broadcast_to(np.array([0.3, 0.16, 0.24], np.float32), skin.shape),
                   alpha=0.85, mirror=True)
        self.paint(a["5_o_Clock_Shadow"], (-0.95, 0.95, 0.15, 1.4),
                   lambda U, V, px, s: _ellipse(U, V, 0.0, 0.78, 0.84, 0.56, px),
                   np.broadcast_to(np.array([0.3, 0.32, 0.36], np.float32), skin.shape),
                   alpha=0.5)

    def eyes(self) -> None:
        a, g = self.a, self.g
        big = np.where(a["Attractive"], 1.15, 1.0).astype(np.float32)[:, None, None]
        erx = 0.2 * big
        ery = np.where(a["Narrow_Eyes"], 0.03, 0.115).astype(np.float32)[:, None, None] * big
        hm = a["Heavy_Makeup"]
        shadow = _pick(_EYE_SHADOWS, g["shadow_colour"]).astype(np.float32)
        self.paint(hm, (0.1, 0.7, -0.42, -0.12),
                   lambda U, V, px, s: _ellipse(U, V, 0.4, -0.27, 0.25, 0.11, px), shadow,
                   alpha=0.9, mirror=True)
        liner = np.zeros_like(self.skin)
        self.paint(hm, (0.1, 0.7, -0.3, -0.08),
                   lambda U, V, px, s: _ellipse(U, V, 0.4, -0.17, erx[s] + 0.07, ery[s] + 0.06,
                                                px), liner, mirror=True)
        white = np.broadcast_to(np.array([0.95, 0.95, 0.93], np.float32), self.skin.shape)
        box = (0.1, 0.7, -0.32, 0.02)
        self.paint(None, box,
                   lambda U, V, px, s: _ellipse(U, V, 0.4, -0.15, erx[s], ery[s], px), white,
                   mirror=True)
        iris = _pick(_EYE_COLOURS, g["eye_colour"]).astype(np.float32)
        self.paint(None, box,
                   lambda U, V, px, s: _ellipse(U, V, 0.4, -0.15, 0.08 * big[s], 0.08 * big[s], px)
                   * _ellipse(U, V, 0.4, -0.15, erx[s], ery[s], px), iris, mirror=True)
        self.paint(a["Attractive"] & ~a["Narrow_Eyes"], box,
                   lambda U, V, px, s: _ellipse(U, V, 0.43, -0.18, 0.035, 0.035, px),
                   np.ones_like(self.skin), mirror=True)

    def eyebrows(self) -> None:
        a = self.a
        arch = np.where(a["Arched_Eyebrows"], 0.2, 0.0).astype(np.float32)[:, None, None]
        half = np.where(a["Bushy_Eyebrows"], 0.1, 0.045).astype(np.float32)[:, None, None]
        colour = (self.hair * np.where(a["Bushy_Eyebrows"], 0.45, 0.62)[:, None]).astype(
            np.float32)
        # Arched brows peak towards the outer end, like a drawn arch.
        self.paint(None, (0.1, 0.75, -0.75, -0.3),
                   lambda U, V, px, s: _between(U, 0.16, 0.7, px) * _between(
                       V, self._brow(U, arch[s]) - half[s], self._brow(U, arch[s]) + half[s], px),
                   colour, mirror=True)

    @staticmethod
    def _brow(U: np.ndarray, arch: np.ndarray) -> np.ndarray:
        t = (U - 0.46) * (1.0 / 0.27)
        return -0.43 - arch * (1.0 - np.square(t)) + 0.03

    def nose(self) -> None:
        a, skin = self.a, self.skin
        big, pointy = a["Big_Nose"], a["Pointy_Nose"] & ~a["Big_Nose"]
        dark = skin * 0.5
        self.paint(~big, (0.0, 0.2, 0.2, 0.4),
                   lambda U, V, px, s: _ellipse(U, V, 0.08, 0.3, 0.05, 0.035, px), dark,
                   mirror=True)
        self.paint(~big & ~pointy, (0.0, 0.2, -0.1, 0.3),
                   lambda U, V, px, s: _between(U, 0.08, 0.13, px) * _between(V, -0.05, 0.26, px),
                   skin * 0.75, mirror=True)
        self.paint(big, (-0.4, 0.4, -0.1, 0.45),
                   lambda U, V, px, s: np.maximum(_ellipse(U, V, 0.0, 0.22, 0.26, 0.16, px),
                                                  _between(U, -0.13, 0.13, px)
                                                  * _between(V, -0.05, 0.2, px)), skin * 0.72)
        self.paint(big, (0.0, 0.35, 0.2, 0.45),
                   lambda U, V, px, s: _ellipse(U, V, 0.14, 0.32, 0.08, 0.055, px),
                   skin * 0.35, mirror=True)
        # Pointy nose: a bright ridge ending in a dark pointed tip.
        self.paint(pointy, (-0.1, 0.1, -0.15, 0.3),
                   lambda U, V, px, s: _between(U, -0.05, 0.05, px) * _between(V, -0.15, 0.22, px),
                   np.ones_like(skin), alpha=0.8)
        self.paint(pointy, (-0.25, 0.25, 0.15, 0.45),
                   lambda U, V, px, s: _between(V, 0.18, 0.42, px)
                   * _between(np.abs(U), -1.0, 0.2 * (0.42 - V) / 0.24, px), skin * 0.4)

    def facial_hair(self) -> None:
        a, rx = self.a, self.rx
        beard = ~a["No_Beard"]
        mouth_w = self._mouth_w
        self.paint(beard, (-1.1, 1.1, 0.1, 1.55),
                   lambda U, V, px, s: _ellipse(U, V, 0.0, 0.82, rx[s] * 0.93, 0.64, px)
                   * (1.0 - np.maximum(_ellipse(U, V, 0.0, 0.6, mouth_w[s] + 0.02, 0.15, px),
                                       _ellipse(U, V, 0.0, 0.47, mouth_w[s] + 0.12, 0.13, px))),
                   self.beard)
        # A full beard leaves the upper lip shaven, so a mustache shows on bearded faces too;
        # goatee and sideburns are darker than the beard and the goatee hangs below the chin.
        ry, dark = self.ry, (self.beard * 0.5).astype(np.float32)
        self.paint(a["Goatee"], (-0.35, 0.35, 0.65, 1.95),
                   lambda U, V, px, s: np.maximum(_ellipse(U, V, 0.0, ry[s] + 0.02, 0.24, 0.4, px),
                                                  _ellipse(U, V, 0.0, 0.84, 0.1, 0.1, px)), dark)
        self.paint(a["Mustache"], (-0.6, 0.6, 0.3, 0.65),
                   lambda U, V, px, s: _ellipse(U, V, 0.0, 0.48, mouth_w[s] + 0.1, 0.12, px), dark)
        self.paint(a["Sideburns"], (0.55, 1.25, -0.65, 0.7),
                   lambda U, V, px, s: _between(U, rx[s] - 0.3, rx[s] + 0.02, px)
                   * _between(V, -0.6, 0.65, px), dark, mirror=True)

    def mouth(self) -> None:
        a, g, skin = self.a, self.g, self.skin
        f32 = np.float32
        smile, open_, big = a["Smiling"], a["Mouth_Slightly_Open"], a["Big_Lips"]
        w = self._mouth_w
        curve = np.where(smile, 0.2, -0.02).astype(f32)[:, None, None]
        m0 = np.where(smile, 0.66, 0.62).astype(f32)[:, None, None]
        gap = np.where(open_, 0.07, 0.0).astype(f32)[:, None, None]
        tu = np.where(big, 0.11, 0.04).astype(f32)[:, None, None]
        tl = np.where(big, 0.15, 0.055).astype(f32)[:, None, None]
        lips = np.where(a["Wearing_Lipstick"][:, None], _pick(_LIPSTICKS, g["lipstick"]),
                        skin * np.array([0.88, 0.58, 0.58])).astype(f32)
        ys, xs = self.fr.window(-0.6, 0.6, 0.3, 1.0)
        U, V, px = self.fr.u[:, ys, xs], self.fr.v[:, ys, xs], self.fr.px
        t = np.square(U / w)
        taper = np.clip(1.0 - t, 0.0, 1.0)
        t *= curve
        d = V - m0
        d += t  # distance below the mouth line, which curves up at the corners when smiling
        inside = _between(U, -w, w, px)
        half_gap = gap * taper
        upper = _between(d, -half_gap - tu * taper - 0.01, -half_gap, px)
        lower = _between(d, half_gap, half_gap + tl * taper + 0.01, px)
        np.maximum(upper, lower, out=upper)
        upper *= inside
        _blend(self.img, slice(None), ys, xs, upper, lips)
        # Open mouths show a dark gap (teeth in its upper half when smiling); closed ones a line.
        hole = half_gap - np.abs(d)
        hole *= px
        hole += 0.5
        np.clip(hole, 0.0, 1.0, out=hole)
        hole *= inside
        _blend(self.img, slice(None), ys, xs, hole, np.broadcast_to(
            np.array([0.2, 0.04, 0.05], f32), skin.shape))
        teeth = np.flatnonzero(smile & open_)
        if len(teeth):
            m = hole[teeth] * np.clip(0.3 - d[teeth] * px[teeth], 0.0, 1.0)
            _blend(self.img, teeth, ys, xs, m, np.broadcast_to(
                np.array([0.95, 0.94, 0.88], f32), (len(teeth), 3)))

    @property
    def _mouth_w(self) -> np.ndarray:
        a = self.a
        w = np.where(a["Smiling"], 0.43, 0.33) + np.where(a["Big_Lips"], 0.04, 0.0)
        return w.astype(np.float32)[:, None, None]

    def hair_front(self) -> None:
        a, rx = self.a, self.rx
        has_hair = ~a["Bald"]
        bangs, receding = a["Bangs"], a["Receding_Hairline"] & ~a["Bangs"]

        def cap(hairline: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
            def mask(U: np.ndarray, V: np.ndarray, px: np.ndarray, s: np.ndarray) -> np.ndarray:
                below = hairline(U, np.square(U / rx[s])) - V
                below *= px
                return _ellipse(U, V, 0.0, -0.27, rx[s] + 0.1, 1.25, px) * np.clip(below, 0.0, 1.0)
            return mask

        normal = cap(lambda U, side: -0.74 + 0.4 * side)
        fringe = cap(lambda U, side: -0.56 + 0.05 * _tri(U * 5.0) + 0.12 * side)
        # Receding: the temples go far back, leaving a peak in the middle (an M shape).
        back = cap(lambda U, side: -1.08 + 0.5 * side
                   + 0.22 * np.clip(1.0 - np.abs(U) * (1.0 / 0.22), 0.0, 1.0))
        textured = a["Straight_Hair"] | a["Wavy_Hair"]
        for kind, mask in ((bangs, fringe), (receding, back), (~bangs & ~receding, normal)):
            for flag, colour in ((textured, self._hair_texture), (~textured, self.hair)):
                self.paint(has_hair & kind & flag, (-1.3, 1.3, -1.6, -0.2), mask, colour)
        # Bald: a shiny dome and the remaining fringe of hair above the ears.
        bald = a["Bald"]
        self.paint(bald, (-0.65, 0.25, -1.2, -0.7),
                   lambda U, V, px, s: _ellipse(U, V, -0.2, -0.95, 0.38, 0.18, px),
                   np.ones_like(self.skin), alpha=0.8)
        self.paint(bald, (0.7, 1.3, -0.65, 0.15),
                   lambda U, V, px, s: _between(U, rx[s] - 0.2, rx[s] + 0.1, px)
                   * _between(V, -0.6, 0.1, px), self.hair, mirror=True)

    def hat(self) -> None:
        a, g, rx = self.a, self.g, self.rx
        colour = _hue_colour(g["hat_h"], _lerp(g["hat_v"], 0.35, 0.95), 0.85).astype(np.float32)
        hat = a["Wearing_Hat"]
        self.paint(hat, (-1.4, 1.4, -2.0, -0.5),
                   lambda U, V, px, s: _ellipse(U, V, 0.0, -1.0, rx[s] + 0.12, 0.98, px)
                   * np.clip((-0.62 - V) * px, 0.0, 1.0), colour)
        self.paint(hat, (-1.4, 1.4, -0.95, -0.6),
                   lambda U, V, px, s: _between(U, -rx[s] - 0.12, rx[s] + 0.12, px)
                   * _between(V, -0.9, -0.76, px), colour * 0.4)
        self.paint(hat, (-1.9, 1.9, -0.85, -0.45),
                   lambda U, V, px, s: _ellipse(U, V, 0.0, -0.66, rx[s] + 0.6, 0.14, px),
                   colour * 0.8)

    def glasses(self) -> None:
        a, g = self.a, self.g
        on = a["Eyeglasses"]
        frame = _pick(_FRAMES, g["frame_colour"]).astype(np.float32)
        dark = (g["sunglasses"] < 0.25)[:, None]
        lens = np.where(dark, np.array([0.08, 0.08, 0.1]), np.array([0.8, 0.9, 1.0])).astype(
            np.float32)
        box = (0.0, 1.2, -0.45, 0.12)
        self.paint(on, box, lambda U, V, px, s: _ellipse(U, V, 0.4, -0.15, 0.27, 0.19, px), lens,
                   alpha=0.35, mirror=True)
        self.paint(on & dark[:, 0], box,
                   lambda U, V, px, s: _ellipse(U, V, 0.4, -0.15, 0.27, 0.19, px), lens,
                   alpha=0.6, mirror=True)
        rx = self.rx
        self.paint(on, box, lambda U, V, px, s: np.maximum.reduce([
            _ellipse(U, V, 0.4, -0.15, 0.33, 0.25, px)
            * (1.0 - _ellipse(U, V, 0.4, -0.15, 0.24, 0.16, px)),
            _between(U, -0.2, 0.12, px) * _between(V, -0.21, -0.13, px),
            _between(U, 0.68, rx[s], px) * _between(V, -0.23, -0.14, px)]), frame, mirror=True)

    def jewellery(self) -> None:
        a, g, rx = self.a, self.g, self.rx
        metal = _pick(_METALS, g["metal"]).astype(np.float32)
        self.paint(a["Wearing_Earrings"], (0.75, 1.35, 0.15, 0.62),
                   lambda U, V, px, s: np.maximum(
                       _ellipse(U, V, rx[s] + 0.0, 0.3, 0.1, 0.1, px),
                       _ellipse(U, V, rx[s] + 0.0, 0.5, 0.09, 0.13, px)), metal, mirror=True)
        self.paint(a["Wearing_Necklace"], (-0.7, 0.7, 1.25, 1.8),
                   lambda U, V, px, s: np.maximum(
                       _between(U, -0.5, 0.5, px)
                       * _between(V, 1.4 + 0.6 * np.square(U) - 0.07, 1.4 + 0.6 * np.square(U)
                                  + 0.07, px),
                       _ellipse(U, V, 0.0, 1.56, 0.13, 0.13, px)), metal)
        tie = a["Wearing_Necktie"]
        shirt = np.broadcast_to(np.array([0.96, 0.96, 0.96], np.float32), self.skin.shape)
        self.paint(tie, (-0.7, 0.7, 1.5, 3.0),
                   lambda U, V, px, s: _between(V, 1.56, 3.0, px)
                   * _between(np.abs(U), -1.0, 0.6 - 0.45 * (V - 1.56), px), shirt)
        tie_col = _pick(_TIES, g["tie_colour"]).astype(np.float32)
        self.paint(tie, (-0.45, 0.45, 1.5, 3.2),
                   lambda U, V, px, s: np.maximum(
                       _ellipse(U, V, 0.0, 1.66, 0.13, 0.1, px),
                       _between(V, 1.68, 3.0, px)
                       * _between(np.abs(U), -1.0, 0.07 + 0.2 * np.clip(V - 1.68, 0.0, 1.0), px)),
                   tie_col)

    def finish(self, seed: int, indices: np.ndarray) -> np.ndarray:
        """Lighting, blur, noise and conversion to (N, H, W, 3) uint8."""
        g, size, img = self.g, self.size, self.img
        f32 = np.float32
        ang = g["light_angle"] * 2 * np.pi
        strength = _lerp(g["light_strength"], 0.0, 0.45)
        grid = (np.arange(size, dtype=f32) + 0.5) / size - 0.5
        light = (1.0 + grid[None, None, :] * (strength * np.cos(ang)).astype(f32)[:, None, None]
                 + grid[None, :, None] * (strength * np.sin(ang)).astype(f32)[:, None, None])
        temp = _lerp(g["temperature"], -0.05, 0.05)
        gain = _lerp(g["gain"], 0.75, 1.12)[:, None] * (1.0 + np.outer(temp, [1.0, 0.0, -1.0]))
        img *= light[:, None]
        img *= (gain * 255.0).astype(f32)[:, :, None, None]
        blurry = np.flatnonzero(self.a["Blurry"])
        if len(blurry):
            r = max(1, round(size / 32))
            b = img[blurry]
            for axis in (2, 3, 2, 3):
                b = _box_blur(b, r, axis)
            img[blurry] = b
        bank = _noise_bank(seed)
        length = 3 * size * size
        if length <= _NOISE_BANK:
            starts = (g["noise_offset"] * (_NOISE_BANK - length)).astype(np.int64)
            windows = np.lib.stride_tricks.sliding_window_view(bank, length)
            noise = windows[starts].reshape(img.shape)
        else:  # very large images: fall back to a per-image generator
            noise = np.stack([np.random.default_rng([seed & 0xFFFFFFFF, int(i)]).standard_normal(
                length, dtype=f32) for i in indices]).reshape(img.shape)
        sigma = _lerp(g["noise_sigma"], 2.0, 12.0).astype(f32)[:, None, None, None]
        img += noise * sigma
        img += 0.5
        np.clip(img, 0.0, 255.0, out=img)
        # Casting per channel into a channels-last array is ~3x faster than transposing after.
        out = np.empty((self.n, size, size, 3), dtype=np.uint8)
        for c in range(3):
            out[..., c] = img[:, c]
        return out


def _box_blur(x: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Box blur of radius r along one axis with edge padding (via a running sum)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(x, pad, mode="edge"), axis=axis, dtype=np.float32)
    n = x.shape[axis]
    hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return (hi - lo) * np.float32(1.0 / (2 * r + 1))


_RENDER_CHUNK = 64


def render(attributes: np.ndarray, seed: int, indices: np.ndarray, size: int = 64) -> np.ndarray:
    """Draw faces with the given attributes.

    Args:
        attributes: (N, 40) 0/1 attributes in ``ATTRIBUTES`` order (any combination is drawn).
        seed: dataset seed; with ``indices`` it fixes every nuisance (pose, colours, noise).
        indices: (N,) image indices; nuisance depends only on (seed, index), never on attributes.
        size: image side in pixels (square images).

    Returns:
        (N, size, size, 3) uint8 RGB images.
    """
    idx = _as_indices(indices)
    attrs = np.asarray(attributes)
    if attrs.shape != (len(idx), len(ATTRIBUTES)):
        raise ValueError(f"attributes must have shape ({len(idx)}, {len(ATTRIBUTES)}), "
                         f"got {attrs.shape}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    out = np.empty((len(idx), size, size, 3), dtype=np.uint8)
    # Chunks bound memory; the result does not depend on the chunking.
    for start in range(0, len(idx), _RENDER_CHUNK):
        sl = slice(start, start + _RENDER_CHUNK)
        nz = _uniforms(seed, idx[sl], _STREAM_NUISANCE, len(_NUISANCE_SLOTS))
        p = _Painter(attrs[sl], nz, size)
        p.background()
        p.body()
        p.long_hair()
        p.jewellery()
        p.ears()
        p.double_chin()
        p.jaw()
        p.face()
        p.skin_marks()
        p.eyes()
        p.eyebrows()
        p.nose()
        p.facial_hair()
        p.mouth()
        p.chin_crease()
        p.hair_front()
        p.hat()
        p.glasses()
        out[sl] = p.finish(seed, idx[sl])
    return out


def _observe(true: np.ndarray, seed: int, idx: np.ndarray, label_noise: float) -> np.ndarray:
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    flips = _uniforms(seed, idx, _STREAM_LABEL_NOISE, len(ATTRIBUTES)) < label_noise
    return (true ^ flips).astype(np.int8)


def generate(indices: np.ndarray, seed: int = 0, size: int = 64,
             label_noise: float = 0.0) -> dict[str, np.ndarray]:
    """Images and labels for the given indices.

    Args:
        indices: image indices (>= 0).
        seed: dataset seed.
        size: image side in pixels.
        label_noise: probability that each observed label is flipped (the image always shows the
            true attributes), imitating CelebA's ambiguous annotations.

    Returns:
        ``image`` (N, size, size, 3) uint8, ``labels`` (N, 40) int8 observed, ``true_labels``
        (N, 40) int8, ``index`` (N,) int64.
    """
    idx = _as_indices(indices)
    true = sample_attributes(seed, idx)
    return {
        "image": render(true, seed, idx, size),
        "labels": _observe(true, seed, idx, label_noise),
        "true_labels": true,
        "index": idx,
    }


def _attribute_column(attribute: str | int) -> int:
    """Column of an attribute given by name or index, checked against ``ATTRIBUTES``."""
    j = ATTRIBUTE_INDEX[attribute] if isinstance(attribute, str) else int(attribute)
    if not 0 <= j < len(ATTRIBUTES):
        raise ValueError(f"attribute index {j} out of range 0..{len(ATTRIBUTES) - 1}")
    return j


def flip_and_render(indices: np.ndarray, attribute: str | int, seed: int = 0, size: int = 64
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same faces drawn as sampled and with one attribute flipped.

    Args:
        indices: image indices.
        attribute: attribute name or column index.
        seed: dataset seed.
        size: image side in pixels.

    Returns:
        ``(original_images, flipped_images, true_attrs, flipped_attrs)``; only the one attribute
        differs between the two attribute arrays (other attributes are not re-conditioned).
    """
    j = _attribute_column(attribute)
    idx = _as_indices(indices)
    true = sample_attributes(seed, idx)
    flipped = true.copy()
    flipped[:, j] ^= 1
    return render(true, seed, idx, size), render(flipped, seed, idx, size), true, flipped


def set_and_render(indices: np.ndarray, attribute: str | int, value: int, seed: int = 0, size: int = 64
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The same faces drawn with one attribute set to ``value`` (0 or 1) and every other as sampled.

    The exact one-attribute edit, "add" (``value=1``) or "remove" (``value=0``): the analysis
    judges these renders with the classifier, as it judges decoded edits, to separate what the
    judge accepts from what the decoder draws. Other attributes are not re-conditioned, as an edit
    of one embedding block leaves the other blocks alone.

    Returns:
        ``(images, attrs)``: uint8 (N, size, size, 3) and the int8 (N, 40) attributes drawn.
    """
    j = _attribute_column(attribute)
    if value not in (0, 1):
        raise ValueError(f"value must be 0 or 1, got {value!r}")
    idx = _as_indices(indices)
    attrs = sample_attributes(seed, idx)
    attrs[:, j] = value
    return render(attrs, seed, idx, size), attrs


def write_celeba_folder(out: str, n: int, size: int = 64, seed: int = 0,
                        label_noise: float = 0.0, val_fraction: float = 0.05,
                        test_fraction: float = 0.05) -> dict:
    """Write ``n`` synthetic faces in CelebA's on-disk layout.

    Writes ``out/img_align_celeba/000001.jpg`` ... (1-based, JPEG quality 95),
    ``out/list_attr_celeba.txt`` (count, header of the 40 names, then ``000001.jpg  1 -1 ...``
    with observed labels) and ``out/list_eval_partition.txt`` (``000001.jpg 0``; 0 train,
    1 valid, 2 test, assigned per image from the seed). File ``k`` holds index ``k - 1``.

    Args:
        out: output folder (created if missing).
        n: number of images.
        size: image side in pixels.
        seed: dataset seed.
        label_noise: fraction of observed labels flipped.
        val_fraction: expected fraction of images in the validation split.
        test_fraction: expected fraction of images in the test split.

    Returns:
        Summary: ``out``, ``n``, ``size``, ``seed``, ``label_noise``, ``splits`` (counts per
        split name), ``positive_rate`` (observed rate per attribute) and ``seconds``.
    """
    from PIL import Image

    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1:
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be "
                         "non-negative and sum to at most 1")
    start = time.perf_counter()
    img_dir = os.path.join(out, "img_align_celeba")
    os.makedirs(img_dir, exist_ok=True)

    def save(item: tuple[str, np.ndarray]) -> None:
        Image.fromarray(item[1]).save(os.path.join(img_dir, item[0]), quality=95)

    attr_lines = [str(n), " ".join(ATTRIBUTES)]
    part_lines = []
    positives = np.zeros(len(ATTRIBUTES), dtype=np.int64)
    splits = {"train": 0, "valid": 0, "test": 0}
    chunk = 1024
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for lo in range(0, n, chunk):
            idx = np.arange(lo, min(n, lo + chunk))
            data = generate(idx, seed, size, label_noise)
            names = [f"{i + 1:06d}.jpg" for i in idx]
            # JPEG encoding releases the GIL, so threads overlap it with the next chunk's drawing.
            list(pool.map(save, zip(names, data["image"])))
            u = _uniforms(seed, idx, _STREAM_PARTITION, 1)[:, 0]
            part = np.where(u < test_fraction, 2, np.where(u < test_fraction + val_fraction, 1, 0))
            for name, row, p in zip(names, data["labels"], part):
                attr_lines.append(name + "".join(" -1" if v == 0 else "  1" for v in row))
                part_lines.append(f"{name} {p}")
            positives += data["labels"].sum(axis=0, dtype=np.int64)
            for key, value in zip(("train", "valid", "test"), (0, 1, 2)):
                splits[key] += int((part == value).sum())
    with open(os.path.join(out, "list_attr_celeba.txt"), "w") as f:
        f.write("\n".join(attr_lines) + "\n")
    with open(os.path.join(out, "list_eval_partition.txt"), "w") as f:
        f.write("\n".join(part_lines) + "\n")
    return {
        "out": os.path.abspath(out), "n": n, "size": size, "seed": seed,
        "label_noise": label_noise, "splits": splits,
        "positive_rate": {a: float(c) / n for a, c in zip(ATTRIBUTES, positives)},
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point: write a synthetic CelebA folder and print a one-line summary."""
    parser = argparse.ArgumentParser(
        prog="python -m olr_ray.data.synthetic",
        description="Write N procedurally drawn CelebA-like faces in CelebA's on-disk layout "
                    "(img_align_celeba/*.jpg, list_attr_celeba.txt, list_eval_partition.txt).")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--label-noise", type=float, default=0.0,
                        help="fraction of observed labels flipped (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="fraction of images in the validation split (default 0.05)")
    parser.add_argument("--test-fraction", type=float, default=0.05,
                        help="fraction of images in the test split (default 0.05)")
    args = parser.parse_args(argv)
    summary = write_celeba_folder(args.out, args.n, args.size, args.seed, args.label_noise,
                                  args.val_fraction, args.test_fraction)
    s = summary["splits"]
    print(f"wrote {summary['n']} images ({args.size}x{args.size}; train {s['train']}, valid "
          f"{s['valid']}, test {s['test']}) in {summary['seconds']:.2f} s to {summary['out']}")
    return summary


if __name__ == "__main__":
    main()
