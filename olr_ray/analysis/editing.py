"""Decoded faces judged by the trained networks: reconstruction, editing (paper 4.5) and, on the
synthetic faces, exact one-attribute edits and block disentanglement."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from olr_ray.analysis import metrics as M
from olr_ray.analysis import plots as P
from olr_ray.data import synthetic

log = logging.getLogger("olr_ray.analysis")
EDIT_SHOWCASE = ["Eyeglasses", "Smiling", "Wearing_Hat", "Blond_Hair", "Mouth_Slightly_Open", "Bald"]


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)]) if len(x) else x


def as_stored(rec: torch.Tensor, size: int) -> torch.Tensor:
    """Decoded images in [0, 1] (N, 3, out, out) as the dataset stores images: resized back to the
    input size, uint8 NHWC."""
    x = F.interpolate(rec, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255.0).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def classify_reconstruction(classifier, rec: torch.Tensor, size: int) -> np.ndarray:
    """Classifier probabilities on decoded images (resized back to the input size, in [0,1])."""
    return torch.sigmoid(batched(classifier, as_stored(rec, size))).float().cpu().numpy()


def judge_decoded(classifier, siamese, rec: torch.Tensor, size: int, *others) -> tuple[np.ndarray, ...]:
    """Decoded images (resized and quantised as stored, once) read by every judge: the classifier's
    probabilities (N, L), the Siamese network's embeddings (N, L, k), then each of ``others``' probabilities."""
    stored = as_stored(rec, size)
    host = lambda t: t.float().cpu().numpy()  # noqa: E731
    return (host(torch.sigmoid(batched(classifier, stored))), host(batched(siamese, stored)),
            *(host(torch.sigmoid(batched(m, stored))) for m in others))


# Where each judge's verdicts go in metrics.json: (prefix, suffix) around the metric's name.
CLASSIFIER, REEMBEDDED, INDEPENDENT = ("editing.", ""), ("editing.", "_reembedded"), ("editing.independent.", "")


# An exact edit draws on a face when it changes at least DRAWN_SHARE of its pixels (8 of a 64 px face) by more
# than DRAWN_LEVEL of 255 in some channel. Adding a label the face already has, or one that another attribute
# hides (earrings under long hair, lipstick under a beard), draws nothing: no judge can see such an edit.
DRAWN_LEVEL = 24
DRAWN_SHARE = 8 / 64**2


def drawn(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(N,) bool: the faces where ``after`` differs visibly from ``before`` (uint8 NHWC renders of the same faces)."""
    moved = np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=-1) > DRAWN_LEVEL
    return moved.mean(axis=(1, 2)) >= DRAWN_SHARE


def _on(rows: np.ndarray, pb: np.ndarray, pa: np.ndarray, l: int, mode: str) -> dict[str, float]:
    """:func:`M.editing_success` over the faces ``rows`` only."""
    return M.editing_success(pb[rows], pa[rows], l, mode)


