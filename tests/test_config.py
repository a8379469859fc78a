"""fit's configuration (cmalign.train.config): defaults, TOML files, dotted overrides, round trip, hash, and the
configs and hashes of runs written before the package re-layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cmalign.errors import ConfigError
from cmalign.objective.config import BLOCK_ONLY_SETTINGS
from cmalign.train.config import FitConfig, apply_overrides, load_config, to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Written by the code before the re-layout (see generate.py there): existing runs and sweeps depend on these.
PRE_MOVE = Path(__file__).parent / "fixtures" / "pre_move"
PRE_MOVE_HASHES = json.loads((PRE_MOVE / "hashes.json").read_text())


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_validate() -> None:
    cfg = FitConfig().validate()
    assert cfg.alpha_target == 0.5
    assert load_config().to_dict() == FitConfig().resolve_defaults().to_dict()


def test_toml_sections_override_defaults(tmp_path: Path) -> None:
    p = write(tmp_path, """
alpha_target = 1
[train]
steps = 12
batch_size = 4
guard = false
[loss]
distribution = "coral"
mmd_bandwidths = [1, 2.5]
[curriculum]
ramp = "cosine"
[scheduler]
mode = "lr"
[model]
fixed_logit_scale = 100.0
[data]
train = "data/train.csv"
""")
    cfg = load_config(p)
    assert cfg.alpha_target == 1.0 and isinstance(cfg.alpha_target, float)
    assert cfg.train.steps == 12 and cfg.train.batch_size == 4 and cfg.train.guard is False
    assert cfg.loss.distribution == "coral"
    assert cfg.loss.mmd_bandwidths == (1.0, 2.5)
    assert cfg.curriculum.ramp == "cosine"
    assert cfg.scheduler.mode == "lr"
    assert cfg.model.fixed_logit_scale == 100.0
    assert cfg.data.train == "data/train.csv"
    # untouched keys keep their defaults
    d = FitConfig().resolve_defaults()
    assert cfg.optim == d.optim
    assert cfg.train.seed == d.train.seed and cfg.model.name == d.model.name


def test_overrides_apply_after_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[train]\nsteps = 12\n")
    cfg = load_config(p, {"train.steps": "30", "train.out": None})
    assert cfg.train.steps == 30
    assert cfg.train.out == FitConfig().train.out  # a None override means "not given"


def test_string_overrides_are_coerced() -> None:
    cfg = load_config(None, {
        "train.steps": "7",
        "optim.lr": "1e-4",
        "alpha_target": "0.25",
        "optim.min_lr_ratio": "0",
        "train.guard": "false",
        "model.grad_checkpointing": "yes",
        "data.val": "none",
        "model.fixed_logit_scale": "100",
        "loss.mmd_bandwidths": "0.5, 1,3",
        "loss.distribution": "bures",
        "curriculum.ramp": "step",
        "scheduler.max_ratio": "2",
    })
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 1e-4
    assert cfg.alpha_target == 0.25
    assert cfg.optim.min_lr_ratio == 0.0 and isinstance(cfg.optim.min_lr_ratio, float)
    assert cfg.train.guard is False
    assert cfg.model.grad_checkpointing is True
    assert cfg.data.val is None
    assert cfg.model.fixed_logit_scale == 100.0 and isinstance(cfg.model.fixed_logit_scale, float)
    assert cfg.loss.mmd_bandwidths == (0.5, 1.0, 3.0)
    assert cfg.loss.distribution == "bures"
    assert cfg.curriculum.ramp == "step"
    assert cfg.scheduler.max_ratio == 2.0


def test_string_none_clears_an_optional_field() -> None:
    cfg = load_config(None, {"model.fixed_logit_scale": "100"})
    cfg = apply_overrides(cfg, {"model.fixed_logit_scale": "None"})
    assert cfg.model.fixed_logit_scale is None


def test_string_override_of_optional_int_is_coerced() -> None:
    cfg = load_config(None, {"data.synth_train_images": "50"})
    assert cfg.data.synth_train_images == 50 and type(cfg.data.synth_train_images) is int
    assert load_config(None, {"data.synth_train_images": "none"}).data.synth_train_images is None


def test_bad_bool_string_raises_naming_the_key() -> None:
    with pytest.raises(ValueError, match="train.guard"):
        load_config(None, {"train.guard": "maybe"})


def test_bad_int_string_raises() -> None:
    with pytest.raises(ValueError):
        load_config(None, {"train.steps": "many"})


@pytest.mark.parametrize("key", ["train.stepz", "alpha", "loss.nope"])
def test_unknown_key_in_overrides_raises_naming_it(key: str) -> None:
    with pytest.raises((KeyError, ValueError), match=key.replace(".", r"\.")):
        load_config(None, {key: "1"})


def test_unknown_section_raises_naming_it() -> None:
    with pytest.raises((KeyError, ValueError), match="trian"):
        load_config(None, {"trian.steps": "1"})


def test_section_as_key_raises() -> None:
    with pytest.raises((KeyError, ValueError), match="train"):
        load_config(None, {"train": "1"})


def test_unknown_key_in_file_raises_naming_file_and_key(tmp_path: Path) -> None:
    p = write(tmp_path, "[train]\nsteps = 10\nbatchsize = 4\n")
    with pytest.raises(ValueError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "batchsize" in str(e.value)


def test_invalid_value_in_file_raises_naming_file(tmp_path: Path) -> None:
    p = write(tmp_path, '[loss]\ndistribution = "kl"\n')
    with pytest.raises(ValueError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "kl" in str(e.value)


def test_invalid_toml_raises_naming_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[train\nsteps = = 3\n", name="broken.toml")
    with pytest.raises(ValueError, match="broken.toml"):
        load_config(p)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("override, match", [
    ({"alpha_target": "-1"}, "alpha_target"),
    ({"train.steps": "0"}, "train.steps"),
    ({"train.batch_size": "1"}, "batch_size"),
    ({"data.on_bad_sample": "ignore"}, "on_bad_sample"),
    ({"optim.accum_steps": "0"}, "accum_steps"),
    ({"train.precision": "fp8"}, "precision"),
    ({"scheduler.mode": "pcgrad"}, "mode"),
    ({"curriculum.warmup_fraction": "1.5"}, "warmup_fraction"),
])
def test_invalid_values_raise(override: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(None, override)


def _custom() -> FitConfig:
    return load_config(None, {
        "alpha_target": "0.8", "train.steps": "33", "train.out": "runs/x", "loss.mmd_bandwidths": "1,2",
        "loss.distribution": "coral", "model.fixed_logit_scale": "50", "data.train": "a.csv",
        "data.csv_separator": "\t", "curriculum.ramp": "cosine", "scheduler.mode": "alpha",
        "optim.min_lr_ratio": "0.1", "model.trainable": "last:1",
    })


@pytest.mark.parametrize("make", [lambda: FitConfig().resolve_defaults(), _custom])
def test_to_toml_round_trip(tmp_path: Path, make) -> None:
    cfg = make()
    p = write(tmp_path, to_toml(cfg), name="config.toml")
    back = load_config(p)
    assert back.to_dict() == cfg.to_dict()
    assert back.hash() == cfg.hash()
    assert back == cfg


def test_hash_ignores_run_time_knobs() -> None:
    base = FitConfig().resolve_defaults().hash()
    assert len(base) == 16
    assert FitConfig().resolve_defaults().hash() == base  # deterministic
    for key, value in [("train.out", "elsewhere"), ("train.checkpoint_every", "7"), ("train.keep_checkpoints", "5"),
                       ("train.guard_every", "3"), ("train.threads", "2"), ("train.device", "cpu"),
                       ("data.num_workers", "0")]:
        assert load_config(None, {key: value}).hash() == base, key


@pytest.mark.parametrize("key, value", [("alpha_target", "0.7"), ("train.steps", "401"), ("train.seed", "1"),
                                        ("loss.distribution", "coral"), ("optim.lr", "1e-4"),
                                        ("curriculum.ramp", "cosine"), ("loss.mmd_bandwidths", "1,2"),
                                        ("loss.lambda_paired", "0.5"), ("model.max_logit_scale", "200")])
def test_hash_changes_with_what_is_trained(key: str, value: str) -> None:
    assert load_config(None, {key: value}).hash() != FitConfig().resolve_defaults().hash()


def test_learning_rate_default_depends_on_the_model() -> None:
    assert load_config().optim.lr == 2e-4  # the embedded tiny model
    assert load_config(None, {"model.name": "ViT-B-32"}).optim.lr == 1e-5  # a pretrained CLIP
    assert load_config(None, {"model.name": "ViT-B-32", "optim.lr": "3e-5"}).optim.lr == 3e-5


@pytest.mark.parametrize("name, toml_file", [("default", "default.toml"), ("custom", "custom.toml"),
                                             ("sweep_a0.5", "sweep_a0.5.toml"), ("run", "run_config.toml")])
def test_config_written_before_the_relayout_loads_with_its_hash_and_keys(name: str, toml_file: str) -> None:
    """A RUN/config.toml of the old code loads, hashes as the old code hashed it (resume compares the two),
    and is written back with the same keys and values."""
    path = PRE_MOVE / toml_file
    cfg = load_config(path)
    assert cfg.hash() == PRE_MOVE_HASHES[name]
    old, new = tomllib.loads(path.read_text()), tomllib.loads(to_toml(cfg))
    # written back with every old key and value; what was added since is the block scheduler's own settings
    added = {k: v for k, v in new["scheduler"].items() if k not in old["scheduler"]}
    assert set(added) == set(BLOCK_ONLY_SETTINGS)
    assert {k: v for k, v in new["scheduler"].items() if k not in added} == old["scheduler"]
    # and the paired term's weight: 0 (off) for a file written before the term existed, and the text tower's share of
    # the alignment gradient: all of it; both leave the identity as it was, though the defaults are now 5 and 0.25
    assert {k for k in new["loss"] if k not in old["loss"]} == {"lambda_paired", "text_share"}
    assert new["loss"].pop("lambda_paired") == 0 and new["loss"].pop("text_share") == 1.0
    # and the warm-up's settle gate: off (a fixed warm-up) for a file written before it, the identity unchanged
    gate = {k: new["curriculum"].pop(k) for k in ("settle_tolerance", "settle_window", "warmup_max_fraction")}
    assert gate["settle_tolerance"] == 0 and cfg.curriculum.settle_tolerance == 0
    assert added["balance_ratio"] == 0  # the α balance: off
    assert new["model"].pop("max_logit_scale") == 100.0  # the logit scale's ceiling: CLIP's, as it always was
    assert {k: v for k, v in new.items() if k != "scheduler"} == {k: v for k, v in old.items() if k != "scheduler"}


def test_defaults_with_the_earlier_scheduler_hash_as_before_the_relayout() -> None:
    # The default scheduler became "block" (a different training, so a different identity); with the mode it
    # had then, the default config still hashes as it did, so no other default moved unnoticed.
    cfg = FitConfig().resolve_defaults()
    assert cfg.hash() != PRE_MOVE_HASHES["default"]
    cfg.scheduler.mode = "project"
    assert cfg.hash() != PRE_MOVE_HASHES["default"]  # the paired term became the default too
    cfg.loss.lambda_paired = 0.0
    assert cfg.hash() != PRE_MOVE_HASHES["default"]  # the text tower's share of the alignment gradient too
    cfg.loss.text_share = 1.0
    assert cfg.hash() != PRE_MOVE_HASHES["default"]  # the warm-up's settle gate too
    cfg.curriculum.settle_tolerance = 0.0
    assert cfg.hash() == PRE_MOVE_HASHES["default"]


def test_a_complete_old_curriculum_table_means_a_fixed_warmup_and_a_partial_one_the_gate(tmp_path) -> None:
    old = tmp_path / "old.toml"
    old.write_text('[curriculum]\nwarmup_fraction = 0.3\nramp = "linear"\n')  # ramp: always written
    assert load_config(old).curriculum.settle_tolerance == 0.0
    partial = tmp_path / "partial.toml"
    partial.write_text("[curriculum]\nwarmup_fraction = 0.3\n")
    assert load_config(partial).curriculum.settle_tolerance == 0.05


def test_a_partial_loss_table_gets_the_paired_terms_default_and_a_complete_old_one_zero(tmp_path) -> None:
    partial = tmp_path / "partial.toml"
    partial.write_text("[loss]\nlambda_distribution = 5.0\n")
    assert load_config(partial).loss.lambda_paired == 5.0 and load_config(partial).loss.text_share == 0.25
    # written whole by an earlier cmalign (scale_by_logit_scale is always written): the term did not exist, and both
    # towers took the alignment gradient alike
    old = tmp_path / "old.toml"
    old.write_text("[loss]\nlambda_distribution = 5.0\nscale_by_logit_scale = true\n")
    assert load_config(old).loss.lambda_paired == 0.0 and load_config(old).loss.text_share == 1.0
    # written by the version that had the paired term but not the share: both towers alike, its λ_p kept
    between = tmp_path / "between.toml"
    between.write_text("[loss]\nlambda_paired = 3.0\nscale_by_logit_scale = true\n")
    assert load_config(between).loss.lambda_paired == 3.0 and load_config(between).loss.text_share == 1.0
    # and a whole file of this version keeps what it says
    cfg = load_config(old, {"loss.lambda_paired": "1.5"})
    now = tmp_path / "now.toml"
    now.write_text(to_toml(cfg))
    assert load_config(now).loss.lambda_paired == 1.5


def test_block_only_settings_are_part_of_the_identity_only_in_block_mode() -> None:
    cfg = FitConfig().resolve_defaults()
    h = cfg.hash()
    cfg.scheduler.every = 5
    assert cfg.hash() != h
    cfg.scheduler.mode = "project"
    h = cfg.hash()
    cfg.scheduler.every = 10
    assert cfg.hash() == h


def test_sweep_runs_keep_the_identity_they_had_before_the_relayout() -> None:
    """A sweep keeps (or resumes) a run whose manifest/checkpoint hash equals the fit config it derives now."""
    from cmalign.sweep.config import SweepConfig
    from cmalign.sweep.run import RunSpec, fit_config

    cfg = fit_config(SweepConfig(steps=50, fit_overrides={"optim.lr": "1e-3", "scheduler.mode": "project",
                                                          "loss.lambda_paired": "0", "loss.text_share": "1",
                                                          "curriculum.settle_tolerance": "0"}),
                     RunSpec("a0.5", 0.5, {}, "alpha"), Path("sweeps/default/runs/a0.5"))
    assert cfg.hash() == PRE_MOVE_HASHES["sweep_a0.5"]


def test_a_bad_data_option_fails_when_the_config_is_loaded_not_when_data_is_read():
    with pytest.raises(ConfigError, match="unknown data format 'parquet'"):
        load_config(overrides={"data.format": "parquet"})
    with pytest.raises(ConfigError, match="separator must be one character"):
        load_config(overrides={"data.csv_separator": ";;"})


@pytest.mark.parametrize("overrides, match", [
    ({"loss.mmd_bandwidths": "a,b"}, r"'loss.mmd_bandwidths' expects tuple\[float, ...\], got 'a,b'"),
    ({"loss.mmd_bandwidths": 2.0}, r"'loss.mmd_bandwidths' expects tuple"),
    ({"train.steps": [1]}, r"'train.steps' expects int, got \[1\]"),
    ({"train.steps": "ten"}, r"'train.steps' expects int, got 'ten'"),
    ({"model.grad_checkpointing": "maybe"}, r"expects bool"),
])
def test_a_value_of_the_wrong_type_is_a_config_error_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_an_unknown_key_is_still_a_key_error_with_a_readable_message():
    with pytest.raises(KeyError) as e:
        load_config(overrides={"train.stepz": 3})
    assert isinstance(e.value, ConfigError) and str(e.value).startswith("unknown config key 'train.stepz'")


@pytest.mark.parametrize("overrides, match", [
    ({"loss.mmd_bandwidths": ""}, r"mmd_bandwidths must be one or more finite numbers > 0 .*, got \(\)"),
    ({"loss.mmd_bandwidths": "1,-2"}, r"mmd_bandwidths must be one or more finite numbers > 0"),
    ({"loss.lambda_centroid": "inf"}, r"loss.lambda_centroid must be a finite number >= 0, got inf"),
    ({"model.max_logit_scale": "0"}, r"model.max_logit_scale must be a finite number > 0, got 0.0"),
    ({"model.fixed_logit_scale": "nan"}, r"model.fixed_logit_scale must be a finite number > 0, got nan"),
])
def test_loss_settings_that_would_fail_mid_training_fail_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_alpha_target_must_be_finite_and_non_negative(value):
    with pytest.raises(ConfigError, match=f"alpha_target must be a finite number >= 0, got {float(value)}"):
        load_config(overrides={"alpha_target": value}).validate()
