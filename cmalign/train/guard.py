"""The guard evaluation `fit` runs on the validation split: is alignment working, is the model intact?

Fine-tuning CLIP can collapse (open_clip #1093), and alignment trades discriminative power for
geometry, so the log carries both sides every K steps: the gaps (centroid, raw, MMD²) and what
they may cost (retrieval R@1 both ways, zero-shot top-1 where the data has labels).
"""

from __future__ import annotations

from contextlib import nullcontext

from cmalign.data.pair_set import PairSet
from cmalign.metrics import gap
from cmalign.metrics.retrieval import retrieval_metrics
from cmalign.metrics.zeroshot import class_weights, zero_shot_accuracy
from cmalign.model.encode import encode_images, encode_texts


def embed(model, pairs: PairSet, preprocess, tokenizer, device, batch_size: int = 256, autocast=nullcontext):
    """Normalised float32 image, caption and (if labelled) class-prompt embeddings; leaves the model in eval mode."""
    model.eval()
    out = {"image": encode_images(model, pairs.images, preprocess, device, batch_size, autocast),
           "text": encode_texts(model, pairs.captions, tokenizer, device, batch_size, autocast)}
    if pairs.labels is not None:
        classes = sorted(set(pairs.labels))
        templates = pairs.class_templates
        prompts = encode_texts(model, [t.format(c) for c in classes for t in templates], tokenizer, device,
                               batch_size, autocast)
        out["classes"] = classes
        out["class_weights"] = class_weights(prompts.reshape(len(classes), len(templates), -1))
    return out


def recall_at_1(emb: dict, pairs: PairSet) -> tuple[float, float]:
    """i→t hits if any caption of the image ranks first; t→i if the caption's own image does. Exact ties
    (duplicate captions) count as their expectation over a random order (:mod:`cmalign.metrics.retrieval`)."""
    r = retrieval_metrics(emb["image"], emb["text"], pairs.caption_image, ks=(1,))
    return r["i2t_R@1"], r["t2i_R@1"]


def zero_shot_top1(emb: dict, pairs: PairSet) -> float | None:
    if pairs.labels is None:
        return None
    return zero_shot_accuracy(emb["image"], pairs.labels, emb["classes"], emb["class_weights"])["top1"]


def guard_metrics(model, pairs: PairSet, preprocess, tokenizer, device, full: bool = False,
                  autocast=nullcontext) -> dict:
    """Guard figures; ``full`` adds every gap measure (used before and after the run).

    ``autocast`` is the run's context-manager factory; the model is left in eval mode.
    """
    emb = embed(model, pairs, preprocess, tokenizer, device, autocast=autocast)
    # Paired gaps use each image with its first caption.
    first_caption = gap.first_caption_index(pairs.caption_image)
    x, y = emb["image"], emb["text"][first_caption]
    i2t, t2i = recall_at_1(emb, pairs)
    out = {"r1_i2t": i2t, "r1_t2i": t2i, "zeroshot_top1": zero_shot_top1(emb, pairs)}
    if full:
        out.update(gap.gap_report(x, y).to_dict())
    else:
        out.update({"centroid": gap.centroid_gap(x, y), "raw": gap.raw_gap(x, y), "mmd2": gap.mmd2(x, y, paired=True)})
    out["n_images"] = int(len(pairs.images))
    return out
