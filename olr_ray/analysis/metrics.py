"""Numeric analyses of OLR embeddings (paper Section 4), on in-memory numpy arrays.

Everything here is pure: callers load embeddings, labels and images (from Parquet, Ray
Datasets, ...) and pass numpy arrays; every function returns plain Python or numpy values and is
deterministic given its ``seed``.

Conventions used throughout:
    E:       float32 embeddings, shape (N, L, k): N images, L labels, k dims per label block.
    labels:  int8 0/1 label matrix, shape (N, L).
    probs:   predicted probabilities, shape (N, L), thresholded at 0.5 unless told otherwise.
    images:  float images in [0, 1], shape (N, 3, H, W), for SSIM/PSNR.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from olr_ray.models.nets import ssim_window

__all__ = [
    "linear_probe",
    "mean_accuracy",
    "balanced_accuracy",
    "per_label_accuracy",
    "per_label_recall",
    "probe_predict",
    "norm_correlation",
    "label_correlation",
    "offdiag_agreement",
    "label_pca",
    "fit_label_gaussians",
    "gaussian_images",
    "edit_embeddings",
    "editing_success",
    "own_block_fraction",
    "own_block_fraction_per_label",
    "ssim_psnr",
]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_embeddings(E: np.ndarray, name: str = "E") -> np.ndarray:
    E = np.asarray(E)
    if E.ndim != 3:
        raise ValueError(f"{name} must have shape (N, L, k), got shape {E.shape}")
    return E


def _check_probs_labels(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    if probs.ndim != 2 or probs.shape != y.shape:
        raise ValueError(
            f"probs and y must both have shape (N, L); got probs {probs.shape} and y {y.shape}"
        )
    if probs.shape[0] == 0:
        raise ValueError("probs and y are empty (N == 0); accuracy is undefined")
    return probs, y.astype(bool)


# --------------------------------------------------------------------------------------------
# Accuracy (shared by the linear probe and the convolutional classifier)
# --------------------------------------------------------------------------------------------


def per_label_accuracy(probs: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Accuracy of each label at a fixed threshold.

    Args:
        probs: Predicted probabilities, shape (N, L).
        y: Ground-truth 0/1 labels, shape (N, L).
        threshold: A label is predicted present when ``probs >= threshold``.

    Returns:
        float64 array of shape (L,) with the fraction of images where the label is right.
    """
    probs, y = _check_probs_labels(probs, y)
    return ((probs >= threshold) == y).mean(axis=0)


