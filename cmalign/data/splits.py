"""Which records a run trains and validates on: the user's files or the generated default."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cmalign.data import synth
from cmalign.data.options import ReaderOptions
from cmalign.data.readers import read_dataset
from cmalign.data.records import BadSample, DataSchemaError, Record

# Zero-shot / clustering prompts for user data (a subset of CLIP's ImageNet templates).
DEFAULT_CLASS_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
)


@dataclass
class DataSplits:
    train: list[Record]
    val: list[Record]
    skipped: list[BadSample] = field(default_factory=list)
    class_templates: tuple[str, ...] = DEFAULT_CLASS_TEMPLATES
    description: dict = field(default_factory=dict)


def read_records(path: str, options: ReaderOptions) -> tuple[list[Record], list[BadSample]]:
    """`read_dataset`'s records and skipped samples (``options``: a DataConfig or an EmbedConfig is one)."""
    res = read_dataset(path, options)
    return res.records, res.skipped


def held_out_keys(records: list[Record], fraction: float) -> set[str]:
    """The ``fraction`` of image keys (at least one) whose hashes are smallest: deterministic, and never
    empty on a small set (a per-key hash threshold left 40 images with none, depending on their paths)."""
    keys = {r.key for r in records}
    if len(keys) < 2:
        return set()
    k = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    return set(sorted(keys, key=lambda key: hashlib.sha1(key.encode()).digest())[:k])


def load_splits(cfg) -> DataSplits:
    """Resolve ``cfg`` (a :class:`cmalign.train.config.DataConfig`) into train and val records.

    Without ``val``, a deterministic share of the train *images* (by key, so no image has captions
    on both sides) is held out.
    """
    if cfg.train is None:
        train = synth.synth_split("train", seed=cfg.synth_seed, n_images=cfg.synth_train_images).records
        val = synth.synth_split("val", seed=cfg.synth_seed).records
        return DataSplits(train=train, val=val, class_templates=synth.CLASS_TEMPLATES,
                          description={"train": f"generated (seed {cfg.synth_seed})", "val": "generated val split"})
    train, skipped = read_records(cfg.train, cfg)
    if cfg.val is not None:
        val, val_skipped = read_records(cfg.val, cfg)
        skipped += val_skipped
        desc_val = cfg.val
    else:
        kept, val = [], []
        held_out = held_out_keys(train, cfg.val_fraction)
        for r in train:
            (val if r.key in held_out else kept).append(r)
        if not val:
            raise DataSchemaError(cfg.train, None, None, f"{len({r.key for r in train})} image(s): too few to "
                                  f"hold out {cfg.val_fraction:.0%} for validation; pass --val")
        train = kept
        desc_val = f"{cfg.val_fraction:.0%} of {cfg.train} held out by image"
    return DataSplits(train=train, val=val, skipped=skipped,
                      description={"train": cfg.train, "val": desc_val, "format": cfg.format})
