"""Torch side of the data: a dataset of image–caption pairs and a resumable, rank-aware sampler.

Exact resume needs the data stream to be a pure function of (seed, step): the sampler derives the
epoch permutation from the seed and starts at any global micro-step, and each sample's random
augmentation is seeded from (seed, epoch, index) instead of the process-global RNG, so worker
count and restarts do not change what the model sees.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from cmalign.data.records import BadSample, BadSampleError, Record, load_image
from cmalign.errors import ConfigError


class PairDataset(Dataset):
    """Items are ``(epoch, index)``; a bad sample is replaced by the next good one and reported.

    Replacing (rather than dropping) keeps every batch the same size, which DDP's all_gather needs.
    """

    MAX_CONSECUTIVE_BAD = 64

    def __init__(self, records: list[Record], transform, tokenizer, seed: int = 0, on_bad_sample: str = "skip"):
        self.records = records
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        bad: list[dict] = []
        for attempt in range(self.MAX_CONSECUTIVE_BAD):
            rec = self.records[(index + attempt) % len(self.records)]
            try:
                image = load_image(rec)
            except Exception as e:  # PIL raises many types for corrupt files
                sample = BadSample(rec.source, "image", f"cannot read image {rec.image}: {type(e).__name__}: {e}")
                if self.on_bad_sample == "fail":
                    raise BadSampleError(f"{sample.source}: field '{sample.field}': {sample.reason}") from e
                bad.append(sample.to_dict())
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFFFFFF)
                pixels = self.transform(image)
            tokens = self.tokenizer([rec.caption])[0]
            return pixels, tokens, bad
        raise BadSampleError(f"{self.MAX_CONSECUTIVE_BAD} consecutive unreadable images from "
                             f"{self.records[index].source}; is the image root right?")


def collate_pairs(batch):
    images = torch.stack([b[0] for b in batch])
    tokens = torch.stack([b[1] for b in batch])
    bad = [x for b in batch for x in b[2]]
    return images, tokens, bad


class ResumableBatchSampler(Sampler):
    """Global micro-batch k covers ``perm[k·B·W : (k+1)·B·W]``; rank r takes its r-th slice of B.

    The same seed thus gives the same global batches for any world size (B·W fixed), and starting
    at micro-step k reproduces the uninterrupted stream from there. Drops each epoch's remainder.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0, total: int | None = None):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.per_epoch = n // self.global_batch
        if self.per_epoch == 0:
            raise ConfigError(f"data set has {n} samples, fewer than one global batch of {self.global_batch}; "
                             "lower --batch-size or add data")
        self.start, self.total = start, total

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        k = self.start
        perm_epoch, perm = -1, None
        while self.total is None or k < self.total:
            epoch, j = divmod(k, self.per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self._perm(epoch), epoch
            lo = j * self.global_batch + self.rank * self.batch_size
            yield [(epoch, int(i)) for i in perm[lo:lo + self.batch_size]]
            k += 1

    def __len__(self) -> int:
        return (self.total - self.start) if self.total is not None else 2**31