def edit_success(judge: Callable[[Iterable[np.ndarray]], Iterator[tuple[np.ndarray, ...]]], E0: np.ndarray,
                 g: dict[str, np.ndarray], names: list[str], scales: Sequence[float], seed: int,
                 keys: Sequence[tuple[str, str]] = (CLASSIFIER, REEMBEDDED),
                 drawn_on: dict[str, np.ndarray] | None = None,
                 ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Every label added (at each scale) and removed on the faces ``E0``, each edit judged by every judge.

    ``judge(Es)`` reads the decoded faces of each embedding batch of ``Es`` (an iterable, consumed as the
    judge goes, so it may read several at once) and yields, in ``Es``' order, one reading per judge, (N, L)
    probabilities each, in the order of ``keys``: the classifier's (the paper's judge, and the unsuffixed
    keys), the Siamese network's re-embedding read by the linear probe (``_reembedded`` keys) and, on
    synthetic runs, the independent judge's (``editing.independent.*``). With ``drawn_on`` (synthetic runs:
    mode -> (N, L) bool, where the exact edit draws on the face, from :func:`exact_edits`), the add (s=1) and
    remove verdicts are also counted over those faces alone (``*_drawn`` keys), the faces where the exact edit
    is counted. Per scale, the adds' success and what they keep of the other labels (``*_by_scale``: over the
    adds that changed their target). An edit is decoded only on the faces some judge can count it on;
    ``others_preserved`` is over those faces (``others_preserved_changed`` over the edits that changed their
    target). Returns the metrics and the per-label add (s=1) and remove success of the
    first judge.
    """
    n = len(keys)
    add, rem, keep, keep_changed = ({j: [] for j in range(n)} for _ in range(4))
    add_d, rem_d, keep_changed_d = ({j: [] for j in range(n)} for _ in range(3))
    add_by_label, rem_by_label = np.full((n, len(names)), np.nan), np.full((n, len(names)), np.nan)
    add_by_label_d = np.full((n, len(names)), np.nan)
    # Add success at every scale, per judge: over every eligible face, and over the drawn ones.
    by_scale = {j: {s: [] for s in scales} for j in range(n)}
    by_scale_d = {j: {s: [] for s in scales} for j in range(n)}
    # And what the adds at each scale keep of the other labels (over the edits that changed their target).
    kept_by_scale = {j: {s: [] for s in scales} for j in range(n)}
    kept_by_scale_d = {j: {s: [] for s in scales} for j in range(n)}

    def collect(r: list[dict[str, float]], into: dict[int, list[float]], kept: dict[int, list[float]] | None,
                kept_changed: dict[int, list[float]]) -> None:
        for j in range(n):
            if not np.isnan(r[j]["target_success"]):
                into[j].append(r[j]["target_success"])
            if kept is not None:
                kept[j].append(r[j]["others_preserved"])
            kept_changed[j].append(r[j]["others_preserved_changed"])

    base = next(iter(judge([E0])))
    seen = np.stack([b >= M.EDIT_THRESHOLD for b in base])  # (judges, N, L), as M.editing_success reads them
    # Every edit, in order: each label added at every scale, then removed. Each is decoded only on the faces some
    # judge can count it on (add: a judge does not see the label; remove: one does), the only faces any key
    # but others_preserved reads: about a third fewer decodes than every face for every edit.
    edits = [(l, mode, s, np.flatnonzero(~seen[:, :, l].all(0) if mode == "add" else seen[:, :, l].any(0)))
             for l in map(int, np.flatnonzero(~g["empty"]))
             for mode, s in [*(("add", s) for s in scales), ("remove", None)]]
    readings = judge(
        (M.edit_embeddings(E0, l, "remove", g) if mode == "remove" else
         M.edit_embeddings(E0, l, "add", g, scale=s, seed=seed + l))[rows]  # each face keeps its own sample
        for l, mode, s, rows in edits if len(rows))
    nothing = {"target_success": float("nan"), "others_preserved": float("nan"),
               "others_preserved_changed": float("nan")}
    for l, mode, s, rows in edits:
        if not len(rows):
            r, rd = [nothing] * n, (None if drawn_on is None else [nothing] * n)
        else:
            after = next(readings)
            r = [M.editing_success(base[j][rows], after[j], l, mode) for j in range(n)]
            d = None if drawn_on is None else drawn_on[mode][rows, l]
            rd = None if d is None else [_on(d, base[j][rows], after[j], l, mode) for j in range(n)]
        if mode == "add":
            for j in range(n):
                for into, kept_into, rr in ((by_scale, kept_by_scale, r), (by_scale_d, kept_by_scale_d, rd)):
                    if rr is None:
                        continue
                    if not np.isnan(rr[j]["target_success"]):
                        into[j][s].append(rr[j]["target_success"])
                    kept_into[j][s].append(rr[j]["others_preserved_changed"])
            if s == 1.0:
                add_by_label[:, l] = [v["target_success"] for v in r]
                collect(r, add, keep, keep_changed)
                if rd is not None:
                    add_by_label_d[:, l] = [v["target_success"] for v in rd]
                    collect(rd, add_d, None, keep_changed_d)
        else:
            rem_by_label[:, l] = [v["target_success"] for v in r]
            collect(r, rem, keep, keep_changed)
            if rd is not None:
                collect(rd, rem_d, None, keep_changed_d)
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    # Over the edits that changed their target: an edit that does nothing keeps everything else too.
    kept = lambda v: mean([x for x in v if not np.isnan(x)])  # noqa: E731
    out: dict[str, Any] = {}
    for j, (prefix, suffix) in enumerate(keys):
        out[f"{prefix}add_success{suffix}"] = mean(add[j])
        out[f"{prefix}remove_success{suffix}"] = mean(rem[j])
        out[f"{prefix}others_preserved{suffix}"] = float(np.nanmean(keep[j])) if keep[j] else float("nan")
        out[f"{prefix}others_preserved_changed{suffix}"] = kept(keep_changed[j])
        if drawn_on is not None:
            out[f"{prefix}add_success_drawn{suffix}"] = mean(add_d[j])
            out[f"{prefix}remove_success_drawn{suffix}"] = mean(rem_d[j])
            out[f"{prefix}others_preserved_changed_drawn{suffix}"] = kept(keep_changed_d[j])
        if not suffix:
            out[f"{prefix}add_success_per_label"] = {nm: float(v) for nm, v in zip(names, add_by_label[j])}
            out[f"{prefix}remove_success_per_label"] = {nm: float(v) for nm, v in zip(names, rem_by_label[j])}
            if drawn_on is not None:
                out[f"{prefix}add_success_drawn_per_label"] = {
                    nm: float(v) for nm, v in zip(names, add_by_label_d[j])}
        out[f"{prefix}add_success_by_scale{suffix}"] = {str(s): mean(v) for s, v in by_scale[j].items()}
        out[f"{prefix}others_preserved_changed_by_scale{suffix}"] = {
            str(s): kept(v) for s, v in kept_by_scale[j].items()}
        if drawn_on is not None:
            out[f"{prefix}add_success_drawn_by_scale{suffix}"] = {str(s): mean(v) for s, v in by_scale_d[j].items()}
            out[f"{prefix}others_preserved_changed_drawn_by_scale{suffix}"] = {
                str(s): kept(v) for s, v in kept_by_scale_d[j].items()}
    return out, add_by_label[0], rem_by_label[0]


def exact_edits(judge: Callable[[Iterable[np.ndarray]], Iterator[dict[str, np.ndarray]]], names: list[str],
                uids: np.ndarray, stored: np.ndarray, seed: int, size: int
                ) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Editing success when decoding loses nothing, on the synthetic faces.

    The generator redraws the same test faces the edits use with only the edited attribute set
    (add) or cleared (remove), and each judge reads those renders exactly as it reads the decoded edits
    (``judge(batches)``: for each uint8 NHWC batch, in order, metric prefix -> probabilities; the batches are
    drawn as the judge consumes them): the share of edits the judge accepts when the one change
    is drawn perfectly. Where a judge reads a label from its correlates (a mustache on a woman's face, which
    the data never shows), even a perfect edit fails. It is a reference, not a bound: a decoder may draw
    correlated cues along with the label (a smile with an open mouth and raised cheeks) and be
    accepted where the exact one-attribute edit is not.

    An eligible face (the judge does not see the label) may have the label already, drawn where the judge
    misses it, or have it hidden by another attribute: the exact edit then draws nothing (:func:`drawn`). The
    ``*_drawn`` keys count only the faces where it draws something, ``editing.exact_*_drawn_share`` says how
    many (face, label) edits those are. Returns the metrics and, per mode, the (N, L) faces it draws on
    (None where the generator does not redraw the stored faces).
    """
    faces = synthetic.render(synthetic.sample_attributes(seed, uids), seed, uids, size)
    if faces.shape != stored.shape or not np.array_equal(faces, stored):
        # Faces from another generator version or seed: the redrawn edits would be of other faces.
        log.warning("exact edits skipped: the generator does not redraw the stored test faces")
        return {}, None
    on = {mode: np.zeros((len(uids), len(names)), bool) for mode in ("add", "remove")}
    edits = [(l, name, mode, value) for l, name in enumerate(names) for mode, value in (("add", 1), ("remove", 0))]

    def batches() -> Iterator[np.ndarray]:
        yield faces
        for l, name, mode, value in edits:
            edited = synthetic.set_and_render(uids, name, value, seed, size)[0]
            on[mode][:, l] = drawn(faces, edited)
            yield edited

    readings = judge(batches())
    base = next(readings)
    judges = list(base)
    res = {p: {"add": {}, "remove": {}, "add_drawn": {}, "remove_drawn": {}} for p in judges}
    keep: dict[str, list[float]] = {p: [] for p in judges}
    for (l, name, mode, _), after in zip(edits, readings):
        for p in judges:
            r = M.editing_success(base[p], after[p], l, mode)
            res[p][mode][name] = r["target_success"]
            res[p][f"{mode}_drawn"][name] = _on(on[mode][:, l], base[p], after[p], l, mode)["target_success"]
            keep[p].append(r["others_preserved"])
    mean = lambda d: float(np.nanmean(list(d.values()))) if any(not np.isnan(v) for v in d.values()) else float("nan")  # noqa: E731
    out: dict[str, Any] = {f"editing.exact_{mode}_drawn_share": float(on[mode].mean()) for mode in on}
    for p in judges:
        out.update({f"{p}exact_add_success": mean(res[p]["add"]),
                    f"{p}exact_remove_success": mean(res[p]["remove"]),
                    f"{p}exact_add_success_drawn": mean(res[p]["add_drawn"]),
                    f"{p}exact_remove_success_drawn": mean(res[p]["remove_drawn"]),
                    f"{p}exact_others_preserved": float(np.nanmean(keep[p])),
                    f"{p}exact_add_success_per_label": {n: float(v) for n, v in res[p]["add"].items()},
                    f"{p}exact_add_success_drawn_per_label": {n: float(v) for n, v in res[p]["add_drawn"].items()}})
    return out, on


