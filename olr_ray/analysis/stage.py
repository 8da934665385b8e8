"""Analysis stage: the paper's experiments on the committed embeddings, figures and report.md.

Everything is computed from the committed embedding Parquet (plus the prepared images for
figures, and the trained models for decoding/editing) and written to ``metrics.json``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from olr_ray import storage
from olr_ray.analysis import load_embeddings
from olr_ray.analysis import metrics as M
from olr_ray.analysis import plots as P
from olr_ray.analysis.report import write_report

log = logging.getLogger("olr_ray.analysis")
EDIT_SHOWCASE = ["Eyeglasses", "Smiling", "Wearing_Hat", "Blond_Hair", "Mouth_Slightly_Open", "Bald"]


def read_split_images(run, plan, split: str, uids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uids, images) of one split, sorted by uid; optionally only the given uids."""
    from olr_ray.pipeline import read_images

    ds = read_images(run, [split], plan, ["uid", "image"])
    out_u, out_i = [], []
    wanted = None if uids is None else set(int(u) for u in uids)
    for b in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        keep = np.ones(len(b["uid"]), bool) if wanted is None else np.isin(b["uid"], list(wanted))
        out_u.append(b["uid"][keep])
        out_i.append(b["image"][keep])
    u, imgs = np.concatenate(out_u), np.concatenate(out_i)
    order = np.argsort(u)
    return u[order], imgs[order]


def _batched(fn, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)]) if len(x) else x


def _as_stored(rec: torch.Tensor, size: int) -> torch.Tensor:
    """Decoded images in [0, 1] (N, 3, out, out) as the dataset stores images: resized back to the
    input size, uint8 NHWC."""
    x = F.interpolate(rec, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255.0).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def classify_reconstruction(classifier, rec: torch.Tensor, size: int) -> np.ndarray:
    """Classifier probabilities on decoded images (resized back to the input size, in [0,1])."""
    return torch.sigmoid(_batched(classifier, _as_stored(rec, size))).numpy()


def reembed(siamese, rec: torch.Tensor, size: int) -> np.ndarray:
    """The Siamese network's embeddings of decoded images (resized and quantised as stored), (N, L, k)."""
    return _batched(siamese, _as_stored(rec, size)).numpy()


