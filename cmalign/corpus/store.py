"""The embeddings directory: clip-retrieval's layout, one set of files per shard, merged by manifest.

    OUT/img_emb/img_emb_0003.npy        (n_images, d) image embeddings of shard 3
    OUT/text_emb/text_emb_0003.npy      (n_texts, d) caption embeddings of shard 3
    OUT/metadata/metadata_0003.parquet  n_images + n_texts rows: first the image rows in img_emb order,
                                        then the text rows in text_emb order (column `row` is the row
                                        in that file); `modality`, `pair_id` (an image and its captions
                                        share it), `image_path`, `caption`, `label`, `key`, `source`
    OUT/shards/shard_0003.json          what made shard 3 (export fingerprint, data, counts, timing)
    OUT/bad_samples/bad_samples_0003.jsonl  skipped images and captions, one JSON object per line
    OUT/manifest.json                   written by the merge once every shard is there and they agree

Concatenating ``img_emb`` then ``text_emb`` of a shard gives one matrix aligned with its metadata
rows, which is what a joint index needs. Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmalign.artifacts.atomic import atomic_write, write_json
from cmalign.artifacts.manifests import field as manifest_field
from cmalign.artifacts.manifests import (
    is_count,
    is_dict,
    is_number,
    is_positive_int,
    read_json_object,
    read_manifest_file,
)
from cmalign.errors import CmalignError, ConfigError

KIND = "cmalign-embeddings"
FORMAT_VERSION = 1
METADATA_COLUMNS = ("modality", "row", "pair_id", "image_path", "caption", "label", "key", "source")
_SHARD_RE = re.compile(r"shard_(\d{4,})\.json$")


class EmbeddingsError(CmalignError, ValueError):
    """An embeddings directory is incomplete, inconsistent, or mixes exports."""


def shard_name(index: int) -> str:
    return f"{index:04d}"


def shard_paths(out: Path, index: int) -> dict[str, Path]:
    s = shard_name(index)
    return {"image": out / "img_emb" / f"img_emb_{s}.npy", "text": out / "text_emb" / f"text_emb_{s}.npy",
            "metadata": out / "metadata" / f"metadata_{s}.parquet", "manifest": out / "shards" / f"shard_{s}.json",
            "bad": out / "bad_samples" / f"bad_samples_{s}.jsonl"}


def parse_shard(spec: str) -> tuple[int, int]:
    """'3/16' → (3, 16); shards are numbered from 0."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec or "")
    if not m:
        raise ConfigError(f"--shard expects I/N (e.g. 3/16, shards numbered 0..N-1), got {spec!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {spec}: need N >= 1 and 0 <= I < N (shards are numbered from 0)")
    return i, n


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, array)


def save_metadata(path: Path, rows: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("modality", pa.string()), ("row", pa.int64()), ("pair_id", pa.int64()),
                        ("image_path", pa.string()), ("caption", pa.string()), ("label", pa.string()),
                        ("key", pa.string()), ("source", pa.string())])
    table = pa.table({c: rows[c] for c in METADATA_COLUMNS}, schema=schema)
    with atomic_write(path, "wb") as f:
        pq.write_table(table, f)


def read_shard_manifests(out: Path) -> dict[int, dict]:
    """Every shard manifest in ``out``, by shard number; a damaged one is an EmbeddingsError naming it."""
    found = {}
    for p in sorted((out / "shards").glob("shard_*.json")):
        m = _SHARD_RE.search(p.name)
        if m:
            found[int(m.group(1))] = check_shard_manifest(read_json_object(p, EmbeddingsError), p)
    return found


def check_shard_manifest(m: dict, path: Path) -> dict:
    """``m`` when it holds the fields merging and loading read, of the types they need; else EmbeddingsError."""
    def check(obj, name, what, ok, where=""):
        return manifest_field(obj, name, what, ok, path, EmbeddingsError, where=where)

    check(m, "num_shards", "a positive integer", is_positive_int)
    check(m, "embed_dim", "a positive integer", is_positive_int)
    rows = check(m, "rows", "an object", is_dict)
    for kind in ("images", "texts"):
        check(rows, kind, "a count", is_count, "rows")
    check(m, "skipped", "a count", is_count)
    check(m, "seconds", "a number", is_number)
    check(m, "data", "an object", lambda v: v is None or is_dict(v))
    for name in ("export", "export_fingerprint", "model", "variant", "dtype", "cmalign_version"):
        check(m, name, "present", lambda v: True)
    return m


