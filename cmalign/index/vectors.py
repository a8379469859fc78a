"""The index's input: vectors and id-table rows read from embeddings directories, checked on the way in.

Building and extending never hold a corpus in memory: :class:`CorpusVectors` keeps the file list and reads one
shard at a time (or given rows through memory maps), and every vector is checked (finite, non-zero) and
L2-normalised before faiss sees it — autofaiss does neither. Corpus *positions* number the vectors of the
parts in order, per shard its images then its texts; the index ids are those positions in add order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmalign.corpus.store import EmbeddingsError, checked_shard_manifests, iter_shards, shard_paths
from cmalign.index.directory import ID_COLUMNS


def clean_vectors(a: np.ndarray, where: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """float32, L2-normalised; a non-finite or zero row is an error naming the file and row (``rows[i]`` is the
    row in ``where`` of ``a[i]`` when ``a`` holds selected rows).

    Returns the vectors and the largest |‖v‖ − 1| seen before normalising.
    """
    a = np.asarray(a, dtype=np.float32)
    row = (lambda i: int(rows[i])) if rows is not None else int
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise EmbeddingsError(f"{where}: row {row(bad[0])} holds NaN or inf ({len(bad)} such rows); "
                              "re-embed the shard")
    norms = np.linalg.norm(a.astype(np.float64), axis=1)
    if len(norms) and norms.min() < 1e-6:
        raise EmbeddingsError(f"{where}: row {row(np.argmin(norms))} is a zero vector; it cannot be "
                              "normalised for inner-product search")
    deviation = float(np.abs(norms - 1).max()) if len(norms) else 0.0
    return np.ascontiguousarray(a / norms[:, None].astype(np.float32)), deviation


@dataclass
class ShardRef:
    """Where one shard's vectors are, and which corpus positions they take."""

    part: int  # which embeddings directory (in the order added to the CorpusVectors)
    index: int
    offset: int  # position of the shard's first image
    images: int
    texts: int
    paths: dict


class CorpusVectors:
    """The vectors of one or more embeddings directories, addressed by corpus position, read shard by shard.

    Keeps only the file list in memory (``blocks()`` reads one shard at a time; ``gather(positions)`` reads given
    rows through memory maps), so on-disk builds stay within a shard's memory.
    """

    def __init__(self):
        self.shards: list[ShardRef] = []
        self.parts = 0
        self.n = 0
        self.max_norm_deviation = 0.0

    def add_dir(self, out: Path, manifest: dict) -> None:
        """Append a merged embeddings directory (``manifest`` is its merged manifest) as the next part."""
        for i, rows in enumerate(shard_rows(out, manifest)):
            self.shards.append(ShardRef(self.parts, i, self.n, rows[0], rows[1], shard_paths(out, i)))
            self.n += rows[0] + rows[1]
        self.parts += 1

    def _read(self, ref: ShardRef) -> np.ndarray:
        parts = []
        for kind in ("image", "text"):
            v, dev = clean_vectors(np.load(ref.paths[kind]), str(ref.paths[kind]))
            self.max_norm_deviation = max(self.max_norm_deviation, dev)
            parts.append(v)
        return np.concatenate(parts)

    def blocks(self):
        """(position of the first row, vectors) per shard, one shard in memory at a time."""
        for ref in self.shards:
            yield ref.offset, self._read(ref)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at ``positions``, in that order."""
        ids = np.asarray(positions, dtype=np.int64)
        offsets = np.array([r.offset for r in self.shards])
        which = np.searchsorted(offsets, ids, side="right") - 1
        out = None
        for s in np.unique(which):
            ref = self.shards[s]
            mask = which == s
            local = ids[mask] - ref.offset
            v = None
            for kind, rows in (("image", local[local < ref.images]), ("text", local[local >= ref.images] - ref.images)):
                if not len(rows):
                    continue
                cleaned, _ = clean_vectors(np.load(ref.paths[kind], mmap_mode="r")[rows], str(ref.paths[kind]), rows)
                v = np.empty((len(local), cleaned.shape[1]), np.float32) if v is None else v
                v[local < ref.images if kind == "image" else local >= ref.images] = cleaned
            out = np.empty((len(ids), v.shape[1]), np.float32) if out is None else out
            out[mask] = v
        return out if out is not None else np.zeros((0, 0), np.float32)

    def positions_of(self, ids) -> np.ndarray:
        """Corpus position of every row of an id table whose parts this corpus holds, first among its parts."""
        starts = {(ref.part, ref.index): ref.offset for ref in self.shards}
        images = {(ref.part, ref.index): ref.images for ref in self.shards}
        keys = list(zip(ids["part"].tolist(), ids["shard"].tolist(), strict=True))
        offset = np.array([starts[k] for k in keys], np.int64)
        n_img = np.array([images[k] for k in keys], np.int64)
        row = ids["row"].to_numpy(np.int64)
        is_text = (ids["modality"] == "text").to_numpy()
        return offset + np.where(is_text, n_img + row, row)


class ArrayVectors:
    """An in-memory corpus with CorpusVectors' interface (for benchmarks and callers holding arrays)."""

    def __init__(self, vectors: np.ndarray, block: int = 100_000):
        self.vectors, self.n, self.block = vectors, len(vectors), block

    def blocks(self):
        for s in range(0, self.n, self.block):
            yield s, self.vectors[s:s + self.block]

    def gather(self, positions: np.ndarray) -> np.ndarray:
        return self.vectors[np.asarray(positions)]


def shard_rows(out: Path, manifest: dict) -> list[tuple[int, int]]:
    """(images, texts) per shard as the shard manifests record them, checked to come from the merged export."""
    shards = checked_shard_manifests(out, manifest)
    return [(int(shards[i]["rows"]["images"]), int(shards[i]["rows"]["texts"])) for i in sorted(shards)]


def read_id_table(out: Path, manifest: dict, part: int, first_id: int):
    """The id table of one embeddings directory (ids from ``first_id`` in corpus order); checks arrays against
    metadata (shapes, counts, dims)."""
    import pandas as pd

    frames, next_id = [], first_id
    for shard in iter_shards(out, manifest):
        meta = shard.metadata.copy()  # image rows then text rows, as the arrays concatenate (iter_shards checks)
        meta.insert(0, "id", np.arange(next_id, next_id + len(meta), dtype=np.int64))
        meta["part"] = part
        meta["shard"] = shard.index
        frames.append(meta)
        next_id += len(meta)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(ID_COLUMNS))
    for col in ("part", "shard", "row", "pair_id"):
        table[col] = table[col].astype("int64")
    return table[list(ID_COLUMNS)]


def read_part(emb_dir: Path, manifest: dict, part: int = 0, first_id: int = 0):
    """One embeddings directory as the index's part ``part``: its id table (ids from ``first_id``, corpus order)
    and its vectors."""
    ids = read_id_table(emb_dir, manifest, part=part, first_id=first_id)
    corpus = CorpusVectors()
    corpus.add_dir(emb_dir, manifest)
    return ids, corpus


def in_add_order(ids, order: np.ndarray, first_id: int):
    """The id table in add order (``order``: corpus positions as added), with ids first_id, first_id + 1, ..."""
    table = ids.iloc[order].reset_index(drop=True)
    table["id"] = np.arange(first_id, first_id + len(table), dtype=np.int64)
    return table
