"""The analysis decodes and judges a split in Ray Data actors: the driver gets the same numbers as decoding the
whole split in one process would give, and its memory does not grow with the split."""

from __future__ import annotations

import threading

import numpy as np
import psutil
import pytest
import torch

from olr_ray.analysis import editing
from olr_ray.analysis import metrics as M
from olr_ray.analysis.decoded import decode_split
from olr_ray.embeddings import Embeddings
from olr_ray.models.nets import Classifier, Decoder, save_checkpoint
from olr_ray.runtime import plan_resources

L, K, SIZE = 6, 8, 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models")
    decoder, clf = Decoder(L, K, image_size=SIZE, width=32, channels=8).eval(), Classifier(L, SIZE, 8).eval()
    for name, m in (("decoder", decoder), ("classifier", clf)):
        (d / f"{name}.pt").write_bytes(save_checkpoint(m, name))
    judge = Classifier(L, SIZE, 8).eval()
    return str(d / "decoder.pt"), str(d / "classifier.pt"), judge, decoder, clf


def _images(uids: np.ndarray) -> np.ndarray:
    return np.stack([np.random.default_rng(int(u)).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for u in uids])


def _split(n: int):
    """A split of ``n`` images drawn inside Ray Data tasks (never in the driver), with random embeddings."""
    import ray

    rng = np.random.default_rng(n)
    uids = np.arange(1000, 1000 + n, dtype=np.int64)
    emb = Embeddings(np.array([f"{u}.jpg" for u in uids]), uids, np.array(["test"] * n),
                     rng.normal(size=(n, L, K)).astype(np.float32), rng.integers(0, 2, (n, L)).astype(np.int8),
                     [f"l{i}" for i in range(L)], K)
    ds = ray.data.range(n).map_batches(lambda b: {"uid": b["id"] + 1000, "image": _images(b["id"] + 1000)},
                                       batch_format="numpy")
    return ds, emb


def test_a_streamed_split_gives_the_whole_split_s_numbers(ray_local, models):
    dec_uri, clf_uri, judge, decoder, clf = models
    ds, emb = _split(300)
    out = decode_split(ds.random_shuffle(seed=1), emb, dec_uri, clf_uri, save_checkpoint(judge, "classifier"), SIZE,
                       decoder.output_size, plan_resources(2, "false"), "fp32")
    np.testing.assert_array_equal(out.uids, emb.uids)
    with torch.inference_mode():
        images = _images(emb.uids)
        x, rec = decoder.target(images), decoder.reconstruct(torch.from_numpy(emb.E))
        ssim, psnr = M.ssim_psnr(rec, x)
        np.testing.assert_allclose(out.ssim_psnr(), (ssim, psnr), rtol=1e-5)
        np.testing.assert_allclose(out.probs["rec_probs"], editing.classify_reconstruction(clf, rec, SIZE), atol=1e-5)
        np.testing.assert_allclose(out.probs["crop_probs"], editing.classify_reconstruction(clf, x, SIZE), atol=1e-5)
        np.testing.assert_allclose(out.probs["judge_probs"], torch.sigmoid(judge(torch.from_numpy(images))).numpy(),
                                   atol=1e-5)


def test_without_a_decoder_the_judge_alone_reads_the_split(ray_local, models):
    """A run with no decoder checkpoint still gets the independent judge's reading of its split."""
    _, clf_uri, judge, _, _ = models
    ds, emb = _split(50)
    out = decode_split(ds, emb, None, clf_uri, save_checkpoint(judge, "classifier"), SIZE, 0,
                       plan_resources(2, "false"), "fp32")
    assert set(out.probs) == {"judge_probs"} and out.ssim is None
    with torch.inference_mode():
        np.testing.assert_allclose(out.probs["judge_probs"],
                                   torch.sigmoid(judge(torch.from_numpy(_images(emb.uids)))).numpy(), atol=1e-5)


def test_an_embedding_row_without_its_image_stops_the_analysis(ray_local, models):
    dec_uri, clf_uri, _, decoder, _ = models
    ds, emb = _split(40)
    with pytest.raises(RuntimeError, match=r"1 embedding row\(s\) of the split have no prepared image \(uid 1039"):
        decode_split(ds.limit(39), emb, dec_uri, clf_uri, None, SIZE, decoder.output_size,
                     plan_resources(2, "false"), "fp32")


def _peak_rss_growth(fn) -> int:
    """The most this process' resident memory rose above where it stood while ``fn`` ran (sampled every 5 ms)."""
    me = psutil.Process()
    base, peak, done = me.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            done.wait(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(0, peak[0] - base)


def test_the_driver_s_memory_does_not_grow_with_the_split(ray_local, models):
    """Decoding 4x the images must not cost the driver more memory: a driver that collected the split would
    hold the extra images' originals and reconstructions as floats (about 180 MB here)."""
    dec_uri, clf_uri, _, decoder, _ = models
    plan = plan_resources(2, "false")

    def run(n: int) -> None:
        ds, emb = _split(n)
        decode_split(ds, emb, dec_uri, clf_uri, None, SIZE, decoder.output_size, plan, "fp32")

    run(200)  # warm: actors, imports, Ray Data's first plan
    small, large = _peak_rss_growth(lambda: run(600)), _peak_rss_growth(lambda: run(2400))
    whole = 1800 * 3 * decoder.output_size ** 2 * 4 * 2  # the extra images' originals and reconstructions
    assert large - small < 0.15 * whole, (small, large, whole)
