"""The generated default data set (cmalign.data.synth): deterministic scenes, captions, labels and files."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from cmalign.data.readers import read_dataset
from cmalign.data.records import Record
from cmalign.data.synth import CAPTIONS_PER_IMAGE, CLASS_TEMPLATES, CLASSES, COLOURS, SHAPES, synth_split, write_synth


def pixels(rec: Record) -> np.ndarray:
    return np.asarray(rec.image.load())


def test_same_seed_gives_identical_captions_labels_and_pixels() -> None:
    a = synth_split("train", seed=3, n_images=12).records
    b = synth_split("train", seed=3, n_images=12).records
    assert [(r.caption, r.label, r.key, r.source) for r in a] == [(r.caption, r.label, r.key, r.source) for r in b]
    for ra, rb in zip(a[::CAPTIONS_PER_IMAGE], b[::CAPTIONS_PER_IMAGE], strict=False):
        pa, pb = pixels(ra), pixels(rb)
        assert pa.shape == (64, 64, 3)
        assert np.array_equal(pa, pb)


def test_different_seed_gives_different_data() -> None:
    a = synth_split("train", seed=0, n_images=12).records
    b = synth_split("train", seed=1, n_images=12).records
    assert [r.caption for r in a] != [r.caption for r in b]
    assert any(not np.array_equal(pixels(ra), pixels(rb))
               for ra, rb in zip(a[::CAPTIONS_PER_IMAGE], b[::CAPTIONS_PER_IMAGE], strict=False))


def test_splits_differ_and_prefix_is_stable() -> None:
    train = synth_split("train", seed=0, n_images=6).records
    val = synth_split("val", seed=0, n_images=6).records
    assert [r.caption for r in train] != [r.caption for r in val]
    # a bigger request starts with the same images: each scene is a function of (seed, split, index)
    longer = synth_split("train", seed=0, n_images=9).records
    assert [r.caption for r in longer[: len(train)]] == [r.caption for r in train]


def test_unknown_split_raises() -> None:
    with pytest.raises(ValueError, match="split"):
        synth_split("holdout", n_images=2)


def test_captions_per_image_share_key_and_label_and_are_distinct_phrasings() -> None:
    recs = synth_split("train", seed=0, n_images=30).records
    assert len(recs) == 30 * CAPTIONS_PER_IMAGE
    by_key: dict[str, list[Record]] = defaultdict(list)
    for r in recs:
        by_key[r.key].append(r)
    assert len(by_key) == 30
    for group in by_key.values():
        assert len(group) == CAPTIONS_PER_IMAGE
        assert len({r.label for r in group}) == 1
        assert len({r.caption for r in group}) == CAPTIONS_PER_IMAGE  # several distinct phrasings
        assert len({r.source for r in group}) == CAPTIONS_PER_IMAGE
        assert all(r.image is group[0].image or r.image == group[0].image for r in group)
        label = group[0].label
        colour, shape = label.split(" ")
        assert colour in COLOURS and shape in SHAPES
        # the class is part of every caption: its colour and its shape (singular or plural) as words
        assert all(re.search(rf"\b{colour}\b", r.caption) and re.search(rf"\b{shape}(e?s)?\b", r.caption)
                   for r in group)


def test_captions_per_image_parameter() -> None:
    recs = synth_split("val", seed=0, n_images=4, captions_per_image=2).records
    assert len(recs) == 8
    assert Counter(r.key for r in recs) == Counter({k: 2 for k in {r.key for r in recs}})


def test_labels_are_the_64_colour_shape_classes() -> None:
    assert len(CLASSES) == 64 == len(set(CLASSES))
    labels = {r.label for r in synth_split("val", seed=0).records}
    assert labels == set(CLASSES)  # every class occurs in the 1000 validation images


def test_captions_and_class_prompts_read_as_english() -> None:
    caps = [r.caption for r in synth_split("train", seed=0, n_images=600).records]
    assert not [c for c in caps if "crosss" in c or "sss" in c]
    assert any("crosses" in c for c in caps) and any("circles" in c for c in caps)
    prompts = [t.format(c) for t in CLASS_TEMPLATES for c in CLASSES]
    assert not [p for p in prompts if re.search(r"\b[Aa] [aeiouAEIOU]", p)]


def test_articles_agree_with_the_next_word() -> None:
    caps = [r.caption for seed in (0, 1) for r in synth_split("train", seed=seed, n_images=300).records]
    bad_a = [c for c in caps if re.search(r"\b[Aa] [aeiouAEIOU]", c)]
    bad_an = [c for c in caps if re.search(r"\b[Aa]n [^aeiouAEIOU\W]", c)]
    assert bad_a == []
    assert bad_an == []
    assert any("an orange" in c for c in caps)  # the rule had something to do


def test_write_synth_csvs_are_readable(tmp_path: Path) -> None:
    sizes = {"train": 6, "val": 3, "test": 3}
    written = write_synth(tmp_path, seed=2, sizes=sizes)
    assert set(written) == set(sizes)
    for split, n in sizes.items():
        assert written[split] == tmp_path / f"{split}.csv"
        result = read_dataset(written[split])
        assert result.skipped == []
        assert len(result.records) == n * CAPTIONS_PER_IMAGE
        expected = synth_split(split, seed=2, n_images=n).records
        assert [r.label for r in result.records] == [r.label for r in expected]
        assert [r.caption for r in result.records] == [r.caption for r in expected]
        keys = [r.key for r in result.records]
        assert len(set(keys)) == n  # captions of one image point at one file
        # PNG is lossless: the file holds exactly the generated pixels
        first = result.records[0]
        assert Path(first.image).is_file()
        from PIL import Image

        with Image.open(first.image) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), pixels(expected[0]))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 2 and manifest["splits"] == sizes
    assert manifest["classes"] == list(CLASSES)
