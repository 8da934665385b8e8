import pytest
import yaml

from olr_ray.config import PRESETS, ConfigError, build_config, from_dict, to_yaml


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(preset):
    cfg = build_config(preset)
    assert to_yaml(from_dict(yaml.safe_load(to_yaml(cfg)))) == to_yaml(cfg)


def test_demo_preset_is_the_documented_default():
    cfg = build_config("demo")
    assert cfg.data.source == "synthetic" and cfg.data.image_size == 64 and cfg.data.n_images >= 20_000
    assert cfg.siamese.k == 32 and cfg.siamese.occlusion_min == 0.33 and cfg.siamese.occlusion_max == 0.66
    assert cfg.decoder.optimizer == "rmsprop" and cfg.decoder.alpha == 0.5


def test_paper_preset_is_the_papers_method():
    """--preset paper turns every departure of this project off (paper sections in config.PAPER_METHOD)."""
    cfg = build_config("paper")
    c, s, d = cfg.classifier, cfg.siamese, cfg.decoder
    assert c.occlusion_prob == 0.0 and c.lr_schedule == "constant"
    assert s.k == 32 and s.target == "occlusion" and s.occlusion_prob == 1.0
    assert (s.occlusion_min, s.occlusion_max) == (0.33, 0.66) and s.label_pair_share == 0.0
    assert s.activation == "relu" and s.block_floor == 0.0 and s.grad_floor == 0.0
    assert s.init_from_classifier is False and s.lr_schedule == "constant"
    assert d.lr == 1e-4 and d.optimizer == "rmsprop" and d.lr_schedule == "constant" and d.alpha == 0.5
    assert d.edit_weight == 0.0 and d.label_weight == 0.0
    assert cfg.data.image_size == 178 and cfg.analysis.pca_label == "Mouth_Slightly_Open"
    assert cfg.analysis.edit_gaussians == "labelled"
    # 4: a random 95/5 split, CelebA's partition file unused, no validation split
    assert cfg.data.partition_file is False and (cfg.data.test_fraction, cfg.data.valid_fraction) == (0.05, 0.0)


def test_the_other_presets_split_80_10_10_and_use_a_folder_s_partition_file():
    for preset in ("demo", "smoke", "celeba"):
        d = build_config(preset).data
        assert (d.test_fraction, d.valid_fraction, d.partition_file) == (0.1, 0.1, True), preset


@pytest.mark.parametrize("overrides, message", [
    (["data.valid_fraction=-0.1"], "data.valid_fraction: expected 0 <= x < 0.5"),
    (["data.valid_fraction=0.3", "data.test_fraction=0.3"], "at least half the images train"),
])
def test_a_split_that_leaves_too_little_to_train_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config("demo", overrides=overrides)


def test_celeba_preset_is_this_projects_recipe_at_celeba_scale():
    paper, celeba, demo = build_config("paper"), build_config("celeba"), build_config("demo")
    for section in ("classifier", "siamese"):  # the demo's departures, kept
        for f in ("occlusion_prob", "activation", "block_floor", "grad_floor", "label_pair_share",
                  "init_from_classifier", "lr_schedule"):
            if hasattr(getattr(demo, section), f) and not (section == "siamese" and f == "occlusion_prob"):
                assert getattr(getattr(celeba, section), f) == getattr(getattr(demo, section), f), (section, f)
    assert celeba.decoder.edit_weight == demo.decoder.edit_weight > 0 and celeba.siamese.occlusion_prob == 1.0
    assert celeba.decoder.lr == 1e-4 and celeba.decoder.lr_schedule == "constant"
    # the same scale as the paper preset: sizes, lengths, resources
    for key in ("num_workers", "use_gpu"):
        assert getattr(celeba, key) == getattr(paper, key)
    split = ("partition_file", "test_fraction", "valid_fraction")
    assert {k: v for k, v in vars(celeba.data).items() if k not in split} == \
        {k: v for k, v in vars(paper.data).items() if k not in split}
    assert celeba.siamese.width == paper.siamese.width == 64
    assert celeba.decoder.epochs == paper.decoder.epochs == 50


def test_overrides_are_typed_and_nested():
    cfg = build_config("smoke", overrides=["siamese.epochs=3", "data.label_noise=0.1", "siamese.target=temperature",
                                           "analysis.edit_scales=[1.0, 2.0]"])
    assert cfg.siamese.epochs == 3 and cfg.data.label_noise == 0.1 and cfg.siamese.target == "temperature"
    assert cfg.analysis.edit_scales == [1.0, 2.0]


def test_exponent_floats_are_numbers_in_overrides_and_files(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string; the paper's rate is written exactly that way."""
    cfg = build_config("smoke", overrides=["decoder.lr=1e-4", "analysis.edit_scales=[5e-1, 1]"])
    assert cfg.decoder.lr == 1e-4 and cfg.analysis.edit_scales == [0.5, 1.0]
    f = tmp_path / "c.yaml"
    f.write_text("classifier:\n  lr: 3e-3\n")
    assert build_config("smoke", str(f)).classifier.lr == 3e-3


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        build_config("smoke", overrides=["nope=1", "siamese.k=0", "classifier.lr=abc", "siamese.target=occ",
                                         "data.bogus=2", "noequals"])
    problems = "\n".join(exc.value.problems)
    for expected in ("nope: unknown key", "siamese.k: expected >= 1", "classifier.lr: expected a number",
                     "siamese.target: expected one of occlusion, temperature", "data.bogus: unknown key",
                     "noequals: expected key=value"):
        assert expected in problems
    assert len(exc.value.problems) == 6


def test_yaml_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 7\nsiamese:\n  k: 16\n")
    cfg = build_config("smoke", str(f))
    assert cfg.seed == 7 and cfg.siamese.k == 16
    f.write_text("siamese: [1, 2]\n")
    with pytest.raises(ConfigError, match="siamese: expected a mapping"):
        build_config("smoke", str(f))


def test_cli_takes_overrides_between_options():
    import olr_ray.cli as cli

    args = cli.parse_args(["--preset", "smoke", "siamese.epochs=1", "--data", "/tmp/faces", "decoder.lr=1e-4"])
    assert args.preset == "smoke" and args.data == "/tmp/faces"
    assert args.overrides == ["siamese.epochs=1", "decoder.lr=1e-4"]
