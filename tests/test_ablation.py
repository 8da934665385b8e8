"""jobs/ablation.py's plan and table: which runs, and how a departure is judged against the two-seed noise."""

import math

from olr_ray import ablation
from olr_ray.config import build_config


def test_every_departure_of_the_default_is_toggled_alone_and_the_paper_arm_is_the_paper_preset_s_method():
    plan = {a.name: a for a in ablation.arms((0, 1))}
    assert {"default-s0", "default-s1", "paper-s0", "paper-s1", "alt-temperature"} <= set(plan)
    toggled = {a.overrides[0].split("=")[0] for n, a in plan.items() if n.startswith("paper-") and len(a.overrides) == 1}
    demo, paper = build_config("demo"), build_config("paper")
    differ = {f"{s}.{f}" for s in ("classifier", "siamese", "decoder") for f in vars(getattr(paper, s))
              if f"{s}.{f}" in ablation._leaves(ablation.PAPER_METHOD)
              and getattr(getattr(demo, s), f) != getattr(getattr(paper, s), f)}
    assert toggled == differ and "siamese.grad_floor" in toggled and "decoder.edit_weight" in toggled
    # The paper arm, on the reduced config, is the paper preset's method field for field.
    cfg = build_config("demo", overrides=ablation.REDUCED + plan["paper-s0"].overrides)
    for key in differ:
        s, f = key.split(".")
        assert getattr(getattr(cfg, s), f) == getattr(getattr(paper, s), f), key
    assert cfg.analysis.split == "valid" and cfg.data.valid_fraction > 0


def test_a_departure_counts_only_beyond_the_two_seed_noise():
    plan = [ablation.Arm("default-s0", 0), ablation.Arm("default-s1", 1), ablation.Arm("paper-s0", 0),
            ablation.Arm("paper-s1", 1), ablation.Arm("paper-siamese.grad_floor", 0, [], "grad floor off"),
            ablation.Arm("paper-decoder.lr", 0, [], "lr down"), ablation.Arm("alt-temperature", 0, [], "temp")]
    base = {key: 0.5 for _, key, _ in ablation.COLUMNS}
    results = {
        "default-s0": {**base, "correlation.vs_label_corr_r": 0.90},
        "default-s1": {**base, "correlation.vs_label_corr_r": 0.92},  # noise on r: 0.02
        "paper-s0": base, "paper-s1": base,
        "paper-siamese.grad_floor": {**base, "correlation.vs_label_corr_r": 0.80},  # 0.11 below: beyond
        "paper-decoder.lr": {**base, "correlation.vs_label_corr_r": 0.905},  # within the noise
    }
    text = ablation.table(results, plan)
    assert "- **grad floor off**: r +0.110 (better with the default)." in text
    assert "- **lr down**: no effect beyond the noise." in text
    assert "| alt-temperature | temp | not run" in text and "temp**" not in text
    noise_row = next(line for line in text.splitlines() if line.startswith("| noise"))
    assert "0.020" in noise_row and not math.isnan(float(noise_row.split("|")[4]))
