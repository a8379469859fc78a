"""`fit`'s configuration: nested dataclasses, loadable from TOML and overridable key by key.

A run directory keeps the fully resolved config (``config.toml``), so a run can be repeated or
resumed from it alone. Section and key names in the TOML are the dataclass field names::

    alpha_target = 0.5
    [train]
    steps = 600
    [loss]
    distribution = "mmd"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmalign.data.options import ReaderOptions
from cmalign.errors import ConfigError, MissingInputError
from cmalign.objective.config import (  # noqa: F401
    BLOCK_ONLY_SETTINGS,
    DISTRIBUTION_TERMS,
    MODES,
    CMAConfig,
    GradSchedulerConfig,
    drop_inert_settings,
    legacy_settings,
)
from cmalign.objective.curriculum import CurriculumConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    name: str = "cmalign-tiny"
    # None: the model's own default — the embedded pretrained base for cmalign-tiny, random
    # weights (with a warning) for anything else. Else an open_clip tag or a checkpoint file.
    pretrained: str | None = None
    trainable: str = "all"  # all | image | text | projections | last:N
    grad_checkpointing: bool = False
    # Fix the logit scale (e.g. 100, as CLIP converges to); None keeps it learnable (clamped at max_logit_scale).
    fixed_logit_scale: float | None = None
    # The learnable logit scale's ceiling: CLIP's 100 by default.
    max_logit_scale: float = 100.0


@dataclass
class DataConfig(ReaderOptions):
    """Which data `fit` trains and validates on; how to read it is the inherited ReaderOptions fields.

    Inherited, not nested, so the TOML keys (``data.format``, ``data.image_root``...) and the config hash stay
    what runs written before recorded; a DataConfig is itself the ReaderOptions that ``read_dataset`` takes.
    """

    train: str | None = None  # None: the generated default set
    val: str | None = None  # None: the default set's val split, or a held-out share of `train`
    val_fraction: float = 0.05  # share of train images held out when no `val` is given
    val_max_images: int = 500  # guard evaluation cost cap
    on_bad_sample: str = "skip"  # skip | fail
    num_workers: int = -1  # -1: auto (1 on a 2-core machine, up to 8 on bigger ones)
    synth_seed: int = 0
    synth_train_images: int | None = None  # None: the full generated train split


@dataclass
class OptimConfig:
    # None: 2e-4 for the embedded cmalign-tiny, 1e-5 for any other (pretrained CLIP-size) model;
    # the resolved value is what RUN/config.toml records.
    lr: float | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    accum_steps: int = 1


TINY_LR = 2e-4  # the tiny default base was pretrained at 1e-3
PRETRAINED_LR = 1e-5  # open_clip-scale CLIPs collapse easily when fine-tuned faster (open_clip #1093)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 128  # per process; the global batch is batch_size × world size
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | amp | amp_bf16 (amp only on CUDA)
    out: str | None = None  # None: runs/<model>-a<alpha>[-N], a new directory each time
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    guard_every: int = 100
    guard: bool = True
    threads: int = 0  # torch CPU threads; 0 leaves torch's default


@dataclass
class FitConfig:
    alpha_target: float = 0.5
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: CMAConfig = field(default_factory=CMAConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    scheduler: GradSchedulerConfig = field(default_factory=GradSchedulerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def resolve_defaults(self) -> FitConfig:
        """Fill the model-dependent defaults (kept ``None`` until the model is known)."""
        if self.optim.lr is None:
            self.optim.lr = TINY_LR if self.model.name == "cmalign-tiny" else PRETRAINED_LR
        return self

    def validate(self) -> FitConfig:
        if not (math.isfinite(self.alpha_target) and self.alpha_target >= 0):
            raise ConfigError(f"alpha_target must be a finite number >= 0, got {self.alpha_target}")
        if self.optim.lr is not None and not (math.isfinite(self.optim.lr) and self.optim.lr > 0):
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.optim.lr}")
        for key in ("max_logit_scale", "fixed_logit_scale"):
            value = getattr(self.model, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"model.{key} must be a finite number > 0, got {value}")
        if self.train.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.train.steps}")
        if self.train.batch_size < 2:
            raise ConfigError("train.batch_size must be >= 2 (contrastive needs negatives), "
                             f"got {self.train.batch_size}")
        if self.data.on_bad_sample not in ("skip", "fail"):
            raise ConfigError(f"data.on_bad_sample must be 'skip' or 'fail', got '{self.data.on_bad_sample}'")
        if self.optim.accum_steps < 1:
            raise ConfigError(f"optim.accum_steps must be >= 1, got {self.optim.accum_steps}")
        if self.train.precision not in ("auto", "fp32", "amp", "amp_bf16"):
            raise ConfigError(f"train.precision must be auto|fp32|amp|amp_bf16, got '{self.train.precision}'")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Identity of what is trained (output location and run-time knobs excluded)."""
        d = self.to_dict()
        for k in ("out", "checkpoint_every", "keep_checkpoints", "guard_every", "threads", "device"):
            d["train"].pop(k, None)
        d["data"].pop("num_workers", None)
        if d["scheduler"]["mode"] != "block":
            for k in BLOCK_ONLY_SETTINGS:
                d["scheduler"].pop(k, None)
        if d["model"].get("max_logit_scale") == 100.0:  # CLIP's clamp, which configs written before it meant
            d["model"].pop("max_logit_scale", None)
        if not d["loss"].get("lambda_paired"):
            d["loss"].pop("lambda_paired", None)
        drop_inert_settings(d)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class UnknownKeyError(ConfigError, KeyError):
    """A config key or section that does not exist (a KeyError, as it always was)."""

    __str__ = Exception.__str__  # KeyError's own would quote the message


