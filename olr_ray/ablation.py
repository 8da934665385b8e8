"""What each departure from the paper buys: the paper's recipe and the default, two seeds each, then every
departure set back to the paper's value alone (one seed), on a reduced synthetic config, measured on the
validation split; writes the table to a markdown file.

Runs go one at a time into ``<output>/<name>`` and are resumed like any run: a finished one is read, not run
again, so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from olr_ray.config import PAPER_METHOD, build_config
from olr_ray.pipeline import run_pipeline

log = logging.getLogger("olr_ray.ablation")

# The demo at a quarter of its images and fewer epochs (about 6 minutes a run on 2 cores in float32: 6,000 images
# and 8 classifier epochs took twice that), measured on the validation split.
REDUCED = ["data.n_images=5000", "classifier.epochs=6", "siamese.epochs=3", "decoder.epochs=2",
           "analysis.edit_images=128", "analysis.disentangle_faces=128", "analysis.split=valid"]

# Departures of this project's default from the paper that a reduced run can measure. Sizes (k) and the
# split are not departures of the method; what the paper preset sets equal to the default is left out.
SKIP = {"data", "analysis"}

# The table's columns: (header, metric key, higher is better).
COLUMNS: list[tuple[str, str, bool]] = [
    ("probe - clf", "probe.minus_classifier", True),
    ("r", "correlation.vs_label_corr_r", True),
    ("r, clf probs", "correlation.classifier_probs_corr_r", True),
    ("dot R^2", "siamese.dot_r2", True),
    ("norm ratio", "embed.norm_ratio_present_absent_valid", True),
    ("add (ind.)", "editing.independent.add_success", True),
    ("remove (ind.)", "editing.independent.remove_success", True),
    ("kept (ind.)", "editing.independent.others_preserved_changed", True),
    ("SSIM", "reconstruction.test_ssim", True),
    ("seconds", "timing.total_seconds", False),
]


@dataclass
class Arm:
    name: str
    seed: int
    overrides: list[str] = field(default_factory=list)
    """Overrides on top of REDUCED (a departure set back to the paper's value, or the whole paper method)."""
    what: str = ""


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _fmt_value(v: Any) -> str:
    return "true" if v is True else "false" if v is False else str(v)


def departures(preset: str = "demo") -> dict[str, tuple[Any, Any]]:
    """Every field where the default differs from the paper's method: key -> (default, paper)."""
    cfg = build_config(preset, overrides=REDUCED)
    out = {}
    for key, paper in _leaves(PAPER_METHOD).items():
        if key.split(".")[0] in SKIP:
            continue
        section, name = key.split(".", 1)
        default = getattr(getattr(cfg, section), name)
        if default != paper:
            out[key] = (default, paper)
    return out


def arms(seeds: tuple[int, int] = (0, 1)) -> list[Arm]:
    """The runs: paper and default at two seeds, then each departure alone and the temperature alternative."""
    paper = [f"{k}={_fmt_value(v)}" for k, v in _leaves(PAPER_METHOD).items() if k.split(".")[0] not in SKIP]
    out = [Arm(f"default-s{s}", s, [], "the default recipe") for s in seeds]
    out += [Arm(f"paper-s{s}", s, paper, "the paper's method") for s in seeds]
    for key, (default, value) in departures().items():
        out.append(Arm(f"paper-{key}", seeds[0], [f"{key}={_fmt_value(value)}"],
                       f"{key}: {_fmt_value(default)} -> {_fmt_value(value)} (the paper's)"))
    out.append(Arm("alt-temperature", seeds[0], ["siamese.target=temperature"],
                   "siamese.target: occlusion -> temperature (the paper's alternative)"))
    return out


def run_arm(arm: Arm, output: str, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run (or read) one arm; its metrics with the run's total stage seconds."""
    cfg = build_config("demo", overrides=REDUCED + arm.overrides + [f"seed={arm.seed}"])
    t0 = time.perf_counter()
    run = run_pipeline(cfg, output, arm.name, progress=progress)
    metrics = dict(run.metrics)
    metrics["timing.total_seconds"] = float(sum(st.get("seconds", 0.0) for st in run.manifest["stages"].values()))
    metrics["_precision"] = run.manifest["stages"].get("classifier", {}).get("precision", "?")
    log.info("ablation: %s done (%.0f s this call)", arm.name, time.perf_counter() - t0)
    return metrics


def _cell(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"


def table(results: dict[str, dict[str, Any]], plan: list[Arm]) -> str:
    """The markdown report: every arm's numbers, the two-seed noise, and each departure's verdict."""
    def value(name: str, key: str) -> float:
        return float(results.get(name, {}).get(key, float("nan")))

    defaults = [a.name for a in plan if a.name.startswith("default-s")]
    papers = [a.name for a in plan if a.name.startswith("paper-s") and a.name[len("paper-s"):].isdigit()]
    def spread(key: str) -> float:
        pairs = [abs(value(g[0], key) - value(g[1], key)) for g in (defaults, papers)]
        pairs = [p for p in pairs if not math.isnan(p)]
        return max(pairs) if pairs else float("nan")

    noise = {key: spread(key) for _, key, _ in COLUMNS}
    def mean(key: str) -> float:
        vals = [value(n, key) for n in defaults if not math.isnan(value(n, key))]
        return float(np.mean(vals)) if vals else float("nan")

    base = {key: mean(key) for _, key, _ in COLUMNS}
    head = "| run | what | " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for arm in plan:
        if arm.name not in results:
            lines.append(f"| {arm.name} | {arm.what} | " + " | ".join("not run" for _ in COLUMNS) + " |")
            continue
        lines.append(f"| {arm.name} | {arm.what} | " + " | ".join(_cell(value(arm.name, k)) for _, k, _ in COLUMNS) + " |")
    lines.append("| noise | largest two-seed difference (default, paper) | "
                 + " | ".join(_cell(noise[k]) for _, k, _ in COLUMNS) + " |")
    verdicts = ["", "## Each departure against the noise", "",
                "A departure's effect is the default (mean of its two seeds) minus the run with the departure set back "
                "to the paper's value; it is beyond the noise where it exceeds the largest two-seed difference.", ""]
    quality = [c for c in COLUMNS if c[1] != "timing.total_seconds"]
    for arm in plan:
        if arm.name in defaults or arm.name in papers or arm.name not in results:
            continue
        beyond = []
        for header, key, higher in quality:
            effect = base[key] - value(arm.name, key)
            if not math.isnan(effect) and abs(effect) > noise[key]:
                good = (effect > 0) == higher
                beyond.append(f"{header} {effect:+.3f} ({'better' if good else 'worse'} with the default)")
        verdict = "; ".join(beyond) if beyond else "no effect beyond the noise"
        verdicts.append(f"- **{arm.what}**: {verdict}.")
    return "\n".join(lines + verdicts) + "\n"


def run_ablation(output: str, report: str, seeds: tuple[int, int] = (0, 1), only: list[str] | None = None,
                 progress: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Every arm in turn (finished ones are read back), then the table into ``report``."""
    plan = arms(seeds)
    results: dict[str, dict[str, Any]] = {}
    todo = [a for a in plan if not only or a.name in only]
    for i, arm in enumerate(todo, 1):
        progress(f"[ablation {i}/{len(todo)}] {arm.name}: {arm.what}")
        results[arm.name] = run_arm(arm, output, progress)
        with open(report, "w", encoding="utf-8") as f:  # after every arm: an interrupted ablation keeps its table
            f.write(header_text(output, len(results), len(plan), results) + table(results, plan))
    return results


def header_text(output: str, done: int, total: int, results: dict[str, dict[str, Any]]) -> str:
    import platform

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    status = "complete" if done == total else f"**{done} of {total} runs done** (re-run the command to continue)"
    return ("# Ablation: what each departure from the paper buys\n\n"
            f"Status: {status}. Machine: {platform.machine()} {cpu}, "
            f"{os.cpu_count()} CPUs; precision "
            + ", ".join(sorted({str(r.get('_precision', '?')) for r in results.values()})) + ".\n\n"
            "Written by `jobs/ablation.py` (runs in `" + output + "`). Every run is the demo reduced to "
            + ", ".join(f"`{o}`" for o in REDUCED) + "; every number is on the validation split. `add`, "
            "`remove` and `kept` are judged by the independent judge (`editing.independent.*`; kept: over the "
            "edits that changed their target). `probe - clf` is the linear probe's mean accuracy minus the "
            "classifier's, `r, clf probs` the classifier probabilities' agreement r (the baseline of `r`).\n\n")
