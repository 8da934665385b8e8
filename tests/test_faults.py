"""Reliability under faults: S3 errors on the wire, bad credentials, killed workers and actors.

Faults are real: S3 errors come from an HTTP proxy in front of the moto endpoint
(:mod:`tests.s3proxy`), workers and actors are killed with SIGKILL from outside. The long
ones are marked ``slow`` (``.ci/run`` still runs them).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from olr_ray import storage
from olr_ray.data import synthetic
from tests.conftest import upload_dir
from tests.s3proxy import FaultProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANARY = os.environ["AWS_SECRET_ACCESS_KEY"]


def _job(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``python jobs/full_pipeline.py ...`` in its own process (and its own local Ray)."""
    full_env = {**os.environ, **env}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "full_pipeline.py"), *args], env=full_env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _all_object_bytes(s3_uri: str) -> bytes:
    return b"".join(storage.read_bytes(f) for f in storage.list_files(s3_uri))


# ---------------------------------------------------------------------------------------------
# Bad credentials, access denied, missing bucket: exit non-zero within 60 s, name the operation
# and the URI, never print the secret.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["bad_credentials", "access_denied", "missing_bucket"])
def test_storage_misconfiguration_fails_fast_and_clearly(case, s3_endpoint, s3_bucket):
    env = {"OLR_S3_MAX_ATTEMPTS": "3"}
    bucket = s3_bucket[len("s3://"):]
    output = f"{s3_bucket}/runs"
    with FaultProxy(s3_endpoint, bad_keys=("AKIDBADKEY0000000000",), denied_buckets=(bucket,)) as proxy:
        if case == "bad_credentials":
            env.update(AWS_ENDPOINT_URL_S3=proxy.url,
                       AWS_ACCESS_KEY_ID="AKIDBADKEY0000000000")
            proxy.denied_buckets.clear()
        elif case == "access_denied":
            env.update(AWS_ENDPOINT_URL_S3=proxy.url)
        else:
            output = f"s3://olr-no-such-bucket-{bucket[-6:]}/runs"
        t0 = time.time()
        res = _job(["--preset", "smoke", "--output", output, "--run-id", "r1"], env, timeout=120)
        elapsed = time.time() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f}s"
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{output}/r1" in last, last  # names the URI ...
    assert any(op in last for op in ("stat ", "mkdir ", "write ", "read ", "list ")), last  # ... and the operation
    expected = {"bad_credentials": "InvalidAccessKeyId|ACCESS_DENIED|access key",
                "access_denied": "AccessDenied|ACCESS_DENIED|Access Denied",
                "missing_bucket": "NoSuchBucket|not found|does not exist|NOT_FOUND"}[case]
    assert any(word.lower() in last.lower() for word in expected.split("|")), last
    assert CANARY not in out


# ---------------------------------------------------------------------------------------------
# What cannot be run as asked stops in seconds, before a Ray starts, with one line saying why.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["no_data_folder", "no_data_bucket", "stage_without_its_inputs"])
def test_bad_requests_fail_before_ray_with_one_line(case, tmp_path, s3_bucket):
    args = {"no_data_folder": ["--data", str(tmp_path / "celeb_a")],
            "no_data_bucket": ["--data", f"{s3_bucket}/no-such-prefix"],
            "stage_without_its_inputs": ["--stages", "siamese,embed", "siamese.epochs=1"]}[case]
    t0 = time.time()
    res = _job(["--preset", "smoke", "--output", str(tmp_path / "runs"), "--run-id", "r1", *args], {}, timeout=120)
    elapsed = time.time() - t0
    out = res.stdout + res.stderr
    last = out.strip().splitlines()[-1]
    assert res.returncode == (2 if case == "stage_without_its_inputs" else 1), out[-3000:]
    assert "Traceback" not in out and "Started a local Ray instance" not in out, out[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f}s"
    expected = {"no_data_folder": f"error: {tmp_path / 'celeb_a'}/list_attr_celeba.txt: not found",
                "no_data_bucket": f"error: {s3_bucket}/no-such-prefix/list_attr_celeba.txt: not found",
                "stage_without_its_inputs": "error: --stages siamese: run r1 has not done data, classifier yet"}[case]
    assert last.startswith(expected), last


