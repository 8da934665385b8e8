"""The smoke preset end to end (in-process on the session's Ray), and what analysts rely on in its output."""

import json
import math
import os
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from olr_ray.config import build_config
from olr_ray.data.celeba import parse_partition_file
from olr_ray.embeddings import NotCommittedError, embedding_schema, load_embeddings
from olr_ray.models.precision import resolve_precision
from olr_ray.pipeline import check_options_against_data, run_pipeline
from olr_ray.run import Run
from olr_ray.runtime import plan_resources
from olr_ray.stages import STAGES
from olr_ray.stages.embed import embed_dataset

pytestmark = pytest.mark.slow

METRIC_KEYS = [
    "classifier.test_mean_accuracy", "classifier.test_mean_accuracy_per_label", "classifier.majority_baseline",
    "siamese.val_mse", "siamese.dot_r2", "embed.norm_ratio_present_absent",
    "probe.test_mean_accuracy", "probe.test_balanced_accuracy", "correlation.vs_label_corr_r", "pca.label",
    "pca.explained_variance_ratio", "reconstruction.test_ssim", "reconstruction.test_psnr",
    "editing.add_success", "editing.remove_success", "editing.others_preserved",
    "disentanglement.own_block_fraction",
]


@pytest.fixture(scope="module")
def smoke(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config("smoke")
    run = run_pipeline(cfg, str(out), "smoke", progress=lambda m: None)
    return run


def test_run_layout(smoke):
    root = smoke.uri
    for name in ("config.yaml", "manifest.json", "metrics.json", "report.md"):
        assert os.path.isfile(os.path.join(root, name)), name
    for name in ("checkpoints", "embeddings", "errors", "analysis", "data"):
        assert os.path.isdir(os.path.join(root, name)), name
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    assert list(manifest["stages"]) == list(STAGES)
    assert all(s["status"] == "done" and s["seconds"] > 0 for s in manifest["stages"].values())
    assert set(manifest["versions"]) >= {"olr_ray", "ray", "torch"}
    assert manifest["stages"]["data"]["rows"] == 600 and manifest["stages"]["embed"]["rows"] == 600
    # 80/10/10, and every image's split in CelebA's own list_eval_partition.txt format.
    splits = parse_partition_file(open(os.path.join(root, "data", "list_eval_partition.txt")).read())
    assert len(splits) == 600 and dict(Counter(splits.values())) == manifest["stages"]["data"]["splits"]
    assert 30 <= manifest["stages"]["data"]["splits"]["valid"] <= 90
    # Per-epoch validation ran on the valid split; the analysis reports on test.
    assert manifest["stages"]["classifier"]["eval_split"] == manifest["stages"]["siamese"]["eval_split"] == "valid"
    for stage in ("classifier", "siamese", "decoder"):
        assert os.path.isfile(os.path.join(root, "checkpoints", stage, "latest.json"))
    emb = os.path.join(root, "embeddings")
    assert os.path.isfile(os.path.join(emb, "_SUCCESS")) and os.path.isfile(os.path.join(emb, "manifest.json"))
    assert not os.path.exists(os.path.join(emb, "_staging"))
    assert pq.read_table(os.path.join(root, "errors", "read_errors.parquet")).num_rows == 0
    figures = set(os.listdir(os.path.join(root, "analysis")))
    assert {"correlation_pair.png", "pca_ranked_strip.png", "reconstructions.png", "gaussians.npz",
            "probe_vs_classifier.png", "editing_per_label_independent.png"} <= figures
    report = open(os.path.join(root, "report.md")).read()
    assert "analysis/correlation_pair.png" in report and "probe.test_mean_accuracy" in report
    # Edit grids: on synthetic runs each shows the original and the exact add beside the decoded edits.
    assert "edit_Eyeglasses.png" in figures
    assert "### Editing Eyeglasses: original, reconstruction," in report and "the exact add" in report
    # The report is written inside the analysis stage: it names no time for it rather than an old one.
    assert "stage analysis: wrote this report" in report and "timing.analysis_seconds" not in report
    # The definitions a reader needs come with the numbers, with this run's sizes in them.
    assert "## How the numbers are measured" in report and "resized (bilinear) to 32x32" in report
    metrics = json.load(open(os.path.join(root, "metrics.json")))
    assert 0.0 <= metrics["reconstruction.classifier_mean_accuracy_cropped_originals"] <= 1.0


def test_metrics_json_has_every_key(smoke):
    metrics = json.load(open(os.path.join(smoke.uri, "metrics.json")))
    missing = [k for k in METRIC_KEYS if k not in metrics]
    assert not missing, missing
    assert set(metrics["classifier.test_mean_accuracy_per_label"]) == set(smoke.stage("data")["label_names"])
    assert 0 <= metrics["probe.test_mean_accuracy"] <= 1 and -1 <= metrics["correlation.vs_label_corr_r"] <= 1
    # Baselines beside the claims: the classifier's probabilities' agreement r, the paper's pairs, PCA's AUC.
    assert -1 <= metrics["correlation.classifier_probs_corr_r"] <= 1 and 0 <= metrics["pca.first_component_auc"] <= 1
    assert set(metrics["correlation.paper_pairs"]) == {"Male~Heavy_Makeup", "Attractive~Wearing_Lipstick"}
    assert metrics["correlation.paper_pairs"]["Male~Heavy_Makeup"]["labels"] < 0  # no makeup on men in the data
    assert 0 <= metrics["editing.others_preserved_changed"] <= 1 or math.isnan(metrics["editing.others_preserved_changed"])
    # The editing Gaussians: fitted on the train images the classifier confirms, never more than have the label.
    g = np.load(os.path.join(smoke.uri, "analysis", "gaussians.npz"))
    assert metrics["editing.gaussians"] == str(g["rule"]) == "confirmed"
    train = load_embeddings(os.path.join(smoke.uri, "embeddings"), columns=["labels"], split="train").labels
    counts = metrics["editing.gaussian_images_per_label"]
    assert list(counts) == smoke.stage("data")["label_names"] and list(counts.values()) == g["count"].tolist()
    assert all(0 < c <= n or c == n == 0 for c, n in zip(counts.values(), (train == 1).sum(0).tolist()))
    # Synthetic runs also judge exact edits (the face redrawn with the label set), per label.
    for key in ("editing.exact_add_success", "editing.exact_remove_success", "editing.exact_others_preserved"):
        assert 0 <= metrics[key] <= 1, key
    assert set(metrics["editing.exact_add_success_per_label"]) == set(smoke.stage("data")["label_names"])
    # ... and by the independent judge, trained on faces whose attributes are independent, kept for later runs.
    for key in ("judge.independent.heldout_mean_accuracy", "judge.independent.test_mean_accuracy",
                "judge.independent.reconstruction_mean_accuracy", "editing.independent.add_success",
                "editing.independent.remove_success", "editing.independent.exact_add_success"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["editing.independent.add_over_exact"] == pytest.approx(
        metrics["editing.independent.add_success"] / metrics["editing.independent.exact_add_success"])
    # The same counted only on the faces the exact edit draws on (not where the face has the label already).
    assert 0 < metrics["editing.exact_add_drawn_share"] < 1
    for key in ("editing.independent.add_success_drawn", "editing.independent.exact_add_success_drawn",
                "editing.independent.remove_success_drawn", "editing.add_success_drawn"):
        assert 0 <= metrics[key] <= 1 or math.isnan(metrics[key]), key
    # Per add scale, what the adds keep of the other labels beside their success, for every judge.
    scales = {str(s) for s in smoke.cfg.analysis.edit_scales}
    for key in ("editing.others_preserved_changed_by_scale", "editing.independent.others_preserved_changed_by_scale",
                "editing.independent.others_preserved_changed_drawn_by_scale",
                "editing.others_preserved_changed_by_scale_reembedded"):
        assert set(metrics[key]) == scales, key
    assert metrics["judge.independent.cached"] is False
    assert len(os.listdir(os.path.join(os.path.dirname(smoke.uri), "_judges"))) == 1


def test_metrics_are_the_committed_data_s(smoke):
    """The numbers in metrics.json are computed from what was committed, and each key has one writer."""
    from olr_ray.analysis.metrics import mean_accuracy, norm_ratio

    metrics = json.load(open(os.path.join(smoke.uri, "metrics.json")))
    emb = load_embeddings(os.path.join(smoke.uri, "embeddings"))
    test = emb.select(emb.splits == "test")
    acc = float(((test.probs >= 0.5) == (test.labels == 1)).mean())
    # The classifier stage measured its own final model on the test images; the committed probs are
    # that model's, so at most a borderline probability or two may fall the other side of 0.5.
    assert abs(metrics["classifier.test_mean_accuracy"] - acc) <= 2 / test.labels.size
    assert metrics["probe.classifier_test_mean_accuracy"] == pytest.approx(mean_accuracy(test.probs, test.labels))
    assert metrics["probe.minus_classifier"] == pytest.approx(
        metrics["probe.test_mean_accuracy"] - metrics["probe.classifier_test_mean_accuracy"])
    assert metrics["embed.norm_ratio_present_absent"] == pytest.approx(norm_ratio(emb.norms, emb.labels), rel=1e-6)
    assert metrics["embed.norm_ratio_present_absent_test"] == pytest.approx(
        norm_ratio(test.norms, test.labels), rel=1e-6)
    manifest = json.load(open(os.path.join(smoke.uri, "manifest.json")))
    owners = [k for st in manifest["stages"].values() for k in st.get("metric_keys", [])]
    assert len(owners) == len(set(owners)), "a metric key written by two stages"
    assert set(owners) | {f"timing.{s}_seconds" for s in STAGES} == set(metrics)
    for name, st in manifest["stages"].items():
        assert all(k.startswith(f"{name}.") for k in st.get("metric_keys", []) if name != "analysis"), name
    # Every stage that runs a model says at which precision (auto: bf16 where this CPU computes it natively).
    expected = resolve_precision("auto", "cpu")
    assert {s: manifest["stages"][s]["precision"] for s in ("classifier", "siamese", "embed", "decoder", "analysis")} \
        == dict.fromkeys(("classifier", "siamese", "embed", "decoder", "analysis"), expected)
    assert json.load(open(os.path.join(smoke.uri, "embeddings", "manifest.json")))["precision"] == expected
    assert emb.E.dtype == np.float32


def test_a_stage_cannot_overwrite_another_stage_s_metric(tmp_path):
    run = Run(build_config("smoke"), str(tmp_path), "r", manifest={"stages": {"classifier": {}, "analysis": {}}})
    run.record("classifier", {"classifier.test_mean_accuracy": 0.9})
    run.record("classifier", {"classifier.test_mean_accuracy": 0.91})  # a re-run of the same stage
    with pytest.raises(RuntimeError, match=r"analysis would overwrite .*classifier.test_mean_accuracy \(classifier\)"):
        run.record("analysis", {"classifier.test_mean_accuracy": 0.5})
    assert run.metrics == {"classifier.test_mean_accuracy": 0.91}


def test_embedding_schema_and_metadata(smoke):
    manifest = json.load(open(os.path.join(smoke.uri, "embeddings", "manifest.json")))
    names, k = manifest["label_names"], manifest["k"]
    assert len(names) == 38 and k == 8
    f = os.path.join(smoke.uri, "embeddings", manifest["files"][0]["path"])
    schema = pq.read_schema(f)
    assert schema.remove_metadata().equals(embedding_schema(names, k))
    assert schema.field("embedding").type == pa.list_(pa.float32(), 38 * 8)
    assert schema.field("labels").type == pa.list_(pa.int8())
    assert all(not isinstance(t, pa.ExtensionType) for t in schema.types)
    md = {a.decode(): b.decode() for a, b in schema.metadata.items()}
    assert json.loads(md["olr.label_names"]) == names and md["olr.k"] == "8" and md["olr.run_id"] == "smoke"
    assert md["olr.model"].endswith(".pt") and "olr.version" in md
    assert sum(f_["rows"] for f_ in manifest["files"]) == manifest["rows"] == 600


def test_load_embeddings_reads_the_committed_rows(smoke):
    emb = load_embeddings(os.path.join(smoke.uri, "embeddings"))
    assert emb.E.shape == (600, 38, 8) and emb.labels.shape == (600, 38)
    assert len(set(emb.ids)) == 600
    assert np.allclose(np.linalg.norm(emb.E, axis=-1), emb.norms, atol=1e-5)
    test = load_embeddings(os.path.join(smoke.uri, "embeddings"), split="test")
    assert 0 < len(test) < 600 and set(test.splits) == {"test"}


def test_duckdb_query_on_local_output(smoke):
    import duckdb

    glob = os.path.join(smoke.uri, "embeddings", "*.parquet")
    rows = duckdb.sql(f"""
        SELECT image_id, norm_Eyeglasses FROM read_parquet('{glob}')
        WHERE split = 'test' ORDER BY norm_Eyeglasses DESC LIMIT 10""").fetchall()
    assert len(rows) == 10 and rows[0][1] >= rows[-1][1]
    n, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT image_id) FROM read_parquet('{glob}')").fetchone()
    assert n == distinct == 600
    # Fixed-size lists arrive as DuckDB arrays: per-label vectors are sliceable.
    (length,) = duckdb.sql(f"SELECT len(embedding) FROM read_parquet('{glob}') LIMIT 1").fetchone()
    assert length == 38 * 8


def _duckdb_s3():
    import duckdb
    from duckdb_extensions import import_extension

    import_extension("httpfs")
    con = duckdb.connect()
    con.execute("LOAD httpfs")
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"].split("://", 1)[1]
    con.execute(f"""CREATE SECRET (TYPE s3, KEY_ID '{os.environ["AWS_ACCESS_KEY_ID"]}',
        SECRET '{os.environ["AWS_SECRET_ACCESS_KEY"]}', REGION 'us-east-1', ENDPOINT '{endpoint}',
        URL_STYLE 'path', USE_SSL false)""")
    return con


def test_embed_to_s3_is_identical_and_reruns_do_not_duplicate(smoke, s3_bucket):
    """Embed the same images with the same checkpoint straight to S3: same rows, same vectors;
    a second write commits the same rows again, not twice as many; DuckDB reads it over S3."""
    run, plan = smoke, plan_resources(2)
    uri = f"{s3_bucket}/runs/smoke/embeddings"
    args = dict(siamese_uri=run.stage("siamese")["checkpoint"], classifier_uri=run.stage("classifier")["checkpoint"],
                label_names=run.stage("data")["label_names"], k=8, run_id="smoke", plan=plan, batch_size=64,
                rows_per_file=250)
    images = lambda: run.read_images(None, plan, ["uid", "image_id", "split", "labels", "image"])  # noqa: E731
    first = embed_dataset(images(), uri, **args)
    second = embed_dataset(images(), uri, **args)
    assert first["rows"] == second["rows"] == 600
    local, remote = load_embeddings(run.path("embeddings")), load_embeddings(uri)
    assert np.array_equal(local.ids, remote.ids)
    assert np.array_equal(local.E, remote.E)  # two runs from the same checkpoint: identical embeddings
    con = _duckdb_s3()
    n, distinct = con.execute(f"SELECT count(*), count(DISTINCT image_id) FROM read_parquet('{uri}/*.parquet')").fetchone()
    assert n == distinct == 600
    top = con.execute(f"""SELECT image_id FROM read_parquet('{uri}/*.parquet') WHERE split='test'
                          ORDER BY norm_Eyeglasses DESC LIMIT 10""").fetchall()
    assert len(top) == 10


def test_write_killed_before_commit_leaves_nothing_visible(smoke, tmp_path, monkeypatch):
    import olr_ray.stages.embed as E

    def killed(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(E, "commit", killed)
    uri = str(tmp_path / "embeddings")
    run, plan = smoke, plan_resources(2)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(run.read_images(None, plan, ["uid", "image_id", "split", "labels", "image"]), uri,
                      run.stage("siamese")["checkpoint"], run.stage("classifier")["checkpoint"],
                      run.stage("data")["label_names"], 8, "x", plan)
    assert os.listdir(os.path.join(uri, "_staging"))  # the files were written...
    with pytest.raises(NotCommittedError):  # ...but nothing is visible to readers
        load_embeddings(uri)
    import duckdb

    with pytest.raises(duckdb.IOException):
        duckdb.sql(f"SELECT count(*) FROM read_parquet('{uri}/*.parquet')").fetchone()


def test_rerun_with_same_run_id_skips_done_stages(smoke):
    messages = []
    again = run_pipeline(smoke.cfg, os.path.dirname(smoke.uri), "smoke", progress=messages.append)
    assert messages[0] == f"run smoke: {smoke.uri}"  # where the run is, first
    assert all("already done" in m for m in messages[1:]) and len(messages) == len(STAGES) + 1
    assert again.metrics == Run.open(smoke.cfg, os.path.dirname(smoke.uri), "smoke", STAGES).metrics


def test_rerun_with_other_config_is_refused(smoke):
    with pytest.raises(ValueError, match=r"different config: seed \(0 -> 1\)"):
        run_pipeline(build_config("smoke", overrides=["seed=1"]), os.path.dirname(smoke.uri), "smoke")


def test_an_option_naming_a_label_the_data_lacks_fails_before_training(smoke):
    from types import SimpleNamespace

    cfg = build_config("smoke", overrides=["analysis.pca_label=Mouth_Open"])
    run = SimpleNamespace(cfg=cfg, data=smoke.data)
    with pytest.raises(ValueError, match=r"analysis.pca_label='Mouth_Open' is not a label .*Mouth_Slightly_Open"):
        check_options_against_data(run, list(STAGES))
    check_options_against_data(run, ["data", "classifier"])  # no analysis asked for: no PCA label needed
    check_options_against_data(SimpleNamespace(cfg=build_config("smoke"), data=smoke.data), list(STAGES))
    # auto (the default) fits any label set: the paper's label where present, else the most balanced one.
    from olr_ray.stages.analysis import pca_label

    other = SimpleNamespace(cfg=build_config("smoke"), data={"label_names": ["attr_a", "attr_b", "attr_c"]})
    check_options_against_data(other, list(STAGES))
    train = np.array([[1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]])
    assert pca_label("auto", ["attr_a", "attr_b", "attr_c"], train)[0] == "attr_b"  # 0.25 and 0.25: the first
    assert pca_label("auto", ["x", "Mouth_Slightly_Open"], train[:, :2]) == ("Mouth_Slightly_Open",
                                                                            "auto: the paper's label")
    assert smoke.metrics["pca.label"] == "Mouth_Slightly_Open" and smoke.metrics["pca.label_rule"].startswith("auto")


@pytest.mark.parametrize("spelling", ["relative", "absolute", "file://"])
def test_a_new_commit_removes_the_parts_of_the_one_before(tmp_path, monkeypatch, spelling):
    """A re-run of the embed stage names its parts afresh: the earlier commit's parts must go, or a
    `read_parquet('.../embeddings/*.parquet')` counts rows twice, however --output was spelled."""
    from olr_ray import storage
    from olr_ray.embeddings import commit

    monkeypatch.chdir(tmp_path)
    uri = {"relative": "runs/r/embeddings", "absolute": str(tmp_path / "runs/r/embeddings"),
           "file://": f"file://{tmp_path}/runs/r/embeddings"}[spelling]

    def stage_and_commit(uid: int) -> None:
        name = f"part-{uid:010d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"uid": [uid, uid + 1]}), sink)
        storage.write_bytes(storage.join(uri, "_staging", name), sink.getvalue().to_pybytes())
        commit(uri, storage.join(uri, "_staging"), [(name, 2)], {"k": 8})

    stage_and_commit(0)
    stage_and_commit(7)
    folder = tmp_path / "runs" / "r" / "embeddings"
    assert sorted(p.name for p in folder.glob("*.parquet")) == ["part-0000000007.parquet"]
    assert json.load(open(folder / "manifest.json"))["files"] == [{"path": "part-0000000007.parquet", "rows": 2}]
    assert (folder / "_SUCCESS").exists() and not (folder / "_staging").exists()


def test_storage_retries_of_a_training_stage_add_up_over_restarted_attempts():
    from olr_ray.train.driver import FitResult

    # Attempt 1 counted 2 then 5 retries; its worker died, and attempt 2 counted afresh: 1, then 3.
    history = [{"storage_retries": c} for c in (2, 5, 1, 3)]
    assert FitResult({}, "", history).storage_retries == 8
    assert FitResult({}, "", [{"epoch": 1}]).storage_retries == 0


def test_embed_new_images_with_the_trained_run(smoke, tmp_path):
    """jobs/embed.py's work: held-out folders (CelebA format at another size, and plain images with no
    attribute file) embedded with the trained models, one row per readable image, nothing retrained."""
    import shutil

    from olr_ray.data import synthetic
    from olr_ray.embed_job import embed_images
    from olr_ray.embeddings import EmbeddingSet

    before = open(os.path.join(smoke.uri, "manifest.json")).read()
    celeba = tmp_path / "celeba"
    synthetic.write_celeba_folder(str(celeba), 30, size=48, seed=7)  # 48 px: resized to the model's 32
    (celeba / "img_align_celeba" / "000005.jpg").write_bytes(b"not a jpeg")
    out = str(tmp_path / "new" / "embeddings")
    manifest = embed_images(smoke.uri, str(celeba), out, progress=lambda m: None)
    assert manifest["rows"] == 29 and manifest["errors"] == 1 and manifest["trained_run"] == smoke.uri
    errors = pq.read_table(os.path.join(out, "_errors", "read_errors.parquet")).to_pylist()
    assert [e["image_id"] for e in errors] == ["000005.jpg"] and errors[0]["reason"].startswith("undecodable image")
    es = EmbeddingSet(out)
    names = smoke.data["label_names"]
    assert es.label_names == names and es.k == 8 and not os.path.exists(os.path.join(out, "_prepared"))
    t = es.table(["image_id", "label_Smiling", "split"]).sort_by("image_id")
    attrs = open(celeba / "list_attr_celeba.txt").read().splitlines()
    j = attrs[1].split().index("Smiling")
    truth = {ln.split()[0]: int(ln.split()[1 + j] == "1") for ln in attrs[2:]}
    assert t["label_Smiling"].to_pylist() == [truth[i] for i in t["image_id"].to_pylist()]
    assert set(t["split"].to_pylist()) <= {"train", "valid", "test"}  # its own partition file
    # The same image embeds the same way from a plain folder (labels null, ids relative to the folder).
    plain = tmp_path / "plain" / "nested"
    plain.mkdir(parents=True)
    for name in ("000001.jpg", "000002.jpg"):
        shutil.copy(celeba / "img_align_celeba" / name, plain / name)
    out2 = str(tmp_path / "plain-emb")
    assert embed_images(smoke.uri, str(tmp_path / "plain"), out2, progress=lambda m: None)["rows"] == 2
    p = EmbeddingSet(out2)
    assert p.table(["labels"])["labels"].null_count == 2
    assert sorted(p.table(["image_id"])["image_id"].to_pylist()) == ["nested/000001.jpg", "nested/000002.jpg"]
    np.testing.assert_allclose(p.lookup(["nested/000001.jpg"]).E, es.lookup(["000001.jpg"]).E, atol=1e-5)
    assert open(os.path.join(smoke.uri, "manifest.json")).read() == before  # nothing retrained or rewritten
    # The output is a new folder or an earlier commit: never the run itself, nor a folder of other files.
    from olr_ray.run import UsageError

    with pytest.raises(UsageError, match="inside the trained run"):
        embed_images(smoke.uri, str(celeba), os.path.join(smoke.uri, "embeddings"), progress=lambda m: None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "sales.parquet").write_bytes(b"x")
    with pytest.raises(UsageError, match="not an embedding commit"):
        embed_images(smoke.uri, str(celeba), str(tmp_path / "mine"), progress=lambda m: None)
    assert (tmp_path / "mine" / "sales.parquet").exists()
    from olr_ray.cli import embed_main

    # jobs/embed.py's own entry point (in this process: it joins the session's Ray), re-committing out2
    assert embed_main(["--model", smoke.uri, "--data", str(plain.parent), "--output", out2]) == 0
    assert EmbeddingSet(out2).manifest["rows"] == 2 and EmbeddingSet(out2).manifest["source"] == str(plain.parent)
    assert embed_main(["--model", smoke.uri, "--data", str(plain.parent), "--output", out2, "--split", "errors"]) == 2


def test_edit_command_draws_the_grid(smoke, tmp_path):
    import subprocess
    import sys

    from olr_ray.edit import edit

    image = load_embeddings(os.path.join(smoke.uri, "embeddings"), split="test").ids[0]
    res = edit(smoke.uri, [image], add=["Eyeglasses"], remove=["Smiling"], scale=1.5)
    assert set(res.edits) == {"+Eyeglasses", "-Smiling", "all"}
    assert res.originals.shape == res.reconstructions.shape == res.edits["all"].shape
    assert not np.allclose(res.edits["+Eyeglasses"], res.reconstructions)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "grid.png"
    cmd = [sys.executable, os.path.join(root, "jobs", "edit.py"), "--run", smoke.uri, "--image", image,
           "--add", "Eyeglasses", "--remove", "Smiling", "--scale", "1.5", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(cmd[:-6] + ["--add", "Mouth_Open"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --add Mouth_Open: not a label of this run")


def test_dry_run_checks_and_writes_nothing(smoke, tmp_path):
    messages = []
    run = run_pipeline(build_config("smoke"), str(tmp_path), "new", progress=messages.append, dry_run=True)
    assert not os.path.exists(tmp_path / "new") and run.manifest["resources"]["num_workers"] == 2
    assert messages[-1].startswith("dry run: would run data, classifier, siamese, embed, decoder, analysis")
    before = open(os.path.join(smoke.uri, "config.yaml")).read()
    cfg = build_config("smoke", overrides=["analysis.edit_images=8"])
    messages.clear()
    run_pipeline(cfg, os.path.dirname(smoke.uri), "smoke", progress=messages.append, dry_run=True)
    assert open(os.path.join(smoke.uri, "config.yaml")).read() == before
    assert messages[-1].startswith("dry run: would run analysis (done already: data, classifier, siamese")


def test_a_refused_resume_changes_nothing(smoke):
    """Checks run before a resume writes: an analysis option the data cannot take leaves the run as it was."""
    files = {n: open(os.path.join(smoke.uri, n)).read() for n in ("config.yaml", "metrics.json", "manifest.json")}
    cfg = build_config("smoke", overrides=["analysis.pca_label=Nope"])
    with pytest.raises(ValueError, match="analysis.pca_label='Nope' is not a label"):
        run_pipeline(cfg, os.path.dirname(smoke.uri), "smoke", progress=lambda m: None)
    assert {n: open(os.path.join(smoke.uri, n)).read() for n in files} == files


def test_a_trained_run_finds_its_checkpoints_wherever_it_was_written_from():
    from olr_ray.trained import TrainedRun

    run = TrainedRun("s3://b/copied/r1", {"stages": {"siamese": {"checkpoint": "./runs/r1/checkpoints/siamese/e-2.pt"}}})
    assert run.checkpoint("siamese") == "s3://b/copied/r1/checkpoints/siamese/e-2.pt"


def test_dry_run_command_lists_no_outputs(ray_local, tmp_path, capsys):
    from olr_ray.cli import main

    assert main(["--preset", "smoke", "--output", str(tmp_path), "--run-id", "d", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: would run data, classifier" in out and "outputs:" not in out
    assert not (tmp_path / "d").exists()


# Last in this module: it changes the shared smoke run's config.
def test_resume_follows_what_changes_results(smoke):
    """Workers and inference batch sizes never block a resume; the analysis' options re-run the analysis alone."""
    out = os.path.dirname(smoke.uri)
    messages = []
    run_pipeline(build_config("smoke", overrides=["num_workers=1", "embed.batch_size=32"]), out, "smoke",
                 progress=messages.append)
    assert sum("already done" in m for m in messages) == len(STAGES)
    messages.clear()
    cfg = build_config("smoke", overrides=["num_workers=1", "embed.batch_size=32", "analysis.edit_images=8"])
    again = run_pipeline(cfg, out, "smoke", progress=messages.append)
    assert [m for m in messages if "already done" in m] == [f"[{s}] already done in this run; skipping"
                                                            for s in STAGES[:-1]]
    assert "[analysis] done in" in messages[-1]
    manifest = json.load(open(os.path.join(smoke.uri, "manifest.json")))
    assert [list(r["changed"]) for r in manifest["resumed_with"]] == [
        ["embed.batch_size", "num_workers"], ["analysis.edit_images"]]
    assert "edit_images: 8" in open(os.path.join(smoke.uri, "config.yaml")).read()
    assert again.metrics["probe.test_mean_accuracy"] == pytest.approx(smoke.metrics["probe.test_mean_accuracy"])


def test_the_analysis_measures_on_the_split_it_is_given(smoke, tmp_path):
    """analysis.split=valid re-runs the analysis alone on the validation images, and metrics.json says so."""
    from olr_ray.analysis.metrics import mean_accuracy

    shutil.copytree(smoke.uri, tmp_path / "smoke")
    shutil.copytree(os.path.join(os.path.dirname(smoke.uri), "_judges"), tmp_path / "_judges")
    messages = []
    run = run_pipeline(build_config("smoke", overrides=["analysis.split=valid"]), str(tmp_path), "smoke",
                       progress=messages.append)
    assert sum("already done" in m for m in messages) == len(STAGES) - 1
    assert run.metrics["analysis.split"] == "valid" and smoke.metrics["analysis.split"] == "test"
    emb = load_embeddings(os.path.join(smoke.uri, "embeddings"))
    valid = emb.select(emb.splits == "valid")
    assert run.metrics["probe.classifier_test_mean_accuracy"] == pytest.approx(mean_accuracy(valid.probs, valid.labels))
    assert "| `analysis.split` | valid |" in open(tmp_path / "smoke" / "report.md").read()
    # The independent judge was read from the output folder, not trained again.
    assert run.metrics["judge.independent.cached"] is True
    assert run.metrics["judge.independent.heldout_mean_accuracy"] == smoke.metrics["judge.independent.heldout_mean_accuracy"]


def test_a_split_is_kept_in_the_object_store_only_when_it_fits(smoke, monkeypatch, caplog):
    """Epoch after epoch the classifier and the Siamese pairs read the train split; a small one is read once,
    one that would crowd the object store streams from storage every pass."""
    from ray.data.dataset import MaterializedDataset

    import olr_ray.run as run_module

    run = Run.open(smoke.cfg, os.path.dirname(smoke.uri), "smoke", STAGES)
    plan = plan_resources(2, "false")
    cached = run.read_images(["train"], plan, ["uid", "image"], cache=True)
    assert isinstance(cached, MaterializedDataset) and cached.count() == smoke.stage("data")["splits"]["train"]
    monkeypatch.setattr(run_module, "CACHE_SHARE", 1e-9)
    with caplog.at_level("INFO", logger="olr_ray"):
        streamed = run.read_images(["train"], plan, ["uid", "image"], cache=True)
    assert not isinstance(streamed, MaterializedDataset)
    assert "stream from storage every pass" in caplog.text
    assert streamed.count() == cached.count()


def test_decoder_pairs_each_image_with_its_own_embedding_and_refuses_a_missing_one(smoke):
    """The decoder trains on (image, embedding) pairs looked up by uid: each image gets its committed row,
    and an image with no committed embedding stops the stage instead of being dropped."""
    import ray

    from olr_ray.stages.analysis import split_images
    from olr_ray.stages.decoder import _attach_embeddings, embedding_image_pairs

    run = Run.open(smoke.cfg, os.path.dirname(smoke.uri), "smoke", STAGES)
    emb = load_embeddings(os.path.join(smoke.uri, "embeddings"), split="test")
    rows = embedding_image_pairs(run, plan_resources(2, "false"), "test", limit=5).take_all()
    assert len(rows) == 5
    assert {int(r["uid"]) for r in rows} == set(emb.uids[:5].tolist())  # the first rows by uid
    by_uid = dict(zip(emb.uids.tolist(), emb.E.reshape(len(emb), -1)))
    images = dict(zip(emb.uids[:5].tolist(), split_images(run, "test", emb.uids[:5])))
    for r in rows:
        np.testing.assert_array_equal(r["embedding"], by_uid[int(r["uid"])])
        np.testing.assert_array_equal(r["image"], images[int(r["uid"])])
    table = ray.put((emb.uids[1:], emb.E[1:].reshape(len(emb) - 1, -1), emb.labels[1:]))
    with pytest.raises(RuntimeError, match=rf"1 prepared image\(s\) have no committed embedding \(uid {emb.uids[0]}"):
        _attach_embeddings({"uid": emb.uids[:3], "image": np.zeros((3, 2, 2, 3), np.uint8)}, table)