def check_compatible(existing: dict, new: dict, where: str) -> None:
    """Shards of one directory must come from one export, one data set and one shard count.

    The data set is compared by file name, format and size, not by absolute path: the nodes of a
    fan-out may mount the same data at different places.
    """
    def same_data(d: dict | None) -> dict:
        d = dict(d or {})
        d["path"] = Path(str(d.get("path", ""))).name
        return d

    for field, what in (("export_fingerprint", "export"), ("num_shards", "shard count"), ("data", "data set"),
                        ("variant", "graph variant"), ("dtype", "dtype"), ("embed_dim", "embedding dim")):
        differs = (same_data(existing.get(field)) != same_data(new.get(field)) if field == "data"
                   else existing.get(field) != new.get(field))
        if differs:
            exports = ""
            if field == "export_fingerprint":  # name both exports: the fingerprints alone do not say which is which
                exports = f"; export {existing.get('export')} here, {new.get('export')} in the new shard"
            raise EmbeddingsError(
                f"{where}: its {what} differs ({field}: {existing.get(field)!r} here, {new.get(field)!r} in the "
                f"new shard{exports}); shards of one directory must come from the same export, data set and "
                "settings. Use another --out"
            )


def merge_shards(out: str | Path) -> dict:
    """Check every shard is present and from the same export, then write OUT/manifest.json."""
    out = Path(out)
    manifest = merged_manifest(out, read_shard_manifests(out))
    write_json(out / "manifest.json", manifest)
    return manifest


def merged_manifest(out: Path, shards: dict[int, dict], files_in: dict[int, Path] | None = None) -> dict:
    """The merged manifest of ``out`` with these shard manifests, once they are all there and agree (else an
    EmbeddingsError); ``files_in`` names another directory holding a shard's files (one staged, not yet moved in)."""
    files_in = files_in or {}
    if not shards:
        raise EmbeddingsError(f"{out}: no shards found (expected {out}/shards/shard_NNNN.json)")
    first = shards[min(shards)]
    n = first["num_shards"]
    for i, m in shards.items():
        check_compatible(first, m, str(shard_paths(out, i)["manifest"]))
    missing = [i for i in range(n) if i not in shards]
    if missing:
        raise EmbeddingsError(f"{out}: {len(missing)} of {n} shards missing ({', '.join(map(str, missing[:20]))}"
                              f"{', ...' if len(missing) > 20 else ''}); run them with --shard I/{n}")
    for i in range(n):
        for kind in ("image", "text", "metadata"):
            if not shard_paths(files_in.get(i, out), i)[kind].is_file():
                raise EmbeddingsError(f"{shard_paths(out, i)[kind]}: missing although shard {i} is recorded")
    totals = {k: sum(shards[i]["rows"][k] for i in range(n)) for k in ("images", "texts")}
    skipped = sum(shards[i]["skipped"] for i in range(n))
    manifest = {
        "kind": KIND, "format_version": FORMAT_VERSION,
        **{k: first[k] for k in ("export", "export_fingerprint", "model", "variant", "embed_dim", "dtype", "data",
                                 "num_shards", "cmalign_version")},
        "rows": totals, "skipped": skipped,
        "shards": [{"index": i, "rows": shards[i]["rows"], "skipped": shards[i]["skipped"],
                    "seconds": shards[i]["seconds"]} for i in range(n)],
        "layout": "clip-retrieval: img_emb/img_emb_NNNN.npy, text_emb/text_emb_NNNN.npy, metadata/metadata_NNNN"
                  ".parquet (image rows, then text rows, per shard)",
    }
    return manifest


@dataclass
class Embeddings:
    """A merged embeddings directory in memory: both matrices and the metadata, aligned."""

    image: np.ndarray
    text: np.ndarray
    image_metadata: object  # pandas.DataFrame, one row per image embedding
    text_metadata: object  # pandas.DataFrame, one row per text embedding
    manifest: dict


def read_merged_manifest(out: str | Path) -> dict:
    """The merged manifest of an embeddings directory; errors say what to run when it is missing."""
    out = Path(out)
    path = out / "manifest.json"
    if not out.is_dir():
        raise EmbeddingsError(f"embeddings directory not found: {out}")
    if any((out / "shards").glob("shard_*.json")):
        hint = f"run `cmalign embed-merge {out}` once every shard is done"
    elif any((out / "img_emb").glob("img_emb_*.npy")):  # clip-retrieval's output: vectors, no record of the model
        hint = (f"it looks like clip-retrieval's output; bind it to the export of the model that made it with "
                f"`cmalign embed-import {out} --export EXPORT --out DIR`")
    else:
        hint = "it holds no shards; write some with `cmalign embed EXPORT --out DIR`"
    manifest = read_manifest_file(path, KIND, EmbeddingsError, hint, FORMAT_VERSION)
    for name in ("num_shards", "embed_dim"):
        manifest_field(manifest, name, "a positive integer", is_positive_int, path, EmbeddingsError)
    return manifest


