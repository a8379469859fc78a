"""The paired vectors of a `cmalign embed` directory, read through the shards' memory maps.

Only index arrays live in memory (a text row's image, each image's captions: 8 bytes a row, 80 MB at 10M
captions); a batch gathers its rows from the maps, so training on 10M stored pairs stays within bounded memory.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmalign.corpus.store import EmbeddingsError, iter_shards, read_merged_manifest

CHECK_ROWS = 65536  # rows per block when checking for NaN/inf (bounded memory)


@dataclass
class _Block:
    offset: int  # global row of its first vector
    array: np.ndarray  # memory map
    path: Path


class _Rows:
    """One modality's vectors over all shards, addressed by global row."""

    def __init__(self, blocks: list[_Block]):
        self.blocks = blocks
        self.offsets = np.array([b.offset for b in blocks], np.int64)
        self.n = blocks[-1].offset + len(blocks[-1].array) if blocks else 0

    def gather(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        d = self.blocks[0].array.shape[1]
        out = np.empty((len(rows), d), np.float32)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(which):
            sel = np.flatnonzero(which == s)
            local = rows[sel] - self.blocks[s].offset
            order = np.argsort(local, kind="stable")  # sorted reads from the map
            out[sel[order]] = self.blocks[s].array[local[order]]
        return out

    def check_finite(self) -> None:
        """NaN/inf rows are refused with their file and row: one would poison every gradient."""
        for b in self.blocks:
            for start in range(0, len(b.array), CHECK_ROWS):
                ok = np.isfinite(np.asarray(b.array[start:start + CHECK_ROWS], np.float32)).all(axis=1)
                if not ok.all():
                    row = start + int(np.flatnonzero(~ok)[0])
                    raise EmbeddingsError(f"{b.path}, row {row}: NaN or inf in the vector ({int((~ok).sum())} such "
                                          "rows in this block); re-embed the corpus")


class PairedVectors:
    """Images and captions of an embeddings directory, each caption with the image of its pair."""

    def __init__(self, emb_dir: str | Path, check: bool = True):
        self.path = Path(emb_dir)
        self.manifest = read_merged_manifest(self.path)
        self.dim = int(self.manifest["embed_dim"])
        img_blocks, txt_blocks, img_pairs, txt_pairs = [], [], [], []
        n_img = n_txt = 0
        for shard in iter_shards(self.path, self.manifest):
            meta = shard.metadata
            is_img = (meta["modality"] == "image").to_numpy()
            img_blocks.append(_Block(n_img, shard.image, shard.paths["image"]))
            txt_blocks.append(_Block(n_txt, shard.text, shard.paths["text"]))
            img_pairs.append(meta["pair_id"].to_numpy()[is_img].astype(np.int64))
            txt_pairs.append(meta["pair_id"].to_numpy()[~is_img].astype(np.int64))
            n_img += len(shard.image)
            n_txt += len(shard.text)
        self.images, self.texts = _Rows(img_blocks), _Rows(txt_blocks)
        image_pair = np.concatenate(img_pairs) if img_pairs else np.zeros(0, np.int64)
        text_pair = np.concatenate(txt_pairs) if txt_pairs else np.zeros(0, np.int64)
        if len(image_pair) < 2:
            raise EmbeddingsError(f"{self.path}: {len(image_pair)} image vector(s); an adapter needs paired image "
                                  "and caption vectors (a `cmalign embed` directory of an image-caption data set)")
        order = np.argsort(image_pair, kind="stable")
        sorted_pairs = image_pair[order]
        if (np.diff(sorted_pairs) == 0).any():
            dup = int(sorted_pairs[np.flatnonzero(np.diff(sorted_pairs) == 0)[0]])
            raise EmbeddingsError(f"{self.path}: pair_id {dup} names more than one image row; pairs are ambiguous")
        pos = np.searchsorted(sorted_pairs, text_pair).clip(0, len(sorted_pairs) - 1)
        found = sorted_pairs[pos] == text_pair
        if not found.all():
            j = int(np.flatnonzero(~found)[0])
            shard, row = self._locate(txt_blocks, j)
            raise EmbeddingsError(f"{shard}, text row {row}: pair_id {int(text_pair[j])} has no image row "
                                  f"({int((~found).sum())} unpaired caption rows); an adapter trains on pairs")
        self.text_image = order[pos]  # global image row of each caption
        # captions of each image, CSR: captions_of(i) = caption_rows[caption_start[i]:caption_start[i + 1]]
        self.caption_rows = np.argsort(self.text_image, kind="stable")
        counts = np.bincount(self.text_image, minlength=self.images.n)
        self.caption_start = np.concatenate([[0], np.cumsum(counts)])
        self.captioned = np.flatnonzero(counts > 0)  # images with at least one caption
        if len(self.captioned) < 2:
            raise EmbeddingsError(f"{self.path}: {len(self.captioned)} image(s) with a caption; need at least 2")
        if check:
            self.images.check_finite()
            self.texts.check_finite()

    @staticmethod
    def _locate(blocks: list[_Block], row: int) -> tuple[Path, int]:
        for b in blocks:
            if row < b.offset + len(b.array):
                return b.path, row - b.offset
        return blocks[-1].path, row  # pragma: no cover

    @property
    def fingerprint(self) -> str:
        return str(self.manifest.get("export_fingerprint"))

    def split(self, val_fraction: float, val_max: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train images, held-out images), by image so no caption of a held-out image is trained on."""
        rng = np.random.default_rng([seed, 7])
        n_val = min(int(round(val_fraction * len(self.captioned))), val_max, len(self.captioned) - 2)
        perm = rng.permutation(self.captioned)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    def batch(self, images: np.ndarray, seed: int, step: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Step ``step``'s batch: ``size`` distinct images and one caption of each, a pure function of
        (seed, step) so a resumed run draws the same batches without saved sampler state."""
        rng = np.random.default_rng([seed, step])
        img = rng.choice(images, size=min(size, len(images)), replace=False)
        start, count = self.caption_start[img], self.caption_start[img + 1] - self.caption_start[img]
        cap = self.caption_rows[start + (rng.random(len(img)) * count).astype(np.int64)]
        return self.images.gather(img), self.texts.gather(cap)

    def held_out(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image vectors, caption vectors, caption → position in ``images``) of the held-out images."""
        rows = np.concatenate([self.caption_rows[self.caption_start[i]:self.caption_start[i + 1]] for i in images])
        where = {int(i): k for k, i in enumerate(images)}
        return (self.images.gather(images), self.texts.gather(rows),
                np.array([where[int(self.text_image[r])] for r in rows], np.int64))
