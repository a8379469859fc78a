"""Embeddings that clip-retrieval's `inference` wrote, imported into an embeddings directory bound to an export.

clip-retrieval keeps one row per sample: row i of ``img_emb/img_emb_K.npy``, of ``text_emb/text_emb_K.npy`` and of
``metadata/metadata_K.parquet`` are one image and its caption. It records no model. The import writes the layout
`cmalign embed` writes (image rows, then text rows, an image and its caption sharing a ``pair_id``; shard and merged
manifests naming the export), so `adapt`, `adapt-apply`, `index`, `search` and `serve` take the vectors unchanged.
The vector files are hard-linked when source and output share a file system (no copy of a 10M-row corpus), else
copied; their bytes are not changed.

Because nothing in clip-retrieval's files says which model made them, the import checks it: the first captions of
shard 0 are encoded with the export and must match their stored vectors (cosine >= VERIFY_MIN_COSINE). Vectors of
another model would otherwise be aligned, indexed and queried with the wrong graphs, silently. Torch-free.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import cmalign
from cmalign.artifacts.atomic import atomic_dir, write_json
from cmalign.artifacts.outputs import check_output
from cmalign.corpus.store import KIND, EmbeddingsError, merged_manifest, save_metadata, shard_paths
from cmalign.metrics.vectors import row_cosines

VERIFY_CAPTIONS = 16
VERIFY_MIN_COSINE = 0.99  # float16 storage costs ~1e-4 of cosine; another model's vectors land near 0
_FILE_RE = {"image": re.compile(r"img_emb_(\d+)\.npy$"), "text": re.compile(r"text_emb_(\d+)\.npy$"),
            "metadata": re.compile(r"metadata_(\d+)\.parquet$")}


def is_clip_retrieval_dir(path: str | Path) -> bool:
    """clip-retrieval's output: ``img_emb/`` and ``text_emb/`` with no cmalign manifest."""
    p = Path(path)
    return (p / "img_emb").is_dir() and (p / "text_emb").is_dir() and not (p / "manifest.json").is_file()


@dataclass
class ImportConfig:
    source: str  # clip-retrieval's output folder (img_emb/, text_emb/, metadata/)
    export: str  # the export whose model made the vectors (checked on captions)
    out: str = "emb/imported"
    variant: str = "fp32"  # the graphs queries of this directory run through
    link: bool = True  # hard-link the vector files where possible (False: always copy)
    verify: bool = True  # refuse vectors the export does not reproduce
    overwrite: bool = False


@dataclass
class ImportResult:
    out: Path
    shards: int
    pairs: int
    linked: bool
    verified: dict = field(default_factory=dict)
    seconds: float = 0.0


def _shard_files(src: Path) -> list[dict[str, Path | None]]:
    """Per clip-retrieval shard number, in order: its vector files and metadata (which may be absent)."""
    found: dict[str, dict[int, Path]] = {k: {} for k in _FILE_RE}
    for kind, folder in (("image", "img_emb"), ("text", "text_emb"), ("metadata", "metadata")):
        for p in sorted((src / folder).glob("*")) if (src / folder).is_dir() else []:
            m = _FILE_RE[kind].search(p.name)
            if m:
                found[kind][int(m.group(1))] = p
    if not found["image"]:
        raise EmbeddingsError(f"{src}/img_emb: no img_emb_N.npy files; is {src} clip-retrieval's output folder?")
    shards = []
    for k in sorted(found["image"]):
        if k not in found["text"]:
            raise EmbeddingsError(f"{found['image'][k]}: no text_emb/text_emb_{k}.npy beside it; an adapter and a "
                                  "joint index need the captions' vectors too (clip-retrieval --enable_text True)")
        shards.append({"image": found["image"][k], "text": found["text"][k], "metadata": found["metadata"].get(k)})
    extra = sorted(set(found["text"]) - set(found["image"]))
    if extra:
        raise EmbeddingsError(f"{found['text'][extra[0]]}: no img_emb file of the same number beside it")
    return shards


def _read_vectors(path: Path) -> np.ndarray:
    try:
        a = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise EmbeddingsError(f"{path}: not a readable .npy array ({e})") from None
    if a.ndim != 2 or a.dtype not in (np.float16, np.float32):
        raise EmbeddingsError(f"{path}: a {a.dtype} array of shape {a.shape}; expected (rows, dim) float16 or float32")
    return a


def _read_metadata(path: Path | None, rows: int) -> dict[str, list]:
    """image_path (or url), caption and key of each row; columns clip-retrieval did not write are empty."""
    empty: list = [None] * rows
    if path is None:
        return {"image_path": empty, "caption": empty, "key": empty}
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise EmbeddingsError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if table.num_rows != rows:
        raise EmbeddingsError(f"{path}: {table.num_rows} rows, but its vector files hold {rows}; clip-retrieval "
                              "writes one metadata row per sample")

    def column(*names: str) -> list:
        for n in names:
            if n in table.column_names:
                return [None if v is None else str(v) for v in table.column(n).to_pylist()]
        return empty

    return {"image_path": column("image_path", "url"), "caption": column("caption"), "key": column("key")}