@dataclass
class Shard:
    """One shard as written: its image and text matrices and its metadata rows (image rows, then text rows)."""

    index: int
    image: np.ndarray
    text: np.ndarray
    metadata: object  # pandas.DataFrame
    paths: dict[str, Path]


def checked_shard_manifests(out: Path, manifest: dict) -> dict[int, dict]:
    """Every shard the merged manifest lists, each made by the export the merged manifest names."""
    shards = read_shard_manifests(out)
    for i in range(int(manifest["num_shards"])):
        own = shards.get(i)
        where = shard_paths(out, i)["manifest"]
        if own is None:
            raise EmbeddingsError(f"{where}: missing although {out / 'manifest.json'} lists shard {i}")
        if own.get("export_fingerprint") != manifest.get("export_fingerprint"):
            raise EmbeddingsError(
                f"{where}: made by export {own.get('export')} (fingerprint {own.get('export_fingerprint')}), but "
                f"{out / 'manifest.json'} names {manifest.get('export')} ({manifest.get('export_fingerprint')}); a "
                "shard of another export was copied in. Re-embed it, then `cmalign embed-merge`")
    return {i: shards[i] for i in range(int(manifest["num_shards"]))}


def iter_shards(out: str | Path, manifest: dict | None = None):
    """Yield the shards of a merged directory one at a time (bounded memory), each checked against the manifest:
    the shard's own manifest names the same export, the arrays have the manifest's dim and match the metadata."""
    import pandas as pd

    out = Path(out)
    manifest = manifest or read_merged_manifest(out)
    checked_shard_manifests(out, manifest)
    dim = int(manifest["embed_dim"])
    for i in range(int(manifest["num_shards"])):
        p = shard_paths(out, i)
        arrays = {}
        for kind in ("image", "text"):
            try:
                a = np.load(p[kind], mmap_mode="r")  # read on use: a caller wanting only the metadata reads no vectors
            except (OSError, ValueError) as e:
                raise EmbeddingsError(f"{p[kind]}: cannot read ({e})") from e
            if a.ndim != 2 or a.shape[1] != dim:
                raise EmbeddingsError(f"{p[kind]}: shape {a.shape}, expected (n, {dim}) (embed_dim of "
                                      f"{out / 'manifest.json'})")
            arrays[kind] = a
        try:
            meta = pd.read_parquet(p["metadata"])
        except (OSError, ValueError) as e:
            raise EmbeddingsError(f"{p['metadata']}: cannot read ({e})") from e
        is_img = meta["modality"] == "image"
        if int(is_img.sum()) != len(arrays["image"]) or int((~is_img).sum()) != len(arrays["text"]):
            raise EmbeddingsError(f"{p['metadata']}: {int(is_img.sum())} image and {int((~is_img).sum())} text rows, "
                                  f"but the arrays have {len(arrays['image'])} and {len(arrays['text'])}")
        if not is_img.to_numpy()[: len(arrays["image"])].all():  # rows pair with the arrays by position
            raise EmbeddingsError(f"{p['metadata']}: rows are not image rows followed by text rows")
        yield Shard(i, arrays["image"], arrays["text"], meta, p)


def load_embeddings(out: str | Path) -> Embeddings:
    """Read a merged embeddings directory; fails if it is not merged or its files disagree."""
    import pandas as pd

    manifest = read_merged_manifest(out)
    images, texts, img_meta, txt_meta = [], [], [], []
    for shard in iter_shards(out, manifest):
        is_img = shard.metadata["modality"] == "image"
        images.append(shard.image)
        texts.append(shard.text)
        img_meta.append(shard.metadata[is_img])
        txt_meta.append(shard.metadata[~is_img])
    empty = np.zeros((0, manifest["embed_dim"]), np.float32)
    return Embeddings(image=np.concatenate(images) if images else empty,  # copies out of the memory maps
                      text=np.concatenate(texts) if texts else empty,
                      image_metadata=pd.concat(img_meta, ignore_index=True),
                      text_metadata=pd.concat(txt_meta, ignore_index=True), manifest=manifest)