def per_label_recall(probs: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Of the images that have each label, the fraction predicted to have it.

    On decoded images this is the ceiling of adding a label by editing: an edit is judged by the
    same classifier, which cannot see the label on a decoded face better than on the decoded
    faces that truly have it.

    Args:
        probs: Predicted probabilities, shape (N, L).
        y: Ground-truth 0/1 labels, shape (N, L).
        threshold: A label is predicted present when ``probs >= threshold``.

    Returns:
        float64 array of shape (L,); NaN for a label no image has.
    """
    probs, y = _check_probs_labels(probs, y)
    pos = y == 1
    hits = ((probs >= threshold) & pos).sum(axis=0).astype(np.float64)
    n = pos.sum(axis=0)
    return np.where(n > 0, hits / np.maximum(n, 1), np.nan)


def mean_accuracy(probs: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> float:
    """Mean over labels of the per-label accuracy (the paper's "success rate").

    Args:
        probs: Predicted probabilities, shape (N, L).
        y: Ground-truth 0/1 labels, shape (N, L).
        threshold: A label is predicted present when ``probs >= threshold``.

    Returns:
        The mean accuracy as a float in [0, 1].
    """
    return float(per_label_accuracy(probs, y, threshold).mean())


def balanced_accuracy(probs: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> float:
    """Mean over labels of (TPR + TNR) / 2.

    CelebA labels are very unbalanced (e.g. "Bald" ~2%), so plain accuracy rewards predicting
    "absent" everywhere; balanced accuracy puts chance at 0.5 for every label.

    A label with no positives in ``y`` has an undefined TPR, so its score is its TNR alone (and
    symmetrically for a label with no negatives). Every label has at least one of the two when
    N > 0, so no label is dropped.

    Args:
        probs: Predicted probabilities, shape (N, L).
        y: Ground-truth 0/1 labels, shape (N, L).
        threshold: A label is predicted present when ``probs >= threshold``.

    Returns:
        The balanced accuracy averaged over labels, a float in [0, 1].
    """
    probs, y = _check_probs_labels(probs, y)
    pred = probs >= threshold
    pos = y.sum(axis=0)
    neg = (~y).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = (pred & y).sum(axis=0) / pos
        tnr = (~pred & ~y).sum(axis=0) / neg
    # nanmean over the two rates of each label: an undefined rate (0/0) is left out.
    per_label = np.nanmean(np.stack([tpr, tnr]), axis=0)
    return float(per_label.mean())


# --------------------------------------------------------------------------------------------
# 4.1 Linear probe
# --------------------------------------------------------------------------------------------


def _train_probe(
    x: torch.Tensor, t: torch.Tensor, epochs: int, lr: float, batch_size: int, weight_decay: float, seed: int
) -> tuple[torch.nn.Linear, list[float]]:
    """Minibatch Adam on BCE for one linear layer; returns the layer and per-epoch mean loss."""
    gen = torch.Generator().manual_seed(seed)
    # Seed the layer's init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(x.shape[1], t.shape[1])
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    n = x.shape[0]
    history: list[float] = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = loss_fn(layer(x[idx]), t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / n)
    return layer, history


def linear_probe(
    E_train: np.ndarray,
    y_train: np.ndarray,
    E_test: np.ndarray,
    y_test: np.ndarray,
    epochs: int = 30,
    lr: float = 1e-2,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    seed: int = 0,
    num_threads: int | None = 1,
    min_steps: int = 300,
) -> dict[str, Any]:
    """Train the paper's linear probe: one linear layer of L sigmoid units on flattened E.

    Features are the flattened embeddings (N, L*k), standardised with the training set's mean and
    standard deviation (features that are constant in training are only centred). The layer is
    trained with binary cross-entropy and minibatch Adam on CPU; with the defaults, 20,000 x 1,216
    inputs train in a few seconds on two cores.

    Args:
        E_train: Training embeddings, shape (N_train, L, k) (or already flat, (N_train, D)).
        y_train: Training labels, 0/1, shape (N_train, L).
        E_test: Test embeddings, same trailing shape as ``E_train``.
        y_test: Test labels, 0/1, shape (N_test, L).
        epochs: Passes over the training set.
        lr: Adam learning rate.
        batch_size: Minibatch size; the training set is reshuffled every epoch.
        weight_decay: L2 penalty passed to Adam.
        seed: Seeds weight initialisation and shuffling, so a run can be repeated exactly.
        min_steps: Minimum number of optimiser steps; on small training sets (few batches per
            epoch) the epoch count is raised to reach it, since ``epochs`` alone would leave the
            layer undertrained there.
        num_threads: torch intra-op threads while training (restored afterwards). The matrices
            are small, so extra threads gain little, and when the cores are shared (Ray workers,
            other jobs) OpenMP spinning made each step ~50x slower; ``None`` keeps torch's setting.

    Returns:
        Dict with ``test_mean_accuracy`` (float), ``test_balanced_accuracy`` (float),
        ``per_label_accuracy`` (np.ndarray (L,)), ``test_probs`` (float32 np.ndarray
        (N_test, L)), ``train_mean_accuracy`` (float), ``train_loss`` (list of per-epoch mean
        BCE; its length is the number of epochs actually run), and the layer itself for
        :func:`probe_predict`: ``mean`` and ``scale`` (the feature standardisation), ``weight``
        (L, L*k) and ``bias`` (L,).
    """
    X_tr = np.asarray(E_train, dtype=np.float32).reshape(len(E_train), -1)
    X_te = np.asarray(E_test, dtype=np.float32).reshape(len(E_test), -1)
    Y_tr = np.asarray(y_train, dtype=np.float32)
    Y_te = np.asarray(y_test)
    if X_tr.shape[1] != X_te.shape[1]:
        raise ValueError(
            f"E_train and E_test have different feature sizes: {X_tr.shape[1]} vs {X_te.shape[1]}"
        )
    if Y_tr.ndim != 2 or Y_tr.shape[0] != X_tr.shape[0]:
        raise ValueError(f"y_train must have shape ({X_tr.shape[0]}, L), got {Y_tr.shape}")
    if Y_te.ndim != 2 or Y_te.shape != (X_te.shape[0], Y_tr.shape[1]):
        raise ValueError(f"y_test must have shape ({X_te.shape[0]}, {Y_tr.shape[1]}), got {Y_te.shape}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    steps_per_epoch = math.ceil(X_tr.shape[0] / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))

    mu = X_tr.mean(axis=0)
    sd = X_tr.std(axis=0)
    # Blocks of absent labels are often exactly zero for every training image; dividing by a
    # zero std would blow them up, so such features are only centred.
    sd = np.where(sd > 1e-8, sd, 1.0).astype(np.float32)
    x_tr = torch.from_numpy((X_tr - mu) / sd)
    x_te = torch.from_numpy((X_te - mu) / sd)
    t_tr = torch.from_numpy(Y_tr)

    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        layer, history = _train_probe(x_tr, t_tr, epochs, lr, batch_size, weight_decay, seed)
        with torch.inference_mode():
            test_probs = torch.sigmoid(layer(x_te)).numpy().astype(np.float32)
            train_probs = torch.sigmoid(layer(x_tr)).numpy()
    finally:
        torch.set_num_threads(prev_threads)

    return {
        "test_mean_accuracy": mean_accuracy(test_probs, Y_te),
        "test_balanced_accuracy": balanced_accuracy(test_probs, Y_te),
        "per_label_accuracy": per_label_accuracy(test_probs, Y_te),
        "test_probs": test_probs,
        "train_mean_accuracy": mean_accuracy(train_probs, Y_tr),
        "train_loss": history,
        "mean": mu,
        "scale": sd,
        "weight": layer.weight.detach().numpy().copy(),
        "bias": layer.bias.detach().numpy().copy(),
    }


def probe_predict(probe: dict[str, Any], E: np.ndarray) -> np.ndarray:
    """Probabilities of a trained :func:`linear_probe` on new embeddings, shape (N, L)."""
    X = (np.asarray(E, dtype=np.float32).reshape(len(E), -1) - probe["mean"]) / probe["scale"]
    z = X @ probe["weight"].T + probe["bias"]
    return (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# 4.2 Correlations
# --------------------------------------------------------------------------------------------


def _safe_corr(X: np.ndarray) -> np.ndarray:
    """Pearson correlation of the columns of X (N, L); constant columns correlate 0 (1 with self)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D (N, L) array, got shape {X.shape}")
    Xc = X - X.mean(axis=0)
    sd = np.sqrt((Xc**2).sum(axis=0))
    ok = sd > 1e-12 * max(1.0, float(np.abs(X).max(initial=0.0)))
    Z = np.zeros_like(Xc)
    Z[:, ok] = Xc[:, ok] / sd[ok]
    C = Z.T @ Z
    # Rounding can push |r| a hair past 1.
    C = np.clip(C, -1.0, 1.0)
    np.fill_diagonal(C, 1.0)
    return C


def norm_correlation(E: np.ndarray) -> np.ndarray:
    """Pearson correlation between the per-label embedding norms (paper Figure 4).

    Args:
        E: Embeddings, shape (N, L, k).

    Returns:
        (L, L) float64 matrix of r between ||E[:, a, :]|| and ||E[:, b, :]||. A label whose norm
        is constant over the images has an undefined r; it is reported as 0 off the diagonal
        and 1 on it, so the matrix stays plottable.
    """
    E = _check_embeddings(E)
    return _safe_corr(np.linalg.norm(E.astype(np.float64), axis=2))


def label_correlation(labels: np.ndarray) -> np.ndarray:
    """Pearson correlation between the ground-truth 0/1 label columns.

    Args:
        labels: 0/1 labels, shape (N, L).

    Returns:
        (L, L) float64 matrix with the same constant-column handling as ``norm_correlation``.
    """
    return _safe_corr(labels)


def offdiag_agreement(A: np.ndarray, B: np.ndarray) -> float:
    """Pearson r between the upper-triangle off-diagonal entries of two (L, L) matrices.

    Used to ask how well the embedding-norm correlations reproduce the label correlations.

    Args:
        A: (L, L) matrix.
        B: (L, L) matrix of the same shape.

    Returns:
        The correlation as a float; NaN when it is undefined (L < 3, or either set of entries is
        constant).
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape != B.shape:
        raise ValueError(f"A and B must be square matrices of the same shape, got {A.shape} and {B.shape}")
    iu = np.triu_indices(A.shape[0], k=1)
    a, b = A[iu], B[iu]
    if a.size < 2:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if den == 0.0:
        return float("nan")
    return float(np.clip((a * b).sum() / den, -1.0, 1.0))


# --------------------------------------------------------------------------------------------
# 4.3 PCA of one label's block
# --------------------------------------------------------------------------------------------


def label_pca(E_l: np.ndarray, n_components: int = 10) -> dict[str, Any]:
    """PCA of one label's embedding block over all images (paper Section 4.3, Figure 5).

    Args:
        E_l: The block of one label, shape (N, k), e.g. ``E[:, l, :]``.
        n_components: Components to keep; clipped to min(N, k).

    Returns:
        Dict with ``explained_variance_ratio`` (list of floats, descending), ``projection``
        (float64 (N,), each image's coordinate on the first component), ``components``
        ((n_components, k) array, rows are unit eigenvectors) and ``mean`` ((k,), the centre
        used). PCA's sign is arbitrary, so the first component is flipped when needed to make
        the projection positively correlated with the block norm: a larger projection then
        means the label's vector is longer, i.e. the label is more evident.
    """
    from sklearn.decomposition import PCA

    E_l = np.asarray(E_l, dtype=np.float64)
    if E_l.ndim != 2:
        raise ValueError(f"E_l must have shape (N, k), got {E_l.shape}; pass E[:, l, :]")
    n = max(1, min(int(n_components), E_l.shape[0], E_l.shape[1]))
    pca = PCA(n_components=n, svd_solver="full")
    Z = pca.fit_transform(E_l)
    components = pca.components_.copy()
    proj = Z[:, 0].copy()
    norms = np.linalg.norm(E_l, axis=1)
    pc, nc = proj - proj.mean(), norms - norms.mean()
    if float((pc * nc).sum()) < 0:
        proj = -proj
        components[0] = -components[0]
    return {
        "explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio_],
        "projection": proj,
        "components": components,
        "mean": pca.mean_.copy(),
    }


def first_component_auc(projection: np.ndarray, y: np.ndarray) -> float:
    """How well the first component ranks the images that have the label above those that do not: the
    ROC AUC of ``projection`` against 0/1 ``y`` (0.5: no better than chance; NaN when one class is empty).

    The component is oriented along the block norm (:func:`label_pca`), not along the label, so an AUC
    under 0.5 means the longer vectors belong to the images without the label.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).reshape(-1)
    if y.min(initial=0) == y.max(initial=0):
        return float("nan")
    return float(roc_auc_score(y, np.asarray(projection, dtype=np.float64).reshape(-1)))


# --------------------------------------------------------------------------------------------
# 4.5 Editing: per-label Gaussians, edits and their success
# --------------------------------------------------------------------------------------------


def gaussian_images(labels: np.ndarray, probs: np.ndarray | None, rule: str) -> np.ndarray:
    """(N, L) bool: the images each label's editing Gaussian is fitted on.

    ``labelled``: every image with the label (the paper, eqs. 4-5). ``confirmed``: those the classifier also
    gives the label (probability >= 0.5), so that labels noted but not visible (annotation noise, a hat over
    the hair) do not pull the label's mean towards an empty block. A label no image confirms keeps every
    labelled image, so it can still be added.
    """
    y = np.asarray(labels) == 1
    if rule == "labelled":
        return y
    if rule != "confirmed":
        raise ValueError(f"rule: expected 'labelled' or 'confirmed', got {rule!r}")
    if probs is None:
        raise ValueError("rule 'confirmed' needs the classifier's probabilities (the embeddings' probs column)")
    probs = np.asarray(probs)
    if probs.shape != y.shape:
        raise ValueError(f"probs must have shape {y.shape} to match labels, got {probs.shape}")
    confirmed = y & (probs >= 0.5)
    none = ~confirmed.any(axis=0)
    confirmed[:, none] = y[:, none]
    return confirmed


def fit_label_gaussians(E: np.ndarray, labels: np.ndarray, ridge: float = 1e-5) -> dict[str, np.ndarray]:
    """Fit N(mean_l, cov_l) to block l over the images that have label l (paper eqs. 4-5).

    Args:
        E: Embeddings, shape (N, L, k).
        labels: 0/1 labels, shape (N, L).
        ridge: Added to the covariance diagonal, relative to the block's mean variance (absolute
            when that is 0), so that every covariance is positive definite and can be sampled
            with a Cholesky factor even when count < k.

    Returns:
        Dict with ``mean`` (float64 (L, k)), ``cov`` (float64 (L, k, k), unbiased, ddof=1),
        ``count`` (int64 (L,), images with the label) and ``empty`` (bool (L,), True where
        count == 0: mean and cov are then all zeros and the label cannot be added).
    """
    E = _check_embeddings(E)  # each label's rows are cast to float64 alone: no float64 copy of every block
    y = np.asarray(labels).astype(bool)
    if y.shape != E.shape[:2]:
        raise ValueError(f"labels must have shape {E.shape[:2]} to match E, got {y.shape}")
    _, L, k = E.shape
    mean = np.zeros((L, k))
    cov = np.zeros((L, k, k))
    count = y.sum(axis=0).astype(np.int64)
    for l in range(L):
        if count[l] == 0:
            continue
        X = E[y[:, l], l, :].astype(np.float64)
        mean[l] = X.mean(axis=0)
        c = np.cov(X, rowvar=False, ddof=1).reshape(k, k) if count[l] > 1 else np.zeros((k, k))
        scale = float(np.trace(c)) / k
        c += ridge * (scale if scale > 0 else 1.0) * np.eye(k)
        cov[l] = c
    return {"mean": mean, "cov": cov, "count": count, "empty": count == 0}


def edit_embeddings(
    E: np.ndarray,
    label_index: int,
    mode: str,
    gaussians: dict[str, np.ndarray],
    scale: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Add or remove one label in a batch of embeddings (paper Section 4.5, Figure 7).

    Args:
        E: Embeddings, shape (N, L, k); not modified.
        label_index: The label l to edit.
        mode: ``"add"`` replaces block l of every image with its own sample from
            N(mean_l, cov_l), multiplied by ``scale`` (scale > 1 gives a stronger phenotype,
            Figure 8); ``"remove"`` sets block l to zero.
        gaussians: Output of ``fit_label_gaussians``.
        scale: Multiplier for added samples; ignored by ``"remove"``.
        seed: Seeds the samples.

    Returns:
        Edited float32 copy of E; every block other than l is bit-identical to the input.
    """
    E = _check_embeddings(E)
    N, L, k = E.shape
    if not 0 <= label_index < L:
        raise ValueError(f"label_index must be in [0, {L}), got {label_index}")
    out = np.array(E, dtype=np.float32, copy=True)
    if mode == "remove":
        out[:, label_index, :] = 0.0
    elif mode == "add":
        if bool(np.asarray(gaussians.get("empty", np.zeros(L, bool)))[label_index]):
            raise ValueError(
                f"label {label_index} has no positive images, so no Gaussian to sample from"
            )
        mean = np.asarray(gaussians["mean"])[label_index]
        cov = np.asarray(gaussians["cov"])[label_index]
        if mean.shape != (k,) or cov.shape != (k, k):
            raise ValueError(f"gaussians do not match k={k}: mean {mean.shape}, cov {cov.shape}")
        chol = np.linalg.cholesky(cov)
        z = np.random.default_rng(seed).standard_normal((N, k))
        out[:, label_index, :] = (scale * (mean + z @ chol.T)).astype(np.float32)
    else:
        raise ValueError(f"mode must be 'add' or 'remove', got {mode!r}")
    return out


# Where a judge of editing sees a label: its probability at least this.
EDIT_THRESHOLD = 0.5


def editing_success(
    probs_before: np.ndarray,
    probs_after: np.ndarray,
    label_index: int,
    mode: str,
    threshold: float = EDIT_THRESHOLD,
) -> dict[str, float]:
    """How well an edit did what it asked, judged by a classifier's predictions.

    ``target_success`` is measured only over images whose label was not already as asked before
    the edit (for "add": predicted absent before; for "remove": predicted present before).
    Counting images that were already right would reward edits that do nothing.

    Args:
        probs_before: Probabilities on the unedited images/embeddings, shape (N, L).
        probs_after: Probabilities after the edit, shape (N, L).
        label_index: The edited label l.
        mode: ``"add"`` (success: p_l >= threshold) or ``"remove"`` (success: p_l < threshold).
        threshold: Decision threshold.

    Returns:
        Dict with ``target_success`` (fraction of eligible images where label l ends as asked;
        NaN if none were eligible), ``others_preserved`` (fraction of (image, other label)
        pairs whose thresholded prediction is unchanged; NaN if L == 1),
        ``others_preserved_changed`` (the same over the eligible images whose label l ended as
        asked; NaN if none did) and ``n_eligible``.
    """
    pb = np.asarray(probs_before, dtype=np.float64)
    pa = np.asarray(probs_after, dtype=np.float64)
    if pb.ndim != 2 or pb.shape != pa.shape:
        raise ValueError(f"probs_before and probs_after must share shape (N, L), got {pb.shape} and {pa.shape}")
    L = pb.shape[1]
    if not 0 <= label_index < L:
        raise ValueError(f"label_index must be in [0, {L}), got {label_index}")
    before = pb >= threshold
    after = pa >= threshold
    if mode == "add":
        eligible = ~before[:, label_index]
        done = after[:, label_index]
    elif mode == "remove":
        eligible = before[:, label_index]
        done = ~after[:, label_index]
    else:
        raise ValueError(f"mode must be 'add' or 'remove', got {mode!r}")
    n_el = int(eligible.sum())
    target = float(done[eligible].mean()) if n_el else float("nan")
    others = np.delete(np.arange(L), label_index)
    preserved = float((before[:, others] == after[:, others]).mean()) if others.size and pb.shape[0] else float("nan")
    # The same over the images whose edit did what it asked: an edit that changes nothing cannot score here.
    changed = eligible & done
    preserved_changed = (float((before[changed][:, others] == after[changed][:, others]).mean())
                         if others.size and changed.any() else float("nan"))
    return {"target_success": target, "others_preserved": preserved, "others_preserved_changed": preserved_changed,
            "n_eligible": n_el}


# --------------------------------------------------------------------------------------------
# Attribute-flip pairs: where does the embedding change land?
# --------------------------------------------------------------------------------------------


def _own_block_shares(
    E_orig: np.ndarray, E_flipped: np.ndarray, label_indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair share of ||dE||^2 in the flipped label's block, and that label; unchanged pairs dropped."""
    A = _check_embeddings(E_orig, "E_orig").astype(np.float64)
    B = _check_embeddings(E_flipped, "E_flipped").astype(np.float64)
    idx = np.asarray(label_indices, dtype=np.int64).reshape(-1)
    if A.shape != B.shape or idx.shape[0] != A.shape[0]:
        raise ValueError(
            f"E_orig {A.shape}, E_flipped {B.shape} and label_indices ({idx.shape[0]},) must agree on N"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= A.shape[1]):
        raise ValueError(f"label_indices must lie in [0, {A.shape[1]})")
    sq = ((B - A) ** 2).sum(axis=2)  # (P, L)
    total = sq.sum(axis=1)
    # A pair whose embedding did not move at all has no share to speak of.
    keep = total > 0
    share = sq[np.arange(len(idx)), idx][keep] / total[keep]
    return share, idx[keep]


def own_block_fraction(E_orig: np.ndarray, E_flipped: np.ndarray, label_indices: np.ndarray) -> float:
    """Mean share of the squared embedding change that falls in the flipped attribute's block.

    For pair i (same face, attribute ``label_indices[i]`` flipped) the share is
    ||dE_l||^2 / ||dE||^2 with l the flipped attribute. 1.0 means the flip only moved its own
    block; an isotropic change gives about 1/L.

    Args:
        E_orig: Embeddings of the original images, shape (P, L, k).
        E_flipped: Embeddings of the flipped images, shape (P, L, k).
        label_indices: The flipped attribute of each pair, shape (P,).

    Returns:
        The share averaged over pairs (pairs with dE == 0 are skipped); NaN if none remain.
    """
    share, _ = _own_block_shares(E_orig, E_flipped, label_indices)
    return float(share.mean()) if share.size else float("nan")


def own_block_fraction_per_label(
    E_orig: np.ndarray, E_flipped: np.ndarray, label_indices: np.ndarray
) -> np.ndarray:
    """``own_block_fraction`` averaged separately for each flipped attribute.

    Args:
        E_orig: Embeddings of the original images, shape (P, L, k).
        E_flipped: Embeddings of the flipped images, shape (P, L, k).
        label_indices: The flipped attribute of each pair, shape (P,).

    Returns:
        float64 array (L,): the mean share over the pairs that flipped each label, NaN for labels
        that no (changed) pair flipped.
    """
    L = np.asarray(E_orig).shape[1]
    share, idx = _own_block_shares(E_orig, E_flipped, label_indices)
    sums = np.bincount(idx, weights=share, minlength=L)
    counts = np.bincount(idx, minlength=L)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# --------------------------------------------------------------------------------------------
# 4.4 Reconstruction quality
# --------------------------------------------------------------------------------------------


def ssim_psnr(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """SSIM and PSNR between two batches of float images in [0, 1].

    SSIM is ``pytorch_msssim.ssim`` (data_range=1, averaged over images and channels; it works per
    channel as the paper does), with the window the decoder trains with
    (:func:`olr_ray.models.nets.ssim_window`). PSNR is 10 * log10(1 / MSE) with the MSE pooled over the
    whole batch, so it is ``inf`` for identical batches.

    Args:
        x: Images, shape (N, 3, H, W), float in [0, 1].
        y: Images of the same shape.

    Returns:
        (ssim, psnr) as floats.
    """
    X = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().to("cpu", torch.float32)
    Y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).detach().to("cpu", torch.float32)
    if X.ndim != 4 or X.shape != Y.shape:
        raise ValueError(f"x and y must share shape (N, C, H, W), got {tuple(X.shape)} and {tuple(Y.shape)}")
    from pytorch_msssim import ssim

    s = float(ssim(X, Y, data_range=1.0, size_average=True, win_size=ssim_window(min(X.shape[-2:]))))
    mse = float(torch.mean((X.double() - Y.double()) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
    return s, psnr


# --------------------------------------------------------------------------------------------
# Per-label norms: present against absent
# --------------------------------------------------------------------------------------------


def norm_ratios(norms: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per label: mean block norm where present over where absent (NaN where one side is empty)."""
    out = np.full(labels.shape[1], np.nan)
    for l in range(labels.shape[1]):
        present, absent = labels[:, l] == 1, labels[:, l] == 0
        if present.any() and absent.any():
            out[l] = norms[present, l].mean() / max(norms[absent, l].mean(), 1e-8)
    return out


def norm_ratio(norms: np.ndarray, labels: np.ndarray) -> float:
    """:func:`norm_ratios` averaged over the labels that are both present and absent somewhere."""
    ratios = norm_ratios(norms, labels)
    return float(np.nanmean(ratios)) if np.isfinite(ratios).any() else float("nan")
