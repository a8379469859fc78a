"""A held-out set of image–caption pairs grouped by image, the shape every retrieval score needs.

fit's guard evaluation, eval's evaluation and fit sets, and export's retrieval check all score "does
each image find its captions, does each caption find its image"; they need the distinct images once,
every caption with the index of its image, and class labels where the data has them. This module builds
that from records, with no torch, so the export and evaluation paths can use it without the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmalign.data.records import Record, load_image
from cmalign.errors import ConfigError


@dataclass
class PairSet:
    """Images (one per key), all their captions, and class prompts."""

    images: list[Record]  # one record per distinct image
    captions: list[str]
    caption_image: np.ndarray  # index into `images` for each caption
    labels: list[str] | None
    class_templates: tuple[str, ...]

    dropped: list[str]  # sources of images that could not be read

    @classmethod
    def from_records(cls, records: list[Record], class_templates, max_images: int = 500) -> PairSet:
        """First ``max_images`` readable images of ``records`` with all their captions.

        Every new image is decoded once here, so an unreadable file is dropped (and listed) up front
        instead of failing an evaluation half-way.
        """
        first: dict[str, int] = {}
        unreadable: set[str] = set()
        images, captions, owner, dropped = [], [], [], []
        for r in records:
            if r.key in unreadable:
                continue
            if r.key not in first:
                if len(first) >= max_images:
                    continue
                try:
                    load_image(r)
                except Exception as e:  # PIL raises many types for corrupt files
                    unreadable.add(r.key)
                    dropped.append(f"{r.source}: {type(e).__name__}: {e}")
                    continue
                first[r.key] = len(images)
                images.append(r)
            captions.append(r.caption)
            owner.append(first[r.key])
        if len(images) < 2:
            raise ConfigError(f"validation split has {len(images)} readable images; at least 2 are needed")
        labels = [r.label for r in images]
        has_labels = all(lbl is not None for lbl in labels) and len(set(labels)) > 1
        return cls(images, captions, np.asarray(owner), labels if has_labels else None, tuple(class_templates),
                   dropped)