def _coerce(value: Any, current: Any, hint: Any, key: str) -> Any:
    """Turn a flag/--set string (or a TOML value) into the field's declared type (hints are strings: PEP 563)."""
    hint = str(hint)
    try:
        return _typed(value, hint)
    except (ValueError, TypeError):
        raise ConfigError(f"config key '{key}' expects {hint}, got {value!r}") from None


def _typed(value: Any, hint: str) -> Any:
    if hint.startswith("tuple"):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        return tuple(float(v) for v in value)
    if isinstance(value, str):
        if "None" in hint and value.lower() in ("none", "null", ""):
            return None
        if hint.startswith("bool"):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint.startswith("int"):
            return int(value)
        if hint.startswith("float"):
            return float(value)
        return value
    if value is None and "None" in hint:
        return None
    if hint.startswith("bool") and not isinstance(value, bool):
        raise TypeError(value)
    if hint.startswith("int") and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(value)
    if hint.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(value)
        return float(value)
    if hint.startswith("str") and not isinstance(value, str):
        raise TypeError(value)
    return value


def parse_set(items: list[str]) -> dict[str, str]:
    """``["train.steps=100", ...]`` (the CLI's ``--set``) → ``{"train.steps": "100"}``; typed by apply_overrides."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set: expected KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def apply_overrides(cfg: FitConfig, overrides: dict[str, Any]) -> FitConfig:
    """Set dotted keys (``"train.steps"``, ``"alpha_target"``); unknown keys are an error."""
    for key, value in overrides.items():
        if value is None:
            continue
        target: Any = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(target) or not hasattr(target, p):
                raise UnknownKeyError(f"unknown config section '{p}' in '{key}'")
            target = getattr(target, p)
        leaf = parts[-1]
        fields = {f.name: f for f in dataclasses.fields(target)}
        if leaf not in fields:
            raise UnknownKeyError(f"unknown config key '{key}'; valid keys here: {', '.join(fields)}")
        if dataclasses.is_dataclass(getattr(target, leaf)):
            raise UnknownKeyError(f"'{key}' is a section, set its keys (e.g. '{key}.{next(iter(fields))}')")
        setattr(target, leaf, _coerce(value, getattr(target, leaf), fields[leaf].type, key))
    for section in (cfg.loss, cfg.curriculum, cfg.scheduler):
        section.__post_init__()
    cfg.data.validate()  # a bad --set data.format fails here, not when the data is read
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FitConfig:
    cfg = FitConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from e
        for section, meant in legacy_settings(data).items():
            data[section] = {**meant, **data[section]}
        try:
            apply_overrides(cfg, _flatten(data))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from e
    apply_overrides(cfg, overrides or {})
    return cfg.resolve_defaults().validate()


def to_toml(cfg: FitConfig) -> str:
    import tomli_w

    def drop_none(d):
        return {k: drop_none(v) if isinstance(v, dict) else (list(v) if isinstance(v, tuple) else v)
                for k, v in d.items() if v is not None}

    return tomli_w.dumps(drop_none(cfg.to_dict()))
