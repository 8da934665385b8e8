"""Two Ray nodes on one machine (two raylets on 127.0.0.1, token authentication on): a local output that one
node cannot see is refused before any work, and a run whose second node dies mid-training completes on the
node left, from the last checkpoint, with one committed row per image.

The second node lives in a mount namespace of its own where one folder is an empty tmpfs: a local output
there is what a node-local disk is on a real cluster. (The smoke job on two nodes through S3 is in
test_job_submit.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.raycluster import ray_cluster

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    logs = tmp_path_factory.mktemp("two-nodes")
    private = f"/tmp/olr-private-{os.getpid()}"
    # A placement Ray Train cannot make any more (its node is gone) fails in 5 s instead of 60 s.
    with ray_cluster(str(logs), nodes=2, private=private,
                     node_env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"}) as cluster:
        cluster.private = private
        yield cluster
    shutil.rmtree(private, ignore_errors=True)


def _job(cluster, args, timeout=900):
    return subprocess.run([sys.executable, "jobs/full_pipeline.py", *args], cwd=REPO, env=cluster.job_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_a_local_output_one_node_cannot_see_is_refused(two_nodes):
    out = os.path.join(two_nodes.private, "runs")
    t0 = time.time()
    res = _job(two_nodes, ["--preset", "smoke", "--output", out, "--run-id", "r"], timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"error: --output {out}: a local folder that 1 of the cluster's 2 nodes cannot see"), last
    assert "s3://" in last
    assert not os.path.exists(out), "nothing of the run is written before the refusal"
    assert time.time() - t0 < 120


def test_a_run_survives_losing_a_node_mid_training(two_nodes, tmp_path):
    import psutil

    out, run_id = tmp_path / "runs", "lost-node"
    ckpt = out / run_id / "checkpoints" / "classifier" / "latest.json"
    proc = subprocess.Popen(
        [sys.executable, "jobs/full_pipeline.py", "--preset", "smoke", "--output", str(out), "--run-id", run_id,
         "--stages", "data,classifier,siamese,embed", "classifier.epochs=20", "siamese.epochs=1"],
        cwd=REPO, env=two_nodes.job_env(), stdout=open(tmp_path / "job.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        # The first epoch's checkpoint: training is under way on both nodes, with 19 epochs (8 s) to go.
        while not ckpt.exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.1)
        raylet = two_nodes.raylet_pid("worker")
        os.kill(raylet, signal.SIGKILL)  # the second node's raylet, by pid: the node is lost
        try:
            psutil.Process(raylet).wait(30)
        except psutil.NoSuchProcess:
            pass
        rc = proc.wait(900)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "job.log").read_text()
    assert rc == 0, log[-4000:]
    manifest = json.loads((out / run_id / "manifest.json").read_text())
    clf = manifest["stages"]["classifier"]
    assert len(clf["nodes_lost"]) == 1 and len(clf["nodes"]) == 2, clf
    assert "planning again on the 1 left" in log
    # The training history says the last attempt resumed after a finished epoch instead of starting again.
    from olr_ray.models import load_checkpoint

    history = load_checkpoint(clf["checkpoint"])[1]["history"]
    assert [h["epoch"] for h in history] == list(range(1, 21)) and history[-1].get("resumed_after_epoch", 0) >= 1
    # Exactly one committed row per readable image.
    emb = manifest["stages"]["embed"]
    files = json.loads((out / run_id / "embeddings" / "manifest.json").read_text())["files"]
    uids = [u for f in files for u in pq.read_table(out / run_id / "embeddings" / f["path"], columns=["uid"])
            .column("uid").to_pylist()]
    assert len(uids) == len(set(uids)) == emb["rows"] == manifest["stages"]["data"]["rows_ok"]
    assert emb["nodes"] == [n for n in clf["nodes"] if n not in clf["nodes_lost"]]