def _verify(export, shard: dict, text: np.ndarray, meta: dict) -> dict:
    """The export re-encodes the first captions; their stored vectors (``text``, the shard's) must match."""
    rows = [i for i, c in enumerate(meta["caption"][:VERIFY_CAPTIONS * 4]) if c][:VERIFY_CAPTIONS]
    if not rows:
        raise EmbeddingsError(f"{shard['metadata'] or shard['text']}: no captions in the metadata to check the "
                              "vectors against the export with; pass --no-verify if you are sure which model made them")
    cos = row_cosines(text[rows], export.encode_texts([meta["caption"][i] for i in rows]))
    worst = int(np.argmin(cos))
    if not cos[worst] >= VERIFY_MIN_COSINE:
        raise EmbeddingsError(
            f"{shard['text']}, row {rows[worst]}: the stored vector of caption {meta['caption'][rows[worst]]!r} has "
            f"cosine {cos[worst]:.4f} to what export {export.path} makes of it (need >= {VERIFY_MIN_COSINE}); these "
            "vectors were made by another model. Import them with the export of that model")
    return {"captions": len(rows), "min_cosine": float(cos.min())}


def _place(src: Path, dst: Path, link: bool) -> bool:
    """Hard-link ``src`` to ``dst`` (True), or copy it (False) across file systems or when asked."""
    if link:
        try:
            os.link(src, dst)
            return True
        except OSError:
            pass
    shutil.copy2(src, dst)
    return False


def import_clip_retrieval(cfg: ImportConfig) -> ImportResult:
    """Write ``cfg.out``: ``cfg.source``'s vectors in cmalign's layout, bound to ``cfg.export``; see the module."""
    from cmalign.export.runtime import ExportedModel

    t0 = time.time()
    src, out = Path(cfg.source), Path(cfg.out)
    if (src / "manifest.json").is_file():
        raise EmbeddingsError(f"{src} has a manifest.json: it is a cmalign embeddings directory already; use it as is")
    shards = _shard_files(src)
    export = ExportedModel(cfg.export, variant=cfg.variant, threads=1)
    vectors, metas = [], []
    for s in shards:
        img, txt = _read_vectors(s["image"]), _read_vectors(s["text"])
        if len(img) != len(txt):
            raise EmbeddingsError(f"{s['text']}: {len(txt)} rows, but {s['image']} holds {len(img)}; clip-retrieval "
                                  "pairs row i of both, so they must have equal lengths")
        for a, p in ((img, s["image"]), (txt, s["text"])):
            if a.shape[1] != export.embed_dim or a.dtype != img.dtype:
                raise EmbeddingsError(f"{p}: {a.dtype} vectors of dim {a.shape[1]}; export {cfg.export} makes dim "
                                      f"{export.embed_dim}, and every file must share {s['image']}'s dtype "
                                      f"{img.dtype}")
        vectors.append((img, txt))
        metas.append(_read_metadata(s["metadata"], len(img)))
    dtypes = {v[0].dtype for v in vectors}
    if len(dtypes) > 1:
        raise EmbeddingsError(f"{src}: shards of different dtypes ({', '.join(sorted(map(str, dtypes)))})")
    verified = _verify(export, shards[0], vectors[0][1], metas[0]) if cfg.verify else {"skipped": "--no-verify"}
    check_output(out, KIND, inputs=[src, Path(cfg.export)], overwrite=cfg.overwrite)
    n, offset, linked = len(shards), 0, True
    identity = {"export": str(Path(cfg.export).resolve()), "export_fingerprint": export.fingerprint,
                "model": {k: export.manifest.get(k) for k in ("alpha_target", "config_hash")}
                | {"source": export.manifest.get("source", {}).get("open_clip_name")},
                "variant": cfg.variant, "embed_dim": export.embed_dim, "dtype": str(vectors[0][0].dtype),
                "data": {"path": str(src.resolve()), "format": "clip-retrieval embeddings", "imported": True},
                "num_shards": n}
    manifests = {}
    with atomic_dir(out) as tmp:
        for d in ("img_emb", "text_emb", "metadata", "shards", "bad_samples"):
            (tmp / d).mkdir()
        for i, (s, (img, _), meta) in enumerate(zip(shards, vectors, metas, strict=True)):
            p = shard_paths(tmp, i)
            linked &= _place(s["image"], p["image"], cfg.link)
            linked &= _place(s["text"], p["text"], cfg.link)
            rows = len(img)
            ids = list(range(offset, offset + rows))  # clip-retrieval's pairing: the sample's global row
            save_metadata(p["metadata"], {
                "modality": ["image"] * rows + ["text"] * rows, "row": list(range(rows)) * 2, "pair_id": ids * 2,
                "image_path": meta["image_path"] * 2, "caption": meta["caption"] * 2, "label": [None] * (2 * rows),
                "key": meta["key"] * 2, "source": [str(s["image"])] * rows + [str(s["text"])] * rows})
            p["bad"].write_text("")
            manifests[i] = {**identity, "kind": "cmalign-embeddings-shard", "shard": i,
                            "cmalign_version": cmalign.__version__, "rows": {"images": rows, "texts": rows},
                            "skipped": 0, "seconds": 0.0,
                            "imported_from": {"image": str(s["image"]), "text": str(s["text"]),
                                              "metadata": None if s["metadata"] is None else str(s["metadata"]),
                                              "verified": verified}}
            write_json(p["manifest"], manifests[i])
            offset += rows
        merged = merged_manifest(tmp, manifests)
        merged["imported_from"] = {"source": str(src.resolve()), "layout": "clip-retrieval", "verified": verified}
        write_json(tmp / "manifest.json", merged)
    return ImportResult(out, n, offset, linked, verified, time.time() - t0)
