"""The run folder: where a run's outputs live and what its manifest and metrics record.

Layout of ``<output>/<run-id>/``: ``config.yaml``, ``manifest.json`` (each stage's status,
timings, row counts and metric keys; versions; git commit), ``data/``, ``checkpoints/``,
``embeddings/``, ``errors/``, ``analysis/``, ``metrics.json``, ``report.md``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

import olr_ray
from olr_ray import storage
from olr_ray.config import PipelineConfig, UsageError, from_dict, to_yaml  # noqa: F401 - UsageError re-exported
from olr_ray.images import decode_images
from olr_ray.runtime import ResourcePlan

log = logging.getLogger("olr_ray")


# The most of Ray's object store a stage may fill with a cached split (Run.read_images(cache=True)).
# OLR_CACHE_SHARE=0 turns the cache off.
CACHE_SHARE = float(os.environ.get("OLR_CACHE_SHARE", "0.2"))
# Options that change how a run is carried out, not what it computes: a resume may change them.
RESULT_NEUTRAL = ("num_workers", "use_gpu", "max_failures", "resource_wait_s", "embed.batch_size", "embed.num_actors")
# Options of the analysis alone: a resume that changes them runs the analysis again.
ANALYSIS_ONLY = "analysis."


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: PipelineConfig, new: PipelineConfig) -> dict[str, tuple[Any, Any]]:
    """Every option whose value differs: dotted key -> (saved, new)."""
    a, b = _flat(saved.to_dict()), _flat(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def decode_prepared(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray Data batch function: the stored ``image_bytes`` decoded into ``image`` (uint8 size x size x 3)."""
    batch["image"] = decode_images(batch.pop("image_bytes"), size)
    return batch