def stage_analysis(run, plan) -> dict[str, Any]:
    from olr_ray.models import load_checkpoint

    cfg, info = run.cfg.analysis, run.stage("data")
    names: list[str] = info["label_names"]
    size = info["image_size"]
    torch.set_num_threads(max(1, int(os.cpu_count() or 1)))
    emb = load_embeddings(run.path("embeddings"))
    train, test = emb.select(emb.splits == "train"), emb.select(emb.splits == "test")
    out: dict[str, Any] = {}
    figs: dict[str, str] = {}
    tmp = tempfile.mkdtemp(prefix="olr-analysis-")
    fig = lambda name: os.path.join(tmp, name)  # noqa: E731

    # 1. Linear probe vs the classifier, on the same test images.
    probe = M.linear_probe(train.E, train.labels, test.E, test.labels, epochs=cfg.probe_epochs, seed=run.cfg.seed)
    out["probe.test_mean_accuracy"] = probe["test_mean_accuracy"]
    out["probe.test_balanced_accuracy"] = probe["test_balanced_accuracy"]
    out["classifier.test_mean_accuracy"] = M.mean_accuracy(test.probs, test.labels)
    out["classifier.test_balanced_accuracy"] = M.balanced_accuracy(test.probs, test.labels)
    out["probe.minus_classifier"] = out["probe.test_mean_accuracy"] - out["classifier.test_mean_accuracy"]
    out["probe.test_accuracy_per_label"] = dict(zip(names, map(float, probe["per_label_accuracy"])))

    # 2. Correlation of per-label norms against the labels' own correlation.
    norm_corr, label_corr = M.norm_correlation(emb.E), M.label_correlation(emb.labels)
    out["correlation.vs_label_corr_r"] = M.offdiag_agreement(norm_corr, label_corr)
    figs["Correlation of per-label embedding norms vs label correlation"] = P.plot_correlation_pair(
        norm_corr, label_corr, names, fig("correlation_pair.png"), out["correlation.vs_label_corr_r"])
    figs["Pearson correlation of per-label embedding norms"] = P.plot_correlation_heatmap(
        norm_corr, names, fig("norm_correlation.png"), "Pearson correlation of per-label embedding norms")
    np.save(fig("norm_correlation.npy"), norm_corr)

    # 3. PCA of one label's vectors, test images ranked on the first component.
    from olr_ray.pipeline import check_options_against_data

    check_options_against_data(run, ["analysis"])  # run_pipeline checked already; a direct call too
    pca_label = cfg.pca_label
    li = names.index(pca_label)
    pca = M.label_pca(emb.E[:, li, :])
    out["pca.label"] = pca_label
    out["pca.explained_variance_ratio"] = [float(v) for v in pca["explained_variance_ratio"]]
    figs[f"PCA of {pca_label} embeddings: explained variance"] = P.plot_pca_variance(
        pca["explained_variance_ratio"], fig("pca_variance.png"), pca_label)
    test_uids, test_images = read_split_images(run, plan, "test")
    if not np.array_equal(test_uids, test.uids):
        raise RuntimeError("test images and test embeddings disagree on uids")
    proj = (test.E[:, li, :] - pca["mean"]) @ pca["components"][0]
    figs[f"Test images ranked by their {pca_label} first-component projection"] = P.plot_ranked_strip(
        test_images, proj, fig("pca_ranked_strip.png"), f"Ranked by PC1 of {pca_label}", n=10,
        value_name="PC1")

    # 4. Reconstruction on the test split.
    dec_uri = run.stage("decoder").get("checkpoint")
    decoder_out = None
    clf, _ = load_checkpoint(run.stage("classifier")["checkpoint"])
    if dec_uri:
        decoder, dstate = load_checkpoint(dec_uri)
        decoder_out = decoder.output_size
        Et = torch.from_numpy(test.E)
        rec = _batched(decoder.reconstruct, Et)
        x = decoder.target(test_images)
        ssim, psnr = M.ssim_psnr(rec, x)
        out["reconstruction.test_ssim"], out["reconstruction.test_psnr"] = float(ssim), float(psnr)
        # The classifier on the decoded test faces: how much of each label survives decoding, the
        # ceiling of editing success (edits are judged by this same classifier on decoded faces).
        rec_probs = classify_reconstruction(clf, rec, size)
        rec_recall = M.per_label_recall(rec_probs, test.labels)
        out["reconstruction.classifier_mean_accuracy"] = M.mean_accuracy(rec_probs, test.labels)
        out["reconstruction.label_recall"] = float(np.nanmean(rec_recall))
        out["reconstruction.label_recall_per_label"] = {n: float(v) for n, v in zip(names, rec_recall)}
        # The originals through the decoded faces' path (centre crop, resized back): what of the gap
        # to classifier.test_mean_accuracy is the decoder's geometry rather than its drawing.
        out["reconstruction.classifier_mean_accuracy_cropped_originals"] = M.mean_accuracy(
            classify_reconstruction(clf, x, size), test.labels)
        n_show = min(8, len(x))
        figs["Test originals (top) and their reconstructions from the embedding (bottom)"] = P.plot_image_grid(
            [[x[i].numpy() for i in range(n_show)], [rec[i].numpy() for i in range(n_show)]],
            fig("reconstructions.png"), row_titles=["original", "reconstruction"])
        figs["Decoder training"] = P.plot_training_curves(_curves(dstate.get("history", [])), fig("decoder_curves.png"))

        # 5. Per-label Gaussians, then editing judged by the classifier on the decoded images.
        g = M.fit_label_gaussians(train.E, train.labels)
        np.savez(fig("gaussians.npz"), mean=g["mean"], cov=g["cov"], count=g["count"], label_names=np.array(names))
        n_edit = min(cfg.edit_images, len(test))
        E0 = test.E[:n_edit]
        # Two judges of every edit: the classifier (the paper's judge, and the metric's), and the
        # Siamese network re-embedding the decoded face with the linear probe reading its labels.
        # Each is flattered when the decoder trained through it: decoder.edit_weight > 0 (the
        # default) trains through the Siamese network, decoder.label_weight > 0 through the
        # classifier. With the defaults the classifier is the judge the decoder never saw.
        siamese, _ = load_checkpoint(run.stage("siamese")["checkpoint"])

        def judge(E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            rec_e = _batched(decoder.reconstruct, torch.from_numpy(E))
            return classify_reconstruction(clf, rec_e, size), M.probe_predict(probe, reembed(siamese, rec_e, size))

        base = judge(E0)
        add, rem, keep_add, keep_rem = ([[], []] for _ in range(4))
        add_by_label = np.full(len(names), np.nan)
        rem_by_label = np.full(len(names), np.nan)
        by_scale: dict[float, list[float]] = {s: [] for s in cfg.edit_scales}
        for l in range(len(names)):
            if g["empty"][l]:
                continue
            for s in cfg.edit_scales:
                after = judge(M.edit_embeddings(E0, l, "add", g, scale=s, seed=run.cfg.seed + l))
                r = [M.editing_success(base[j], after[j], l, "add") for j in (0, 1)]
                if not np.isnan(r[0]["target_success"]):
                    by_scale[s].append(r[0]["target_success"])
                if s == 1.0:
                    add_by_label[l] = r[0]["target_success"]
                    for j in (0, 1):
                        if not np.isnan(r[j]["target_success"]):
                            add[j].append(r[j]["target_success"])
                        keep_add[j].append(r[j]["others_preserved"])
            after = judge(M.edit_embeddings(E0, l, "remove", g))
            r = [M.editing_success(base[j], after[j], l, "remove") for j in (0, 1)]
            rem_by_label[l] = r[0]["target_success"]
            for j in (0, 1):
                if not np.isnan(r[j]["target_success"]):
                    rem[j].append(r[j]["target_success"])
                keep_rem[j].append(r[j]["others_preserved"])
        for j, suffix in ((0, ""), (1, "_reembedded")):
            out[f"editing.add_success{suffix}"] = float(np.mean(add[j])) if add[j] else float("nan")
            out[f"editing.remove_success{suffix}"] = float(np.mean(rem[j])) if rem[j] else float("nan")
            keep = keep_add[j] + keep_rem[j]
            out[f"editing.others_preserved{suffix}"] = float(np.nanmean(keep)) if keep else float("nan")
        d = run.cfg.decoder
        out["editing.decoder_trained_through"] = ", ".join(
            name for name, w in (("siamese (flatters the _reembedded judge)", d.edit_weight),
                                 ("classifier (flatters the classifier's judgement)", d.label_weight)) if w > 0) or "neither judge"
        out["editing.add_success_per_label"] = {n: float(v) for n, v in zip(names, add_by_label)}
        out["editing.remove_success_per_label"] = {n: float(v) for n, v in zip(names, rem_by_label)}
        # On synthetic data, exact one-attribute edits judged the same way, drawn beside the decoded adds.
        exact = (_exact_edits(clf, names, test.uids[:n_edit], test_images[:n_edit], run.cfg.seed, size)
                 if info.get("kind") == "synthetic" else {})
        out.update(exact)
        series = {"add (s=1)": add_by_label}
        if exact:
            series["add, exact edits (the face redrawn with the label set)"] = [
                exact["editing.exact_add_success_per_label"].get(n, np.nan) for n in names]
        series.update({"remove": rem_by_label, "label seen on decoded faces that have it": rec_recall})
        figs["Editing success per label (judged by the classifier on the decoded images)"] = P.plot_per_label_bars(
            series,
            names, fig("editing_per_label.png"), "Editing success per label",
            ylabel="fraction of eligible test images", bar=0.7)
        out["editing.add_success_by_scale"] = {str(s): float(np.mean(v)) if v else float("nan") for s, v in by_scale.items()}
        redraw = None
        if exact:
            from olr_ray.data import synthetic

            def redraw(name: str) -> np.ndarray:
                return synthetic.set_and_render(test.uids[:4], name, 1, run.cfg.seed, size)[0]
        figs.update(_editing_figures(decoder, g, E0, names, cfg.edit_scales, fig, run.cfg.seed,
                                     originals=x[:n_edit], exact=redraw))

    # 6. Block disentanglement on the synthetic faces: flip one attribute, measure where E moves.
    if info.get("kind") == "synthetic" and cfg.disentangle_faces > 0:
        out.update(_disentanglement(run, names, size, cfg.disentangle_faces))

    # Training curves of the classifier and the Siamese network.
    for stage in ("classifier", "siamese"):
        _, st = load_checkpoint(run.stage(stage)["checkpoint"])
        figs[f"{stage.capitalize()} training"] = P.plot_training_curves(_curves(st.get("history", [])),
                                                                       fig(f"{stage}_curves.png"))

    run.metrics.update(out)
    # Upload figures, then the report that links them by relative path.
    storage.makedirs(run.path("analysis"))
    rel: dict[str, str] = {}
    for title, path in figs.items():
        name = os.path.basename(path)
        storage.write_bytes(run.path("analysis", name), open(path, "rb").read())
        rel[title] = os.path.join(tmp, "analysis", name)
    for extra in ("gaussians.npz", "norm_correlation.npy"):
        if os.path.exists(fig(extra)):
            storage.write_bytes(run.path("analysis", extra), open(fig(extra), "rb").read())
    os.makedirs(os.path.join(tmp, "analysis"), exist_ok=True)
    for title, path in figs.items():
        os.replace(path, os.path.join(tmp, "analysis", os.path.basename(path)))
    # This stage's own time is known only after the report is written: leave out an earlier attempt's.
    shown = {k: v for k, v in run.metrics.items() if k != "timing.analysis_seconds"}
    report = write_report(tmp, shown, rel, paper_reference=info.get("kind") != "synthetic",
                          extra_sections={"How the numbers are measured": _measurement_section(run, size, decoder_out),
                                          "Run": _run_section(run)})
    storage.write_bytes(run.path("report.md"), open(report, "rb").read())
    return {"figures": sorted(os.path.basename(p) for p in figs.values()), "report": run.path("report.md")}


def _curves(history: list[dict[str, Any]]) -> dict[str, list[float]]:
    keys = [k for k in (history[0] if history else {}) if k.endswith(("loss", "accuracy", "r2", "ssim", "psnr"))
            and isinstance(history[0][k], (int, float))]
    return {k: [float(h.get(k, np.nan)) for h in history] for k in keys}


def _editing_figures(decoder, g, E0, names, scales, fig, seed, originals: torch.Tensor | None = None,
                     exact: Any = None) -> dict[str, str]:
    """Edit grids for a few showcase labels: reconstruction, adds at each scale, remove.

    With ``originals`` (the edited faces as ``decoder.target`` shows them) and ``exact`` (label
    name -> those faces redrawn with the label set, uint8 NHWC, synthetic runs only), each grid
    starts with the original and shows the exact add beside the decoded ones: what a perfect add
    would draw.
    """
    figs = {}
    n = min(4, len(E0))
    shown = [l for l in EDIT_SHOWCASE if l in names][:4] or names[:4]
    for label in shown:
        l = names.index(label)
        if g["empty"][l]:
            continue
        rows, base = [], decoder.reconstruct(torch.from_numpy(E0[:n]))
        cols, titles = [base], ["reconstruction"]
        if originals is not None:
            cols, titles = [originals[:n]] + cols, ["original"] + titles
        for s in scales:
            cols.append(decoder.reconstruct(torch.from_numpy(M.edit_embeddings(E0[:n], l, "add", g, scale=s, seed=seed + l))))
            titles.append(f"+{label} s={s}")
        cols.append(decoder.reconstruct(torch.from_numpy(M.edit_embeddings(E0[:n], l, "remove", g))))
        titles.append(f"-{label}")
        if exact is not None:
            cols.append(decoder.target(exact(label)[:n]))
            titles.append(f"+{label} exact")
        with torch.inference_mode():
            for i in range(n):
                rows.append([c[i].detach().numpy() for c in cols])
        what = "original, reconstruction, " if originals is not None else ""
        what += f"add with s in {list(scales)}, remove" + (", and the exact add (the face redrawn with the label)" if exact is not None else "")
        figs[f"Editing {label}: {what}"] = P.plot_image_grid(
            rows, fig(f"edit_{label}.png"), col_titles=titles, title=f"Editing {label}")
    return figs


def _exact_edits(clf, names: list[str], uids: np.ndarray, stored: np.ndarray, seed: int, size: int
                 ) -> dict[str, Any]:
    """Editing success when decoding loses nothing, on the synthetic faces.

    The generator redraws the same test faces the edits use with only the edited attribute set
    (add) or cleared (remove), and the classifier judges those renders exactly as it judges the
    decoded edits: the share of edits the judge accepts when the one change is drawn perfectly.
    Where the judge reads a label from its correlates (a mustache on a woman's face, which the data
    never shows), even a perfect edit fails. It is a reference, not a bound: a decoder may draw
    correlated cues along with the label (a smile with an open mouth and raised cheeks) and be
    accepted where the exact one-attribute edit is not.
    """
    from olr_ray.data import synthetic

    def judge(images: np.ndarray) -> np.ndarray:
        return torch.sigmoid(_batched(clf, torch.from_numpy(images))).numpy()

    drawn = synthetic.render(synthetic.sample_attributes(seed, uids), seed, uids, size)
    if drawn.shape != stored.shape or not np.array_equal(drawn, stored):
        # Faces from another generator version or seed: the redrawn edits would be of other faces.
        log.warning("exact edits skipped: the generator does not redraw the stored test faces")
        return {}
    base = judge(drawn)
    res: dict[str, dict[str, float]] = {"add": {}, "remove": {}}
    keep: list[float] = []
    for l, name in enumerate(names):
        for mode, value in (("add", 1), ("remove", 0)):
            after = judge(synthetic.set_and_render(uids, name, value, seed, size)[0])
            r = M.editing_success(base, after, l, mode)
            res[mode][name] = r["target_success"]
            keep.append(r["others_preserved"])
    mean = lambda d: float(np.nanmean(list(d.values()))) if any(not np.isnan(v) for v in d.values()) else float("nan")
    return {"editing.exact_add_success": mean(res["add"]),
            "editing.exact_remove_success": mean(res["remove"]),
            "editing.exact_others_preserved": float(np.nanmean(keep)),
            "editing.exact_add_success_per_label": {n: float(v) for n, v in res["add"].items()}}


def _disentanglement(run, names: list[str], size: int, n_faces: int) -> dict[str, Any]:
    from olr_ray.data import synthetic
    from olr_ray.models import load_checkpoint

    siamese, _ = load_checkpoint(run.stage("siamese")["checkpoint"])
    rng = np.random.default_rng(run.cfg.seed + 99)
    idx = 10_000_000 + np.arange(n_faces)  # faces never seen in training
    flips = rng.integers(0, len(names), n_faces)
    E_o, E_f = [], []
    for l in range(len(names)):
        sel = idx[flips == l]
        if len(sel) == 0:
            continue
        orig, flipped, _, _ = synthetic.flip_and_render(sel, names[l], seed=run.cfg.seed, size=size)
        E_o.append(_batched(siamese, torch.from_numpy(orig)).numpy())
        E_f.append(_batched(siamese, torch.from_numpy(flipped)).numpy())
    order = np.concatenate([np.full((flips == l).sum(), l) for l in range(len(names)) if (flips == l).any()])
    Eo, Ef = np.concatenate(E_o), np.concatenate(E_f)
    per = M.own_block_fraction_per_label(Eo, Ef, order)
    return {"disentanglement.own_block_fraction": M.own_block_fraction(Eo, Ef, order),
            "disentanglement.chance_fraction": 1.0 / len(names),
            "disentanglement.own_block_fraction_per_label": {n: float(v) for n, v in zip(names, per) if not np.isnan(v)}}


def _measurement_section(run, size: int, decoder_out: int | None) -> str:
    """What each group of numbers is computed on, in words (the definitions a reader of the numbers needs)."""
    cfg = run.cfg.analysis
    lines = [
        "- **Splits.** The linear probe and the per-label Gaussians are fitted on the train split; every "
        "other number is measured on the test split.",
        "- **Probe vs classifier.** Both are read at 0.5 on the same test images; mean accuracy averages "
        "the per-label accuracies, balanced accuracy the per-label mean of the two class recalls.",
    ]
    if decoder_out:
        lines += [
            f"- **Reconstruction.** The decoder draws {decoder_out}x{decoder_out} pixels; SSIM and PSNR "
            f"compare them with the centre {decoder_out}x{decoder_out} of each {size}x{size} test image. SSIM "
            "has a 7-pixel window below 176 pixels and PSNR pools the squared error over the split, so the "
            "decoder's own `val_ssim`/`val_psnr` (11-pixel window, per-image PSNR) differ slightly.",
            f"- **Editing.** The first {cfg.edit_images} test faces, every label. The classifier judges each "
            f"decoded face resized (bilinear) to {size}x{size} and stored as uint8, at 0.5. *Add* counts the "
            "(face, label) pairs where it does not see the label on the unedited reconstruction and sees it "
            "after the edit (s=1); *remove* the pairs where it sees the label before and not after; *others "
            "preserved* the other labels of each edited face that it reads as on the unedited reconstruction. "
            "Eligibility follows the classifier's reading, not the ground truth, because the edit acts on "
            "the decoded face. The `_reembedded` keys judge the same faces by the Siamese network and the "
            "linear probe instead.",
            "- **Geometry.** The crop and resize alone cost the classifier "
            "`classifier.test_mean_accuracy` minus `reconstruction.classifier_mean_accuracy_cropped_originals` "
            "(the originals judged through the same path), before any decoding.",
        ]
    if run.stage("data").get("kind") == "synthetic":
        lines.append(
            "- **Exact edits** (synthetic data). The generator redraws each edited face with only the label "
            "set (add) or cleared (remove), and the classifier judges the full-size renders; eligibility "
            "follows its reading of the original face. They show what a perfectly drawn one-attribute edit "
            "scores with this judge.")
        lines.append("- **Disentanglement** (synthetic data). The same face redrawn with one attribute flipped "
                     "and re-embedded: the share of the squared change of the embedding that falls in that "
                     "attribute's own block (1/L if it spread evenly).")
    return "\n".join(lines)


def _run_section(run) -> str:
    lines = [f"- run id: `{run.run_id}`", f"- location: `{run.uri}`", f"- data: `{run.cfg.data.source}`"]
    for name, st in run.manifest["stages"].items():
        if st.get("status") == "running":  # this stage: its time lands in manifest.json when it ends
            lines.append(f"- stage {name}: wrote this report (its time: `manifest.json`)")
        elif "seconds" in st:
            lines.append(f"- stage {name}: {st['status']} in {st['seconds']:.1f}s")
    return "\n".join(lines)
