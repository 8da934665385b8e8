"""Ray clusters started by the tests themselves: a head, and optionally a second node, on 127.0.0.1 with token
authentication on. Every process is started here and ended here by pid: never `ray stop` or a name
pattern, which would reach every Ray on the machine (the test session's own)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_ports() -> list[str]:
    # Own ports for each node's agents: the session's Ray already holds the defaults.
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


@dataclass
class Cluster:
    gcs: str
    """``127.0.0.1:PORT``: what ``RAY_ADDRESS`` is set to for a driver that joins."""
    dashboard: str
    """``http://127.0.0.1:PORT``: the job server."""
    env: dict[str, str]
    """Environment for clients (ray job submit, a driver): the head's token, no RAY_ADDRESS."""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    temp_dirs: list[str] = field(default_factory=list)

    def raylet_pid(self, node: str) -> int:
        """The raylet of ``head`` or ``worker``: a child of its `ray start --block`."""
        import psutil

        for p in psutil.Process(self.procs[node].pid).children(recursive=True):
            if p.name() == "raylet":
                return p.pid
        raise RuntimeError(f"no raylet under the {node}'s ray start")

    def alive_nodes(self) -> int:
        r = subprocess.run([RAY, "status", f"--address={self.gcs}"], env=self.env, capture_output=True, text=True,
                           timeout=60)
        active = r.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in r.stdout else ""
        return len(re.findall(r"^\s*1 node_[0-9a-f]+", active, re.M))

    def job_env(self, **extra: str) -> dict[str, str]:
        """Environment for a driver that joins this cluster (``python jobs/full_pipeline.py`` on this machine)."""
        return {**self.env, "RAY_ADDRESS": self.gcs, **extra}


def _end(procs: list[subprocess.Popen], temp_dirs: list[str]) -> None:
    """End what these processes started: their trees, and any process of their session folders that left
    the tree (Ray daemonises some)."""
    import psutil

    pids = set()
    for proc in procs:
        try:
            pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        pids.add(proc.pid)
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(t in cmd for t in temp_dirs):
            pids.add(p.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass


@contextmanager
def ray_cluster(logs: str, nodes: int = 1, cpus: int = 2, private: str | None = None,
                worker_drop_env: tuple[str, ...] = (), node_env: dict[str, str] | None = None, gpus: int = 0):
    """A head (and ``nodes - 1`` more nodes) of ``cpus`` CPUs each, token authentication on.

    Args:
        logs: folder for each node's log.
        private: a folder the second node sees as an empty tmpfs of its own (a mount namespace of its own),
            so that a local output there is not shared between the nodes.
        worker_drop_env: variables the second node does not inherit (e.g. the S3 endpoint, which the job
            must hand to its workers itself).
        node_env: more variables for every node (not for clients).
        gpus: GPUs the head announces (logical only: a machine without CUDA shows what a GPU stage does there).
    """
    token = secrets.token_hex(32)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    # The job's `python` is the one on the head's PATH: this environment's, as after `source .venv/bin/activate`.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    port, dash = free_port(), free_port()
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    head_tmp = f"/tmp/olr-head-{tag}"  # short: Ray's socket paths live under it
    cluster = Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env, temp_dirs=[head_tmp])
    os.makedirs(logs, exist_ok=True)
    try:
        cluster.procs["head"] = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
             f"--num-cpus={cpus}", f"--num-gpus={gpus}", *_agent_ports(), f"--temp-dir={head_tmp}",
             "--disable-usage-stats"],
            env={**env, **(node_env or {})}, stdout=open(os.path.join(logs, "head.log"), "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        _wait(cluster, 1, "head")
        for i in range(1, nodes):
            wenv = {k: v for k, v in {**env, **(node_env or {})}.items() if k not in worker_drop_env}
            # A session folder of its own: nodes that shared the head's would share its runtime-env cache, and one
            # node's agent would delete the job's working directory under the other's feet.
            node_tmp = f"/tmp/olr-node{i}-{tag}"
            cluster.temp_dirs.append(node_tmp)
            cmd = [RAY, "start", "--block", f"--address={cluster.gcs}", "--node-ip-address=127.0.0.1",
                   f"--num-cpus={cpus}", *_agent_ports(), f"--temp-dir={node_tmp}", "--disable-usage-stats"]
            if private and i == 1:
                os.makedirs(private, exist_ok=True)
                cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f'mount -t tmpfs olr-private "{private}" && exec "$@"', "sh", *cmd]
            cluster.procs[f"worker{i}" if i > 1 else "worker"] = subprocess.Popen(
                cmd, env=wenv, stdout=open(os.path.join(logs, f"worker{i}.log"), "w"), stderr=subprocess.STDOUT,
                start_new_session=True)
        _wait(cluster, nodes, "nodes")
        yield cluster
    finally:
        _end(list(cluster.procs.values()), cluster.temp_dirs)
        for t in cluster.temp_dirs:
            shutil.rmtree(t, ignore_errors=True)


def _wait(cluster: Cluster, nodes: int, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if cluster.alive_nodes() >= nodes:
                return
        except subprocess.TimeoutExpired:
            pass
        dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
        if dead or time.time() > deadline:
            raise RuntimeError(f"Ray {what} did not come up ({', '.join(dead) or 'timeout'}): see the node logs")
        time.sleep(2)
