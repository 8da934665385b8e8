"""The whole OLR run: data -> classifier -> siamese -> embed -> decoder -> analysis.

Run layout ``<output>/<run-id>/``: ``config.yaml``, ``manifest.json`` (each stage's status,
timings, row counts; versions; git commit), ``data/``, ``checkpoints/``, ``embeddings/``,
``errors/``, ``analysis/``, ``metrics.json``, ``report.md``.

Re-running with the same run id skips stages marked done in the manifest; an interrupted
training stage continues from its last checkpoint (``checkpoints/<stage>/latest.json``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

import olr_ray
from olr_ray import storage
from olr_ray.config import STAGES, PipelineConfig, from_dict, to_yaml

log = logging.getLogger("olr_ray")


def default_run_id(cfg: PipelineConfig) -> str:
    digest = hashlib.sha1(to_yaml(cfg).encode()).hexdigest()[:6]
    return time.strftime("%Y%m%d-%H%M%S") + "-" + digest


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git is fine
        return None


@dataclass
class Run:
    """Paths and bookkeeping of one run folder (local or S3)."""

    cfg: PipelineConfig
    uri: str
    run_id: str
    manifest: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    @classmethod
    def open(cls, cfg: PipelineConfig, output: str, run_id: str) -> "Run":
        """Create the run folder, or reopen it for resume (its saved config must match)."""
        import ray
        import torch

        uri = storage.join(output, run_id)
        run = cls(cfg, uri, run_id)
        if storage.exists(run.path("manifest.json")):
            run.manifest = storage.read_json(run.path("manifest.json"))
            if storage.exists(run.path("metrics.json")):
                run.metrics = storage.read_json(run.path("metrics.json"))
            saved = from_dict(_yaml_load(storage.read_bytes(run.path("config.yaml")).decode()))
            if to_yaml(saved) != to_yaml(cfg):
                raise UsageError(f"run {run_id} at {uri} was started with a different config; "
                                 f"use a new --run-id or the same options (see {run.path('config.yaml')})")
            log.info("resuming run %s at %s", run_id, uri)
        else:
            storage.makedirs(uri)
            storage.write_bytes(run.path("config.yaml"), to_yaml(cfg).encode())
            run.manifest = {
                "run_id": run_id,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": {"olr_ray": olr_ray.__version__, "ray": ray.__version__, "torch": torch.__version__,
                             "python": platform.python_version()},
                "git_commit": _git_commit(),
                "stages": {s: {"status": "pending"} for s in STAGES},
            }
            run.save()
        return run

    def save(self) -> None:
        # S3 retries (throttling, 5xx) counted by this process and reported by each stage's workers.
        per_stage = {n: int(st.get("storage_retries", 0)) for n, st in self.manifest["stages"].items()}
        driver = storage.retry_count()
        self.manifest["storage_retries"] = {"driver": driver, **per_stage, "total": driver + sum(per_stage.values())}
        storage.write_json(self.path("manifest.json"), self.manifest)
        storage.write_json(self.path("metrics.json"), self.metrics)

    def stage(self, name: str) -> dict[str, Any]:
        return self.manifest["stages"].setdefault(name, {"status": "pending"})

    def done(self, name: str) -> bool:
        return self.stage(name).get("status") == "done"


def _yaml_load(text: str) -> dict:
    import yaml

    return yaml.safe_load(text) or {}


# --------------------------------------------------------------------------- data access


def split_dirs(run: Run, splits: list[str] | None = None) -> list[str]:
    info = run.stage("data")
    present = info.get("splits", {})
    wanted = splits or [s for s in ("train", "valid", "test") if present.get(s)]
    return [run.path("data", f"part={s}") for s in wanted if present.get(s)]


def read_images(run: Run, splits: list[str] | None, plan, columns: list[str] | None = None):
    """The prepared images of some splits as a Ray Dataset (read tasks ask for ``plan.task_cpus``)."""
    import ray

    dirs = split_dirs(run, splits)
    if not dirs:
        raise RuntimeError(f"run {run.run_id}: no prepared images for splits {splits} under {run.path('data')}")
    fs, _ = storage.resolve(run.uri)
    paths = [storage.resolve(d)[1] for d in dirs]
    ds = ray.data.read_parquet(paths, filesystem=fs, num_cpus=plan.task_cpus)
    return ds.select_columns(columns) if columns else ds


def eval_split(run: Run) -> str:
    """Validation split for per-epoch metrics: ``valid`` when the data has one, else ``test``."""
    return "valid" if run.stage("data").get("splits", {}).get("valid") else "test"


# --------------------------------------------------------------------------- stages


def stage_data(run: Run, plan) -> dict[str, Any]:
    """Draw or read every image once into ``<run>/data/part=<split>/``; unreadable ones go to ``errors/``."""
    import numpy as np

    from olr_ray.data.sources import open_source

    cfg = run.cfg
    src = open_source(cfg.data, cfg.seed)
    data_uri = run.path("data")
    storage.delete_dir(data_uri)  # a half-written earlier attempt

    def tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        err = batch["error"].astype(str)
        batch["part"] = np.where(err == "", batch["split"].astype(str), "errors")
        return batch

    fs, path = storage.resolve(data_uri)
    src.dataset.map_batches(tag, batch_format="numpy", num_cpus=plan.task_cpus).write_parquet(
        path, filesystem=fs, partition_cols=["part"], ray_remote_args={"num_cpus": plan.task_cpus},
        min_rows_per_file=2000)
    counts: dict[str, int] = {}
    for f in storage.list_files(data_uri, ".parquet"):
        part = f.split("part=")[-1].split("/")[0]
        counts[part] = counts.get(part, 0) + pq.read_metadata(storage.resolve(f)[1], filesystem=fs).num_rows
    errors = counts.pop("errors", 0)
    err_table = pa.table({"image_id": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    if errors:
        t = pq.read_table(storage.resolve(storage.join(data_uri, "part=errors"))[1], filesystem=fs,
                          columns=["image_id", "error"])
        err_table = pa.table({"image_id": t["image_id"], "reason": t["error"]}).sort_by("image_id")
    storage.makedirs(run.path("errors"))
    efs, epath = storage.resolve(run.path("errors", "read_errors.parquet"))
    pq.write_table(err_table, epath, filesystem=efs)
    total = sum(counts.values()) + errors
    if total != src.num_rows:
        raise RuntimeError(f"data stage lost rows: {src.num_rows} in the source, {total} written + errors")
    if errors:
        log.warning("%d of %d images could not be read; reasons in %s", errors, total,
                    run.path("errors", "read_errors.parquet"))
    return {"rows": total, "rows_ok": total - errors, "errors": errors, "splits": counts,
            "label_names": src.label_names, "image_size": src.image_size, "source": cfg.data.source,
            "kind": src.kind}


def _task_common(run: Run, plan, stage_cfg) -> dict[str, Any]:
    return dict(label_names=run.stage("data")["label_names"], epochs=stage_cfg.epochs,
                batch_size=stage_cfg.batch_size, lr=stage_cfg.lr, seed=run.cfg.seed,
                threads=plan.threads_per_worker)


def stage_classifier(run: Run, plan) -> dict[str, Any]:
    from olr_ray.train.driver import fit
    from olr_ray.train.tasks import ClassifierTask

    c = run.cfg.classifier
    info = run.stage("data")
    names = info["label_names"]
    task = ClassifierTask(name="classifier", model_name="classifier",
                          model_args=dict(num_labels=len(names), image_size=info["image_size"], width=c.width),
                          weight_decay=c.weight_decay, checkpoint_dir=run.path("checkpoints", "classifier"),
                          lr_schedule=c.lr_schedule, occlusion_prob=c.occlusion_prob,
                          occlusion_min=run.cfg.siamese.occlusion_min, occlusion_max=run.cfg.siamese.occlusion_max,
                          occlusion_fill=run.cfg.siamese.occlusion_fill,
                          **_task_common(run, plan, c))
    cols = ["image", "labels"]
    # Validation and test sets are read once and kept in the object store: rank 0 evaluates on
    # them every epoch, and re-reading them cost ~7 s an epoch on the demo.
    datasets = {
        "train": read_images(run, ["train"], plan, cols),
        "valid": read_images(run, [eval_split(run)], plan, cols).materialize(),
        "test": read_images(run, ["test"], plan, cols).materialize(),
    }
    res = fit(task, datasets, plan, run.path("checkpoints"), run.cfg.max_failures)
    m = res.metrics
    run.metrics.update({
        "classifier.test_mean_accuracy": m["test_mean_accuracy"],
        "classifier.test_mean_accuracy_per_label": m["test_mean_accuracy_per_label"],
        "classifier.majority_baseline": m["majority_baseline"],
        "classifier.val_loss": m["val_loss"],
        "classifier.epochs": m["epoch"],
    })
    return {"checkpoint": res.checkpoint_uri, "epochs": m["epoch"], "train_samples_last_epoch": m["train_samples"],
            "storage_retries": train_retries(res)}


def train_retries(res) -> int:
    """Storage retries of rank 0 over every attempt of a training stage, from its checkpoint history.

    Each epoch records its process's running count, which starts again at 0 in a restarted worker, so
    a fall marks a new attempt. Retries after an attempt's last checkpoint were never recorded.
    """
    total = prev = 0
    for h in res.history:
        count = int(h.get("storage_retries", 0))
        total += count - prev if count >= prev else count
        prev = count
    return total


def stage_siamese(run: Run, plan) -> dict[str, Any]:
    from olr_ray.train.driver import fit
    from olr_ray.train.pairs import pair_dataset
    from olr_ray.train.tasks import SiameseTask

    s = run.cfg.siamese
    info = run.stage("data")
    names = info["label_names"]
    clf = run.stage("classifier")["checkpoint"]
    task = SiameseTask(name="siamese", model_name="siamese",
                       model_args=dict(num_labels=len(names), k=s.k, image_size=info["image_size"], width=s.width,
                                       label_kernel=s.label_kernel, activation=s.activation,
                                       floor=s.block_floor),
                       init_trunk_from=clf if s.init_from_classifier else "", lr_schedule=s.lr_schedule,
                       grad_floor=s.grad_floor,
                       weight_decay=s.weight_decay, shuffle_buffer=None,
                       checkpoint_dir=run.path("checkpoints", "siamese"), **_task_common(run, plan, s))
    cols = ["uid", "image", "labels"]
    train = read_images(run, ["train"], plan, cols)
    datasets = {f"pairs_{e}": pair_dataset(train, clf, run.cfg.seed, e, s, plan) for e in range(s.epochs)}
    val = read_images(run, [eval_split(run)], plan, cols).limit(2 * s.val_pairs)
    # Validation pairs are fixed (epoch -1, no shuffle) so every epoch is measured on the same pairs.
    # Materialised once: re-running the pipeline (and starting a labelling actor) every epoch
    # cost ~10 s an epoch.
    datasets["valid"] = pair_dataset(val, clf, run.cfg.seed, -1, s, plan, shuffle=False,
                                     label_pairs=False).materialize()
    res = fit(task, datasets, plan, run.path("checkpoints"), run.cfg.max_failures,
              split=[f"pairs_{e}" for e in range(s.epochs)])
    m = res.metrics
    run.metrics.update({
        "siamese.val_mse": m["val_loss"],
        "siamese.dot_r2": m["val_dot_r2"],
        "siamese.val_norm_ratio_present_absent": m["val_norm_ratio_present_absent"],
        "siamese.target": s.target,
        "siamese.epochs": m["epoch"],
    })
    return {"checkpoint": res.checkpoint_uri, "epochs": m["epoch"], "pairs_last_epoch": m["train_samples"],
            "storage_retries": train_retries(res)}


def stage_embed(run: Run, plan) -> dict[str, Any]:
    import numpy as np

    from olr_ray.analysis import load_embeddings
    from olr_ray.embed import embed_dataset
    from olr_ray.train.tasks import norm_ratio, norm_ratios

    info = run.stage("data")
    images = read_images(run, None, plan, ["uid", "image_id", "split", "labels", "image"])
    manifest = embed_dataset(
        images, run.path("embeddings"), run.stage("siamese")["checkpoint"], run.stage("classifier")["checkpoint"],
        info["label_names"], run.cfg.siamese.k, run.run_id, plan, run.cfg.embed.batch_size,
        run.cfg.embed.rows_per_file, config=run.cfg.to_dict())
    if manifest["rows"] != info["rows_ok"]:
        raise RuntimeError(f"embedding committed {manifest['rows']} rows but {info['rows_ok']} images were readable")
    emb = load_embeddings(run.path("embeddings"), columns=["uid", "split", "labels", "norms"])
    run.metrics["siamese.norm_ratio_present_absent"] = norm_ratio(emb.norms, emb.labels)
    # The mean of ratios is pulled up by nearly dead blocks (absent norm ~0): the median and
    # the dead-block count say whether it is a few labels or all of them.
    ratios = norm_ratios(emb.norms, emb.labels)
    run.metrics["siamese.norm_ratio_present_absent_median"] = float(np.nanmedian(ratios))
    run.metrics["siamese.norm_ratio_per_label"] = {n: float(r) for n, r in zip(info["label_names"], ratios)}
    # Dead: a block that stays at its floor (block_floor on every coordinate, norm floor*sqrt(k))
    # on 99% of the images, i.e. carries nothing.
    floor_norm = run.cfg.siamese.block_floor * np.sqrt(run.cfg.siamese.k)
    dead = np.quantile(emb.norms, 0.99, axis=0) <= floor_norm * 1.05 + 1e-6
    run.metrics["siamese.dead_blocks"] = int(dead.sum())
    run.metrics["siamese.dead_block_labels"] = [n for n, d in zip(info["label_names"], dead) if d]
    test = emb.splits == "test"
    run.metrics["siamese.norm_ratio_present_absent_test"] = norm_ratio(emb.norms[test], emb.labels[test])
    if len(np.unique(emb.uids)) != len(emb.uids):
        raise RuntimeError("embedding output has duplicate uids")
    return {"rows": manifest["rows"], "files": len(manifest["files"]), "uri": run.path("embeddings"),
            "storage_retries": manifest.get("storage_retries", 0)}


StageFn = Callable[[Run, Any], dict[str, Any]]


def stage_functions() -> dict[str, StageFn]:
    from olr_ray.analysis.stage import stage_analysis
    from olr_ray.decode import stage_decoder

    return {"data": stage_data, "classifier": stage_classifier, "siamese": stage_siamese, "embed": stage_embed,
            "decoder": stage_decoder, "analysis": stage_analysis}


def run_pipeline(cfg: PipelineConfig, output: str = "./runs", run_id: str | None = None,
                 stages: list[str] | None = None, progress: Callable[[str], None] = print) -> Run:
    """Run (or resume) the pipeline; returns the run with its manifest and metrics."""
    from olr_ray.runtime import init_ray, plan_resources

    # Storage first: bad credentials, a denied or missing bucket fail here, in seconds, before
    # a Ray cluster is started or joined.
    run = Run.open(cfg, output, run_id or default_run_id(cfg))
    wanted = stages or list(STAGES)
    check_stage_order(run, wanted)
    if "data" in wanted and not run.done("data") and cfg.data.source != "synthetic":
        from olr_ray.data.celeba import require_attr_file

        require_attr_file(cfg.data.source)
    init_ray()
    plan = plan_resources(cfg.num_workers, cfg.use_gpu)
    run.manifest["resources"] = plan.__dict__
    fns = stage_functions()
    if run.done("data"):
        check_options_against_data(run, wanted)
    for name in STAGES:
        if name not in wanted:
            continue
        if run.done(name):
            progress(f"[{name}] already done in this run; skipping")
            continue
        st = run.stage(name)
        st.update({"status": "running", "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        run.save()
        progress(f"[{name}] starting")
        t0 = time.time()
        try:
            out = fns[name](run, plan)
        except BaseException as exc:
            st.update({"status": "failed", "error": storage.redact(f"{type(exc).__name__}: {exc}")[:2000],
                       "seconds": round(time.time() - t0, 2)})
            run.save()
            raise
        st.update(out)
        st.update({"status": "done", "seconds": round(time.time() - t0, 2),
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        run.metrics[f"timing.{name}_seconds"] = st["seconds"]
        run.save()
        progress(f"[{name}] done in {st['seconds']:.1f}s")
        if name == "data":
            check_options_against_data(run, wanted)
    return run


class UsageError(ValueError):
    """What was asked cannot be done as asked (options, run id, stage order); the message says what to change."""


# The stages each one reads the outputs of. The analysis works without a decoder (no reconstruction
# or editing then), so the decoder is not among its prerequisites.
PREREQUISITES = {"data": [], "classifier": ["data"], "siamese": ["data", "classifier"],
                 "embed": ["data", "classifier", "siamese"], "decoder": ["data", "classifier", "siamese", "embed"],
                 "analysis": ["data", "classifier", "siamese", "embed"]}


def check_stage_order(run: Run, wanted: list[str]) -> None:
    """Every stage asked for has its inputs: each prerequisite is done in this run or asked for too."""
    for name in wanted:
        missing = [p for p in PREREQUISITES[name] if p not in wanted and not run.done(p)]
        if missing:
            raise UsageError(f"--stages {name}: run {run.run_id} has not done {', '.join(missing)} yet; add "
                             f"{'it' if len(missing) == 1 else 'them'} to --stages, or leave --stages out")


def check_options_against_data(run: Run, wanted: list[str]) -> None:
    """Options that name a label must name one of the data's, checked before any training starts."""
    names = run.stage("data").get("label_names") or []
    label = run.cfg.analysis.pca_label
    if "analysis" in wanted and label not in names:
        raise UsageError(f"analysis.pca_label={label!r} is not a label of {run.cfg.data.source!r}; expected one "
                         f"of: {', '.join(names)}. The data stage is done: start a new --run-id with "
                         f"analysis.pca_label=<label>")


def summary(run: Run) -> str:
    """A short table of the headline metrics and where the outputs are."""
    keys = ["classifier.test_mean_accuracy", "classifier.majority_baseline", "siamese.dot_r2",
            "siamese.norm_ratio_present_absent", "probe.test_mean_accuracy", "correlation.vs_label_corr_r",
            "reconstruction.test_ssim", "editing.add_success", "editing.others_preserved",
            "disentanglement.own_block_fraction"]
    lines = [f"run {run.run_id}: {run.uri}", "", f"{'metric':<40} value"]
    for k in keys:
        if k in run.metrics:
            v = run.metrics[k]
            lines.append(f"{k:<40} {v:.4f}" if isinstance(v, float) else f"{k:<40} {v}")
    lines += ["", "outputs:"]
    for name in ("embeddings", "errors", "analysis", "metrics.json", "report.md", "manifest.json"):
        lines.append(f"  {name:<14} {run.path(name)}")
    return "\n".join(lines)
