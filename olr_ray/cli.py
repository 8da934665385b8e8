"""Run the whole OLR pipeline: data -> classifier -> siamese -> embed -> decoder -> analysis.

Locally (starts a Ray sized to this machine):
    python jobs/full_pipeline.py --preset demo

On a cluster (joins it; outputs on S3):
    ray job submit --working-dir . -- python jobs/full_pipeline.py --preset paper \\
        --data s3://my-bucket/celeba --output s3://my-bucket/olr-runs

Any config field can be overridden as key=value, e.g. ``siamese.epochs=10 data.n_images=5000``.
Re-running with the same --run-id skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import olr_ray
from olr_ray.config import PRESETS, ConfigError, PipelineConfig, build_config
from olr_ray.data.celeba import DatasetFormatError
from olr_ray.pipeline import run_pipeline, summary
from olr_ray.run import UsageError
from olr_ray.stages import STAGES
from olr_ray.storage import StorageError


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog="Config fields (key=value): every field of olr_ray/config.py, e.g. siamese.epochs=10; the resolved "
               "config is written to <output>/<run-id>/config.yaml.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"olr_ray {olr_ray.__version__}")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config file, applied on top of the preset")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="smoke: tiny, minutes on 2 CPUs (CI); demo: synthetic 64x64, 20k images, "
                        "about 25 min on 2 CPUs (default); paper: CelebA 178x178, GPU workers")
    p.add_argument("--data", metavar="synthetic|PATH|s3://...",
                   help="image source: built-in synthetic faces or a CelebA-format folder (data.source)")
    p.add_argument("--output", default=os.environ.get("OLR_OUTPUT", "./runs"), metavar="PATH|s3://...",
                   help="where run folders go (default ./runs)")
    p.add_argument("--run-id", help="run folder name (default: timestamp and config hash); reuse it to resume")
    p.add_argument("--num-workers", type=int, help="Ray Train workers per training stage (0: in-process)")
    p.add_argument("--use-gpu", choices=["auto", "true", "false"], help="train and embed on GPUs (default auto)")
    p.add_argument("--stages", help=f"comma-separated subset, run in pipeline order: {','.join(STAGES)}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field")
    return p.parse_intermixed_args(argv)  # key=value overrides may sit between options


def resolve(args: argparse.Namespace) -> tuple[PipelineConfig | None, list[str] | None, list[str]]:
    """The config and stage list the options ask for, and every problem with them."""
    extra: dict = {}
    if args.data:
        extra.setdefault("data", {})["source"] = args.data
    if args.num_workers is not None:
        extra["num_workers"] = args.num_workers
    if args.use_gpu:
        extra["use_gpu"] = args.use_gpu
    stages, problems, cfg = None, [], None
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in stages if s not in STAGES]
        if bad:
            problems.append(f"--stages: unknown stage(s) {', '.join(bad)}; expected a subset of {', '.join(STAGES)}")
    try:
        cfg = build_config(args.preset, args.config, args.overrides, extra)
    except ConfigError as exc:
        problems += exc.problems
    return cfg, stages, problems


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    cfg, stages, problems = resolve(args)
    if problems or cfg is None:
        print("error: invalid configuration:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    try:
        run = run_pipeline(cfg, args.output, args.run_id, stages)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StorageError, DatasetFormatError) as exc:  # names the file (and line) or the operation and URI,
        print(f"error: {exc}", file=sys.stderr)     # never a credential
        return 1
    print()
    print(summary(run))
    return 0


def console() -> None:
    """The ``olr-ray`` console script."""
    sys.exit(main(prog="olr-ray"))
