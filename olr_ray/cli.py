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
from olr_ray import ablation
from olr_ray.config import PRESETS, ConfigError, PipelineConfig, build_config, to_yaml
from olr_ray.data.celeba import DatasetFormatError
from olr_ray.edit import edit, edit_grid
from olr_ray.embed_job import embed_images
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
                   help="smoke: tiny, minutes on 2 CPUs (CI); demo: synthetic 64x64, 20k images, about 35 min "
                        "on 2 CPUs with bf16, 80 in float32 (default); paper: the paper's method exactly, CelebA "
                        "178x178, GPU workers; celeba: this project's recipe at the same scale")
    p.add_argument("--data", metavar="synthetic|PATH|s3://...",
                   help="image source: built-in synthetic faces or a CelebA-format folder (data.source)")
    p.add_argument("--output", default=os.environ.get("OLR_OUTPUT", "./runs"), metavar="PATH|s3://...",
                   help="where run folders go (default ./runs)")
    p.add_argument("--run-id", help="run folder name (default: timestamp and config hash); reuse it to resume")
    p.add_argument("--num-workers", type=int, help="Ray Train workers per training stage (0: in-process)")
    p.add_argument("--use-gpu", choices=["auto", "true", "false"], help="train and embed on GPUs (default auto)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="model compute precision (default auto: bf16 where the hardware runs it natively)")
    p.add_argument("--stages", help=f"comma-separated subset, run in pipeline order: {','.join(STAGES)}")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="check data, storage, stage order and resources, say what would run, then stop")
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
    if args.precision:
        extra["precision"] = args.precision
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
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        run = run_pipeline(cfg, args.output, args.run_id, stages, dry_run=args.dry_run)
    except (UsageError, StorageError, DatasetFormatError) as exc:
        return _fail(exc)
    if not args.dry_run:  # a dry run has said what would run; it has no outputs to list
        print()
        print(summary(run))
    return 0


def console() -> None:
    """The ``olr-ray`` console script."""
    sys.exit(main(prog="olr-ray"))


def _fail(exc: Exception) -> int:
    """One ``error:`` line for what the user must change (2) or a file, storage or data problem (1); the
    messages name the file (and line) or the operation and URI, never a credential."""
    print(f"error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, UsageError) else 1


def embed_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``jobs/embed.py``: embed new images with a trained run, without training."""
    p = argparse.ArgumentParser(prog=prog, description="Embed new images with a trained run, without training: "
                                "the same committed Parquet as the run's own embeddings/.")
    p.add_argument("--version", action="version", version=f"olr_ray {olr_ray.__version__}")
    p.add_argument("--model", required=True, metavar="RUN", help="the trained run folder: <output>/<run-id>")
    p.add_argument("--data", required=True, metavar="PATH|s3://...",
                   help="a CelebA-format folder (its labels are kept) or any folder or prefix of images "
                        "(labels null); images are centre-cropped and resized to the model's size")
    p.add_argument("--output", required=True, metavar="PATH|s3://...", help="where the embeddings are committed")
    p.add_argument("--split", default="all", help="split value for images without list_eval_partition.txt")
    p.add_argument("--num-workers", type=int, default=2, help="sizes the Ray Data actor pool like the pipeline")
    p.add_argument("--use-gpu", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--batch-size", type=int, default=256, help="images per inference batch")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        manifest = embed_images(args.model, args.data, args.output, args.num_workers, args.use_gpu, args.batch_size,
                                split=args.split)
    except (UsageError, StorageError, DatasetFormatError) as exc:
        return _fail(exc)
    print(f"{manifest['rows']} rows committed: {args.output} (unreadable images: {manifest['errors']})")
    return 0


def edit_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``jobs/edit.py``: add or remove labels of some images of a trained run and draw the grid."""
    p = argparse.ArgumentParser(prog=prog, description="Edit images of a trained run: add or remove labels in "
                                "their embeddings, decode, and draw original, reconstruction and each edit.")
    p.add_argument("--version", action="version", version=f"olr_ray {olr_ray.__version__}")
    p.add_argument("--run", required=True, metavar="RUN", help="the trained run folder: <output>/<run-id>")
    p.add_argument("--image", required=True, action="append", metavar="IMAGE_ID",
                   help="an image_id of the run (repeat for more rows)")
    p.add_argument("--add", action="append", default=[], metavar="LABEL", help="label to add (repeatable)")
    p.add_argument("--remove", action="append", default=[], metavar="LABEL", help="label to remove (repeatable)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplier of the added block (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled blocks")
    p.add_argument("--out", default="edits.png", metavar="PNG", help="the grid (local or s3://; default edits.png)")
    args = p.parse_args(argv)
    if not args.add and not args.remove:
        p.error("give at least one --add or --remove")
    try:
        res = edit(args.run, args.image, args.add, args.remove, args.scale, args.seed)
        edit_grid(res, args.out, title=f"{args.run.rstrip('/').rsplit('/', 1)[-1]}: {', '.join(res.edits)}")
    except (UsageError, StorageError, DatasetFormatError) as exc:
        return _fail(exc)
    print(f"wrote {args.out}: {len(res.image_ids)} image(s) x {', '.join(['original', 'reconstruction', *res.edits])}")
    return 0


def ablation_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``jobs/ablation.py``: the paper's recipe, the default and each departure alone; a markdown table."""
    p = argparse.ArgumentParser(prog=prog, description=ablation.__doc__.split("\n\n")[0],
                                epilog="Runs: " + ", ".join(a.name for a in ablation.arms()))
    p.add_argument("--version", action="version", version=f"olr_ray {olr_ray.__version__}")
    p.add_argument("--output", default="./runs/ablation", metavar="PATH|s3://...",
                   help="where the ablation's run folders go (default ./runs/ablation); re-use it to continue")
    p.add_argument("--report", default="docs/ablation.md", metavar="FILE.md", help="the table (default docs/ablation.md)")
    p.add_argument("--seeds", default="0,1", help="the two seeds of the paper and default runs (default 0,1)")
    p.add_argument("--only", help="comma-separated run names, to run a few (the table lists the rest as not run)")
    p.add_argument("--list", action="store_true", help="print every run and what it changes, then exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        if len(seeds) != 2 or seeds[0] == seeds[1]:
            raise ValueError
    except ValueError:
        print(f"error: --seeds: expected two different integers like 0,1, got {args.seeds!r}", file=sys.stderr)
        return 2
    plan = ablation.arms(seeds)
    if args.list:
        for arm in plan:
            print(f"{arm.name:<40} seed {arm.seed}  {arm.what}")
        return 0
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    unknown = sorted(set(only or []) - {a.name for a in plan})
    if unknown:
        print(f"error: --only: unknown run(s) {', '.join(unknown)}; --list shows them", file=sys.stderr)
        return 2
    try:
        ablation.run_ablation(args.output, args.report, seeds, only)
    except (UsageError, StorageError) as exc:
        return _fail(exc)
    print(f"table: {args.report}")
    return 0
