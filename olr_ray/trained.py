"""A finished run, opened to be used again: its trained models, label set, image size, embeddings
and prepared images, read from the run folder without Ray (local or ``s3://``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import yaml

from olr_ray import storage
from olr_ray.run import UsageError, prepared_images


@dataclass
class TrainedRun:
    uri: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, uri: str, needs: tuple[str, ...] = ("data", "classifier", "siamese")) -> "TrainedRun":
        """The run at ``uri`` (``<output>/<run-id>``); the stages in ``needs`` must be done there."""
        uri = storage.absolute(uri)
        path = storage.join(uri, "manifest.json")
        if not storage.exists(path):
            raise UsageError(f"{path}: not found; expected a run folder <output>/<run-id> written by "
                             f"jobs/full_pipeline.py")
        run = cls(uri, storage.read_json(path))
        missing = [s for s in needs if run.manifest["stages"].get(s, {}).get("status") != "done"]
        if missing:
            raise UsageError(f"run {uri} has not finished {', '.join(missing)}; finish it first "
                             f"(jobs/full_pipeline.py --run-id {run.manifest.get('run_id', '<run-id>')})")
        return run

    def stage(self, name: str) -> dict[str, Any]:
        return self.manifest["stages"].get(name, {})

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    @property
    def label_names(self) -> list[str]:
        return list(self.stage("data")["label_names"])

    @cached_property
    def config(self) -> dict[str, Any]:
        """The run's resolved config (``config.yaml``) as a dict."""
        return yaml.safe_load(storage.read_bytes(self.path("config.yaml")).decode()) or {}

    @property
    def k(self) -> int:
        return int(self.config["siamese"]["k"])

    @property
    def image_size(self) -> int:
        return int(self.stage("data")["image_size"])

    def checkpoint(self, stage: str) -> str:
        """The stage's final checkpoint, inside this run folder wherever the run was written from (the
        manifest keeps the URI as the run wrote it: relative to its working directory, or another root)."""
        uri = self.stage(stage).get("checkpoint")
        if not uri or "/checkpoints/" not in uri:
            raise UsageError(f"run {self.uri} has no {stage} checkpoint; run its {stage} stage first")
        return self.path(*uri[uri.rindex("/checkpoints/") + 1:].split("/"))

    def images(self, image_ids: list[str]) -> dict[str, np.ndarray]:
        """The prepared images (uint8 HxWx3) of some image ids, read from ``data/`` without Ray."""
        files = [f for f in storage.list_files(self.path("data"), ".parquet") if "part=errors" not in f]
        try:
            return prepared_images(files, "image_id", image_ids, self.image_size)
        except KeyError as e:
            raise KeyError(f"{e.args[0]} (run {self.uri})") from None