def editing_figures(decoder, g, E0, names, scales, fig, seed, originals: torch.Tensor | None = None,
                    exact: Callable[[str], np.ndarray] | None = None) -> dict[str, str]:
    """Edit grids for a few showcase labels: reconstruction, adds at each scale, remove.

    With ``originals`` (the edited faces as ``decoder.target`` shows them) and ``exact`` (label
    name -> those faces redrawn with the label set, uint8 NHWC, synthetic runs only), each grid
    starts with the original and shows the exact add beside the decoded ones: what a perfect add
    would draw.
    """
    figs = {}
    n = min(4, len(E0))
    decode = lambda E: decoder.reconstruct(torch.from_numpy(E))  # noqa: E731
    shown = [l for l in EDIT_SHOWCASE if l in names][:4] or names[:4]
    for label in shown:
        l = names.index(label)
        if g["empty"][l]:
            continue
        cols, titles = [decode(E0[:n])], ["reconstruction"]
        if originals is not None:
            cols, titles = [originals[:n]] + cols, ["original"] + titles
        for s in scales:
            cols.append(decode(M.edit_embeddings(E0[:n], l, "add", g, scale=s, seed=seed + l)))
            titles.append(f"+{label} s={s}")
        cols.append(decode(M.edit_embeddings(E0[:n], l, "remove", g)))
        titles.append(f"-{label}")
        if exact is not None:
            cols.append(decoder.target(exact(label)[:n]))
            titles.append(f"+{label} exact")
        with torch.inference_mode():
            rows = [[c[i].detach().numpy() for c in cols] for i in range(n)]
        what = "original, reconstruction, " if originals is not None else ""
        what += f"add with s in {list(scales)}, remove" + (
            ", and the exact add (the face redrawn with the label)" if exact is not None else "")
        figs[f"Editing {label}: {what}"] = P.plot_image_grid(
            rows, fig(f"edit_{label}.png"), col_titles=titles, title=f"Editing {label}")
    return figs


