"""Every embedding the tasks need from one system (a model, or a model with a post-hoc fix), made once."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cmalign.evaluation.datasets import EvalData
from cmalign.evaluation.posthoc import PosthocMap
from cmalign.metrics import gap


@dataclass
class SystemEmbeddings:
    image: np.ndarray  # evaluation images
    text: np.ndarray  # every evaluation caption
    prompts: np.ndarray | None  # (classes, templates, d) class prompts, when labelled
    classes: list[str] | None
    fit_image: np.ndarray  # fit-set images
    fit_text: np.ndarray  # every fit-set caption

    def first_captions(self, data: EvalData) -> np.ndarray:
        """One caption per image (its first): the pairs the gap measures use."""
        return self.text[gap.first_caption_index(data.eval.caption_image)]

    def mapped(self, fix: PosthocMap) -> SystemEmbeddings:
        return replace(self, image=fix.image(self.image), text=fix.text(self.text),
                       prompts=None if self.prompts is None else fix.queries(
                           self.prompts.reshape(-1, self.prompts.shape[-1])).reshape(self.prompts.shape),
                       fit_image=fix.image(self.fit_image), fit_text=fix.text(self.fit_text))

    def fit_pairs(self, data: EvalData) -> tuple[np.ndarray, np.ndarray]:
        """(image, caption) rows for every fit-set caption."""
        return self.fit_image[data.fit.caption_image], self.fit_text


def embed_all(encoder, data: EvalData, log=None) -> SystemEmbeddings:
    say = log or (lambda _msg: None)
    say(f"{encoder.label}: {len(data.eval.images)} images, {len(data.eval.captions)} captions")
    image = encoder.encode_images(data.eval.images)
    text = encoder.encode_texts(data.eval.captions)
    prompts = classes = None
    if data.eval.labels is not None:
        classes = sorted(set(data.eval.labels))
        templates = data.eval.class_templates
        flat = encoder.encode_texts([t.format(c) for c in classes for t in templates])
        prompts = flat.reshape(len(classes), len(templates), -1)
    say(f"{encoder.label}: fit set, {len(data.fit.images)} images, {len(data.fit.captions)} captions")
    fit_image = encoder.encode_images(data.fit.images)
    fit_text = encoder.encode_texts(data.fit.captions)
    return SystemEmbeddings(image, text, prompts, classes, fit_image, fit_text)
