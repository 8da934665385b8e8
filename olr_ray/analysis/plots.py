"""Figures for the OLR analyses; every function writes one PNG and returns its path.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas rather than through
``pyplot``: no global figure state, no GUI backend, and safe to call from Ray workers or threads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "plot_correlation_heatmap",
    "plot_correlation_pair",
    "plot_ranked_strip",
    "plot_image_grid",
    "plot_pca_variance",
    "plot_training_curves",
]

DPI = 150


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _to_hwc(img: np.ndarray) -> np.ndarray:
    """Image as (H, W, 3) or (H, W) for imshow: accepts uint8 or float [0, 1], HWC or CHW."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32), 0.0, 1.0)
    return a


def _label_fontsize(n: int, side_inches: float) -> float:
    # One label per cell: about a third of the cell height (in points) stays legible without
    # overlapping its neighbours (38 CelebA labels on ~12 inches -> ~7 pt).
    cell_pt = 72.0 * 0.8 * side_inches / max(n, 1)
    return float(np.clip(0.38 * cell_pt, 4.0, 9.0))


def _draw_matrix(
    fig: Figure, ax, M: np.ndarray, names: Sequence[str], title: str, annotate: bool, side: float
):
    n = M.shape[0]
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")  # NaN cells in light grey
    im = ax.imshow(M, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
    fs = _label_fontsize(n, side)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(names, rotation=90, fontsize=fs)
    ax.set_yticklabels(names, fontsize=fs)
    ax.set_title(title, fontsize=11)
    if annotate:
        for i in range(n):
            for j in range(n):
                v = M[i, j]
                if not np.isfinite(v):
                    continue
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=fs * 0.8,
                        color="white" if abs(v) > 0.6 else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label("Pearson r", fontsize=9)
    return im


def _check_matrix(M: np.ndarray, names: Sequence[str]) -> np.ndarray:
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] != len(names):
        raise ValueError(f"matrix must be (L, L) with L == len(names) == {len(names)}, got {M.shape}")
    return M


def plot_correlation_heatmap(
    M: np.ndarray, names: Sequence[str], path: str, title: str, annotate: bool | None = None
) -> str:
    """Heatmap of an (L, L) correlation matrix on a diverging colour map fixed to [-1, 1].

    Args:
        M: (L, L) correlation matrix.
        names: L label names, drawn on both axes.
        path: Output PNG path; parent folders are created.
        title: Figure title.
        annotate: Print r in each cell; by default only when L <= 40 (the paper prints them).

    Returns:
        ``path``.
    """
    M = _check_matrix(M, names)
    n = M.shape[0]
    annotate = n <= 40 if annotate is None else annotate
    side = float(np.clip(0.3 * n + 2.5, 5.0, 16.0))
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    _draw_matrix(fig, ax, M, names, title, annotate, side)
    fig.tight_layout()
    return _save(fig, path)


def plot_correlation_pair(
    norm_corr: np.ndarray,
    label_corr: np.ndarray,
    names: Sequence[str],
    path: str,
    r: float,
    annotate: bool | None = None,
) -> str:
    """Embedding-norm correlations beside ground-truth label correlations (paper Figure 4).

    Args:
        norm_corr: (L, L) correlations of per-label embedding norms.
        label_corr: (L, L) correlations of the 0/1 labels.
        names: L label names.
        path: Output PNG path.
        r: Agreement between the two matrices' off-diagonal entries, shown in the title.
        annotate: Print r in each cell; by default only when L <= 20 (cells are small here).
        The diagonal (always 1) is greyed out so the colour range is spent on the off-diagonal
        entries that ``r`` compares.

    Returns:
        ``path``.
    """
    A = _check_matrix(norm_corr, names).copy()
    B = _check_matrix(label_corr, names).copy()
    np.fill_diagonal(A, np.nan)
    np.fill_diagonal(B, np.nan)
    n = A.shape[0]
    annotate = n <= 20 if annotate is None else annotate
    side = float(np.clip(0.3 * n + 2.5, 4.5, 14.0))
    fig = _new_figure(2 * side + 2.0, side + 0.6)
    _draw_matrix(fig, fig.add_subplot(1, 2, 1), A, names, "Embedding-norm correlation", annotate, side)
    _draw_matrix(fig, fig.add_subplot(1, 2, 2), B, names, "Label correlation", annotate, side)
    fig.suptitle(f"Norm vs label correlations: off-diagonal agreement r = {r:.3f}", fontsize=13)
    fig.tight_layout()
    return _save(fig, path)


