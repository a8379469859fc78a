"""What `cmalign eval` measures, on which data, with which settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cmalign.data.options import ReaderOptions
from cmalign.errors import ConfigError
from cmalign.evaluation.captioning.config import DecoderConfig

TASKS = ("gap", "retrieval", "mixed", "mixcorpus", "clustering", "zeroshot", "caption")


@dataclass
class EvalConfig:
    source: str | None = None  # a fit run, an export directory, or None with `model`
    model: str | None = None  # an open_clip model name (with `pretrained`), when `source` is None
    pretrained: str | None = None
    baseline: str = "auto"  # auto | base | none | a run or export directory
    data: str | None = None  # None: the generated validation split
    fit_data: str | None = None  # training pairs for the caption decoder and post-hoc fits
    reader: ReaderOptions = field(default_factory=ReaderOptions)
    templates: tuple[str, ...] | None = None  # class-prompt templates; None: the data set's own or CLIP-style
    tasks: tuple[str, ...] = TASKS
    posthoc: tuple[str, ...] = ()
    posthoc_on: str = "auto"  # whose embeddings the fixes apply to: auto (the baseline if any) | model | baseline
    out: str | None = None  # None: reports/<source name>
    overwrite: bool = False
    max_images: int | None = None  # evaluation images (all captions of each); None: all
    fit_images: int = 1000  # training images (all their captions) for the decoder and the post-hoc fits
    fit_share: float = 0.5  # share of --data images used for fitting when no fit data is given
    k: int = 10  # mixed-modality top-k
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    figures: bool = True
    map_points: int = 400  # images (and as many captions) per 2-D map
    seed: int = 0  # every random choice of the evaluation (KMeans, PCA, t-SNE, MMD subsamples, the decoder)
    synth_seed: int = 0  # which generated data set (the one `fit`'s default trains on is seed 0)
    device: str = "auto"  # torch models: auto | cpu | cuda
    provider: str = "cpu"  # exports: cpu | cuda
    variant: str = "fp32"  # exports: fp32 | fp16 | int8
    batch_size: int = 128
    bootstrap: int = 1000  # resamples of the images for every figure's 95 % interval; 0: no intervals
    bootstrap_slow: int = 200  # resamples for MMD², Bures, CORAL and W₂ (O(n²) or d×d per resample), ≤ bootstrap

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ConfigError(f"unknown task(s) {', '.join(bad)}; expected any of {', '.join(TASKS)}")
        if self.source is None and self.model is None:
            raise ConfigError("give a run or export directory, or --model NAME [--pretrained TAG]")
        if self.source is not None and self.model is not None:
            raise ConfigError("give either a run/export directory or --model, not both")
        if self.posthoc_on not in ("auto", "model", "baseline"):
            raise ConfigError(f"posthoc_on must be auto, model or baseline, got {self.posthoc_on!r}")
        if self.fit_images < 2:
            raise ConfigError(f"fit_images must be at least 2, got {self.fit_images}")
        if not 0 < self.fit_share < 1:
            raise ConfigError(f"fit_share must lie in (0, 1), got {self.fit_share}")
        if self.bootstrap < 0 or self.bootstrap_slow < 0:
            raise ConfigError(f"bootstrap repetitions must be 0 (off) or more, got {self.bootstrap} and "
                              f"{self.bootstrap_slow}")

    def to_dict(self) -> dict:
        return asdict(self)
