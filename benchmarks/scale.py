"""How time and memory grow with the number of images (#19): the whole pipeline with small models, at N and 4N
synthetic images, each run in its own process with its own local Ray.

    python benchmarks/scale.py --n 5000 --size 96

Prints one JSON line per run (per stage: seconds, images/s, peak RSS of the driver and of the largest Ray
worker process, the rise of /dev/shm, where Ray's object store lives, and the bytes Ray spilled to disk)
and a last line with ``driver_peak_ratio`` (driver peak RSS at 4N over N), ``per_image_time_ratio`` and a
linear CelebA estimate (202,599 images at 178 px) per stage.

A run of 200 images goes first, unmeasured: it trains the analysis' independent judge (synthetic runs), which
both measured runs then read. Memory is sampled every 0.2 s with psutil and given to the stage that was running (the manifest's start and
finish times). Run it on a quiet machine: /dev/shm is shared with every other process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELEBA_IMAGES, CELEBA_SIZE = 202_599, 178


def _tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


class Sampler(threading.Thread):
    """Samples the driver's RSS, the largest other process' RSS, /dev/shm's use and Ray's spill folder."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()
        self.shm0 = shutil.disk_usage("/dev/shm").used

    def run(self) -> None:
        while not self.stop.is_set():
            procs = _tree(self.pid)
            rss = {}
            for p in procs:
                try:
                    rss[p.pid] = p.memory_info().rss
                except psutil.Error:
                    pass
            spill = 0
            for p in procs:
                try:
                    if p.name() == "raylet":
                        sess = next((a.split("=", 1)[1] for a in p.cmdline() if a.startswith("--session_dir=")), "")
                        spill = _dir_bytes(os.path.join(sess, "ray_spilled_objects")) if sess else 0
                        break
                except psutil.Error:
                    pass
            workers = [v for k, v in rss.items() if k != self.pid]
            self.samples.append((time.time(), rss.get(self.pid, 0), max(workers, default=0),
                                 shutil.disk_usage("/dev/shm").used - self.shm0, spill))
            time.sleep(0.2)


def _ts(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def run_once(n: int, size: int, out: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "jobs/full_pipeline.py", "--preset", "smoke", "--output", out, "--run-id", f"n{n}",
           f"data.n_images={n}", f"data.image_size={size}", *extra]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"n={n}: the pipeline failed:\n{err[-3000:]}")
    run = os.path.join(out, f"n{n}")
    stages = json.load(open(os.path.join(run, "manifest.json")))["stages"]
    per_stage = {}
    for name, st in stages.items():
        # The manifest's times have whole seconds: a stage gets every sample of its seconds.
        a, b = _ts(st["started_at"]) - 1, _ts(st["finished_at"]) + 1
        window = [s for s in sampler.samples if a <= s[0] <= b] or [(0, 0, 0, 0, 0)]
        per_stage[name] = {
            "seconds": st["seconds"], "images_per_s": round(n / st["seconds"], 1),
            "driver_peak_mb": round(max(s[1] for s in window) / 2**20, 1),
            "worker_peak_mb": round(max(s[2] for s in window) / 2**20, 1),
            "shm_rise_mb": round(max(s[3] for s in window) / 2**20, 1),
            "spilled_mb": round(max(s[4] for s in window) / 2**20, 1),
        }
    return {"n": n, "image_size": size, "seconds": round(time.time() - t0, 1),
            "driver_peak_mb": round(max(s[1] for s in sampler.samples) / 2**20, 1),
            "data_bytes": _dir_bytes(os.path.join(run, "data")), "stages": per_stage}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000, help="images of the first run; the second has 4x (default 5000)")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    p.add_argument("--output", help="keep the two runs here (default: a temporary folder, removed)")
    p.add_argument("overrides", nargs="*", help="more key=value config overrides for both runs")
    args = p.parse_args()
    out = args.output or tempfile.mkdtemp(prefix="olr-scale-")
    runs = []
    try:
        # A small run first trains the analysis' independent judge, kept in the output folder for both measured
        # runs: otherwise the first would train it in its driver and the second read it.
        run_once(min(200, args.n), args.size, out, args.overrides)
        for n in (args.n, 4 * args.n):
            r = run_once(n, args.size, out, args.overrides)
            print(json.dumps(r), flush=True)
            runs.append(r)
    finally:
        if not args.output:
            shutil.rmtree(out, ignore_errors=True)
    small, large = runs
    per_image = {s: large["stages"][s]["seconds"] / large["n"] / (small["stages"][s]["seconds"] / small["n"])
                 for s in large["stages"]}
    # The CelebA estimate (an extrapolation, not a measurement). Time: the larger run's, plus the marginal
    # seconds per image (between the two runs) for every further image, scaled by pixels. Driver memory: the
    # larger run's peak plus the marginal growth per image, not scaled by pixels (the driver holds per-image
    # numbers and embeddings, never images: tests/test_streaming.py). Data: bytes per image scaled by pixels.
    px = (CELEBA_SIZE / args.size) ** 2
    extra = CELEBA_IMAGES - large["n"]
    celeba = {}
    for s in large["stages"]:
        a, b = small["stages"][s], large["stages"][s]
        per_image_s = max(0.0, b["seconds"] - a["seconds"]) / (large["n"] - small["n"])
        per_image_mb = max(0.0, b["driver_peak_mb"] - a["driver_peak_mb"]) / (large["n"] - small["n"])
        celeba[s] = {"seconds": round(b["seconds"] + per_image_s * (CELEBA_IMAGES * px - large["n"])),
                     "driver_mb": round(b["driver_peak_mb"] + per_image_mb * extra),
                     "driver_kb_per_image": round(per_image_mb * 1024, 2)}
    total_time = sum(large["stages"][s]["seconds"] for s in large["stages"]) / large["n"]
    small_time = sum(small["stages"][s]["seconds"] for s in small["stages"]) / small["n"]
    print(json.dumps({
        "celeba_estimate": {"stages": celeba, "driver_peak_mb": max(v["driver_mb"] for v in celeba.values()),
                            "data_gb": round(large["data_bytes"] / large["n"] * CELEBA_IMAGES * px / 1e9, 1)},
        "per_stage_time_ratio": {s: round(v, 2) for s, v in per_image.items()},
        "driver_peak_ratio": round(large["driver_peak_mb"] / small["driver_peak_mb"], 2),
        "per_image_time_ratio": round(total_time / small_time, 2),
    }))


if __name__ == "__main__":
    main()
