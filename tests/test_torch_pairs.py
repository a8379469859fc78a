"""The torch side of the data (cmalign.data.torch_pairs): the resumable, rank-aware sampler and PairDataset."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from cmalign.data.records import BadSampleError, Record
from cmalign.data.synth import synth_split
from cmalign.data.torch_pairs import PairDataset, ResumableBatchSampler, collate_pairs

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
