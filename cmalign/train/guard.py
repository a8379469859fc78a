"""The guard evaluation `fit` runs on the validation split: is alignment working, is the model intact?

Fine-tuning CLIP can collapse (open_clip #1093), and alignment trades discriminative power for
geometry, so the log carries both sides every K steps: the gaps (centroid, raw, MMD²) and what
they may cost (retrieval R@1 both ways, zero-shot top-1 where the data has labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cmalign.data.records import Record, load_image
from cmalign.errors import ConfigError
from cmalign.metrics import gap
from cmalign.metrics.retrieval import retrieval_metrics


@dataclass
class GuardSet:
    """Validation images (one per key), all their captions, and class prompts."""

    images: list[Record]  # one record per distinct image
    captions: list[str]
    caption_image: np.ndarray  # index into `images` for each caption
    labels: list[str] | None
    class_templates: tuple[str, ...]

    dropped: list[str]  # sources of validation images that could not be read

    @classmethod
    def from_records(cls, records: list[Record], class_templates, max_images: int = 500) -> GuardSet:
        """First ``max_images`` readable images of ``records`` with all their captions."""
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


@torch.no_grad()
def embed(model, guard: GuardSet, preprocess, tokenizer, device, batch_size: int = 256, autocast=None):
    """Normalised float32 image, caption and (if labelled) class-prompt embeddings."""
    model.eval()
    ctx = autocast or torch.autocast(device_type="cpu", enabled=False)
    img, txt = [], []
    for i in range(0, len(guard.images), batch_size):
        pix = torch.stack([preprocess(load_image(r)) for r in guard.images[i:i + batch_size]])
        with ctx:
            img.append(model.encode_image(pix.to(device), normalize=True).float().cpu())
    for i in range(0, len(guard.captions), batch_size):
        with ctx:
            txt.append(model.encode_text(tokenizer(guard.captions[i:i + batch_size]).to(device),
                                         normalize=True).float().cpu())
    out = {"image": torch.cat(img).numpy(), "text": torch.cat(txt).numpy()}
    if guard.labels is not None:
        classes = sorted(set(guard.labels))
        weights = []
        for c in classes:
            with ctx:
                e = model.encode_text(tokenizer([t.format(c) for t in guard.class_templates]).to(device),
                                      normalize=True).float().mean(0)
            weights.append(torch.nn.functional.normalize(e, dim=0).cpu())
        out["classes"] = classes
        out["class_weights"] = torch.stack(weights).numpy()
    return out


def recall_at_1(emb: dict, guard: GuardSet) -> tuple[float, float]:
    """i→t hits if any caption of the image ranks first; t→i if the caption's own image does. Exact ties
    (duplicate captions) count as their expectation over a random order (:mod:`cmalign.metrics.retrieval`)."""
    r = retrieval_metrics(emb["image"], emb["text"], guard.caption_image, ks=(1,))
    return r["i2t_R@1"], r["t2i_R@1"]


def zero_shot_top1(emb: dict, guard: GuardSet) -> float | None:
    if guard.labels is None:
        return None
    pred = (emb["image"] @ emb["class_weights"].T).argmax(1)
    truth = np.asarray([emb["classes"].index(lbl) for lbl in guard.labels])
    return float((pred == truth).mean())


def guard_metrics(model, guard: GuardSet, preprocess, tokenizer, device, full: bool = False, autocast=None) -> dict:
    """Guard figures; ``full`` adds every gap measure (used before and after the run)."""
    emb = embed(model, guard, preprocess, tokenizer, device, autocast=autocast)
    # Paired gaps use each image with its first caption.
    first_caption = np.unique(guard.caption_image, return_index=True)[1]
    x, y = emb["image"], emb["text"][first_caption]
    i2t, t2i = recall_at_1(emb, guard)
    out = {"r1_i2t": i2t, "r1_t2i": t2i, "zeroshot_top1": zero_shot_top1(emb, guard)}
    if full:
        out.update(gap.gap_report(x, y).to_dict())
    else:
        out.update({"centroid": gap.centroid_gap(x, y), "raw": gap.raw_gap(x, y), "mmd2": gap.mmd2(x, y)})
    out["n_images"] = int(len(guard.images))
    return out
