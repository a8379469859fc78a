"""`cmalign index-add`: grow an index with new data embedded by the same export, without rebuilding it.

A corpus that grows every day cannot be re-indexed every day. The new embeddings directory becomes the next
*part*: its ids follow the existing ones, the search knobs are re-tuned on the grown corpus when every earlier
part is still on disk as it was indexed (the manifest says so when they could not be), and the directory is
replaced only once the larger index is written, so a failure leaves the old one as it was.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cmalign.artifacts.atomic import atomic_dir, write_json
from cmalign.artifacts.manifests import json_object_or_none
from cmalign.corpus.store import EmbeddingsError, read_merged_manifest
from cmalign.index.build import IndexResult, Progress, fill_and_tune
from cmalign.index.choice import estimate_bytes
from cmalign.index.directory import (
    IDS_FILE,
    INDEX_FILE,
    MANIFEST,
    checksums,
    counts,
    part_entry,
    read_index_manifest,
    require_for_add,
    write_ids,
)
from cmalign.index.errors import ExportMismatchError, IndexBuildError
from cmalign.index.faiss_backend import import_faiss
from cmalign.index.joint import JointIndex
from cmalign.index.tuning import RecallProbe, recall_entry
from cmalign.index.vectors import CorpusVectors, in_add_order, read_part


def add_to_index(index_dir: str | Path, embeddings: str | Path, retune: bool = True,
                 progress: Progress | None = None) -> IndexResult:
    """Add a merged embeddings directory (new data, same export) to an existing index without rebuilding it.

    The new ids follow the existing ones. The index directory is replaced only once the larger index is
    written, so a failure leaves the old one as it was. With ``retune`` the search knobs are re-tuned on the
    grown corpus (read back from every part's embeddings directory).
    """
    t0 = time.time()
    faiss = import_faiss()
    index_dir, emb_dir = Path(index_dir), Path(embeddings)
    manifest = read_index_manifest(index_dir)
    require_for_add(manifest, index_dir / MANIFEST)
    if manifest.get("on_disk"):
        raise IndexBuildError(f"{index_dir} is an on-disk index, whose merged lists are read-only: rebuild it with "
                              "every embeddings shard (`cmalign index ... --on-disk --overwrite`)")
    new_manifest = read_merged_manifest(emb_dir)
    if not _same_export(new_manifest, manifest):
        remedy = f"Re-embed {emb_dir} with {manifest['export']['path']}"
        adapter = (json_object_or_none(Path(manifest["export"]["path"]) / "manifest.json") or {}).get("adapter")
        if adapter and adapter.get("base_fingerprint") == new_manifest.get("export_fingerprint"):
            remedy = (f"They are the adapter's base vectors: map them first, `cmalign adapt-apply {emb_dir} "
                      f"--adapter {adapter.get('path')} --out DIR`, then add DIR (no re-encoding)")
        raise ExportMismatchError(
            f"{emb_dir} was embedded with export {new_manifest.get('export')} (fingerprint "
            f"{new_manifest.get('export_fingerprint')}), the index {index_dir} with {manifest['export']['path']} "
            f"({manifest['export']['fingerprint']}); vectors of two models cannot share an index. {remedy}")
    if int(new_manifest["embed_dim"]) != int(manifest["dim"]):
        raise ExportMismatchError(f"{emb_dir}: dim {new_manifest['embed_dim']}, the index {manifest['dim']}")
    resolved = str(emb_dir.resolve())
    if any(p["embeddings"] == resolved for p in manifest["parts"]):
        raise IndexBuildError(f"{emb_dir} is already in {index_dir} (part "
                              f"{next(p['part'] for p in manifest['parts'] if p['embeddings'] == resolved)})")
    loaded = JointIndex(index_dir)
    index, old_ids = loaded.index, loaded.ids
    first = int(index.ntotal)
    part = len(manifest["parts"])
    new_ids, corpus = read_part(emb_dir, new_manifest, part=part, first_id=first)
    if corpus.n == 0:
        raise EmbeddingsError(f"{emb_dir}: holds no embeddings; nothing to add")
    if not index.is_trained:  # pragma: no cover - every written index is trained
        raise IndexBuildError(f"{index_dir}: the index is not trained")

    # Re-tuning needs every earlier part's vectors (truth is exact search over all); the held-out queries are
    # drawn from the new part, which is what an index that grows sees next.
    combined = _all_parts(manifest) if retune else None
    probe, gather_old, old_n = None, None, 0
    if combined is not None:
        old_n = combined.n
        combined.add_dir(emb_dir, new_manifest)
        settings = manifest.get("settings", {})
        probe = RecallProbe.held_out(combined.blocks, combined.gather, combined.n, k=settings.get("k", 10),
                                     n_queries=settings.get("tune_queries", 1000), seed=settings.get("seed", 0) + part,
                                     candidates=np.arange(old_n, combined.n))
        position_of_id = combined.positions_of(old_ids)
        gather_old = lambda ids: combined.gather(position_of_id[np.asarray(ids)])  # noqa: E731
    target = manifest["recall"].get("target", manifest.get("settings", {}).get("recall_target", 0.95))
    index, order, tuning = fill_and_tune(index, corpus, probe, target, progress,
                                         first_id=first, position_offset=old_n,
                                         gather_old=gather_old)
    if index.ntotal != first + corpus.n:
        raise IndexBuildError(f"the index holds {index.ntotal} vectors after adding {corpus.n} to {first}")

    import pandas as pd

    ids = pd.concat([old_ids, in_add_order(new_ids, order, first)], ignore_index=True)
    new = dict(manifest)
    new["parts"] = manifest["parts"] + [part_entry(emb_dir, new_manifest, part, first, corpus.n)]
    new["ntotal"], new["counts"] = int(index.ntotal), counts(ids)
    new["memory"] = dict(manifest["memory"], estimate_bytes=estimate_bytes(manifest["factory"], int(index.ntotal),
                                                                             int(manifest["dim"])))
    new["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if tuning is not None:
        new["search_params"] = tuning.params
        new["recall"] = recall_entry(tuning, probe) | {"after_add": part}
    else:
        why = ("--no-retune" if not retune else
               "an earlier part's embeddings directory is gone or changed" if combined is None else
               "the new part is too small to hold out queries")
        new["recall"] = dict(manifest["recall"], stale=f"not re-measured after adding part {part} ({why})")
    with atomic_dir(index_dir) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        write_ids(tmp / IDS_FILE, ids)
        new["checksums"] = checksums(tmp, new["files"])
        write_json(tmp / MANIFEST, new)
    return IndexResult(index_dir, new, time.time() - t0)


def _same_export(embeddings_manifest: dict, index_manifest: dict) -> bool:
    """Whether an embeddings directory was made by the export that embedded the index's corpus."""
    return embeddings_manifest.get("export_fingerprint") == index_manifest["export"]["fingerprint"]


def _all_parts(index_manifest: dict) -> CorpusVectors | None:
    """The vectors of every part, if each embeddings directory is still there as it was indexed (same export,
    same row counts); None otherwise."""
    corpus = CorpusVectors()
    for p in index_manifest["parts"]:
        d = Path(p["embeddings"])
        try:
            manifest = read_merged_manifest(d)
        except (EmbeddingsError, OSError):
            return None
        if not _same_export(manifest, index_manifest) or manifest.get("rows") != p.get("rows"):
            return None
        corpus.add_dir(d, manifest)
    return corpus
