"""The prepared-data copy, encoded (what the data stage stores) against decoded pixels (what it stored before):
bytes per image, and the seconds of one read pass over the copy (Ray Data read + decode, what an epoch that
streams its images pays), for the built-in faces and for a CelebA-format folder of JPEGs. Prints JSON.

    .venv/bin/python benchmarks/data_copy.py --n 4000 --size 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs if f.endswith(".parquet"))


def measure(ds_fn, n: int, size: int, tmp: str, plan, repeats: int) -> dict:
    from olr_ray.run import read_prepared
    from olr_ray.stages.data import prepare

    out = {}
    for encode in (True, False):
        data = os.path.join(tmp, "encoded" if encode else "pixels")
        counts = prepare(ds_fn(), n, data, os.path.join(tmp, "errors.parquet"), plan, encode=encode)
        dirs = [os.path.join(data, f"part={s}") for s in counts if s != "errors" and counts[s]]
        passes = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rows = sum(len(b["image"]) for b in read_prepared(dirs, plan, ["uid", "image"], size)
                       .iter_batches(batch_size=256, batch_format="numpy"))
            passes.append(time.perf_counter() - t0)
        assert rows == n - counts.get("errors", 0)
        passes.sort()
        out["encoded" if encode else "pixels"] = {
            "bytes_per_image": round(_bytes(data) / n), "read_pass_seconds": round(passes[len(passes) // 2], 2),
            "images_per_s": round(n / passes[len(passes) // 2])}
        shutil.rmtree(data)
    out["bytes_ratio"] = round(out["encoded"]["bytes_per_image"] / out["pixels"]["bytes_per_image"], 3)
    out["read_time_ratio"] = round(out["encoded"]["read_pass_seconds"] / out["pixels"]["read_pass_seconds"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4000, help="images of each copy (default 4000)")
    p.add_argument("--size", type=int, default=64, help="side of the built-in faces (default 64)")
    p.add_argument("--celeba-size", type=int, default=178,
                   help="side of the CelebA-format folder's decoded images (default 178: CelebA's 218x178 JPEGs)")
    p.add_argument("--repeats", type=int, default=3, help="read passes per copy; the median is reported")
    args = p.parse_args()

    import ray

    from olr_ray.config import DataConfig
    from olr_ray.data import synthetic
    from olr_ray.data.celeba import read_celeba
    from olr_ray.data.sources import open_source
    from olr_ray.runtime import init_ray, plan_resources

    init_ray()
    plan = plan_resources(2, "false")
    tmp = tempfile.mkdtemp(prefix="olr-data-copy-")
    try:
        res = {"synthetic": {"n": args.n, "size": args.size, **measure(
            lambda: open_source(DataConfig(n_images=args.n, image_size=args.size), 0).dataset,
            args.n, args.size, tmp, plan, args.repeats)}}
        print(json.dumps(res), flush=True)
        folder = os.path.join(tmp, "celeba")
        synthetic.write_celeba_folder(folder, n=args.n, size=args.celeba_size, seed=0)
        source = sum(os.path.getsize(os.path.join(folder, "img_align_celeba", f))
                     for f in os.listdir(os.path.join(folder, "img_align_celeba")))
        res["celeba_format"] = {"n": args.n, "size": args.celeba_size, "source_bytes_per_image": round(source / args.n),
                                **measure(lambda: read_celeba(folder, args.celeba_size)[0], args.n, args.celeba_size,
                                          tmp, plan, args.repeats)}
        print(json.dumps(res))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
