"""The whole OLR run: the registered stages in order (data -> classifier -> siamese -> embed ->
decoder -> analysis) over one run folder (:class:`olr_ray.run.Run`).

Re-running with the same run id skips stages marked done in the manifest; an interrupted
training stage continues from its last checkpoint (``checkpoints/<stage>/latest.json``).
"""

from __future__ import annotations

import time
from typing import Callable

from olr_ray import storage
from olr_ray.config import PipelineConfig
from olr_ray.run import Run, UsageError, default_run_id, utc_now
from olr_ray.runtime import (
    ResourcePlan,
    acquire_resources,
    check_shared_output,
    cluster_nodes,
    init_ray,
)
from olr_ray.stages import BY_NAME, REGISTRY, STAGES

HEADLINE = ["analysis.split", "classifier.test_mean_accuracy", "classifier.val_mean_accuracy", "classifier.majority_baseline", "siamese.dot_r2",
            "embed.norm_ratio_present_absent", "probe.test_mean_accuracy", "correlation.vs_label_corr_r",
            "reconstruction.test_ssim", "editing.add_success", "editing.others_preserved",
            "disentanglement.own_block_fraction"]


def check_stage_order(run: Run, wanted: list[str]) -> None:
    """Every stage asked for has its inputs: each one it requires is done in this run or asked for too."""
    for name in wanted:
        missing = [p for p in BY_NAME[name].REQUIRES if p not in wanted and not run.done(p)]
        if missing:
            raise UsageError(f"--stages {name}: run {run.run_id} has not done {', '.join(missing)} yet; add "
                             f"{'it' if len(missing) == 1 else 'them'} to --stages, or leave --stages out")


def check_options_against_data(run: Run, wanted: list[str]) -> None:
    """The checks stages make of their options once the data is known (e.g. a label the data must have)."""
    for stage in REGISTRY:
        if stage.NAME in wanted and hasattr(stage, "check"):
            stage.check(run)


def _run_stage(run: Run, stage, plan: ResourcePlan, progress: Callable[[str], None]) -> None:
    """One stage, its status, time and error in the manifest whatever happens."""
    st = run.stage(stage.NAME)
    st.update({"status": "running", "started_at": utc_now()})
    run.save()
    progress(f"[{stage.NAME}] starting")
    t0 = time.time()
    try:
        out = stage.run(run, plan)
    except BaseException as exc:
        st.update({"status": "failed", "error": storage.redact(f"{type(exc).__name__}: {exc}")[:2000],
                   "seconds": round(time.time() - t0, 2)})
        run.save()
        raise
    st.update(out)
    st.update({"status": "done", "seconds": round(time.time() - t0, 2), "finished_at": utc_now()})
    run.metrics[f"timing.{stage.NAME}_seconds"] = st["seconds"]
    run.save()
    progress(f"[{stage.NAME}] done in {st['seconds']:.1f}s")


def _run_with_replanning(run: Run, stage, plan: ResourcePlan, progress: Callable[[str], None]) -> ResourcePlan:
    """One stage; when it fails after a node of the plan was lost, the work is planned again on the nodes left
    and the stage runs again (a training stage from its last checkpoint), once per lost node."""
    cfg = run.cfg
    while True:
        try:
            _run_stage(run, stage, plan, progress)
            return plan
        except Exception:
            alive = {n.node_id for n in cluster_nodes()}
            lost = [n for n in plan.node_ids if n not in alive]
            if not lost or not alive:
                raise
            st = run.stage(stage.NAME)
            st["nodes_lost"] = sorted(set(st.get("nodes_lost", [])) | set(lost))
            progress(f"[{stage.NAME}] failed after losing {len(lost)} node(s) ({', '.join(n[:8] for n in lost)}); "
                     f"planning again on the {len(alive)} left and running the stage again from its last checkpoint")
            plan = acquire_resources(cfg.num_workers, cfg.use_gpu, cfg.resource_wait_s, progress)
            run.manifest["resources"] = plan.__dict__
            run.save()


def run_pipeline(cfg: PipelineConfig, output: str = "./runs", run_id: str | None = None,
                 stages: list[str] | None = None, progress: Callable[[str], None] = print,
                 dry_run: bool = False) -> Run:
    """Run (or resume) the pipeline; returns the run with its manifest and metrics.

    ``dry_run``: check the request (storage, data, stage order, a resume's config), start or join Ray and
    size the work, say what would run, and stop there, writing nothing.
    """
    # Storage first: bad credentials, a denied or missing bucket fail here, in seconds, before
    # a Ray cluster is started or joined. Nothing is written until Ray's checks have passed too.
    run_id = run_id or default_run_id(cfg)
    run = Run.open(cfg, output, run_id, STAGES, dry=True)
    progress(f"run {run.run_id}: {run.uri}")
    wanted = stages or list(STAGES)
    check_stage_order(run, wanted)
    for stage in REGISTRY:
        if stage.NAME in wanted and not run.done(stage.NAME) and hasattr(stage, "precheck"):
            stage.precheck(run)
    init_ray()
    plan = acquire_resources(cfg.num_workers, cfg.use_gpu, cfg.resource_wait_s, progress)
    check_shared_output(output)
    run.manifest["resources"] = plan.__dict__
    if run.done("data"):
        check_options_against_data(run, wanted)
    if dry_run:
        todo = [s for s in wanted if not run.done(s)]
        progress(f"dry run: would run {', '.join(todo) or 'nothing'} "
                 f"(done already: {', '.join(s for s in wanted if run.done(s)) or 'none'}); resources: {plan}")
        return run
    run = Run.open(cfg, output, run_id, STAGES)  # now written: the folder, its config and manifest
    run.manifest["resources"] = plan.__dict__
    run.accept_changes()
    for stage in REGISTRY:
        if stage.NAME not in wanted:
            continue
        if run.done(stage.NAME):
            progress(f"[{stage.NAME}] already done in this run; skipping")
            continue
        plan = _run_with_replanning(run, stage, plan, progress)
        if stage.NAME == "data":
            check_options_against_data(run, wanted)
    return run


def summary(run: Run) -> str:
    """A short table of the headline metrics and where the outputs are."""
    lines = [f"run {run.run_id}: {run.uri}", "", f"{'metric':<40} value"]
    for k in HEADLINE:
        if k in run.metrics:
            v = run.metrics[k]
            lines.append(f"{k:<40} {v:.4f}" if isinstance(v, float) else f"{k:<40} {v}")
    lines += ["", "outputs:"]
    for name in ("embeddings", "errors", "analysis", "metrics.json", "report.md", "manifest.json"):
        lines.append(f"  {name:<14} {run.path(name)}")
    return "\n".join(lines)