def _encoded(files: list[str]) -> bool:
    """Whether prepared-image files keep each image encoded (``image_bytes``) rather than as pixels (``image``,
    runs written before the data copy was compacted)."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(files[0])
    return "image_bytes" in pq.read_schema(path, filesystem=fs).names


def read_prepared(dirs: list[str], plan: ResourcePlan, columns: list[str] | None, size: int):
    """Prepared images (the folders ``stages.data.prepare`` writes) as a Ray Dataset with ``image`` decoded
    (uint8 ``size`` x ``size`` x 3); read and decode tasks ask for ``plan.task_cpus``."""
    import ray

    fs, _ = storage.resolve(dirs[0])
    files = [f for d in dirs for f in storage.list_files(d, ".parquet")]
    encoded = bool(files) and _encoded(files)
    read = [c if c != "image" or not encoded else "image_bytes" for c in columns] if columns else None
    ds = ray.data.read_parquet([storage.resolve(d)[1] for d in dirs], filesystem=fs, num_cpus=plan.task_cpus,
                               columns=read)
    if encoded and (columns is None or "image" in columns):
        ds = ds.map_batches(decode_prepared, fn_kwargs={"size": size}, batch_format="numpy",
                            num_cpus=plan.task_cpus)
    return ds


def prepared_images(files: list[str], key: str, values: list, size: int) -> dict:
    """The prepared images (uint8 ``size`` x ``size`` x 3) whose ``key`` column (``uid`` or ``image_id``) is in
    ``values``, read from the Parquet ``files`` without Ray, as ``{value: image}``; only the matching rows are
    kept in memory. A value with no image is a ``KeyError`` naming it."""
    import json

    import pyarrow as pa
    import pyarrow.dataset as pads

    fs, _ = storage.resolve(files[0])
    encoded = _encoded(files)
    table = pads.dataset([storage.resolve(f)[1] for f in files], filesystem=fs, format="parquet").to_table(
        columns=[key, "image_bytes" if encoded else "image"], filter=pads.field(key).isin(list(values)))
    if table.num_rows == 0:
        found: dict = {}
    elif encoded:
        found = dict(zip(table[key].to_pylist(), decode_images(table["image_bytes"].to_pylist(), size)))
    else:
        col = table["image"].combine_chunks()
        if isinstance(col, pa.ExtensionArray):  # Ray's tensor type, registered when ray is imported
            shape, col = list(col.type.shape), col.storage
        else:
            shape = json.loads(table.schema.field("image").metadata[b"ARROW:extension:metadata"])
        flat = col.flatten().to_numpy().astype(np.uint8)
        found = dict(zip(table[key].to_pylist(), flat.reshape(-1, *shape)))
    missing = [v for v in values if v not in found]
    if missing:
        raise KeyError(f"{key}(s) {', '.join(map(str, missing[:5]))} not among the prepared images in "
                       f"{files[0].rsplit('/', 1)[0]}" + (" and others" if len(files) > 1 else ""))
    return found


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Options this resume changes (all of them ones a resume may change); applied by :meth:`accept_changes`."""

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    @property
    def output_root(self) -> str:
        """The ``--output`` folder that holds this run (and the others written there)."""
        return self.uri.rstrip("/").rsplit("/", 1)[0]

    @classmethod
    def open(cls, cfg: PipelineConfig, output: str, run_id: str, stages: tuple[str, ...], dry: bool = False) -> "Run":
        """Create the run folder, or reopen it for resume (its saved config must match but for the
        options a resume may change). ``dry``: check the same, write nothing."""
        uri = storage.join(output, run_id)
        run = cls(cfg, uri, run_id)
        if storage.exists(run.path("manifest.json")):
            run.manifest = storage.read_json(run.path("manifest.json"))
            if storage.exists(run.path("metrics.json")):
                run.metrics = storage.read_json(run.path("metrics.json"))
            saved = from_dict(yaml.safe_load(storage.read_bytes(run.path("config.yaml")).decode()) or {})
            run._check_changes(config_changes(saved, cfg))
            log.info("resuming run %s at %s", run_id, uri)
        elif dry:
            run.manifest = {"run_id": run_id, "stages": {s: {"status": "pending"} for s in stages}}
        else:
            import ray  # heavy: only once the request has been checked
            import torch

            storage.makedirs(uri)
            storage.write_bytes(run.path("config.yaml"), to_yaml(cfg).encode())
            run.manifest = {
                "run_id": run_id,
                "created_at": utc_now(),
                "versions": {"olr_ray": olr_ray.__version__, "ray": ray.__version__, "torch": torch.__version__,
                             "python": platform.python_version()},
                "git_commit": _git_commit(),
                "stages": {s: {"status": "pending"} for s in stages},
            }
            run.save()
        return run

    def _check_changes(self, changes: dict[str, tuple[Any, Any]]) -> None:
        """A resume may change how the run is carried out, and the analysis' options (the analysis then
        runs again); any other change would mix results of two configs in one run. Nothing is written here."""
        pca = changes.get("analysis.pca_label")
        if pca and "auto" in pca and self.metrics.get("pca.label") in pca:
            del changes["analysis.pca_label"]  # auto resolved to the very label the other names
        blocking = [k for k in changes if k not in RESULT_NEUTRAL and not k.startswith(ANALYSIS_ONLY)]
        if blocking:
            shown = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in blocking[:6])
            raise UsageError(f"run {self.run_id} at {self.uri} was started with a different config: {shown}; use a "
                             f"new --run-id or the same options (see {self.path('config.yaml')})")
        self.changes = changes
        if any(k.startswith(ANALYSIS_ONLY) for k in changes) and self.done("analysis"):
            self.stage("analysis")["status"] = "pending"  # in memory: a dry run says the analysis would run again

    def accept_changes(self) -> None:
        """Write the resume's accepted changes, once every check of the request has passed: the new
        config.yaml, the change under ``resumed_with``, and the analysis' old metrics gone when its
        options changed (its stage is pending, run again now or by a later resume)."""
        if not self.changes:
            return
        if any(k.startswith(ANALYSIS_ONLY) for k in self.changes):
            for k in self.stage("analysis").pop("metric_keys", []):
                self.metrics.pop(k, None)
            log.info("analysis options changed: the analysis runs again")
        self.manifest.setdefault("resumed_with", []).append(
            {"at": utc_now(), "changed": {k: list(v) for k, v in self.changes.items()}})
        storage.write_bytes(self.path("config.yaml"), to_yaml(self.cfg).encode())
        self.changes = {}
        self.save()

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

    def record(self, stage: str, metrics: dict[str, Any]) -> None:
        """Add a stage's metrics; every key has one writer, so a key another stage wrote is an error."""
        owners = {k: name for name, st in self.manifest["stages"].items() if name != stage
                  for k in st.get("metric_keys", [])}
        clash = sorted(k for k in metrics if k in owners)
        if clash:
            raise RuntimeError(f"stage {stage} would overwrite metrics of another stage: "
                               + ", ".join(f"{k} ({owners[k]})" for k in clash))
        self.metrics.update(metrics)
        st = self.stage(stage)
        st["metric_keys"] = sorted(set(st.get("metric_keys", [])) | set(metrics))

    # ----------------------------------------------------------------------- the prepared data

    @property
    def data(self) -> dict[str, Any]:
        """What the data stage recorded: label_names, image_size, splits, rows, kind."""
        return self.stage("data")

    def split_dirs(self, splits: list[str] | None = None) -> list[str]:
        present = self.data.get("splits", {})
        wanted = splits or [s for s in ("train", "valid", "test") if present.get(s)]
        return [self.path("data", f"part={s}") for s in wanted if present.get(s)]

    def eval_split(self) -> str:
        """Validation split for per-epoch metrics: ``valid`` when the data has one, else ``test``."""
        return "valid" if self.data.get("splits", {}).get("valid") else "test"

    def read_images(self, splits: list[str] | None, plan: ResourcePlan, columns: list[str] | None = None,
                    cache: bool = False):
        """The prepared images of some splits as a Ray Dataset (read tasks ask for ``plan.task_cpus``).

        ``cache``: read them once into Ray's object store when they take at most ``CACHE_SHARE`` of it, so a
        stage that passes over them every epoch does not read and decode the Parquet files again each time
        (on the demo that was a third of each classifier epoch); larger splits stream from storage every pass.
        """
        dirs = self.split_dirs(splits)
        if not dirs:
            raise RuntimeError(f"run {self.run_id}: no prepared images for splits {splits} under {self.path('data')}")
        ds = read_prepared(dirs, plan, columns, int(self.data["image_size"]))
        if cache:
            counts = self.data.get("splits", {})
            rows = sum(counts.get(s, 0) for s in (splits or counts))
            return self.cache(ds, rows, 3 * int(self.data.get("image_size", 0)) ** 2 + 512,  # pixels, labels, ids
                              ",".join(splits or counts))
        return ds

    @staticmethod
    def cache(ds, rows: int, row_bytes: int, what: str):
        """``ds`` read once into Ray's object store when its ``rows`` of about ``row_bytes`` each take at most
        ``CACHE_SHARE`` of it, else ``ds`` as it is, streamed from storage on every pass. The log says which."""
        import ray

        need = rows * row_bytes
        store = float(ray.cluster_resources().get("object_store_memory", 0))
        if need <= CACHE_SHARE * store:
            log.info("%s: %d rows (%.0f MB) read once into the object store", what, rows, need / 1e6)
            return ds.materialize()
        log.info("%s: %d rows (%.0f MB) stream from storage every pass: over %.0f%% of the object store (%.0f MB)",
                 what, rows, need / 1e6, 100 * CACHE_SHARE, store / 1e6)
        return ds
