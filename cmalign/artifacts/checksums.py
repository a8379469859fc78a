"""File checksums that artifacts record in their manifests and verify when they are loaded.

Exports hash their graphs whole; an index can be tens of GB, so :func:`file_checksum` hashes a sample of a
large file (its ends and evenly spaced blocks) to keep a load from reading it twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FULL_HASH_BYTES = 256 << 20  # files up to this size are hashed whole (~0.5 s)
_SAMPLE_BLOCKS, _BLOCK, _ENDS = 64, 64 << 10, 1 << 20


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_checksum(path: str | Path) -> dict:
    """{"size", "sha256", "sampled"}: the whole file's sha256 up to FULL_HASH_BYTES; above, a hash of its first and
    last MiB and 64 evenly spaced 64 KiB blocks."""
    path = Path(path)
    size = path.stat().st_size
    if size <= FULL_HASH_BYTES:
        return {"size": size, "sha256": sha256_file(path), "sampled": False}
    h = hashlib.sha256()
    spots = [(0, _ENDS), (size - _ENDS, _ENDS)]
    spots += [(i * (size - _BLOCK) // (_SAMPLE_BLOCKS - 1), _BLOCK) for i in range(_SAMPLE_BLOCKS)]
    with open(path, "rb") as f:
        for offset, length in spots:
            f.seek(offset)
            h.update(f.read(length))
    return {"size": size, "sha256": h.hexdigest(), "sampled": True}