def disentanglement(siamese, names: list[str], size: int, n_faces: int, seed: int) -> dict[str, Any]:
    """Faces never seen in training redrawn with one attribute flipped and re-embedded: the share of
    the embedding's squared change that lands in that attribute's own block."""
    rng = np.random.default_rng(seed + 99)
    idx = 10_000_000 + np.arange(n_faces)  # faces never seen in training
    flips = rng.integers(0, len(names), n_faces)
    E_o, E_f = [], []
    for l in range(len(names)):
        sel = idx[flips == l]
        if len(sel) == 0:
            continue
        orig, flipped, _, _ = synthetic.flip_and_render(sel, names[l], seed=seed, size=size)
        E_o.append(batched(siamese, torch.from_numpy(orig)).numpy())
        E_f.append(batched(siamese, torch.from_numpy(flipped)).numpy())
    order = np.concatenate([np.full((flips == l).sum(), l) for l in range(len(names)) if (flips == l).any()])
    Eo, Ef = np.concatenate(E_o), np.concatenate(E_f)
    per = M.own_block_fraction_per_label(Eo, Ef, order)
    return {"disentanglement.own_block_fraction": M.own_block_fraction(Eo, Ef, order),
            "disentanglement.chance_fraction": 1.0 / len(names),
            "disentanglement.own_block_fraction_per_label": {n: float(v) for n, v in zip(names, per) if not np.isnan(v)}}
