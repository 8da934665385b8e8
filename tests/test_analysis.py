"""Known-answer tests for the analysis metrics, plots and report (no Ray, no Parquet)."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

from olr_ray.analysis import metrics as M
from olr_ray.analysis import plots as P
from olr_ray.analysis.report import flatten_metrics, write_report


def _separable(n: int, L: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings whose block l carries label l in its first coordinate, well separated."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, L)) < 0.4).astype(np.int8)
    E = 0.1 * rng.standard_normal((n, L, k)).astype(np.float32)
    E[:, :, 0] += np.where(y == 1, 2.0, -2.0)
    return E, y


# ------------------------------------------------------------------ accuracy and the probe


def test_accuracy_functions_on_hand_made_probs() -> None:
    y = np.array([[1, 0], [0, 0], [1, 1], [0, 1]], dtype=np.int8)
    p = np.array([[0.9, 0.1], [0.6, 0.2], [0.4, 0.8], [0.1, 0.7]])
    # label 0: right, wrong, wrong, right -> 0.5 ; label 1: all right -> 1.0
    np.testing.assert_allclose(M.per_label_accuracy(p, y), [0.5, 1.0])
    assert M.mean_accuracy(p, y) == pytest.approx(0.75)
    # label 0: TPR 1/2, TNR 1/2 -> 0.5 ; label 1: 1.0
    assert M.balanced_accuracy(p, y) == pytest.approx(0.75)


def test_balanced_accuracy_skips_undefined_rate() -> None:
    # Label 0 has no positives: its score is its TNR (2 of 3 right), not NaN.
    y = np.array([[0], [0], [0]], dtype=np.int8)
    p = np.array([[0.1], [0.2], [0.9]])
    assert M.balanced_accuracy(p, y) == pytest.approx(2 / 3)


def test_accuracy_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        M.mean_accuracy(np.zeros((3, 2)), np.zeros((3, 3)))


def test_linear_probe_separable_reaches_full_accuracy() -> None:
    E, y = _separable(1200, 5, 4, seed=0)
    out = M.linear_probe(E[:1000], y[:1000], E[1000:], y[1000:], epochs=20, seed=0)
    assert out["test_mean_accuracy"] > 0.99
    assert out["test_balanced_accuracy"] > 0.99
    assert out["per_label_accuracy"].shape == (5,)
    assert out["test_probs"].shape == (200, 5)
    assert out["train_loss"][-1] < out["train_loss"][0]
    # The trained layer judges new embeddings exactly as it judged the test split.
    np.testing.assert_allclose(M.probe_predict(out, E[1000:]), out["test_probs"], atol=1e-5)


def test_linear_probe_random_labels_is_chance_and_deterministic() -> None:
    rng = np.random.default_rng(1)
    E = rng.standard_normal((1500, 4, 8)).astype(np.float32)
    y = (rng.random((1500, 4)) < 0.5).astype(np.int8)
    a = M.linear_probe(E[:1000], y[:1000], E[1000:], y[1000:], epochs=5, seed=3)
    b = M.linear_probe(E[:1000], y[:1000], E[1000:], y[1000:], epochs=5, seed=3)
    assert abs(a["test_balanced_accuracy"] - 0.5) < 0.06
    np.testing.assert_array_equal(a["test_probs"], b["test_probs"])


def test_linear_probe_constant_features_do_not_break_standardisation() -> None:
    E, y = _separable(600, 3, 4, seed=2)
    E[:, 1, 1:] = 0.0  # exactly constant features, as in blocks of absent labels
    out = M.linear_probe(E[:500], y[:500], E[500:], y[500:], epochs=10)
    assert np.isfinite(out["test_probs"]).all()
    assert out["test_mean_accuracy"] > 0.98


# ------------------------------------------------------------------ correlations


def test_norm_correlation_matches_constructed_norms() -> None:
    rng = np.random.default_rng(0)
    n = 500
    a = rng.random(n) + 1.0
    b = 3.0 - a + 0.0 * rng.random(n)  # exactly anti-correlated norms
    c = rng.random(n) + 1.0
    E = np.zeros((n, 4, 3), np.float32)
    # Put each norm along one axis of its block, so ||E[:, l]|| is exactly the value.
    E[:, 0, 0], E[:, 1, 2], E[:, 2, 1] = a, b, c
    E[:, 3, 0] = 5.0  # constant norm
    C = M.norm_correlation(E)
    assert C.shape == (4, 4)
    assert C[0, 1] == pytest.approx(-1.0, abs=1e-5)
    assert C[0, 2] == pytest.approx(np.corrcoef(a, c)[0, 1], abs=1e-5)
    np.testing.assert_allclose(np.diag(C), 1.0)
    np.testing.assert_allclose(C[3, :3], 0.0)
    np.testing.assert_allclose(C, C.T)


def test_label_correlation_handles_constant_columns() -> None:
    labels = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 1], [0, 1, 1]], dtype=np.int8)
    C = M.label_correlation(labels)
    assert C[0, 1] == pytest.approx(-1.0)
    assert C[0, 2] == 0.0 and C[2, 2] == 1.0


def test_offdiag_agreement() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 6))
    A = (X + X.T) / 2
    np.fill_diagonal(A, 1.0)
    assert M.offdiag_agreement(A, A) == pytest.approx(1.0)
    B = -A
    np.fill_diagonal(B, 1.0)  # the diagonal must not count
    assert M.offdiag_agreement(A, B) == pytest.approx(-1.0)
    assert math.isnan(M.offdiag_agreement(np.eye(2), np.eye(2)))


# ------------------------------------------------------------------ PCA


@pytest.mark.parametrize("direction_sign", [1.0, -1.0])
def test_label_pca_line_and_sign(direction_sign: float) -> None:
    rng = np.random.default_rng(0)
    t = rng.random(300) * 4 + 0.5  # positive scale -> norm grows with t
    d = direction_sign * np.array([1.0, 2.0, -1.0, 0.5]) / np.linalg.norm([1.0, 2.0, -1.0, 0.5])
    E_l = t[:, None] * d + 1e-4 * rng.standard_normal((300, 4))
    out = M.label_pca(E_l, n_components=3)
    evr = out["explained_variance_ratio"]
    assert len(evr) == 3 and evr[0] > 0.999
    assert out["projection"].shape == (300,)
    assert np.corrcoef(out["projection"], np.linalg.norm(E_l, axis=1))[0, 1] > 0.99
    # The returned component is consistent with the projection.
    np.testing.assert_allclose((E_l - out["mean"]) @ out["components"][0], out["projection"], atol=1e-8)


# ------------------------------------------------------------------ Gaussians and editing


def test_fit_label_gaussians_recovers_mean_and_cov() -> None:
    rng = np.random.default_rng(0)
    n, L, k = 20000, 2, 3
    mean = np.array([1.0, -2.0, 0.5])
    A = np.array([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [0.2, -0.3, 0.5]])
    cov = A @ A.T
    labels = np.zeros((n, L), np.int8)
    labels[: n // 2, 0] = 1  # label 1 never present
    E = 10 * rng.standard_normal((n, L, k)).astype(np.float32)  # images without the label: noise
    E[: n // 2, 0, :] = rng.multivariate_normal(mean, cov, size=n // 2)
    g = M.fit_label_gaussians(E, labels)
    np.testing.assert_allclose(g["mean"][0], mean, atol=0.05)
    np.testing.assert_allclose(g["cov"][0], cov, atol=0.05)
    assert g["count"].tolist() == [n // 2, 0]
    assert g["empty"].tolist() == [False, True]
    np.testing.assert_array_equal(g["cov"][1], 0.0)
    np.linalg.cholesky(g["cov"][0])  # positive definite


def test_fit_label_gaussians_single_positive_is_pd() -> None:
    E = np.ones((3, 1, 4), np.float32)
    g = M.fit_label_gaussians(E, np.array([[1], [0], [0]], np.int8))
    np.linalg.cholesky(g["cov"][0])


def test_confirmed_gaussians_leave_out_labels_the_classifier_does_not_see() -> None:
    """A noted label whose block is empty (annotation noise) shrinks the labelled mean; the confirmed one
    is fitted on the images the classifier also calls, and a label nobody confirms keeps its labelled images."""
    rng = np.random.default_rng(0)
    n, k = 4000, 4
    labels = np.zeros((n, 2), np.int8)
    labels[:1000] = 1
    seen = np.zeros(n, bool)
    seen[:600] = True  # 400 of the 1000 labelled images do not show label 0
    E = np.zeros((n, 2, k), np.float32)
    E[:600, 0] = 1.0 + 0.1 * rng.standard_normal((600, k))
    probs = np.full((n, 2), 0.1, np.float32)
    probs[seen, 0] = 0.9  # the classifier sees label 0 where it is drawn, label 1 nowhere
    labelled = M.gaussian_images(labels, probs, "labelled")
    confirmed = M.gaussian_images(labels, probs, "confirmed")
    np.testing.assert_array_equal(labelled, labels == 1)
    np.testing.assert_array_equal(confirmed[:, 0], seen)
    np.testing.assert_array_equal(confirmed[:, 1], labels[:, 1] == 1)  # fallback: nobody confirms label 1
    g_lab, g_conf = M.fit_label_gaussians(E, labelled), M.fit_label_gaussians(E, confirmed)
    np.testing.assert_allclose(g_lab["mean"][0], 0.6, atol=0.02)
    np.testing.assert_allclose(g_conf["mean"][0], 1.0, atol=0.02)
    assert g_conf["count"].tolist() == [600, 1000]
    with pytest.raises(ValueError, match="probs"):
        M.gaussian_images(labels, None, "confirmed")
    with pytest.raises(ValueError, match="shape"):
        M.gaussian_images(labels, probs[:10], "confirmed")
    with pytest.raises(ValueError, match="rule"):
        M.gaussian_images(labels, probs, "seen")


def test_edit_embeddings_touches_only_target_block() -> None:
    rng = np.random.default_rng(0)
    E = rng.standard_normal((50, 4, 3)).astype(np.float32)
    labels = (rng.random((50, 4)) < 0.5).astype(np.int8)
    g = M.fit_label_gaussians(E, labels)
    for mode in ("add", "remove"):
        out = M.edit_embeddings(E, 2, mode, g, seed=1)
        assert out.dtype == np.float32 and out.shape == E.shape
        np.testing.assert_array_equal(np.delete(out, 2, axis=1), np.delete(E, 2, axis=1))
        assert not np.array_equal(out[:, 2], E[:, 2])
    np.testing.assert_array_equal(M.edit_embeddings(E, 2, "remove", g)[:, 2], 0.0)
    a1 = M.edit_embeddings(E, 2, "add", g, seed=5)
    a2 = M.edit_embeddings(E, 2, "add", g, scale=2.0, seed=5)
    np.testing.assert_allclose(a2[:, 2], 2 * a1[:, 2], rtol=1e-5)
    # Different images get different samples.
    assert not np.allclose(a1[0, 2], a1[1, 2])


def test_edit_embeddings_errors() -> None:
    E = np.zeros((2, 2, 3), np.float32)
    g = M.fit_label_gaussians(E, np.array([[1, 0], [1, 0]], np.int8))
    with pytest.raises(ValueError, match="no positive"):
        M.edit_embeddings(E, 1, "add", g)
    with pytest.raises(ValueError, match="mode"):
        M.edit_embeddings(E, 0, "swap", g)


def test_editing_success_exact_fractions() -> None:
    before = np.array([[0.1, 0.9, 0.2], [0.2, 0.8, 0.7], [0.7, 0.1, 0.1], [0.3, 0.6, 0.6]])
    after = np.array([[0.8, 0.9, 0.2], [0.4, 0.3, 0.7], [0.9, 0.1, 0.1], [0.6, 0.6, 0.4]])
    # add label 0: eligible rows 0, 1, 3 (row 2 already on); succeeded rows 0, 3 -> 2/3.
    # others (labels 1, 2): 8 pairs, changed: (1, 1) and (3, 2) -> 6/8.
    out = M.editing_success(before, after, 0, "add")
    assert out["target_success"] == pytest.approx(2 / 3)
    assert out["others_preserved"] == pytest.approx(6 / 8)
    assert out["n_eligible"] == 3
    # over the rows the add changed (0 and 3): only (3, 2) changed -> 3/4.
    assert out["others_preserved_changed"] == pytest.approx(3 / 4)
    # remove label 1: eligible rows 0, 1, 3; off in row 1 only -> 1/3.
    out = M.editing_success(before, after, 1, "remove")
    assert out["target_success"] == pytest.approx(1 / 3)
    # labels 0, 2: changed (0,0), (3,0), (3,2) -> 5/8.
    assert out["others_preserved"] == pytest.approx(5 / 8)
    assert out["others_preserved_changed"] == 1.0  # row 1, where the remove worked, kept labels 0 and 2
    # an edit that does nothing keeps every other label, and counts for nothing over the changed edits
    idle = M.editing_success(before, before, 0, "add")
    assert idle["others_preserved"] == 1.0 and math.isnan(idle["others_preserved_changed"])
    assert math.isnan(M.editing_success(after, after, 0, "add", threshold=0.0)["target_success"])


def test_per_label_recall_counts_only_images_that_have_the_label() -> None:
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]])
    probs = np.array([[0.9, 0.9, 0.9], [0.2, 0.6, 0.1], [0.9, 0.1, 0.8], [0.5, 0.0, 0.0]])
    # label 0: has it rows 0, 1, 3; seen in 0 and 3 (0.5 is on) -> 2/3; false positive row 2 ignored.
    # label 1: rows 1, 2; seen in 1 -> 1/2. label 2: no image has it -> NaN, not 0.
    r = M.per_label_recall(probs, y)
    assert r[0] == pytest.approx(2 / 3) and r[1] == pytest.approx(1 / 2) and math.isnan(r[2])
    with pytest.raises(ValueError):
        M.per_label_recall(probs[:, :2], y)


# ------------------------------------------------------------------ own-block fraction


def test_own_block_fraction_only_own_block_changes() -> None:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((30, 5, 4)).astype(np.float32)
    idx = rng.integers(0, 5, size=30)
    B = A.copy()
    B[np.arange(30), idx] += rng.standard_normal((30, 4)).astype(np.float32)
    assert M.own_block_fraction(A, B, idx) == pytest.approx(1.0)
    per = M.own_block_fraction_per_label(A, B, idx)
    assert per.shape == (5,)
    np.testing.assert_allclose(per[~np.isnan(per)], 1.0)


def test_own_block_fraction_isotropic_and_per_label() -> None:
    rng = np.random.default_rng(0)
    L = 8
    A = rng.standard_normal((4000, L, 16))
    B = A + rng.standard_normal(A.shape)
    idx = np.repeat(np.arange(L - 1), 4000 // (L - 1) + 1)[:4000]  # label L-1 never flipped
    assert M.own_block_fraction(A, B, idx) == pytest.approx(1 / L, abs=0.01)
    per = M.own_block_fraction_per_label(A, B, idx)
    np.testing.assert_allclose(per[: L - 1], 1 / L, atol=0.02)
    assert math.isnan(per[L - 1])
    # Unchanged pairs are skipped rather than counted as 0.
    B2 = B.copy()
    B2[:10] = A[:10]
    assert M.own_block_fraction(A, B2, idx) == pytest.approx(M.own_block_fraction(A[10:], B[10:], idx[10:]))


# ------------------------------------------------------------------ SSIM / PSNR


def test_ssim_psnr_identical_and_noisy() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 32, 32)).astype(np.float32)
    s, p = M.ssim_psnr(x, x)
    assert s == pytest.approx(1.0, abs=1e-5) and p == math.inf
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    s2, p2 = M.ssim_psnr(torch.from_numpy(x), torch.from_numpy(y))
    mse = float(np.mean((x.astype(np.float64) - y) ** 2))
    assert p2 == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert 0.0 < s2 < 0.99


def test_ssim_psnr_tiny_images() -> None:
    x = np.random.default_rng(0).random((1, 3, 5, 5)).astype(np.float32)
    s, _ = M.ssim_psnr(x, x)
    assert s == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------ plots


def _is_png(path: str) -> bool:
    with open(path, "rb") as fh:
        return os.path.getsize(path) > 1000 and fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path) -> None:
    rng = np.random.default_rng(0)
    L = 6
    names = [f"Label_{i}" for i in range(L)]
    C = M.label_correlation((rng.random((100, L)) < 0.5).astype(np.int8))
    imgs = rng.integers(0, 255, size=(25, 16, 16, 3), dtype=np.uint8)
    paths = [
        P.plot_correlation_heatmap(C, names, str(tmp_path / "a" / "heat.png"), "label correlation"),
        P.plot_correlation_pair(C, C, names, str(tmp_path / "pair.png"), r=1.0),
        P.plot_ranked_strip(imgs, rng.standard_normal(25), str(tmp_path / "strip.png"), "PC1", n=10),
        P.plot_image_grid(
            [[imgs[0], imgs[1] / 255.0, imgs[2]], [imgs[3], None]],
            str(tmp_path / "grid.png"),
            row_titles=["+Smiling", "-Smiling"],
            col_titles=["original", "reconstruction", "edited"],
            title="editing",
        ),
        P.plot_pca_variance([0.675, 0.041, 0.03], str(tmp_path / "evr.png"), "Mouth_Slightly_Open"),
        P.plot_training_curves(
            {"train_loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.7, 0.6], "val_acc": [0.5, 0.7, 0.8]},
            str(tmp_path / "curves.png"),
        ),
        P.plot_per_label_bars({"add": [0.1, np.nan, 0.9, 0.5, 0.0, 1.0], "remove": [0.5] * L,
                               "label seen on decoded faces that have it (ceiling of add)": [0.3] * L}, names,
                              str(tmp_path / "per_label.png"), "Editing success per label", bar=0.7),
    ]
    for p in paths:
        assert _is_png(p), p


def test_plot_checks_shapes(tmp_path) -> None:
    with pytest.raises(ValueError, match="len\\(names\\)"):
        P.plot_correlation_heatmap(np.eye(3), ["a", "b"], str(tmp_path / "x.png"), "t")
    with pytest.raises(ValueError, match="series 'add' has 2 values for 3 labels"):
        P.plot_per_label_bars({"add": [0.1, 0.2]}, ["a", "b", "c"], str(tmp_path / "y.png"), "t")


# ------------------------------------------------------------------ report


def test_report_contains_numbers_figures_and_paper(tmp_path) -> None:
    run_dir = tmp_path / "run"
    fig = run_dir / "analysis" / "evr.png"
    P.plot_pca_variance([0.6, 0.1], str(fig), "Mouth_Slightly_Open")
    metrics = {
        "probe": {"test_mean_accuracy": 0.9012, "test_balanced_accuracy": 0.8123,
                  "per_label_accuracy": np.array([0.9, 0.91])},
        "classifier": {"test_mean_accuracy": 0.9345},
        "pca": {"explained_variance_ratio": [0.6, 0.1]},
        "correlation": {"agreement_r": 0.77},
        "reconstruction": {"psnr": math.inf, "n_images": 12},
    }
    path = write_report(str(run_dir), metrics,
                        {"PCA variance": str(fig), "Relative": "analysis/other.png"},
                        paper_reference=True, extra_sections={"Notes": "tiny run"})
    assert path == str(run_dir / "report.md")
    text = open(path, encoding="utf-8").read()
    for s in ("probe.test_mean_accuracy", "0.9012", "0.8123", "0.9345", "0.7700", "inf", "12",
              "classifier.test_mean_accuracy", "probe.per_label_accuracy"):
        assert s in text, s
    assert "![PCA variance](analysis/evr.png)" in text
    assert "![Relative](analysis/other.png)" in text
    # Paper numbers beside ours.
    for s in ("91.6%", "94.2%", "67.5%", "4.1%", "90.1%", "93.5%", "60.0%", "10.0%"):
        assert s in text, s
    assert "## Notes" in text and "tiny run" in text
    # Headline table comes before the full table.
    assert text.index("Headline") < text.index("All metrics")
    head = text[text.index("Headline"): text.index("Comparison")]
    assert "probe.test_mean_accuracy" in head and "pca.explained_variance_ratio.0" in head


def test_report_compares_the_paper_pca_only_for_its_label(tmp_path) -> None:
    metrics = {"pca": {"label": "Smiling", "explained_variance_ratio": [0.5, 0.2]}}
    text = open(write_report(str(tmp_path), metrics, {}, paper_reference=True)).read()
    assert "PCA of the 'Smiling' (paper: 'Mouth_Slightly_Open') block, 1st component variance | 67.5% | 50.0%" in text


def test_report_without_paper_reference(tmp_path) -> None:
    text = open(write_report(str(tmp_path), {"x": 1.5}, {}, paper_reference=False)).read()
    assert "91.6%" not in text and re.search(r"`x` \| 1\.5000", text)


def test_flatten_metrics() -> None:
    flat = flatten_metrics({"a": {"b": 1, "c": {"d": [0.5, 0.25]}}})
    assert flat["a.b"] == 1 and flat["a.c.d.1"] == 0.25


def test_first_component_auc() -> None:
    y = np.array([0, 0, 1, 1, 1])
    assert M.first_component_auc(np.array([0.1, 0.2, 0.8, 0.9, 0.7]), y) == 1.0
    assert M.first_component_auc(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), y) == 0.0  # oriented against the label
    assert M.first_component_auc(np.array([0.5, 0.2, 0.5, 0.2, 0.5]), y) == pytest.approx(3.5 / 6)  # ties count a half
    assert np.isnan(M.first_component_auc(np.arange(3.0), np.ones(3)))
