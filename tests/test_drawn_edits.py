"""Exact edits that draw nothing (the face already has the label, or another attribute hides it) and the
``*_drawn`` counts that leave them out (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from olr_ray.analysis import editing
from olr_ray.analysis import metrics as M
from olr_ray.data import synthetic

NAMES = [a for a in synthetic.ATTRIBUTES if a not in ("Wearing_Necklace", "Wearing_Necktie")]


def test_adding_a_label_the_face_has_draws_nothing() -> None:
    uids = np.arange(64)
    faces = synthetic.render(synthetic.sample_attributes(0, uids), 0, uids, 64)
    bald, has = synthetic.set_and_render(uids, "Bald", 1, 0, 64)
    already = synthetic.sample_attributes(0, uids)[:, synthetic.ATTRIBUTE_INDEX["Bald"]] == 1
    on = editing.drawn(faces, bald)
    assert not on[already].any()  # nothing to draw where the face is bald already
    assert on[~already].all()  # a bald head replaces the hair on every other face
    assert not editing.drawn(faces, faces).any()


def test_exact_edits_count_only_the_faces_they_draw_on() -> None:
    uids = np.arange(1000, 1096)
    faces = synthetic.render(synthetic.sample_attributes(0, uids), 0, uids, 64)
    truth = synthetic.sample_attributes(0, uids)[:, [synthetic.ATTRIBUTE_INDEX[n] for n in NAMES]]
    # A judge that never sees a label: every face is eligible for every add, and no add succeeds.
    blind = lambda batches: ({"editing.": np.zeros((len(b), len(NAMES)))} for b in batches)  # noqa: E731
    out, on = editing.exact_edits(blind, NAMES, uids, faces, 0, 64)
    assert on is not None and on["add"].shape == (len(uids), len(NAMES))
    assert not on["add"][truth == 1].any() and not on["remove"][truth == 0].any()
    assert 0 < out["editing.exact_add_drawn_share"] < 1
    assert out["editing.exact_add_success"] == 0.0 and out["editing.exact_add_success_drawn"] == 0.0
    # Faces of another generator or seed: no exact edits, and no faces to count on.
    assert editing.exact_edits(blind, NAMES, uids, faces[::-1].copy(), 0, 64) == ({}, None)


def test_decoded_edits_counted_on_the_drawn_faces() -> None:
    rng = np.random.default_rng(0)
    n, L, k = 40, 3, 4
    E0 = 0.01 * rng.standard_normal((n, L, k)).astype(np.float32)
    train = rng.standard_normal((200, L, k)).astype(np.float32) + 3.0
    g = M.fit_label_gaussians(train, np.ones((200, L), np.int8))
    even = np.arange(n) % 2 == 0

    # A judge that sees a label where its block is large, but only on the even faces.
    def judge(batches):
        for E in batches:
            yield ((np.linalg.norm(E, axis=2) > 1.0) & even[:, None]).astype(float),

    for rows, expected in ((even, 1.0), (~even, 0.0)):
        drawn_on = {"add": np.repeat(rows[:, None], L, 1), "remove": np.repeat(rows[:, None], L, 1)}
        out, _, _ = editing.edit_success(judge, E0, g, [f"l{i}" for i in range(L)], [1.0], 0,
                                         keys=[editing.CLASSIFIER], drawn_on=drawn_on)
        assert out["editing.add_success"] == pytest.approx(0.5)
        assert out["editing.add_success_drawn"] == pytest.approx(expected)
        assert out["editing.add_success_drawn_per_label"] == {f"l{i}": pytest.approx(expected) for i in range(L)}
        assert out["editing.add_success_by_scale"] == {"1.0": pytest.approx(0.5)}
        assert out["editing.add_success_drawn_by_scale"] == {"1.0": pytest.approx(expected)}
        # Each edit touches its own block alone, and this judge reads each label from its own block.
        assert out["editing.others_preserved_changed_by_scale"] == {"1.0": pytest.approx(1.0)}
    out, _, _ = editing.edit_success(judge, E0, g, ["a", "b", "c"], [1.0], 0, keys=[editing.CLASSIFIER])
    assert "editing.add_success_drawn" not in out


def test_edits_are_decoded_only_where_a_judge_can_count_them() -> None:
    rng = np.random.default_rng(1)
    n, L, k = 30, 3, 4
    E0 = 0.01 * rng.standard_normal((n, L, k)).astype(np.float32)
    E0[:10, 0] += 5.0  # label 0 present on the first 10 faces
    train = rng.standard_normal((200, L, k)).astype(np.float32) + 3.0
    g = M.fit_label_gaussians(train, np.ones((200, L), np.int8))
    sizes = []

    def reads(E):  # a face-local judge: a label is seen where its block is large
        return (np.linalg.norm(E, axis=2) > 1.0).astype(float)

    def judge(batches):
        for E in batches:
            sizes.append(len(E))
            yield reads(E), reads(E)

    keys = [editing.CLASSIFIER, editing.INDEPENDENT]
    out, _, _ = editing.edit_success(judge, E0, g, ["a", "b", "c"], [1.0], 0, keys=keys)
    # The base, then: add a on its 20 unseen faces, remove a on its 10; add b and c on all 30; nothing to remove.
    assert sizes == [n, 20, 10, n, n]
    # The same numbers as judging every face of every edit.
    base = reads(E0)
    full = [M.editing_success(base, reads(M.edit_embeddings(E0, l, "add", g, seed=l)), l, "add") for l in range(L)]
    assert out["editing.add_success"] == pytest.approx(np.mean([r["target_success"] for r in full]))
    assert out["editing.independent.remove_success"] == pytest.approx(1.0)
    assert out["editing.others_preserved_changed"] == pytest.approx(
        np.mean([r["others_preserved_changed"] for r in full]))
