"""Typed configuration for every stage, loaded from YAML, presets and ``key=value`` overrides.

Each stage has one dataclass; :class:`PipelineConfig` holds them all. Every problem in a
config is collected and reported together (:class:`ConfigError`), before any work starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """One or more invalid config values; ``problems`` lists each by its dotted key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


class UsageError(ValueError):
    """What was asked cannot be done as asked (options, run id, stage order, resources); the message says
    what to change."""


def _check(problems: list[str], ok: bool, key: str, msg: str) -> None:
    if not ok:
        problems.append(f"{key}: {msg}")


def _at_least(problems: list[str], pre: str, obj: Any, **bounds: float) -> None:
    """``field=lowest`` for each field of ``obj`` that has a lower bound, checked alike."""
    for name, low in bounds.items():
        value = getattr(obj, name)
        _check(problems, value >= low, f"{pre}.{name}", f"expected >= {low}, got {value!r}")


def _positive(problems: list[str], pre: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(problems, value > 0, f"{pre}.{name}", f"expected > 0, got {value!r}")


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    source: str = "synthetic"
    """``synthetic`` (built-in CelebA-like faces), a local CelebA-format folder, or ``s3://bucket/prefix``."""
    n_images: int = 20_000
    """Number of images to draw when ``source`` is ``synthetic``."""
    image_size: int = 64
    """Square side after centre crop and resize (CelebA 218x178 becomes 178x178 at 178). A folder of
    smaller images is never scaled up: it runs at its own size."""
    label_noise: float = 0.02
    """Synthetic only: fraction of observed labels flipped, imitating CelebA's ambiguous labels."""
    drop_labels: list[str] = field(default_factory=lambda: ["Wearing_Necklace", "Wearing_Necktie"])
    """Attributes removed where present (the paper drops these two: L=38 on CelebA)."""
    test_fraction: float = 0.1
    """Test share of the seeded split: the synthetic data's, and a folder's without list_eval_partition.txt
    (CelebA's own file splits 80/10/10)."""
    valid_fraction: float = 0.1
    """Validation share of that split. Per-epoch validation and every choice of a default use ``valid``; ``test``
    only reports. 0 leaves no validation split: per-epoch metrics then fall back to ``test``."""
    partition_file: bool = True
    """Split a CelebA-format folder by its list_eval_partition.txt where it has one; false draws the seeded
    split above even then (the paper's random 95/5 on CelebA)."""
    max_images: int = 0
    """Read only N rows of the attribute file, evenly spread over it so every split keeps its share
    (0: all). For quick trials on big folders."""

    def validate(self, p: list[str], pre: str = "data") -> None:
        _at_least(p, pre, self, n_images=8, max_images=0)
        _check(p, 16 <= self.image_size <= 512, f"{pre}.image_size", f"expected 16..512, got {self.image_size!r}")
        _check(p, 0.0 <= self.label_noise < 0.5, f"{pre}.label_noise", f"expected 0 <= x < 0.5, got {self.label_noise!r}")
        _check(p, 0.0 < self.test_fraction < 0.5, f"{pre}.test_fraction", f"expected 0 < x < 0.5, got {self.test_fraction!r}")
        _check(p, 0.0 <= self.valid_fraction < 0.5, f"{pre}.valid_fraction",
               f"expected 0 <= x < 0.5, got {self.valid_fraction!r}")
        _check(p, self.test_fraction + self.valid_fraction <= 0.5, f"{pre}.valid_fraction",
               f"expected test_fraction + valid_fraction <= 0.5 (at least half the images train), got "
               f"{self.test_fraction!r} + {self.valid_fraction!r}")


@dataclass
class ClassifierConfig:
    """The multi-label CNN whose probabilities label the Siamese pairs."""

    epochs: int = 12
    """Passes over the training split. The classifier both labels the Siamese pairs and judges the
    edits, so an under-trained one caps everything after it (docs/defaults.md)."""
    batch_size: int = 64
    """Images per step per worker."""
    lr: float = 2e-3
    """AdamW learning rate."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """Per-epoch learning rate: constant (the paper's), or cosine decay to 0 (docs/defaults.md)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    width: int = 32
    """Channels of the first conv stage; later stages double it."""
    occlusion_prob: float = 0.25
    """Share of training images that get one random rectangle, drawn like the Siamese pairs'
    (``siamese.occlusion_*``), so the classifier stays calibrated on the occluded images it
    labels. The classifier also judges the edits, and the more occluded images it trains on, the
    more it reads a label from its correlates (0: clean images only, as the paper; docs/defaults.md)."""

    def validate(self, p: list[str], pre: str = "classifier") -> None:
        _at_least(p, pre, self, epochs=1, batch_size=2, weight_decay=0, width=4)
        _positive(p, pre, self, "lr")
        _check(p, 0 <= self.occlusion_prob <= 1, f"{pre}.occlusion_prob",
               f"expected a probability in [0, 1], got {self.occlusion_prob!r}")


@dataclass
class SiameseConfig:
    """The Siamese embedding network and the occluded-pair targets it learns from."""

    k: int = 32
    """Embedding size per label (the paper uses 32)."""
    epochs: int = 4
    """Epochs; each draws fresh random pairs and fresh occlusions."""
    batch_size: int = 16
    """Pairs per step per worker (small batches: the dot-product loss needs many steps)."""
    lr: float = 2e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    width: int = 32
    """Channels of the first trunk stage."""
    label_kernel: int = 1
    """Kernel side of the label-specific conv layer (L*k maps); 1 keeps it cheap at 64x64."""
    activation: Literal["relu", "abs", "relu_leaky_grad"] = "relu_leaky_grad"
    """How blocks are kept non-negative: ``relu`` before pooling (blocks of rare labels can die:
    all zeros, no gradient), ``abs`` after pooling (never dies, but absent blocks keep a floor) or
    ``relu_leaky_grad`` (ReLU values, leaky gradient, with ``block_floor``; docs/defaults.md)."""
    block_floor: float = 0.003
    """Constant added to every embedding coordinate: keeps the loss's gradient alive where both
    blocks of a pair would be exactly zero (``relu``, ``relu_leaky_grad``); the absent-label norm
    is then at least block_floor * sqrt(k) (docs/defaults.md)."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """Per-epoch learning rate: constant, or cosine decay to 0 (docs/defaults.md)."""
    init_from_classifier: bool = True
    """Start the Siamese trunk from the trained classifier's trunk (same width only): it already
    detects the labels, so the label layer learns from the first step."""
    target: Literal["occlusion", "temperature"] = "occlusion"
    """How the classifier's output is softened: random occlusion (the paper's choice) or temperature."""
    temperature: float = 2.0
    """Temperature for ``target: temperature``: sigmoid(logit / T)."""
    occlusion_min: float = 0.33
    """Smallest occlusion side as a fraction of the image side."""
    occlusion_max: float = 0.66
    """Largest occlusion side as a fraction of the image side."""
    occlusion_fill: Literal["zero", "mean", "noise"] = "zero"
    """What the occluded rectangle is filled with."""
    occlusion_prob: float = 0.5
    """Share of pair images that are occluded (the paper: all). Below 1, the rest are fed clean,
    with clean targets, so the network also sees the un-occluded images it later embeds."""
    label_pair_share: float = 0.5
    """Share of training images paired with one that shares a label (rare labels first) instead of
    at random (the paper: 0, all random). Rare labels otherwise almost never meet in a pair;
    validation pairs stay random (docs/defaults.md)."""
    grad_floor: float = 0.05
    """Backward-only floor g on the pair loss's gradient: d<E1, E2>/dE1 = E2 + g; the loss value
    is the paper's (0: the exact gradient). The exact gradient vanishes where both blocks of a pair
    are near zero, so a rare label's block that shrank early in training stays small (docs/defaults.md)."""
    val_pairs: int = 1024
    """Held-out pairs (from the validation split) for val loss and dot-product R^2."""
    labeler_batch_size: int = 256
    """Pairs per batch in the Ray Data labelling actors."""

    def validate(self, p: list[str], pre: str = "siamese") -> None:
        _at_least(p, pre, self, k=1, epochs=1, batch_size=2, width=4, val_pairs=8, labeler_batch_size=1)
        _positive(p, pre, self, "lr", "temperature")
        _check(p, self.label_kernel in (1, 3, 5), f"{pre}.label_kernel", f"expected 1, 3 or 5, got {self.label_kernel!r}")
        _check(p, 0 < self.occlusion_min <= self.occlusion_max <= 1, f"{pre}.occlusion_min/occlusion_max",
               f"expected 0 < min <= max <= 1, got {self.occlusion_min!r}, {self.occlusion_max!r}")
        _check(p, 0 <= self.occlusion_prob <= 1, f"{pre}.occlusion_prob",
               f"expected a probability in [0, 1], got {self.occlusion_prob!r}")
        _check(p, 0 <= self.block_floor < 1, f"{pre}.block_floor", f"expected 0 <= floor < 1, got {self.block_floor!r}")
        _check(p, 0 <= self.label_pair_share <= 1, f"{pre}.label_pair_share",
               f"expected a share in [0, 1], got {self.label_pair_share!r}")
        _check(p, 0 <= self.grad_floor < 1, f"{pre}.grad_floor", f"expected 0 <= g < 1, got {self.grad_floor!r}")


@dataclass
class EmbedConfig:
    """Batch embedding of every image with Ray Data."""

    batch_size: int = 256
    """Images per inference batch."""
    num_actors: int = 0
    """The most inference actors (0: sized from the cluster's free CPUs/GPUs so read tasks keep a CPU)."""
    rows_per_file: int = 50_000
    """Upper bound on rows per Parquet file."""

    def validate(self, p: list[str], pre: str = "embed") -> None:
        _at_least(p, pre, self, batch_size=1, num_actors=0, rows_per_file=1)


@dataclass
class DecoderConfig:
    """Reconstruction model after the paper's Table 1, trained on the embeddings."""

    epochs: int = 10
    """Passes over the training embeddings (docs/defaults.md: 10 against 8, 6, 4 and 2 on the demo, two seeds each)."""
    batch_size: int = 32
    """Embeddings per step per worker (2 workers of 32 take the steps one process of 64 would)."""
    lr: float = 1e-3
    """Learning rate (paper: 1e-4, the paper preset; 1e-3 reaches the demo's SSIM in fewer epochs)."""
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    """Optimizer (paper: RMSProp)."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """Per-epoch learning rate: constant (the paper and its preset), or cosine decay over the epochs
    (docs/defaults.md)."""
    alpha: float = 0.5
    """Loss weight: alpha*(1-SSIM) + (1-alpha)*MSE(x, minmax(out)) (paper: 0.5)."""
    label_weight: float = 0.0
    """Weight of a term the paper does not have: BCE between the frozen classifier's outputs on the
    decoded face and the image's labels (0: the paper's loss). It trains through the judge of
    editing and turns faces to blotches, so it is off by default (docs/defaults.md)."""
    edit_weight: float = 30.0
    """Weight of a term the paper does not have: every batch also decodes a copy of its embeddings with
    one random block per image edited as the analysis edits (half sampled from the label's Gaussian,
    half zeroed), and the frozen Siamese network re-embeds those faces; the term is the MSE between
    what went in and what comes back (0: the paper's loss). Pixel losses draw the average face for a
    label pattern, so a cue whose look varies (a hat of any colour) averages away and its block is
    barely read. The Siamese network is then no longer an independent judge of editing
    (``editing.*_reembedded``); the classifier still is. About 1.8x the decoder's time (docs/defaults.md)."""
    edit_warmup: float = 1.0
    """Epochs over which the edit term's weight rises linearly from 0 to ``edit_weight`` (0: the full weight from
    the first step): the decoder learns faces before the term pulls on them, a guard against a decoder that
    learns a texture the Siamese network reads instead (docs/defaults.md)."""
    width: int = 128
    """Channels of the reshaped dense output (paper: 6x6x512 at 178)."""
    channels: int = 48
    """Channels of the conv stack (paper: 64; the first ConvTranspose has twice this; docs/defaults.md: 48 against 32
    on the demo, two seeds)."""

    def validate(self, p: list[str], pre: str = "decoder") -> None:
        _at_least(p, pre, self, epochs=1, batch_size=2, label_weight=0, edit_weight=0, edit_warmup=0, width=8,
                  channels=4)
        _positive(p, pre, self, "lr")
        _check(p, 0 <= self.alpha <= 1, f"{pre}.alpha", f"expected 0..1, got {self.alpha!r}")


@dataclass
class AnalysisConfig:
    """The paper's experiments on the committed embeddings."""

    pca_label: str = "auto"
    """Label whose vectors are analysed with PCA. ``auto``: the paper's (Mouth_Slightly_Open) where the
    data has it, else the label present in the share of training images closest to one half (the
    most balanced ranking); the analysis names the label and the rule in its log and report."""
    probe_epochs: int = 200
    """Full-batch epochs of the linear probe."""
    edit_images: int = 256
    """Test images edited per label for the editing metrics (and, on synthetic runs, the exact edits;
    docs/defaults.md)."""
    split: Literal["test", "valid"] = "test"
    """Split the analysis measures on (metrics.json ``analysis.split``): ``test`` for the numbers a report
    states, ``valid`` for comparing recipes and choosing defaults. Key names that say ``test`` mean this split."""
    edit_gaussians: Literal["labelled", "confirmed"] = "confirmed"
    """Training images each label's editing Gaussian (paper eqs. 4-5) is fitted on: ``labelled``, every image
    with the label (the paper and its preset); ``confirmed``, those the classifier also gives the label
    (p >= 0.5), so a label noted but not visible does not shrink the samples (a label no image confirms keeps
    every labelled image). The decoder's training edits sample the labelled images' Gaussians either way
    (docs/defaults.md)."""
    edit_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])
    """Scales s of the sampled block in the editing sweep."""
    disentangle_faces: int = 256
    """Synthetic only: faces redrawn with one attribute flipped, per run."""
    judge_images: int = 16_000
    """Synthetic only: faces with every attribute independent of the others that the independent judge
    trains on (``judge.independent.*``, ``editing.independent.*``); 0: no independent judge."""
    judge_epochs: int = 8
    """Epochs of the independent judge over its faces. The judge is trained once per output folder and recipe
    (``<output>/_judges/``) and read by every later run."""

    def validate(self, p: list[str], pre: str = "analysis") -> None:
        _at_least(p, pre, self, probe_epochs=1, edit_images=1, disentangle_faces=0, judge_images=0, judge_epochs=1)
        _check(p, len(self.edit_scales) >= 1 and all(s > 0 for s in self.edit_scales), f"{pre}.edit_scales",
               f"expected a non-empty list of positive numbers, got {self.edit_scales!r}")


