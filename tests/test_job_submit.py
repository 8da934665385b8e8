"""`ray job submit` of the smoke pipeline to a two-node cluster on this machine (two raylets on 127.0.0.1, token
authentication on), output on the S3 endpoint: the job completes, and its training and embedding stages ran on
both nodes. The second node is not told the S3 endpoint: the job hands its storage settings to its workers
(never credentials, which come from each node)."""

import os
import subprocess
import time

import pytest

from olr_ray import storage
from tests.raycluster import RAY, ray_cluster

pytestmark = pytest.mark.slow


@pytest.fixture()
def cluster(tmp_path):
    with ray_cluster(str(tmp_path / "nodes"), nodes=2, worker_drop_env=("AWS_ENDPOINT_URL_S3",)) as c:
        yield c


def test_job_submit_runs_the_pipeline_on_two_nodes(cluster, s3_bucket, tmp_path):
    out = f"{s3_bucket}/runs"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The README's cluster command: the runtime env installs nothing; the job runs the uploaded working
    # directory with what the node has (the image's Ray, torch and dependencies on a cluster).
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", repo,
           "--runtime-env", os.path.join(repo, "cluster", "runtime_env.yaml"), "--",
           "python", "jobs/full_pipeline.py", "--preset", "smoke", "--output", out, "--run-id", "job",
           "data.n_images=300", "classifier.epochs=1", "siamese.epochs=1", "decoder.epochs=1",
           "analysis.probe_epochs=5", "embed.batch_size=32"]
    t0 = time.time()
    deadline = t0 + 180
    while True:  # the job agent registers a little after the job server answers
        r = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=900, cwd=repo)
        if "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
            break
        time.sleep(5)
    seconds = time.time() - t0
    (tmp_path / "job.log").write_text(r.stdout + r.stderr)
    lines = [x for x in (r.stdout + r.stderr).splitlines() if "row/s]" not in x and x.strip()]  # no progress bars
    assert r.returncode == 0, "\n".join(lines[-60:])
    assert "succeeded" in (r.stdout + r.stderr).lower()
    manifest = storage.read_json(f"{out}/job/manifest.json")
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert storage.exists(f"{out}/job/embeddings/_SUCCESS") and storage.exists(f"{out}/job/report.md")
    # Training and embedding used both nodes.
    for stage in ("classifier", "siamese", "decoder", "embed"):
        assert len(set(manifest["stages"][stage]["nodes"])) == 2, (stage, manifest["stages"][stage])
    assert manifest["resources"]["placement"] == "STRICT_SPREAD"
    print(f"two-node smoke job: {seconds:.0f}s; stages: "
          + ", ".join(f"{k} {v.get('seconds')}s" for k, v in manifest["stages"].items()))
    # The job server is bound to localhost only, and the auth token never lands in the output.
    text = "".join(storage.read_bytes(f).decode(errors="ignore") for f in storage.list_files(f"{out}/job")
                   if f.endswith((".json", ".yaml", ".md")))
    assert cluster.env["RAY_AUTH_TOKEN"] not in text and cluster.env["RAY_AUTH_TOKEN"] not in r.stdout
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text + r.stdout + r.stderr