def test_gpus_no_cluster_has_fail_in_one_line(tmp_path):
    """--use-gpu true where the cluster has no GPU (and no autoscaler to add one): one error line, exit 2."""
    t0 = time.time()
    res = _job(["--preset", "smoke", "--use-gpu", "true", "--output", str(tmp_path / "runs"), "--run-id", "g"], {},
               timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert time.time() - t0 < 60
    assert out.strip().splitlines()[-1].startswith(
        "error: --use-gpu true needs 2 GPU(s) for 2 training worker(s); the cluster has 0"), out[-1000:]


@pytest.mark.parametrize("gpus, workers", [(0, 2), (1, 1), (4, 2)])
def test_auto_gpus_cap_the_workers_to_the_cluster_s(gpus, workers):
    """use_gpu=auto on a cluster of `gpus` GPUs, 2 workers asked: GPU workers capped to the GPUs there are."""
    from olr_ray.runtime import Node, plan_resources

    plan = plan_resources(2, "auto", [Node("head", "10.0.0.1", 16.0, float(gpus))])
    assert plan.use_gpu is (gpus > 0) and plan.num_workers == workers


# ---------------------------------------------------------------------------------------------
# Corrupt input read from S3 through 5% 503 SlowDown: the job completes, errors/ lists exactly
# the bad images, rows + errors = input, every file reads in full, retries are in the manifest.
# The folder has another size and another label set than CelebA: sizes and L follow the data.
# ---------------------------------------------------------------------------------------------

LABELS = ["Male", "Smiling", "Eyeglasses", "Wearing_Hat", "Bald", "Young", "Blond_Hair", "Black_Hair",
          "Mouth_Slightly_Open", "No_Beard"]
RENAMED = [f"attr_{n.lower()}" for n in LABELS]


def _custom_folder(out: str, n: int, size: int) -> tuple[set[str], set[str]]:
    """A CelebA-format folder with 10 renamed labels; 1% undecodable JPEGs and 0.5% missing files."""
    synthetic.write_celeba_folder(out, n=n, size=size, seed=11)
    path = os.path.join(out, "list_attr_celeba.txt")
    lines = open(path).read().splitlines()
    header = lines[1].split()
    cols = [header.index(n) for n in LABELS]
    rows = [lines[0], " ".join(RENAMED)]
    for line in lines[2:]:
        parts = line.split()
        rows.append(" ".join([parts[0]] + [parts[1 + c] for c in cols]))
    open(path, "w").write("\n".join(rows) + "\n")
    ids = sorted(os.listdir(os.path.join(out, "img_align_celeba")))
    rng = np.random.default_rng(0)
    picked = rng.choice(len(ids), size=int(n * 0.01) + int(n * 0.005), replace=False)
    corrupt = {ids[i] for i in picked[: int(n * 0.01)]}
    missing = {ids[i] for i in picked[int(n * 0.01):]}
    for name in corrupt:
        with open(os.path.join(out, "img_align_celeba", name), "r+b") as f:
            f.write(b"\x00" * 64)  # the JPEG header is gone
    for name in missing:
        os.remove(os.path.join(out, "img_align_celeba", name))
    return corrupt, missing


@pytest.mark.slow
def test_job_on_a_corrupt_custom_folder_through_s3_slowdown(tmp_path, s3_endpoint, s3_bucket):
    n, size = 600, 28  # smaller than the smoke preset's 32: the run follows the data
    corrupt, missing = _custom_folder(str(tmp_path / "faces"), n, size)
    upload_dir(str(tmp_path / "faces"), f"{s3_bucket}/faces")
    run = f"{s3_bucket}/runs/faulty"
    with FaultProxy(s3_endpoint, fault_rate=0.05, seed=1) as proxy:
        # Up to the embedding: the stages that read images and write Parquet; the decoder and the
        # analysis are covered by test_pipeline's smoke run (local disk), which keeps CI shorter.
        res = _job(["--preset", "smoke", "--data", f"{s3_bucket}/faces", "--output", f"{s3_bucket}/runs",
                    "--run-id", "faulty", "--stages", "data,classifier,siamese,embed"],
                   {"AWS_ENDPOINT_URL_S3": proxy.url, "OLR_S3_MAX_ATTEMPTS": "8"}, timeout=900)
        faults, requests = proxy.faults, proxy.requests
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert faults > 0 and requests > 100
    # The local Ray serves the state API (its dashboard, on 127.0.0.1), so Ray Train's placement-group
    # cleaner gets its answers instead of warning once a second.
    assert "Failed to query Ray Train Controller" not in out
    # stdout is not a terminal: no progress bars, one line per step (the README's promise for job logs).
    assert "row/s]" not in out and out.count("\n") < 600, out.count("\n")

    manifest = storage.read_json(f"{run}/manifest.json")
    assert [n for n, st in manifest["stages"].items() if st["status"] == "done"] == ["data", "classifier", "siamese",
                                                                                     "embed"]
    assert manifest["storage_retries"]["total"] > 0  # our own counted retries of the injected 503s

    # Exactly the bad images are in errors/, with their reasons; nothing else is missing.
    errors = pq.read_table(storage.resolve(f"{run}/errors/read_errors.parquet")[1],
                           filesystem=storage.resolve(run)[0]).to_pydict()
    reasons = dict(zip(errors["image_id"], errors["reason"]))
    assert set(reasons) == corrupt | missing
    assert all(reasons[i] == "missing file" for i in missing)
    assert all(reasons[i].startswith("undecodable image") for i in corrupt)

    from olr_ray.embeddings import load_embeddings

    emb = load_embeddings(f"{run}/embeddings")
    assert len(emb.ids) + len(reasons) == n and len(set(emb.ids)) == len(emb.ids)
    assert not (set(emb.ids) & set(reasons))
    # Sizes and labels follow the data: 10 renamed labels, 28 px images.
    assert emb.label_names == RENAMED and emb.E.shape[1:] == (10, 8)
    assert manifest["stages"]["data"]["image_size"] == size
    # Every Parquet file of the run reads in full (through the clean endpoint).
    fs = storage.resolve(run)[0]
    for f in storage.list_files(run, ".parquet"):
        t = pq.read_table(storage.resolve(f)[1], filesystem=fs)
        assert t.num_rows == pq.read_metadata(storage.resolve(f)[1], filesystem=fs).num_rows
    metrics = storage.read_json(f"{run}/metrics.json")
    assert set(metrics["classifier.test_mean_accuracy_per_label"]) == set(RENAMED)
    # The canary secret is in no log and no output object.
    assert CANARY not in out
    assert CANARY.encode() not in _all_object_bytes(run)


# ---------------------------------------------------------------------------------------------
# A training worker killed mid-run: Ray Train restarts the group, the loop resumes from the
# last checkpoint, and the result is within the seed-noise band of clean runs.
# ---------------------------------------------------------------------------------------------

def _ours(proc, session_dir: str) -> bool:
    """Whether ``proc`` belongs to this test session's Ray: its raylet (an ancestor) names our session folder.
    Another Ray on the machine (a user's job, a second test run) has workers of the same names."""
    import psutil

    try:
        return any(session_dir in " ".join(parent.cmdline()) for parent in proc.parents())
    except psutil.Error:
        return False


def _kill_when(predicate, needle: str, found: list, deadline: float = 240.0) -> threading.Thread:
    """SIGKILL the first process of this session's Ray whose command line contains ``needle`` once
    ``predicate()`` holds."""
    import psutil
    import ray

    session_dir = ray._private.worker._global_node.get_session_dir_path()

    def run():
        t_end = time.time() + deadline
        while time.time() < t_end and not found:
            if predicate():
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if needle in " ".join(proc.info["cmdline"] or []) and _ours(proc, session_dir):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        found.append(proc.info["pid"])
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_training_survives_a_killed_worker(ray_local, tmp_path):
    from olr_ray.runtime import plan_resources
    from olr_ray.train.driver import fit
    from olr_ray.train.tasks import ClassifierTask

    L = 6
    drawn = synthetic.generate(np.arange(1200), seed=5, size=32)
    rows = [{"image": drawn["image"][i], "labels": drawn["labels"][i, :L].astype(np.int8)} for i in range(1200)]
    data = {"train": ray_local.data.from_items(rows[:1000]), "valid": ray_local.data.from_items(rows[1000:]),
            "test": ray_local.data.from_items(rows[1000:])}

    def run(name: str, seed: int, kill: bool):
        task = ClassifierTask(name=name, model_name="classifier", model_args=dict(num_labels=L, image_size=32, width=8),
                              label_names=[f"l{i}" for i in range(L)], epochs=3, batch_size=16, lr=3e-3, seed=seed,
                              checkpoint_dir=str(tmp_path / name / "classifier"))
        killed: list[int] = []
        if kill:
            first = tmp_path / name / "classifier" / "epoch-0001.pt"
            _kill_when(first.exists, "RayTrainWorker", killed)
        res = fit(task, data, plan_resources(2), str(tmp_path / name), max_failures=1)
        return res, killed

    faulty, killed = run("faulty", 0, kill=True)
    assert killed, "no training worker was found to kill"
    assert [h["epoch"] for h in faulty.history] == [1, 2, 3]
    assert "resumed_after_epoch" not in faulty.history[0]
    assert faulty.history[-1]["resumed_after_epoch"] in (1, 2)  # resumed, not restarted from scratch
    clean = [run(f"clean{s}", s, kill=False)[0] for s in (0, 1)]
    accs = [c.metrics["test_mean_accuracy"] for c in clean]
    band = max(0.02, 2 * abs(accs[0] - accs[1]))
    assert abs(faulty.metrics["test_mean_accuracy"] - accs[0]) <= band, (faulty.metrics["test_mean_accuracy"], accs)


# ---------------------------------------------------------------------------------------------
# An embedding actor killed mid-stage: exact rows, no duplicates, identical embeddings.
# Same seed, same checkpoint: the same content hash (reproducibility on CPU).
# ---------------------------------------------------------------------------------------------

def _content_hash(uri: str) -> str:
    from olr_ray.embeddings import load_embeddings

    emb = load_embeddings(uri)
    order = np.argsort(emb.uids)
    h = hashlib.sha256()
    for arr in (emb.uids[order], emb.E[order], emb.labels[order], emb.probs[order]):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_embedding_survives_a_killed_actor(ray_local, tmp_path):
    import torch

    from olr_ray.models import create_model, save_checkpoint
    from olr_ray.runtime import plan_resources
    from olr_ray.stages.embed import embed_dataset

    L, n = 8, 3000
    names = [f"l{i}" for i in range(L)]
    torch.manual_seed(0)
    for name, args in (("siamese", dict(num_labels=L, k=4, image_size=32, width=8)),
                       ("classifier", dict(num_labels=L, image_size=32, width=8))):
        (tmp_path / f"{name}.pt").write_bytes(save_checkpoint(create_model(name, **args), name))
    drawn = synthetic.generate(np.arange(n), seed=2, size=32)
    rows = [{"uid": i, "image_id": f"{i:06d}.jpg", "split": "train", "labels": drawn["labels"][i, :L].astype(np.int8),
             "image": drawn["image"][i]} for i in range(n)]
    ds = ray_local.data.from_items(rows, override_num_blocks=30)
    plan = plan_resources(2)

    def embed(out: str):
        return embed_dataset(ds, out, str(tmp_path / "siamese.pt"), str(tmp_path / "classifier.pt"), names, 4,
                             "t", plan, batch_size=16, rows_per_file=500)

    clean = embed(str(tmp_path / "clean"))
    killed: list[int] = []
    staged: list[int] = []

    def first_part_written() -> bool:
        # Kill once the stage has written its first part (of n / 500): mid-stage however loaded the machine is.
        staged.append(len(list((tmp_path / "faulty" / "_staging").glob("*/part-*.parquet"))))
        return staged[-1] > 0

    _kill_when(first_part_written, "Embedder", killed, deadline=240)
    faulty = embed(str(tmp_path / "faulty"))
    assert killed, "no embedding actor was found to kill"
    assert 0 < staged[-1] < n // 500, f"the actor was killed after {staged[-1]} of {n // 500} parts"
    assert clean["rows"] == faulty["rows"] == n
    from olr_ray.embeddings import load_embeddings

    ids = load_embeddings(str(tmp_path / "faulty")).ids
    assert len(set(ids)) == n
    assert _content_hash(str(tmp_path / "faulty")) == _content_hash(str(tmp_path / "clean"))
