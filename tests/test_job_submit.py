"""`ray job submit` against a local head started by the test (127.0.0.1, token auth on) runs the job."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """End the head this test started, by pid: its process tree, and any process of its session folder
    that left the tree (Ray daemonises some); never `ray stop` or a name pattern, which reach every Ray."""
    import psutil

    pids = set()
    try:
        pids = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        pass
    pids |= {p.pid for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])}
    pids.add(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(20)


@pytest.fixture()
def head(tmp_path):
    """A Ray head on 127.0.0.1 with its dashboard/job server on 127.0.0.1 and a fresh auth token.

    Started with --block in its own process group and killed as a group: `ray stop` would also
    stop every other Ray on the machine (the test session's own).
    """
    token = secrets.token_hex(32)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    # The job's `python` is the one on the head's PATH: this environment's, as after `source .venv/bin/activate`.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    dash = _port()
    temp_dir = f"/tmp/olr-head-{os.getpid()}"
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={_port()}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2",
         # Own ports for the agents too: the session's Ray already holds the defaults.
         f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
         f"--metrics-export-port={_port()}", f"--runtime-env-agent-port={_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 240
        while True:
            r = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True)
            if r.returncode == 0:
                break
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"Ray head did not come up: {r.stderr[-2000:]}")
            time.sleep(2)
        yield address, env
    finally:
        _end_head(proc, temp_dir)
        # The head's session folder (logs, sockets, ~7 MB) is outside tmp_path to keep socket paths
        # short, so it is removed here rather than left in /tmp after every run.
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_runs_the_pipeline(head, tmp_path):
    address, env = head
    out = tmp_path / "runs"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The README's cluster command: the runtime env installs nothing; the job runs the uploaded working
    # directory with what the node has (the image's Ray, torch and dependencies on a cluster).
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", repo,
           "--runtime-env", os.path.join(repo, "cluster", "runtime_env.yaml"), "--",
           "python", "jobs/full_pipeline.py", "--preset", "smoke", "--output", str(out), "--run-id", "job",
           "data.n_images=300", "classifier.epochs=1", "siamese.epochs=1", "decoder.epochs=1",
           "analysis.probe_epochs=5"]
    deadline = time.time() + 180
    while True:  # the job agent registers a little after the job server answers
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=repo)
        if "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    manifest = json.load(open(out / "job" / "manifest.json"))
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert (out / "job" / "embeddings" / "_SUCCESS").exists() and (out / "job" / "report.md").exists()
    # The job server is bound to localhost only, and the auth token never lands in the output.
    text = "".join(open(os.path.join(root, f), errors="ignore").read()
                   for root, _, files in os.walk(out) for f in files if f.endswith((".json", ".yaml", ".md")))
    assert env["RAY_AUTH_TOKEN"] not in text and env["RAY_AUTH_TOKEN"] not in r.stdout
