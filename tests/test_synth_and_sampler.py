"""The generated default data set (cmalign.data.synth) and the torch data side (cmalign.data.torch_pairs)."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from cmalign.data.readers import read_dataset
from cmalign.data.records import BadSampleError, Record
from cmalign.data.synth import CAPTIONS_PER_IMAGE, SHAPES, synth_split, write_synth
from cmalign.data.torch_pairs import PairDataset, ResumableBatchSampler, collate_pairs

# ------------------------------------------------------------------ synth


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
        assert label in SHAPES
        assert all(label in r.caption for r in group)  # the class is part of every caption


def test_captions_per_image_parameter() -> None:
    recs = synth_split("val", seed=0, n_images=4, captions_per_image=2).records
    assert len(recs) == 8
    assert Counter(r.key for r in recs) == Counter({k: 2 for k in {r.key for r in recs}})


def test_labels_cover_several_shapes() -> None:
    labels = {r.label for r in synth_split("train", seed=0, n_images=80).records}
    assert labels <= set(SHAPES)
    assert len(labels) >= 5


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
    assert manifest["classes"] == list(SHAPES)


# ------------------------------------------------------------------ ResumableBatchSampler


def take(sampler: ResumableBatchSampler, k: int) -> list[list[tuple[int, int]]]:
    return list(itertools.islice(iter(sampler), k))


@pytest.mark.parametrize("seed", [0, 5])
def test_world_size_invariance(seed: int) -> None:
    n, b, k = 23, 3, 12  # 3 global batches of 6 per epoch: k spans 4 epochs
    single = take(ResumableBatchSampler(n, 2 * b, seed=seed), k)
    r0 = take(ResumableBatchSampler(n, b, seed=seed, rank=0, world_size=2), k)
    r1 = take(ResumableBatchSampler(n, b, seed=seed, rank=1, world_size=2), k)
    assert all(len(x) == b for x in r0 + r1)
    assert single == [a + c for a, c in zip(r0, r1, strict=False)]
    # ranks never share a sample within a step
    assert all(not set(a) & set(c) for a, c in zip(r0, r1, strict=False))


@pytest.mark.parametrize("start", [1, 4, 7])
def test_start_resumes_the_uninterrupted_stream(start: int) -> None:
    full = take(ResumableBatchSampler(20, 4, seed=3), 12)
    resumed = take(ResumableBatchSampler(20, 4, seed=3, start=start), 12 - start)
    assert resumed == full[start:]


def test_total_bounds_the_stream_and_len() -> None:
    s = ResumableBatchSampler(20, 4, seed=1, start=3, total=9)
    batches = list(s)
    assert len(batches) == len(s) == 6
    assert batches == take(ResumableBatchSampler(20, 4, seed=1), 9)[3:]


def test_each_epoch_covers_every_index_once() -> None:
    n, b = 24, 4
    s = ResumableBatchSampler(n, b, seed=7)
    batches = take(s, 3 * (n // b))
    for epoch in range(3):
        chunk = batches[epoch * (n // b):(epoch + 1) * (n // b)]
        items = [it for batch in chunk for it in batch]
        assert all(e == epoch for e, _ in items)
        assert sorted(i for _, i in items) == list(range(n))
    orders = [[i for batch in batches[e * 6:(e + 1) * 6] for _, i in batch] for e in range(3)]
    assert orders[0] != orders[1]  # a fresh permutation each epoch


def test_epoch_with_remainder_drops_it_without_repeats() -> None:
    n, b = 23, 4  # 5 batches of 4 per epoch, 3 samples dropped
    batches = take(ResumableBatchSampler(n, b, seed=2), 5)
    items = [i for batch in batches for _, i in batch]
    assert len(items) == 20 and len(set(items)) == 20
    assert set(items) <= set(range(n))
    assert take(ResumableBatchSampler(n, b, seed=2), 6)[5][0][0] == 1  # the 6th batch opens epoch 1


def test_same_seed_same_stream_different_seed_different_stream() -> None:
    assert take(ResumableBatchSampler(30, 5, seed=4), 6) == take(ResumableBatchSampler(30, 5, seed=4), 6)
    assert take(ResumableBatchSampler(30, 5, seed=4), 6) != take(ResumableBatchSampler(30, 5, seed=5), 6)


@pytest.mark.parametrize("n, b, ws", [(3, 4, 1), (7, 4, 2), (0, 2, 1)])
def test_fewer_samples_than_a_global_batch_raises(n: int, b: int, ws: int) -> None:
    with pytest.raises(ValueError, match="global batch"):
        ResumableBatchSampler(n, b, world_size=ws)


# ------------------------------------------------------------------ PairDataset


@pytest.fixture(scope="module")
def tiny():
    from cmalign.model.loading import load_model

    return load_model("cmalign-tiny", None)


@pytest.fixture()
def records_with_bad(tmp_path: Path) -> list[Record]:
    good = synth_split("train", seed=0, n_images=4, captions_per_image=1).records
    bad_file = tmp_path / "broken.png"
    bad_file.write_bytes(b"\x89PNG not really a png \x00\x01\x02" * 8)
    bad = Record(image=str(bad_file), caption="a broken picture", label="circle", key=str(bad_file),
                 source="data.csv:3")
    return [good[0], bad, good[1], good[2], good[3]]


def test_bad_image_is_replaced_by_the_next_record_and_reported(tiny, records_with_bad) -> None:
    recs = records_with_bad
    ds = PairDataset(recs, tiny.preprocess_val, tiny.tokenizer, seed=0)
    px, tokens, bad = ds[(0, 1)]
    assert len(bad) == 1
    assert bad[0]["source"] == "data.csv:3" and bad[0]["field"] == "image"
    assert "broken.png" in bad[0]["reason"]
    # what came back is the next record's pair
    assert torch.equal(tokens, tiny.tokenizer([recs[2].caption])[0])
    _, _, clean = ds[(0, 2)]
    assert clean == []
    assert torch.equal(px, tiny.preprocess_val(recs[2].image.load().convert("RGB")))
    assert px.shape == (3, 32, 32)


def test_consecutive_bad_images_are_all_reported(tiny, records_with_bad, tmp_path: Path) -> None:
    recs = list(records_with_bad)
    other = tmp_path / "also_broken.jpg"
    other.write_bytes(b"garbage")
    recs.insert(2, Record(image=str(other), caption="x", source="data.csv:4"))
    ds = PairDataset(recs, tiny.preprocess_val, tiny.tokenizer)
    _, tokens, bad = ds[(0, 1)]
    assert [b["source"] for b in bad] == ["data.csv:3", "data.csv:4"]
    assert torch.equal(tokens, tiny.tokenizer([recs[3].caption])[0])


def test_missing_image_file_is_a_bad_sample(tiny, tmp_path: Path) -> None:
    good = synth_split("train", seed=0, n_images=1, captions_per_image=1).records
    recs = [Record(image=str(tmp_path / "nope.png"), caption="gone", source="x.csv:2"), good[0]]
    _, _, bad = PairDataset(recs, tiny.preprocess_val, tiny.tokenizer)[(0, 0)]
    assert [b["source"] for b in bad] == ["x.csv:2"]


def test_on_bad_sample_fail_raises_naming_the_source(tiny, records_with_bad) -> None:
    ds = PairDataset(records_with_bad, tiny.preprocess_val, tiny.tokenizer, on_bad_sample="fail")
    ds[(0, 0)]  # good ones still load
    with pytest.raises(BadSampleError, match="data.csv:3"):
        ds[(0, 1)]


def test_all_images_unreadable_raises(tiny, tmp_path: Path) -> None:
    f = tmp_path / "bad.png"
    f.write_bytes(b"nope")
    recs = [Record(image=str(f), caption="a", source=f"bad.csv:{i}") for i in (2, 3)]
    with pytest.raises(BadSampleError, match="bad.csv:2"):
        PairDataset(recs, tiny.preprocess_val, tiny.tokenizer)[(0, 0)]


def test_augmentation_is_deterministic_per_sample(tiny) -> None:
    recs = synth_split("train", seed=0, n_images=4, captions_per_image=1).records
    ds = PairDataset(recs, tiny.preprocess_train, tiny.tokenizer, seed=11)
    torch.manual_seed(1)
    first = [ds[(0, i)][0] for i in range(4)]
    torch.manual_seed(12345)
    torch.rand(17)
    second = [ds[(0, i)][0] for i in reversed(range(4))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=False))
    # a fresh dataset object (e.g. in a DataLoader worker) draws the same
    again = PairDataset(recs, tiny.preprocess_train, tiny.tokenizer, seed=11)
    assert torch.equal(again[(0, 2)][0], first[2])
    # the augmentation is really random: other epochs or seeds crop differently
    assert any(not torch.equal(ds[(e, 0)][0], first[0]) for e in (1, 2, 3))
    other = PairDataset(recs, tiny.preprocess_train, tiny.tokenizer, seed=12)
    assert any(not torch.equal(other[(0, i)][0], first[i]) for i in range(4))


def test_dataset_leaves_the_global_rng_alone(tiny) -> None:
    recs = synth_split("train", seed=0, n_images=2, captions_per_image=1).records
    ds = PairDataset(recs, tiny.preprocess_train, tiny.tokenizer)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ds[(0, 0)]
    assert torch.equal(torch.rand(3), expected)


def test_collate_stacks_and_flattens_bad_lists(tiny, records_with_bad) -> None:
    ds = PairDataset(records_with_bad, tiny.preprocess_val, tiny.tokenizer)
    images, tokens, bad = collate_pairs([ds[(0, i)] for i in range(4)])
    assert images.shape == (4, 3, 32, 32)
    assert tokens.shape == (4, 32)
    assert [b["source"] for b in bad] == ["data.csv:3"]


def test_dataset_with_sampler_in_a_dataloader(tiny) -> None:
    recs = synth_split("train", seed=0, n_images=6, captions_per_image=1).records
    ds = PairDataset(recs, tiny.preprocess_train, tiny.tokenizer, seed=0)
    sampler = ResumableBatchSampler(len(ds), 3, seed=0, total=4)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=0)
    batches = list(loader)
    assert len(batches) == 4
    resumed = list(torch.utils.data.DataLoader(ds, batch_sampler=ResumableBatchSampler(len(ds), 3, seed=0, start=2,
                                                                                         total=4),
                                               collate_fn=collate_pairs))
    for (a_img, a_tok, _), (b_img, b_tok, _) in zip(batches[2:], resumed, strict=False):
        assert torch.equal(a_img, b_img) and torch.equal(a_tok, b_tok)