@dataclass
class PipelineConfig:
    """Everything one run needs. Written to ``<run>/config.yaml``."""

    seed: int = 0
    """Seed for splits, pairs, occlusions and initialisation."""
    num_workers: int = 2
    """Ray Train workers per training stage (0: run the loop in the driver process)."""
    use_gpu: Literal["auto", "true", "false"] = "auto"
    """Train and embed on GPUs: auto uses them when the cluster has any."""
    max_failures: int = 1
    """Worker failures each training stage recovers from (from its last checkpoint)."""
    resource_wait_s: float = 900.0
    """How long to wait for an autoscaler to add the GPUs ``use_gpu=true`` needs (0: fail at once)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute precision of every model (training, pair labelling, embedding, analysis): bf16 runs the
    models' layers under bfloat16 autocast, with losses, dot products, SSIM and the committed embeddings
    in float32. auto: bf16 on hardware that computes it natively (GPUs from Ampere, CPUs with AVX-512-BF16
    or AMX), fp32 elsewhere; each stage's choice is in the manifest (docs/speed.md)."""
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    siamese: SiameseConfig = field(default_factory=SiameseConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def validate(self) -> None:
        p: list[str] = []
        _check(p, self.num_workers >= 0, "num_workers", f"expected >= 0, got {self.num_workers!r}")
        _check(p, self.max_failures >= -1, "max_failures", f"expected >= -1, got {self.max_failures!r}")
        _check(p, self.resource_wait_s >= 0, "resource_wait_s", f"expected >= 0 seconds, got {self.resource_wait_s!r}")
        for name in ("data", "classifier", "siamese", "embed", "decoder", "analysis"):
            getattr(self, name).validate(p)
        _check_literals(self, "", p)
        if p:
            raise ConfigError(p)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_literals(obj: Any, prefix: str, p: list[str]) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_literals(value, f"{prefix}{f.name}.", p)
        elif typing.get_origin(hints[f.name]) is Literal:
            allowed = typing.get_args(hints[f.name])
            _check(p, value in allowed, f"{prefix}{f.name}", f"expected one of {', '.join(map(str, allowed))}, got {value!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # Tiny: what CI runs end to end; minutes on 2 CPU cores.
    "smoke": {
        "num_workers": 2,
        "data": {"n_images": 600, "image_size": 32},
        "classifier": {"epochs": 1, "batch_size": 64, "width": 8},
        "siamese": {"epochs": 2, "batch_size": 16, "width": 8, "k": 8, "val_pairs": 64},
        "decoder": {"epochs": 1, "batch_size": 32, "width": 32, "channels": 8},
        "analysis": {"probe_epochs": 50, "edit_images": 16, "disentangle_faces": 32, "judge_images": 512,
                     "judge_epochs": 1},
    },
    # The default: synthetic 64x64, 20,000 images, about 35 minutes on 2 cores with bf16, 80 in float32 (README).
    "demo": {},
    # The paper's method exactly on CelebA (PAPER_METHOD over CELEBA_SCALE).
    "paper": {},
    # This project's recipe on CelebA: the demo's departures from the paper, at CelebA's scale.
    "celeba": {},
}

# CelebA at the paper's resolution on GPU workers: sizes and lengths, shared by "paper" and "celeba".
CELEBA_SCALE: dict[str, Any] = {
    "num_workers": 4,
    "use_gpu": "true",
    "data": {"source": "s3://YOUR-BUCKET/celeba", "image_size": 178, "label_noise": 0.0},
    "classifier": {"epochs": 15, "batch_size": 128, "width": 64},
    "siamese": {"epochs": 30, "batch_size": 64, "width": 64, "k": 32, "label_kernel": 3},
    "decoder": {"epochs": 50, "batch_size": 64, "width": 512, "channels": 64},
    "embed": {"batch_size": 512},
}

# Every departure of this project from the paper, set back to the paper's value (section of the paper):
PAPER_METHOD: dict[str, Any] = {
    "classifier": {
        "occlusion_prob": 0.0,        # 3: the classifier is trained on the labels; only the pairs are occluded
        "lr_schedule": "constant",    # 3: no schedule is given
    },
    "siamese": {
        "k": 32,                      # 4.1: E in R^(N x 38 x 32)
        "target": "occlusion",        # 3: occlusion, not temperature, gives the joint probabilities
        "occlusion_prob": 1.0,        # 3, Fig. 2: both images of every pair are occluded
        "occlusion_min": 0.33,        # 3, Fig. 2: sides uniform in [0.33, 0.66] of the image's
        "occlusion_max": 0.66,
        "label_pair_share": 0.0,      # Fig. 2: the two images are chosen at random
        "activation": "relu",         # 3: a label layer of L*k ReLU maps, then average pooling
        "block_floor": 0.0,           # 3: the pooled maps are the embedding, nothing added
        "grad_floor": 0.0,            # 3: the MSE of the dot products, its exact gradient
        "init_from_classifier": False,  # 3: the Siamese network is trained on its own
        "lr_schedule": "constant",    # 3: no schedule is given
    },
    "decoder": {
        "lr": 1e-4,                   # 4.4: RMSProp, learning rate 1e-4
        "optimizer": "rmsprop",
        "lr_schedule": "constant",
        "alpha": 0.5,                 # 4.4: a = 0.5 in eq. 3
        "edit_weight": 0.0,           # 4.4, eq. 3: SSIM and MSE only
        "label_weight": 0.0,
    },
    # 4.3: PCA of Mouth_Slightly_Open; 4.5, eqs. 4-5: each Gaussian over the images that have the label
    "analysis": {"pca_label": "Mouth_Slightly_Open", "edit_gaussians": "labelled"},
    # 4: a random 95/5 train/test split, CelebA's own partition file unused, no validation split.
    "data": {"partition_file": False, "test_fraction": 0.05, "valid_fraction": 0.0},
}

# This project's recipe where it departs from the paper (README, docs/defaults.md), at CelebA's scale.
CELEBA_RECIPE: dict[str, Any] = {
    "siamese": {"occlusion_prob": 1.0},
    "decoder": {"lr": 1e-4, "optimizer": "rmsprop", "lr_schedule": "constant", "alpha": 0.5},
}


def _merged(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            out[k] = _merged(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


PRESETS["paper"] = _merged(CELEBA_SCALE, PAPER_METHOD)
PRESETS["celeba"] = _merged(CELEBA_SCALE, CELEBA_RECIPE)


def _coerce(value: Any, hint: Any, key: str, p: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return str(value).lower() if isinstance(value, bool) else value
    if hint is bool:
        if isinstance(value, bool):
            return value
        p.append(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            p.append(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; Python reads it as a number
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            p.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            p.append(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            p.append(f"{key}: expected a list, got {value!r}")
            return value
        (inner,) = typing.get_args(hint)
        return [_coerce(v, inner, f"{key}[{i}]", p) for i, v in enumerate(value)]
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str, p: list[str]) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            p.append(f"{full}: unknown key (valid: {', '.join(sorted(names))})")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                p.append(f"{full}: expected a mapping, got {value!r}")
                continue
            _apply(current, value, f"{full}.", p)
        else:
            before = len(p)
            coerced = _coerce(value, hints[key], full, p)
            if len(p) == before:  # a wrongly typed value is reported, and the default kept for the range checks
                setattr(obj, key, coerced)


def parse_overrides(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turn ``a.b=value`` strings into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        if "=" not in item:
            problems.append(f"{item}: expected key=value")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"{key}: conflicts with another override")
                break
        else:
            node[parts[-1]] = value
    return nested, problems


def build_config(
    preset: str | None = "demo",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Preset, then YAML file, then ``extra`` (CLI flags), then ``key=value`` overrides; validated.

    Raises:
        ConfigError: listing every unknown key and invalid value at once.
    """
    cfg = PipelineConfig()
    problems: list[str] = []
    if preset is not None:
        if preset not in PRESETS:
            problems.append(f"--preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
        else:
            _apply(cfg, PRESETS[preset], "", problems)
    if config_file:
        try:
            with open(config_file) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError([f"--config: cannot read {config_file}: {exc.strerror}"]) from exc
        except yaml.YAMLError as exc:
            raise ConfigError([f"--config: {config_file} is not valid YAML: {exc}"]) from exc
        if not isinstance(loaded, dict):
            problems.append(f"--config: {config_file} must hold a mapping at the top level")
        else:
            _apply(cfg, loaded, "", problems)
    if extra:
        _apply(cfg, extra, "", problems)
    if overrides:
        nested, parse_problems = parse_overrides(overrides)
        problems += parse_problems
        _apply(cfg, nested, "", problems)
    try:
        cfg.validate()
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def from_dict(d: dict[str, Any]) -> PipelineConfig:
    """Rebuild a config saved with :func:`to_yaml` (used on resume)."""
    cfg = PipelineConfig()
    problems: list[str] = []
    _apply(cfg, d, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg
