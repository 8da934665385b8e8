"""Analysis stage: the paper's experiments on the committed embeddings, figures and report.md.

Everything is computed from the committed embedding Parquet (plus the prepared images for
figures, and the trained models for decoding and editing) and written to ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from olr_ray import storage
from olr_ray.analysis import editing
from olr_ray.analysis import metrics as M
from olr_ray.analysis import plots as P
from olr_ray.analysis.decoded import DecodedSplit, EditJudges, decode_split
from olr_ray.analysis.judge import independent_judge
from olr_ray.analysis.report import measurement_section, run_section, write_report
from olr_ray.data import synthetic
from olr_ray.embeddings import Embeddings, load_embeddings
from olr_ray.models.inference import load_for_inference, pool_precision
from olr_ray.models.nets import checkpoint_state, save_checkpoint
from olr_ray.models.precision import resolve_precision
from olr_ray.run import Run, UsageError, prepared_images
from olr_ray.runtime import ResourcePlan

NAME = "analysis"
log = logging.getLogger("olr_ray.analysis")
# The analysis works without a decoder (no reconstruction or editing then).
REQUIRES = ("data", "classifier", "siamese", "embed")


PAPER_PCA_LABEL = "Mouth_Slightly_Open"


def check(run: Run) -> None:
    """Options that name a label must name one of the data's, checked once the data stage is done."""
    names = run.data.get("label_names") or []
    split = run.cfg.analysis.split
    if run.data.get("splits") and not run.data["splits"].get(split):
        raise UsageError(f"analysis.split={split!r}: the data has no {split} images (splits: "
                         f"{', '.join(f'{k} {v}' for k, v in run.data['splits'].items())}); expected one of those "
                         f"with images")
    label = run.cfg.analysis.pca_label
    if label != "auto" and label not in names:
        raise UsageError(f"analysis.pca_label={label!r} is not a label of {run.cfg.data.source!r}; expected one "
                         f"of: {', '.join(names)}. The data stage is done: start a new --run-id with "
                         f"analysis.pca_label=<label> (or auto)")


@dataclass
class _Context:
    """What every part of the analysis reads, and the figures it has drawn (title -> local PNG)."""

    run: Run
    names: list[str]
    size: int
    train: Embeddings
    test: Embeddings
    split: str
    """The split the analysis measures on (``analysis.split``): "test" in a metric's name means this split."""
    tmp: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="olr-analysis-"))
    seconds: dict[str, float] = field(default_factory=dict)
    """Seconds each part took (manifest ``stages.analysis.seconds``)."""

    @contextlib.contextmanager
    def timed(self, part: str):
        t0 = time.perf_counter()
        yield
        self.seconds[part] = round(time.perf_counter() - t0, 2)
        log.info("analysis: %s done in %.1f s", part, self.seconds[part])
    figs: dict[str, str] = field(default_factory=dict)

    def fig(self, name: str) -> str:
        return os.path.join(self.tmp, name)


def split_images(run: Run, split: str, uids: np.ndarray) -> np.ndarray:
    """The prepared images of some uids of one split, in that order: only those rows are read into memory."""
    files = [f for d in run.split_dirs([split]) for f in storage.list_files(d, ".parquet")]
    if len(uids) == 0:
        return np.zeros((0, run.data["image_size"], run.data["image_size"], 3), np.uint8)
    found = prepared_images(files, "uid", [int(u) for u in uids], run.data["image_size"])
    return np.stack([found[int(u)] for u in uids])


def _probe(c: _Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """Linear probe vs the classifier (its committed probabilities), on the same test images."""
    cfg = c.run.cfg
    # One thread (linear_probe's default): two took 11 s against 16 s on an idle machine, but 161 s while
    # another job shared its 2 cores (OpenMP spinning), so the probe stays on one.
    probe = M.linear_probe(c.train.E, c.train.labels, c.test.E, c.test.labels, epochs=cfg.analysis.probe_epochs,
                           seed=cfg.seed)
    clf_acc = M.mean_accuracy(c.test.probs, c.test.labels)
    return probe, {
        "probe.test_mean_accuracy": probe["test_mean_accuracy"],
        "probe.test_balanced_accuracy": probe["test_balanced_accuracy"],
        "probe.classifier_test_mean_accuracy": clf_acc,
        "probe.classifier_test_balanced_accuracy": M.balanced_accuracy(c.test.probs, c.test.labels),
        "probe.minus_classifier": probe["test_mean_accuracy"] - clf_acc,
        "probe.test_accuracy_per_label": dict(zip(c.names, map(float, probe["per_label_accuracy"]))),
    }


def _probe_vs_classifier(c: _Context, probe: dict[str, Any]) -> dict[str, Any]:
    """Per label, probe against classifier; the faces of the label where they disagree most (the paper's Fig. 3:
    faces the probe gets wrong and the classifier right, and the other way round beside them)."""
    y = c.test.labels == 1
    probe_p = M.probe_predict(probe, c.test.E)
    probe_seen, clf_seen = probe_p >= 0.5, c.test.probs >= 0.5
    probe_ok, clf_ok = probe_seen == y, clf_seen == y
    probe_acc, clf_acc = probe_ok.mean(0), clf_ok.mean(0)
    c.figs["Probe vs classifier, per label"] = P.plot_per_label_bars(
        {"linear probe on the embedding": probe_acc, "classifier": clf_acc}, c.names,
        c.fig("probe_vs_classifier.png"), "Test accuracy per label", ylabel="accuracy")
    j = int(np.argmax(clf_acc - probe_acc))
    only_clf = np.flatnonzero(~probe_ok[:, j] & clf_ok[:, j])
    only_probe = np.flatnonzero(probe_ok[:, j] & ~clf_ok[:, j])
    label = c.names[j]
    if len(only_clf) or len(only_probe):
        picks = [only_clf[:8], only_probe[:8]]
        rows = [list(split_images(c.run, c.split, c.test.uids[p])) if len(p) else [None] for p in picks]
        # Under each face: whether it has the label, and the probe's and the classifier's probability.
        captions = [[f"{'has' if y[i, j] else 'lacks'} it\nprobe {probe_p[i, j]:.2f}, clf {c.test.probs[i, j]:.2f}"
                     for i in p] for p in picks]
        c.figs[f"{label}: test faces the probe gets wrong and the classifier right (top), and the reverse"] = \
            P.plot_image_grid(rows, c.fig("probe_wrong_classifier_right.png"),
                              row_titles=["probe wrong,\nclassifier right", "probe right,\nclassifier wrong"],
                              title=f"{label} (largest classifier - probe gap)", captions=captions)
    return {
        "probe.classifier_test_accuracy_per_label": dict(zip(c.names, map(float, clf_acc))),
        "probe.largest_gap_label": label,
        "probe.largest_gap_probe_wrong_classifier_right": float(len(only_clf) / len(y)),
        "probe.largest_gap_probe_right_classifier_wrong": float(len(only_probe) / len(y)),
    }


# Label pairs the paper cites (Section 4.2) with their correlations beside its own figure.
PAPER_PAIRS = [("Male", "Heavy_Makeup"), ("Attractive", "Wearing_Lipstick")]


def _correlation(c: _Context, emb: Embeddings) -> dict[str, Any]:
    """Correlation of per-label norms against the labels' own correlation, beside the same agreement for
    the classifier's probabilities (a per-label detector with no embedding: the baseline of the claim)."""
    norm_corr, label_corr = M.norm_correlation(emb.E), M.label_correlation(emb.labels)
    prob_corr = M.label_correlation(emb.probs)
    r = M.offdiag_agreement(norm_corr, label_corr)
    pairs = {f"{a}~{b}": {"norms": float(norm_corr[i, j]), "labels": float(label_corr[i, j]),
                          "classifier_probs": float(prob_corr[i, j])}
             for a, b in PAPER_PAIRS if a in c.names and b in c.names
             for i, j in [(c.names.index(a), c.names.index(b))]}
    c.figs["Correlation of per-label embedding norms vs label correlation"] = P.plot_correlation_pair(
        norm_corr, label_corr, c.names, c.fig("correlation_pair.png"), r)
    c.figs["Pearson correlation of per-label embedding norms"] = P.plot_correlation_heatmap(
        norm_corr, c.names, c.fig("norm_correlation.png"), "Pearson correlation of per-label embedding norms")
    np.save(c.fig("norm_correlation.npy"), norm_corr)
    return {"correlation.vs_label_corr_r": r,
            "correlation.classifier_probs_corr_r": M.offdiag_agreement(prob_corr, label_corr),
            "correlation.paper_pairs": pairs}


def pca_label(option: str, names: list[str], train_labels: np.ndarray) -> tuple[str, str]:
    """The label to analyse with PCA, and the rule that chose it."""
    if option != "auto":
        return option, "analysis.pca_label"
    if PAPER_PCA_LABEL in names:
        return PAPER_PCA_LABEL, "auto: the paper's label"
    share = (train_labels == 1).mean(axis=0)
    j = int(np.argmin(np.abs(share - 0.5)))
    return names[j], f"auto: the data has no {PAPER_PCA_LABEL}; the label on the share of training images " \
                     f"closest to one half ({share[j]:.2f})"


def _pca(c: _Context, emb: Embeddings) -> dict[str, Any]:
    """PCA of one label's vectors; test images ranked on the first component."""
    label, rule = pca_label(c.run.cfg.analysis.pca_label, c.names, c.train.labels)
    log.info("PCA of the %s block (%s)", label, rule)
    li = c.names.index(label)
    pca = M.label_pca(emb.E[:, li, :])
    c.figs[f"PCA of {label} embeddings: explained variance"] = P.plot_pca_variance(
        pca["explained_variance_ratio"], c.fig("pca_variance.png"), label)
    proj = (c.test.E[:, li, :] - pca["mean"]) @ pca["components"][0]
    # Only the faces the strip shows are read.
    c.figs[f"Test images ranked by their {label} first-component projection"] = P.plot_ranked_strip(
        lambda idx: split_images(c.run, c.split, c.test.uids[idx]), proj, c.fig("pca_ranked_strip.png"),
        f"Ranked by PC1 of {label}", n=10, value_name="PC1")
    return {"pca.label": label, "pca.label_rule": rule,
            "pca.first_component_auc": M.first_component_auc(proj, c.test.labels[:, li]),
            "pca.explained_variance_ratio": [float(v) for v in pca["explained_variance_ratio"]]}


def _reconstruction(c: _Context, decoder, dec: DecodedSplit) -> tuple[dict[str, Any], np.ndarray]:
    """The split decoded from its embeddings (by the actors of :func:`decode_split`): SSIM/PSNR, and how much of
    each label survives."""
    extra = {}
    if "judge_rec_probs" in dec.probs:
        extra["judge.independent.reconstruction_mean_accuracy"] = M.mean_accuracy(
            dec.probs["judge_rec_probs"], c.test.labels)
    ssim, psnr = dec.ssim_psnr()
    # The classifier on the decoded test faces: how much of each label survives decoding, the
    # ceiling of editing success (edits are judged by this same classifier on decoded faces).
    rec_probs = dec.probs["rec_probs"]
    recall = M.per_label_recall(rec_probs, c.test.labels)
    n_show = min(8, len(c.test))
    with torch.inference_mode():
        x = decoder.target(split_images(c.run, c.split, c.test.uids[:n_show]))
        rec = decoder.reconstruct(torch.from_numpy(c.test.E[:n_show]))
    c.figs["Test originals (top) and their reconstructions from the embedding (bottom)"] = P.plot_image_grid(
        [[x[i].numpy() for i in range(n_show)], [rec[i].numpy() for i in range(n_show)]],
        c.fig("reconstructions.png"), row_titles=["original", "reconstruction"])
    return {
        "reconstruction.test_ssim": float(ssim), "reconstruction.test_psnr": float(psnr),
        "reconstruction.classifier_mean_accuracy": M.mean_accuracy(rec_probs, c.test.labels),
        "reconstruction.label_recall": float(np.nanmean(recall)),
        "reconstruction.label_recall_per_label": {n: float(v) for n, v in zip(c.names, recall)},
        # The originals through the decoded faces' path (centre crop, resized back): what of the gap
        # to classifier.test_mean_accuracy is the decoder's geometry rather than its drawing.
        "reconstruction.classifier_mean_accuracy_cropped_originals": M.mean_accuracy(
            dec.probs["crop_probs"], c.test.labels),
        **extra,
    }, recall


def _editing(c: _Context, decoder, judges: EditJudges, probe: dict[str, Any], recall: np.ndarray,
             independent: bool) -> dict[str, Any]:
    """Per-label Gaussians, then every label added and removed on the first test faces, judged on the decoded faces.

    ``judges``: the actors that decode and judge every edit (on the job's GPUs when it has them); ``decoder``
    draws the figures here.
    """
    run, cfg, seed = c.run, c.run.cfg.analysis, c.run.cfg.seed
    g = M.fit_label_gaussians(c.train.E, M.gaussian_images(c.train.labels, c.train.probs, cfg.edit_gaussians))
    np.savez(c.fig("gaussians.npz"), mean=g["mean"], cov=g["cov"], count=g["count"], label_names=np.array(c.names),
             rule=np.array(cfg.edit_gaussians))
    n_edit = min(cfg.edit_images, len(c.test))
    E0 = c.test.E[:n_edit]
    # Two judges of every edit: the classifier (the paper's judge, and the metric's), and the
    # Siamese network re-embedding the decoded face with the linear probe reading its labels.
    # Each is flattered when the decoder trained through it: decoder.edit_weight > 0 (the
    # default) trains through the Siamese network, decoder.label_weight > 0 through the
    # classifier. With the defaults the classifier is the judge the decoder never saw.

    # On synthetic runs a third: the independent judge, trained on faces whose attributes are independent.
    keys = [editing.CLASSIFIER, editing.REEMBEDDED] + ([editing.INDEPENDENT] if independent else [])

    def judge(batches: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, ...]]:
        for probs, reembedded, *rest in judges.map("judge", batches):
            yield (probs, M.probe_predict(probe, reembedded), *rest)

    # On synthetic data, exact one-attribute edits judged the same way, drawn beside the decoded adds; the
    # faces where they draw something are where the decoded edits are also counted (the *_drawn keys).
    uids = c.test.uids[:n_edit]
    originals = split_images(run, c.split, uids)
    prefixes = [editing.CLASSIFIER[0]] + ([editing.INDEPENDENT[0]] if independent else [])
    read = lambda batches: (dict(zip(prefixes, r)) for r in judges.map("classify", batches))  # noqa: E731
    exact, drawn_on = (editing.exact_edits(read, c.names, uids, originals, seed, c.size)
                       if run.data.get("kind") == "synthetic" else ({}, None))
    out, add_by_label, rem_by_label = editing.edit_success(judge, E0, g, c.names, cfg.edit_scales, seed, keys,
                                                           drawn_on=drawn_on)
    out.update(exact)
    out["editing.gaussians"] = cfg.edit_gaussians
    out["editing.gaussian_images_per_label"] = dict(zip(c.names, g["count"].tolist()))
    d = run.cfg.decoder
    out["editing.decoder_trained_through"] = ", ".join(
        name for name, w in (("siamese (flatters the _reembedded judge)", d.edit_weight),
                             ("classifier (flatters the classifier's judgement)", d.label_weight)) if w > 0
    ) or "neither judge"
    series = {"add (s=1)": add_by_label}
    if exact:
        series["add, exact edits (the face redrawn with the label set)"] = [
            exact["editing.exact_add_success_per_label"].get(n, np.nan) for n in c.names]
    series.update({"remove": rem_by_label, "label seen on decoded faces that have it": recall})
    c.figs["Editing success per label (judged by the classifier on the decoded images)"] = P.plot_per_label_bars(
        series, c.names, c.fig("editing_per_label.png"), "Editing success per label",
        ylabel="fraction of eligible test images", bar=0.7)
    if independent and exact:
        # The decoder's part under a judge that reads each label from its own drawing: decoded adds as a
        # share of what the same judge accepts when the edit is drawn exactly.
        ind = editing.INDEPENDENT[0]
        out[f"{ind}add_over_exact"] = out[f"{ind}add_success"] / max(out[f"{ind}exact_add_success"], 1e-9)
        if f"{ind}add_success_drawn" in out:
            out[f"{ind}add_over_exact_drawn"] = (out[f"{ind}add_success_drawn"]
                                                 / max(out[f"{ind}exact_add_success_drawn"], 1e-9))
        c.figs["Editing success per label under the independent judge"] = P.plot_per_label_bars(
            {"add (s=1)": [out[f"{ind}add_success_per_label"][n] for n in c.names],
             "add (s=1), faces the exact add draws on": [
                 out.get(f"{ind}add_success_drawn_per_label", {}).get(n, np.nan) for n in c.names],
             "add, exact edits": [out[f"{ind}exact_add_success_per_label"][n] for n in c.names],
             "add, exact edits that draw": [out[f"{ind}exact_add_success_drawn_per_label"][n] for n in c.names],
             "remove": [out[f"{ind}remove_success_per_label"][n] for n in c.names]},
            c.names, c.fig("editing_per_label_independent.png"),
            "Editing success per label, independent judge", ylabel="fraction of eligible test images", bar=0.9)
    redraw = (lambda name: synthetic.set_and_render(uids[:4], name, 1, seed, c.size)[0]) if exact else None
    c.figs.update(editing.editing_figures(decoder, g, E0, c.names, cfg.edit_scales, c.fig, seed,
                                          originals=decoder.target(originals[:4]), exact=redraw))
    return out


def _curves(history: list[dict[str, Any]]) -> dict[str, list[float]]:
    keys = [k for k in (history[0] if history else {}) if k.endswith(("loss", "accuracy", "r2", "ssim", "psnr"))
            and isinstance(history[0][k], (int, float))]
    return {k: [float(h.get(k, np.nan)) for h in history] for k in keys}


def _publish(c: _Context, decoder_out: int | None) -> list[str]:
    """Upload the figures, the arrays beside them, then the report that links them by relative path."""
    run = c.run
    storage.makedirs(run.path("analysis"))
    local = os.path.join(c.tmp, "analysis")
    os.makedirs(local, exist_ok=True)
    rel: dict[str, str] = {}
    for title, path in c.figs.items():
        name = os.path.basename(path)
        storage.write_bytes(run.path("analysis", name), open(path, "rb").read())
        os.replace(path, os.path.join(local, name))
        rel[title] = os.path.join(local, name)
    for extra in ("gaussians.npz", "norm_correlation.npy"):
        if os.path.exists(c.fig(extra)):
            storage.write_bytes(run.path("analysis", extra), open(c.fig(extra), "rb").read())
    # This stage's own time is known only after the report is written: leave out an earlier attempt's.
    shown = {k: v for k, v in run.metrics.items() if k != "timing.analysis_seconds"}
    synthetic_data = run.data.get("kind") == "synthetic"
    judge = synthetic_data and run.cfg.analysis.judge_images > 0
    sections = {"How the numbers are measured": measurement_section(run.cfg.analysis.edit_images, c.size,
                                                                    decoder_out, synthetic_data,
                                                                    run.cfg.analysis.split, judge),
                "Run": run_section(run.run_id, run.uri, run.cfg.data.source, run.manifest["stages"])}
    report = write_report(c.tmp, shown, rel, paper_reference=not synthetic_data, extra_sections=sections)
    storage.write_bytes(run.path("report.md"), open(report, "rb").read())
    return sorted(os.path.basename(p) for p in c.figs.values())


def run(run: Run, plan: ResourcePlan) -> dict[str, Any]:
    """The analysis. What sits in this process is the embeddings (N x L x k float32 for every split: about 1 GB
    for CelebA with k=32, and a copy of the train split's) and per-image numbers; the split's images are decoded and judged by Ray Data actors
    (:func:`decode_split`), the edits by a pool of actors (:class:`EditJudges`), each on a GPU share when the job has
    GPUs, and only the faces the figures show are read here."""
    check(run)  # run_pipeline checked already; a direct call too
    torch.set_num_threads(max(1, int(os.cpu_count() or 1)))
    emb = load_embeddings(run.path("embeddings"))
    split = run.cfg.analysis.split  # "test" in a metric's name means this split
    c = _Context(run, run.data["label_names"], run.data["image_size"], emb.select(emb.splits == "train"),
                 emb.select(emb.splits == split), split)
    try:
        return _analyse(c, emb, plan)
    finally:  # the figures' local copies: every one is in the run's analysis/ folder by now
        shutil.rmtree(c.tmp, ignore_errors=True)


def _analyse(c: _Context, emb: Embeddings, plan: ResourcePlan) -> dict[str, Any]:
    run, split = c.run, c.split
    with c.timed("probe"):
        probe, out = _probe(c)
    with c.timed("correlation"):
        out.update(_correlation(c, emb))
    out["analysis.split"] = split
    with c.timed("pca"):
        out.update(_pca(c, emb))
        out.update(_probe_vs_classifier(c, probe))
    # The actors' precision, resolved where they run; the figures' few decodes run here, at this machine's.
    precision = pool_precision(run.cfg.precision, plan)
    here = resolve_precision(run.cfg.precision, "cpu")
    ckpt = {s: run.stage(s).get("checkpoint") for s in ("classifier", "siamese", "decoder")}
    independent = judge_bytes = None
    if run.data.get("kind") == "synthetic" and run.cfg.analysis.judge_images > 0:
        with c.timed("independent_judge"):
            independent, judge_out = independent_judge(
                storage.join(run.output_root, "_judges"), c.names, c.size, run.cfg.analysis.judge_images,
                run.cfg.analysis.judge_epochs, here, plan=plan, setting=run.cfg.precision)
        judge_bytes = save_checkpoint(independent, "classifier")  # the actors load it like a checkpoint file
        out.update(judge_out)
    decoder_out = decoder = None
    if ckpt["decoder"]:
        decoder, dstate = load_for_inference(ckpt["decoder"], here)
        decoder_out = decoder.output_size
    if decoder is not None or judge_bytes is not None:
        with c.timed("decode_split"):
            dec = decode_split(run.read_images([split], plan, ["uid", "image"]), c.test, ckpt["decoder"],
                               ckpt["classifier"], judge_bytes, c.size, decoder_out or 0, plan, precision)
        if judge_bytes is not None:
            out["judge.independent.test_mean_accuracy"] = M.mean_accuracy(dec.probs["judge_probs"], c.test.labels)
    if decoder is not None:
        with c.timed("reconstruction"):
            rec_out, recall = _reconstruction(c, decoder, dec)
        out.update(rec_out)
        c.figs["Decoder training"] = P.plot_training_curves(_curves(dstate.get("history", [])),
                                                            c.fig("decoder_curves.png"))
        with c.timed("editing"):
            judges = EditJudges(plan, precision, decoder=ckpt["decoder"], classifier=ckpt["classifier"],
                                siamese=ckpt["siamese"], others=[judge_bytes] if judge_bytes else [], size=c.size)
            try:
                out.update(_editing(c, decoder, judges, probe, recall, judge_bytes is not None))
            finally:
                judges.close()
    clf_state = checkpoint_state(ckpt["classifier"])  # for its training curves
    siamese, siamese_state = load_for_inference(ckpt["siamese"], here)
    if run.data.get("kind") == "synthetic" and run.cfg.analysis.disentangle_faces > 0:
        with c.timed("disentanglement"):
            out.update(editing.disentanglement(siamese, c.names, c.size, run.cfg.analysis.disentangle_faces,
                                               run.cfg.seed))
    for stage, st in (("classifier", clf_state), ("siamese", siamese_state)):
        c.figs[f"{stage.capitalize()} training"] = P.plot_training_curves(_curves(st.get("history", [])),
                                                                         c.fig(f"{stage}_curves.png"))
    run.record(NAME, out)
    with c.timed("report"):
        figures = _publish(c, decoder_out)
    return {"figures": figures, "report": run.path("report.md"), "precision": precision, "seconds": c.seconds}
