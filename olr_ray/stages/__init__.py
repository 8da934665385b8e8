"""The pipeline's stages, one module each, in the order they run.

Every stage module has the same shape:

- ``NAME``: its name in ``--stages``, the manifest and ``checkpoints/<name>``;
- ``REQUIRES``: the stages whose outputs it reads (done in this run or run before it);
- ``run(run, plan) -> dict``: does the work, records its metrics with ``run.record(NAME, ...)``
  (every metric key has one writer) and returns what the manifest keeps about it;
- optionally ``precheck(run)``: checks the request before Ray starts, and ``check(run)``: checks
  options against the data once the data stage is done, before any training.
"""

from __future__ import annotations

from types import ModuleType

from olr_ray.stages import analysis, classifier, data, decoder, embed, siamese

REGISTRY: tuple[ModuleType, ...] = (data, classifier, siamese, embed, decoder, analysis)
STAGES: tuple[str, ...] = tuple(s.NAME for s in REGISTRY)
BY_NAME: dict[str, ModuleType] = {s.NAME: s for s in REGISTRY}
