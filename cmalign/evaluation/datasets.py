"""The evaluation set and the fit set (training pairs for the caption decoder and the post-hoc fits)."""

from __future__ import annotations

from dataclasses import dataclass

from cmalign.data import synth
from cmalign.data.pair_set import PairSet
from cmalign.data.splits import DEFAULT_CLASS_TEMPLATES, held_out_keys, read_records
from cmalign.errors import ConfigError

ALL = 10**12


@dataclass
class EvalData:
    eval: PairSet  # images, all their captions, labels, class templates
    fit: PairSet  # training images and captions
    description: dict
    notes: list[str]


def load_eval_data(cfg) -> EvalData:
    """Resolve ``cfg`` (an :class:`~cmalign.evaluation.config.EvalConfig`) into the two sets.

    Without ``data``: the generated validation split, fitted on the generated train split. With ``data`` but no
    ``fit_data``: a deterministic share of the data's *images* (by key) is fitted on, the rest evaluated, so no
    image is on both sides.
    """
    notes: list[str] = []
    if cfg.data is None:
        eval_records = synth.synth_split("val", seed=cfg.synth_seed).records
        fit_records = synth.synth_split("train", seed=cfg.synth_seed, n_images=cfg.fit_images).records
        templates = synth.CLASS_TEMPLATES
        desc = {"eval": f"generated validation split (data seed {cfg.synth_seed})",
                "fit": f"generated train split, first {cfg.fit_images} images (data seed {cfg.synth_seed})"}
    else:
        eval_records, skipped = read_records(cfg.data, cfg.reader)
        if skipped:
            notes.append(f"{len(skipped)} row(s) of {cfg.data} skipped while reading (first: {skipped[0].reason})")
        templates = DEFAULT_CLASS_TEMPLATES
        if cfg.fit_data is not None:
            fit_records, skipped = read_records(cfg.fit_data, cfg.reader)
            if skipped:
                notes.append(f"{len(skipped)} row(s) of {cfg.fit_data} skipped while reading")
            desc = {"eval": cfg.data, "fit": cfg.fit_data}
        else:
            held = held_out_keys(eval_records, cfg.fit_share)
            fit_records = [r for r in eval_records if r.key in held]
            eval_records = [r for r in eval_records if r.key not in held]
            if not fit_records or not eval_records:
                raise ConfigError(f"{cfg.data}: too few images to split into fit and evaluation parts; pass --fit-data")
            desc = {"eval": f"{cfg.data}: the {1 - cfg.fit_share:.0%} of images not used for fitting",
                    "fit": f"{cfg.data}: {cfg.fit_share:.0%} of images by key hash (no --fit-data given)"}
            notes.append(f"no --fit-data: the caption decoder and the post-hoc fixes were fitted on "
                         f"{cfg.fit_share:.0%} of the images of {cfg.data}, and every task evaluated on the rest")
    if cfg.templates:
        templates = tuple(cfg.templates)
    eval_set = PairSet.from_records(eval_records, templates, max_images=cfg.max_images or ALL)
    fit_set = PairSet.from_records(fit_records, templates, max_images=cfg.fit_images)
    for name, s in (("evaluation", eval_set), ("fit", fit_set)):
        if s.dropped:
            notes.append(f"{len(s.dropped)} unreadable {name} image(s) left out (first: {s.dropped[0]})")
    if eval_set.labels is None:
        notes.append("the evaluation data has no class labels (or one class): clustering and zero-shot are skipped")
    desc.update({"images": len(eval_set.images), "captions": len(eval_set.captions),
                 "classes": sorted(set(eval_set.labels)) if eval_set.labels else None,
                 "templates": list(templates), "fit_images": len(fit_set.images),
                 "fit_captions": len(fit_set.captions)})
    return EvalData(eval_set, fit_set, desc, notes)
