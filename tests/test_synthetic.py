"""Tests for the synthetic CelebA-like dataset (olr_ray.data.synthetic)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from olr_ray.data import synthetic as syn

A = syn.ATTRIBUTE_INDEX


def test_attribute_names_follow_celeba_order() -> None:
    assert len(syn.ATTRIBUTES) == 40 == len(set(syn.ATTRIBUTES))
    assert syn.ATTRIBUTES[0] == "5_o_Clock_Shadow" and syn.ATTRIBUTES[-1] == "Young"
    assert syn.ATTRIBUTES.index("Male") == 20 and syn.ATTRIBUTES.index("Smiling") == 31
    assert set(syn.CELEBA_RATES) == set(syn.ATTRIBUTES)
    table = syn.describe_model()
    assert len(table.splitlines()) == 40 and "Wearing_Lipstick: P=0.01 if Male=1" in table


def test_same_seed_and_index_give_the_same_face_in_any_batch() -> None:
    whole = syn.generate(np.arange(40), seed=3, size=48, label_noise=0.1)
    # Different batch composition, order and chunking must not change any image or label.
    picked = np.array([37, 2, 19, 0, 25])
    part = syn.generate(picked, seed=3, size=48, label_noise=0.1)
    for key in ("image", "labels", "true_labels", "index"):
        np.testing.assert_array_equal(part[key], whole[key][picked], err_msg=key)
    single = syn.generate([19], seed=3, size=48, label_noise=0.1)
    np.testing.assert_array_equal(single["image"][0], whole["image"][19])
    assert whole["image"].shape == (40, 48, 48, 3) and whole["image"].dtype == np.uint8
    assert whole["labels"].dtype == np.int8 and whole["index"].dtype == np.int64

    other = syn.generate(np.arange(40), seed=4, size=48)
    assert not np.array_equal(other["image"], whole["image"])
    assert not np.array_equal(other["true_labels"], whole["true_labels"])


def test_render_chunking_does_not_change_images(monkeypatch: pytest.MonkeyPatch) -> None:
    idx = np.arange(100, 140)
    attrs = syn.sample_attributes(0, idx)
    ref = syn.render(attrs, 0, idx, size=32)
    monkeypatch.setattr(syn, "_RENDER_CHUNK", 7)
    np.testing.assert_array_equal(syn.render(attrs, 0, idx, size=32), ref)


@pytest.mark.parametrize("size", [16, 64, 178])
def test_any_square_size(size: int) -> None:
    img = syn.generate(np.arange(3), size=size)["image"]
    assert img.shape == (3, size, size, 3)
    assert img.std() > 10  # not blank


def test_marginals_match_celeba_and_documented_model() -> None:
    attrs = syn.sample_attributes(0, np.arange(60_000))
    rates = attrs.mean(axis=0)
    off = {a: (round(float(rates[A[a]]), 3), r) for a, r in syn.CELEBA_RATES.items()
           if abs(rates[A[a]] - r) > 0.025}
    assert not off, f"marginals (model, CelebA) too far apart: {off}"
    for name, target in (("Male", 0.42), ("Young", 0.77), ("Smiling", 0.48),
                         ("Mouth_Slightly_Open", 0.48), ("Eyeglasses", 0.065),
                         ("No_Beard", 0.83)):
        assert abs(rates[A[name]] - target) < 0.015, (name, rates[A[name]])


def test_correlations_follow_the_model() -> None:
    corr = syn.label_correlation(n=40_000, seed=1)
    assert corr.shape == (40, 40)
    np.testing.assert_allclose(corr, corr.T, atol=1e-12)

    def c(a: str, b: str) -> float:
        return float(corr[A[a], A[b]])

    assert c("Male", "Heavy_Makeup") < -0.4
    assert c("Male", "Wearing_Lipstick") < -0.5
    assert c("Male", "No_Beard") < -0.4
    for beard in ("Mustache", "Goatee", "Sideburns", "5_o_Clock_Shadow"):
        assert c("Male", beard) > 0.15, beard
    assert c("Young", "Gray_Hair") < -0.2 and c("Young", "Bald") < -0.1
    assert c("Smiling", "High_Cheekbones") > 0.5 and c("Smiling", "Mouth_Slightly_Open") > 0.3
    assert c("Heavy_Makeup", "Wearing_Lipstick") > 0.6
    assert c("Chubby", "Double_Chin") > 0.3

    attrs = syn.sample_attributes(2, np.arange(30_000))
    hair = attrs[:, [A["Black_Hair"], A["Blond_Hair"], A["Brown_Hair"], A["Gray_Hair"]]]
    assert hair.sum(axis=1).max() == 1, "hair colours must be mutually exclusive"
    bald = attrs[:, A["Bald"]] == 1
    for styled in ("Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair",
                   "Straight_Hair", "Wavy_Hair", "Receding_Hairline"):
        assert attrs[bald, A[styled]].sum() == 0, styled
    assert not np.any(attrs[:, A["Straight_Hair"]] & attrs[:, A["Wavy_Hair"]])
    female = attrs[:, A["Male"]] == 0
    assert attrs[female, A["No_Beard"]].min() == 1


def test_label_noise_flips_about_the_requested_fraction() -> None:
    out = syn.generate(np.arange(3000), seed=0, size=8, label_noise=0.2)
    flipped = (out["labels"] != out["true_labels"]).mean()
    assert abs(flipped - 0.2) < 0.01
    clean = syn.generate(np.arange(50), seed=0, size=8)
    np.testing.assert_array_equal(clean["labels"], clean["true_labels"])
    # The images show the true attributes, so noise leaves them untouched.
    np.testing.assert_array_equal(
        syn.generate(np.arange(50), seed=0, size=8, label_noise=0.3)["image"], clean["image"])
    with pytest.raises(ValueError, match="label_noise"):
        syn.generate([0], label_noise=1.5)


def test_flip_and_render_changes_only_that_attribute() -> None:
    idx = np.arange(24)
    attrs = syn.sample_attributes(0, idx)
    np.testing.assert_array_equal(syn.render(attrs, 0, idx), syn.generate(idx)["image"])
    for name in syn.ATTRIBUTES:
        orig, flip, true, flipped = syn.flip_and_render(idx, name, seed=0, size=64)
        diff = (true != flipped)
        assert diff[:, A[name]].all() and diff.sum() == len(idx), name
        changed = np.abs(orig.astype(int) - flip.astype(int)).sum(axis=(1, 2, 3)) > 0
        # A few flips can be hidden (e.g. Bangs under a hat); most must show.
        assert changed.mean() >= 0.75, (name, changed.mean())
    # Region checks: the change sits where the attribute is drawn.
    for name, rows in (("Wearing_Necktie", slice(44, 64)), ("Wearing_Necklace", slice(38, 64)),
                       ("Wearing_Hat", slice(0, 30)), ("Smiling", slice(30, 50)),
                       ("Eyeglasses", slice(18, 38))):
        orig, flip, _, _ = syn.flip_and_render(idx, name)
        d = np.abs(orig.astype(int) - flip.astype(int)).sum(axis=(0, 2, 3))
        assert d[rows].sum() > 0.9 * d.sum(), (name, d[rows].sum() / d.sum())


def test_set_and_render_draws_the_same_face_with_one_attribute_set() -> None:
    idx = np.arange(32)
    true = syn.sample_attributes(0, idx)
    for name in ("Wearing_Hat", "Mustache", "Eyeglasses", "Male"):
        j = A[name]
        orig, flip, _, _ = syn.flip_and_render(idx, name)
        for value in (0, 1):
            img, attrs = syn.set_and_render(idx, name, value, seed=0, size=64)
            assert (attrs[:, j] == value).all(), name
            np.testing.assert_array_equal(np.delete(attrs, j, 1), np.delete(true, j, 1))
            # Faces that already had the value come out as drawn; the others as flip_and_render draws them.
            kept = true[:, j] == value
            np.testing.assert_array_equal(img[kept], orig[kept])
            np.testing.assert_array_equal(img[~kept], flip[~kept])
    with pytest.raises(ValueError, match="value must be 0 or 1"):
        syn.set_and_render(idx, "Male", 2)
    with pytest.raises(ValueError, match="out of range"):
        syn.set_and_render(idx, 40, 1)


def test_write_celeba_folder_format(tmp_path: "os.PathLike[str]") -> None:
    out = str(tmp_path / "celeba")
    summary = syn.write_celeba_folder(out, n=60, size=40, seed=5, label_noise=0.05,
                                      val_fraction=0.2, test_fraction=0.2)
    assert summary["n"] == 60 and sum(summary["splits"].values()) == 60
    images = sorted(os.listdir(os.path.join(out, "img_align_celeba")))
    assert images == [f"{i:06d}.jpg" for i in range(1, 61)]
    for name in images[:5]:
        with Image.open(os.path.join(out, "img_align_celeba", name)) as im:
            assert im.format == "JPEG" and im.size == (40, 40) and im.mode == "RGB"

    lines = open(os.path.join(out, "list_attr_celeba.txt")).read().splitlines()
    assert lines[0] == "60"
    assert lines[1].split() == syn.ATTRIBUTES
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 60 and [r[0] for r in rows] == images
    values = np.array([[int(v) for v in r[1:]] for r in rows])
    assert values.shape == (60, 40) and set(np.unique(values)) <= {-1, 1}
    expected = syn.generate(np.arange(60), seed=5, size=8, label_noise=0.05)["labels"]
    np.testing.assert_array_equal((values + 1) // 2, expected)

    parts = [line.split() for line in open(os.path.join(out, "list_eval_partition.txt"))]
    assert [p[0] for p in parts] == images
    assert {p[1] for p in parts} <= {"0", "1", "2"} and len({p[1] for p in parts}) == 3


def test_cli_help_and_small_run(tmp_path: "os.PathLike[str]") -> None:
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    helped = subprocess.run([sys.executable, "-m", "olr_ray.data.synthetic", "--help"],
                            capture_output=True, text=True, env=env, check=True)
    for flag in ("--out", "--n", "--size", "--seed", "--label-noise"):
        assert flag in helped.stdout
    out = str(tmp_path / "cli")
    run = subprocess.run([sys.executable, "-m", "olr_ray.data.synthetic", "--out", out, "--n",
                          "12", "--size", "32", "--seed", "1", "--label-noise", "0.1"],
                         capture_output=True, text=True, env=env, check=True)
    assert "wrote 12 images" in run.stdout and out in run.stdout
    assert len(os.listdir(os.path.join(out, "img_align_celeba"))) == 12


def test_every_attribute_is_learnable_from_pixels() -> None:
    """A tiny CNN trained for a few seconds beats the majority baseline on every attribute."""
    torch = pytest.importorskip("torch")
    n_train, n_test, epochs = 4000, 2000, 8
    data = syn.generate(np.arange(n_train + n_test), seed=11, size=64)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    # 2x2 average pooling to 32x32 keeps training within seconds on two cores.
    x = torch.nn.functional.avg_pool2d(
        torch.from_numpy(data["image"]).permute(0, 3, 1, 2).float() / 255.0, 2)
    x = x - x[:n_train].mean(dim=(0, 2, 3), keepdim=True)
    y = torch.from_numpy(data["true_labels"]).float()
    layers: list = []
    channels = 3
    for width in (16, 32, 64):
        layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                   torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        channels = width
    net = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 40))
    batch = 64
    steps = epochs * (n_train // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for start in range(0, n_train - batch + 1, batch):
            b = perm[start:start + batch]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        pred = (net(x[n_train:]) > 0).numpy()
    truth = data["true_labels"][n_train:].astype(bool)
    acc = (pred == truth).mean(axis=0)
    train_rate = data["true_labels"][:n_train].mean(axis=0)
    majority = np.where(train_rate >= 0.5, truth.mean(axis=0), 1.0 - truth.mean(axis=0))
    margins = {a: round(float(acc[i] - majority[i]), 4) for i, a in enumerate(syn.ATTRIBUTES)}
    failed = {a: m for a, m in margins.items() if m <= 0}
    assert not failed, f"not learnable (accuracy - majority): {failed}; all margins: {margins}"


def test_synthetic_source_draws_the_generator_faces(request: pytest.FixtureRequest) -> None:
    """The data stage's synthetic source (Ray Data, in parallel blocks) gives each uid the face and the
    observed labels ``generate`` draws for that index, minus the dropped labels."""
    request.getfixturevalue("ray_local")
    from olr_ray.config import DataConfig
    from olr_ray.data.sources import open_source

    src = open_source(DataConfig(n_images=120, image_size=32, label_noise=0.1), seed=2)
    rows = sorted(src.dataset.take_all(), key=lambda r: int(r["uid"]))
    ref = syn.generate(np.arange(120), seed=2, size=32, label_noise=0.1)
    keep = [A[n] for n in src.label_names]
    assert [int(r["uid"]) for r in rows] == list(range(120)) and src.num_rows == 120
    assert len(src.label_names) == 38 and "Wearing_Necktie" not in src.label_names
    images = np.stack([r["image"] for r in rows])
    labels = np.stack([r["labels"] for r in rows])
    assert images.dtype == np.uint8 and labels.dtype == np.int8
    np.testing.assert_array_equal(images, ref["image"])
    np.testing.assert_array_equal(labels, ref["labels"][:, keep])
    assert {r["split"] for r in rows} == {"train", "valid", "test"} and all(r["error"] == "" for r in rows)


def test_the_independent_judge_s_faces_have_no_correlations_to_lean_on():
    from olr_ray.analysis.judge import JUDGE_RATES

    a = syn.sample_independent_attributes(1_000_003, np.arange(20_000), JUDGE_RATES).astype(float)
    np.testing.assert_allclose(a.mean(0), JUDGE_RATES, atol=0.02)
    corr = np.corrcoef(a.T)
    assert np.abs(corr[~np.eye(len(corr), dtype=bool)]).max() < 0.04
    # The data's own attributes are correlated (the judge this replaces could lean on that).
    m = syn.sample_attributes(0, np.arange(20_000)).astype(float)
    assert np.nanmax(np.abs(np.corrcoef(m.T)[~np.eye(len(corr), dtype=bool)])) > 0.3
