"""Markdown report of an analysis run: headline table, every metric, every figure."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["flatten_metrics", "write_report", "PAPER_REFERENCE"]

#: Numbers reported in the paper for CelebA (Sections 4.1 and 4.3).
PAPER_REFERENCE: dict[str, float] = {
    "probe_mean_accuracy": 0.916,
    "classifier_mean_accuracy": 0.942,
    "pca_first_component_evr": 0.675,
    "pca_second_component_evr": 0.041,
}

# Leaf names shown in the headline table when present (in this order of preference per leaf).
_HEADLINE_LEAVES = (
    "split",
    "test_mean_accuracy",
    "majority_baseline",
    "test_balanced_accuracy",
    "mean_accuracy",
    "balanced_accuracy",
    "dot_r2",
    "norm_ratio_present_absent",
    "vs_label_corr_r",
    "agreement_r",
    "offdiag_agreement",
    "explained_variance_ratio.0",
    "explained_variance_ratio.1",
    "test_ssim",
    "test_psnr",
    "ssim",
    "psnr",
    "label_recall",
    "add_success",
    "remove_success",
    "target_success",
    "others_preserved",
    "add_success_reembedded",
    "remove_success_reembedded",
    "others_preserved_reembedded",
    "others_preserved_changed",
    "exact_add_success",
    "exact_remove_success",
    "add_over_exact",
    "add_success_drawn",
    "remove_success_drawn",
    "others_preserved_changed_drawn",
    "exact_add_success_drawn",
    "exact_remove_success_drawn",
    "add_over_exact_drawn",
    "heldout_mean_accuracy",
    "own_block_fraction",
)

# Arrays longer than this are summarised rather than printed in full.
_MAX_INLINE = 64


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str, np.generic)) or v is None


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys (``{"probe": {"acc": 1}}`` -> ``{"probe.acc": 1}``).

    Short 1-D lists/arrays (up to 64 items) are also spread into ``key.0``, ``key.1``, ... so each
    number can be looked up, and kept whole under ``key`` for the full table.

    Args:
        metrics: Nested mapping of metric values.
        prefix: Key prefix used in recursion.

    Returns:
        Flat ordered dict from dotted key to value.
    """
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, key + "."))
            continue
        out[key] = v
        if isinstance(v, (list, tuple, np.ndarray)):
            arr = np.asarray(v, dtype=object).reshape(-1) if np.ndim(v) else np.asarray([v])
            if 0 < arr.size <= _MAX_INLINE and np.ndim(v) == 1 and all(_is_scalar(x) for x in arr):
                for i, x in enumerate(arr):
                    out[f"{key}.{i}"] = x
    return out


def _fmt(v: Any) -> str:
    """Markdown-safe text for one metric value."""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f) or math.isinf(f):
            return str(f)
        if f != 0 and (abs(f) >= 1e5 or abs(f) < 1e-3):
            return f"{f:.4g}"
        return f"{f:.4f}"
    if isinstance(v, (list, tuple, np.ndarray)):
        arr = np.asarray(v)
        if arr.size > _MAX_INLINE or arr.ndim > 1:
            try:
                a = arr.astype(np.float64)
                return (f"array shape {arr.shape}, mean {_fmt(float(np.nanmean(a)))}, "
                        f"min {_fmt(float(np.nanmin(a)))}, max {_fmt(float(np.nanmax(a)))}")
            except (TypeError, ValueError):
                return f"array shape {arr.shape}"
        return "[" + ", ".join(_fmt(x) for x in arr.tolist()) + "]"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _find(flat: Mapping[str, Any], *suffixes: str) -> Any:
    """First scalar whose dotted key equals or ends with one of the suffixes (tried in order)."""
    for s in suffixes:
        for k, v in flat.items():
            if (k == s or k.endswith("." + s)) and _is_scalar(v) and not isinstance(v, str):
                return v
    return None


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


def _paper_section(flat: Mapping[str, Any]) -> list[str]:
    probe = _find(flat, "probe.test_mean_accuracy")
    clf = _find(flat, "classifier.test_mean_accuracy", "classifier.mean_accuracy")
    ev1 = _find(flat, "pca.explained_variance_ratio.0", "explained_variance_ratio.0")
    ev2 = _find(flat, "pca.explained_variance_ratio.1", "explained_variance_ratio.1")
    label = flat.get("pca.label", "Mouth_Slightly_Open")
    # The paper's PCA figures are Mouth_Slightly_Open's; another label's are not comparable and say so.
    pca_block = "'Mouth_Slightly_Open'" if label == "Mouth_Slightly_Open" else f"'{label}' (paper: 'Mouth_Slightly_Open')"
    ref = PAPER_REFERENCE
    lines = [
        "## Comparison with the paper (CelebA)",
        "",
        "| quantity | paper | this run |",
        "|---|---|---|",
        f"| linear probe on embeddings, test mean accuracy | {_pct(ref['probe_mean_accuracy'])} | {_pct(probe)} |",
        f"| convolutional classifier, test mean accuracy | {_pct(ref['classifier_mean_accuracy'])} | {_pct(clf)} |",
    ]
    gap_ours = "n/a" if probe is None or clf is None else f"{100 * (float(clf) - float(probe)):.1f} points"
    gap_paper = 100 * (ref["classifier_mean_accuracy"] - ref["probe_mean_accuracy"])
    lines += [
        f"| classifier minus probe | {gap_paper:.1f} points | {gap_ours} |",
        f"| PCA of the {pca_block} block, 1st component variance | {_pct(ref['pca_first_component_evr'])} | {_pct(ev1)} |",
        f"| PCA of the {pca_block} block, 2nd component variance | {_pct(ref['pca_second_component_evr'])} | {_pct(ev2)} |",
        "",
    ]
    return lines


def write_report(
    run_dir: str,
    metrics: dict,
    figures: dict[str, str],
    paper_reference: bool,
    extra_sections: dict[str, str] | None = None,
    headline_keys: list[str] | None = None,
    title: str = "OLR analysis report",
) -> str:
    """Write ``report.md`` into ``run_dir``.

    Layout: headline table, the paper comparison (when ``paper_reference``), every figure, any
    extra sections, and finally a table of every flattened metric.

    Args:
        run_dir: Local folder of the run; created if missing.
        metrics: Nested metrics; each number appears under its dotted key
            (e.g. ``probe.test_mean_accuracy``).
        figures: Figure title -> PNG path (absolute, or relative to ``run_dir``). Paths are
            written relative to ``run_dir`` so the report moves with its folder.
        paper_reference: Add the paper's CelebA numbers beside ours (probe 91.6% vs classifier
            94.2%; first principal component 67.5% of the variance, second 4.1%).
        extra_sections: Heading -> markdown body, appended after the figures.
        headline_keys: Dotted keys for the headline table; by default every scalar whose last
            key part is a known headline metric (accuracies, agreement r, SSIM, PSNR, editing
            and own-block scores), or the first ten scalars if none is.
        title: Top-level heading.

    Returns:
        Path of the written ``report.md``.
    """
    os.makedirs(run_dir, exist_ok=True)
    flat = flatten_metrics(metrics)
    scalars = {k: v for k, v in flat.items() if _is_scalar(v)}

    if headline_keys is None:
        headline_keys = [k for leaf in _HEADLINE_LEAVES for k in scalars
                         if k == leaf or k.endswith("." + leaf)]
        headline_keys = list(dict.fromkeys(headline_keys)) or list(scalars)[:10]
    missing = [k for k in headline_keys if k not in flat]
    if missing:
        raise KeyError(f"headline_keys not found in metrics: {missing}; available: {sorted(flat)}")

    lines = [f"# {title}", "", "## Headline metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(flat[k])} |" for k in headline_keys]
    lines.append("")

    if paper_reference:
        lines += _paper_section(flat)

    if figures:
        lines += ["## Figures", ""]
        for fig_title, p in figures.items():
            rel = os.path.relpath(p, run_dir) if os.path.isabs(p) else p
            rel = rel.replace(os.sep, "/")
            lines += [f"### {fig_title}", "", f"![{fig_title}]({rel})", ""]

    for heading, body in (extra_sections or {}).items():
        lines += [f"## {heading}", "", body.rstrip(), ""]

    lines += ["## All metrics", "", "| metric | value |", "|---|---|"]
    # Spread list items (key.0, key.1, ...) are already shown inside their list's row.
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in flat.items()
              if not (k.rsplit(".", 1)[-1].isdigit() and k.rsplit(".", 1)[0] in flat)]
    lines.append("")

    path = os.path.join(run_dir, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return path


def measurement_section(edit_images: int, size: int, decoder_out: int | None, synthetic: bool,
                        split: str = "test", judge: bool = False) -> str:
    """What each group of numbers is computed on, in words (the definitions a reader of the numbers needs)."""
    lines = [
        "- **Splits.** The linear probe and the per-label Gaussians are fitted on the train split; the "
        f"analysis' numbers are measured on the **{split}** split (`analysis.split`; a key that says `test` "
        f"means this split). `classifier.test_*` is the test split; the classifier's and the Siamese "
        "network's `val_*` numbers and `siamese.dot_r2` are the validation split (the test split where the "
        "data has none).",
        "- **Probe vs classifier.** Both are read at 0.5 on the same test images (the classifier through the "
        "committed `probs`); mean accuracy averages the per-label accuracies, balanced accuracy the per-label "
        "mean of the two class recalls.",
        "- **Correlations.** `correlation.vs_label_corr_r` is the Pearson r between the off-diagonal "
        "correlations of the per-label embedding norms and those of the labels, over every image; "
        "`correlation.classifier_probs_corr_r` is the same for the classifier's probabilities, a per-label "
        "detector without embeddings: the baseline the embeddings' r is to be read against.",
        "- **PCA.** `pca.first_component_auc`: the ROC AUC of the test images' first-component projection "
        "for the analysed label (0.5 is chance).",
    ]
    if decoder_out:
        lines += [
            f"- **Reconstruction.** The decoder draws {decoder_out}x{decoder_out} pixels; SSIM and PSNR "
            f"compare them with the centre {decoder_out}x{decoder_out} of each {size}x{size} test image. SSIM "
            "uses the decoder's training window (11 pixels from 44 pixels up, 7 below) and PSNR pools the "
            "squared error over the split, so the decoder's own `val_psnr` (per-image PSNR, on the "
            "validation split) differs slightly.",
            f"- **Editing.** The first {edit_images} test faces, every label. The classifier judges each "
            f"decoded face resized (bilinear) to {size}x{size} and stored as uint8, at 0.5. *Add* counts the "
            "(face, label) pairs where it does not see the label on the unedited reconstruction and sees it "
            "after the edit (s=1); *remove* the pairs where it sees the label before and not after; *others "
            "preserved* the other labels of each edited face that it reads as on the unedited reconstruction "
            "(`others_preserved`: over the faces some judge could count the edit on, the only faces an edit is "
            "decoded for; `others_preserved_changed`: over the edits that changed their target). "
            "Eligibility follows the classifier's reading, not the ground truth, because the edit acts on "
            "the decoded face. The `_reembedded` keys judge the same faces by the Siamese network and the "
            "linear probe instead.",
            "- **Geometry.** The crop and resize alone cost the classifier "
            "`classifier.test_mean_accuracy` minus `reconstruction.classifier_mean_accuracy_cropped_originals` "
            "(the originals judged through the same path), before any decoding.",
        ]
    if synthetic:
        lines.append(
            "- **Exact edits** (synthetic data). The generator redraws each edited face with only the label "
            "set (add) or cleared (remove), and the classifier judges the full-size renders; eligibility "
            "follows its reading of the original face. They show what a perfectly drawn one-attribute edit "
            "scores with this judge. Where the judge misses a label the face already has, or another attribute "
            "hides it (earrings under long hair, lipstick under a beard), the exact edit draws nothing; the "
            "`*_drawn` keys count, for exact and decoded edits alike, only the faces where the exact edit changes "
            "the picture (`editing.exact_add_drawn_share` of the (face, label) adds).")
        if judge:
            lines.append(
                "- **Independent judge** (synthetic data). A classifier trained from the generator alone on "
                "faces whose attributes are each present with probability one half, independently of the "
                "others, so it cannot read a label from what usually comes with it; no OLR model sees its faces. "
                "It judges the same reconstructions, decoded edits and exact edits (`editing.independent.*`); "
                "`judge.independent.heldout_mean_accuracy` is its accuracy on independent faces it did not "
                "train on, `judge.independent.test_mean_accuracy` on this run's images. "
                "`editing.independent.add_over_exact` is the decoded adds as a share of its exact adds: the "
                "decoder's part, with the judge's own misses divided out (`add_over_exact_drawn`: both on the "
                "faces the exact add draws on).")
        lines.append("- **Disentanglement** (synthetic data). The same face redrawn with one attribute flipped "
                     "and re-embedded: the share of the squared change of the embedding that falls in that "
                     "attribute's own block (1/L if it spread evenly).")
    return "\n".join(lines)


def run_section(run_id: str, uri: str, source: str, stages: Mapping[str, Mapping[str, Any]]) -> str:
    """Where the run is and how long each stage took (the running one, which writes the report, has no time yet)."""
    lines = [f"- run id: `{run_id}`", f"- location: `{uri}`", f"- data: `{source}`"]
    for name, st in stages.items():
        if st.get("status") == "running":  # this stage: its time lands in manifest.json when it ends
            lines.append(f"- stage {name}: wrote this report (its time: `manifest.json`)")
        elif "seconds" in st:
            lines.append(f"- stage {name}: {st['status']} in {st['seconds']:.1f}s")
    return "\n".join(lines)