def plot_ranked_strip(
    images: np.ndarray | Callable[[np.ndarray], np.ndarray],
    values: np.ndarray,
    path: str,
    title: str,
    n: int = 10,
    value_name: str = "",
) -> str:
    """Images ranked by a value, picked evenly through the ranking (paper Figure 5).

    Args:
        images: (N, H, W, 3) uint8 (or float in [0, 1]) images, or a function that gives the images of some
            indices (in their order), so that only the shown images need be read.
        values: (N,) values to rank by, e.g. the first-PC projection.
        path: Output PNG path.
        title: Figure title.
        n: Images to show (fewer if N < n); positions are ``linspace(0, N-1, n)`` in the
            ascending ranking, so the ends are the minimum and maximum.
        value_name: Optional prefix for the number shown above each image.

    Returns:
        ``path``.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not callable(images):
        images = np.asarray(images)
        if len(images) != len(values):
            raise ValueError(f"images ({len(images)}) and values ({len(values)}) must be equal in length")
    if len(values) == 0:
        raise ValueError("values must be non-empty")
    order = np.argsort(values, kind="stable")
    n = min(n, len(values))
    ranks = np.unique(np.round(np.linspace(0, len(values) - 1, n)).astype(int))
    shown = images(order[ranks]) if callable(images) else images[order[ranks]]
    fig = _new_figure(1.6 * len(ranks) + 0.4, 2.4)
    for j, rank in enumerate(ranks):
        i = order[rank]
        ax = fig.add_subplot(1, len(ranks), j + 1)
        ax.imshow(_to_hwc(shown[j]), cmap="gray")
        prefix = f"{value_name}=" if value_name else ""
        ax.set_title(f"{prefix}{values[i]:.2f}\nrank {rank}", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{title} (ascending, {len(values)} images)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_image_grid(
    rows: list[list[np.ndarray | None]],
    path: str,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    title: str | None = None,
    captions: list[list[str]] | None = None,
) -> str:
    """A grid of images, e.g. originals vs reconstructions, or original / recon / edited.

    Args:
        rows: Rows of images; each image is (H, W, 3) uint8 or float in [0, 1] ((3, H, W) is
            also accepted). ``None`` leaves a blank cell; short rows are padded with blanks.
        path: Output PNG path.
        row_titles: Optional text at the left of each row (e.g. "+Smiling").
        col_titles: Optional text above each column (e.g. "original", "reconstruction").
        title: Optional figure title.
        captions: Optional text under each image, row by row (e.g. a face's label and two probabilities).

    Returns:
        ``path``.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("rows must contain at least one image")
    n_rows = len(rows)
    n_cols = max(len(r) for r in rows)
    if row_titles is not None and len(row_titles) != n_rows:
        raise ValueError(f"row_titles has {len(row_titles)} entries for {n_rows} rows")
    if col_titles is not None and len(col_titles) != n_cols:
        raise ValueError(f"col_titles has {len(col_titles)} entries for {n_cols} columns")
    cell = 1.6
    fig = _new_figure(cell * n_cols + (1.0 if row_titles else 0.2), cell * n_rows + (0.5 if title else 0.2))
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1)
            img = row[j] if j < len(row) else None
            if img is not None:
                ax.imshow(_to_hwc(img), cmap="gray")
            # Keep the axes (not axis("off")) so the row title can sit in the y label.
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if i == 0 and col_titles is not None:
                ax.set_title(col_titles[j], fontsize=8)
            if j == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[i], fontsize=8, rotation=0, ha="right", va="center")
            if captions is not None and i < len(captions) and j < len(captions[i]):
                ax.set_xlabel(captions[i][j], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_pca_variance(evr: Sequence[float], path: str, label_name: str) -> str:
    """Bar chart of a label block's PCA explained-variance ratios, with the cumulative sum.

    Args:
        evr: Explained variance ratios, descending.
        path: Output PNG path.
        label_name: The label whose block was analysed (for the title).

    Returns:
        ``path``.
    """
    evr = np.asarray(evr, dtype=np.float64).reshape(-1)
    if evr.size == 0:
        raise ValueError("evr is empty")
    x = np.arange(1, evr.size + 1)
    fig = _new_figure(max(4.5, 0.45 * evr.size + 2.0), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(x, 100 * evr, color="tab:blue", label="per component")
    ax.plot(x, 100 * np.cumsum(evr), "o-", color="tab:orange", ms=3, label="cumulative")
    for b, v in zip(bars, evr):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, f"{100 * v:.1f}%", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_ylim(0, 105)
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance (%)")
    ax.set_title(f"PCA of the '{label_name}' embeddings")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_per_label_bars(series: dict[str, Sequence[float]], names: Sequence[str], path: str, title: str,
                        ylabel: str = "fraction", bar: float | None = None) -> str:
    """Grouped horizontal bars, one row per label (e.g. add and remove success per label).

    Args:
        series: Series name -> one value per label (NaN: not measured, drawn as no bar).
        names: Label names, in the series' order.
        path: Output PNG path.
        title: Figure title.
        ylabel: Axis label for the values.
        bar: Optional target drawn as a dashed vertical line.

    Returns:
        ``path``.
    """
    if not series:
        raise ValueError("series is empty")
    n = len(names)
    for key, vals in series.items():
        if len(vals) != n:
            raise ValueError(f"series {key!r} has {len(vals)} values for {n} labels")
    fig = _new_figure(7.0, 0.2 * n + 1.4)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)
    h = 0.8 / len(series)
    for i, (key, vals) in enumerate(series.items()):
        ax.barh(y + (i - (len(series) - 1) / 2) * h, np.nan_to_num(np.asarray(vals, float)), height=h, label=key)
    if bar is not None:
        ax.axvline(bar, ls="--", color="k", lw=1, label=f"target {bar:g}")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel(ylabel)
    ncol = len(series) + 1 if sum(len(k) for k in series) < 50 else 2  # long names: two columns
    ax.set_title(title, pad=12 + 12 * math.ceil((len(series) + (bar is not None)) / ncol))
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=ncol, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


_SPLIT_PREFIXES = ("train_", "val_", "valid_", "test_")


def _series_group(name: str) -> str:
    for p in _SPLIT_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def plot_training_curves(history: dict[str, list[float]], path: str, title: str | None = None) -> str:
    """Per-epoch curves, one subplot per metric with its train/val series together.

    Series are grouped by name after a ``train_`` / ``val_`` / ``valid_`` / ``test_`` prefix, so
    ``train_loss`` and ``val_loss`` share the "loss" subplot.

    Args:
        history: Series name -> one value per epoch; empty series are skipped.
        path: Output PNG path.
        title: Optional figure title.

    Returns:
        ``path``.
    """
    groups: dict[str, list[str]] = {}
    for name, vals in history.items():
        if len(vals):
            groups.setdefault(_series_group(name), []).append(name)
    if not groups:
        raise ValueError("history has no non-empty series to plot")
    n = len(groups)
    fig = _new_figure(4.2 * n, 3.3)
    for j, (group, names) in enumerate(groups.items()):
        ax = fig.add_subplot(1, n, j + 1)
        for name in names:
            vals = np.asarray(history[name], dtype=np.float64)
            ax.plot(np.arange(1, len(vals) + 1), vals, marker="o" if len(vals) <= 30 else None,
                    ms=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(group)
        ax.set_title(group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
