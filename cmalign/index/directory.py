"""The index directory on disk — its files, its manifest and its id table — in one place, so that building,
extending and loading an index agree on the format:

    IDX/index.faiss     one FAISS index, inner product over L2-normalised vectors; int64 ids 0..n-1 in the
                        order added: the embeddings in order (per shard its images, then its texts), except
                        the tuning sample, held out while the knobs are tuned and added last
    IDX/index.ivfdata   the inverted lists of an on-disk IVF index (``on_disk=True``), beside index.faiss
    IDX/ids.parquet     id → modality, pair_id, part, shard, row, image_path, caption, label, key, source
    IDX/manifest.json   the export that made the embeddings (fingerprint), the factory and why it was chosen,
                        the tuned search knobs and the recall they measured, the parts, versions, and a
                        checksum of every file (verified at load: a damaged index is an error, not wrong scores)

Each *part* is one merged embeddings directory (:mod:`cmalign.corpus.store`): the first from `cmalign index`,
one more per `cmalign index-add`.
"""

from __future__ import annotations

import time
from pathlib import Path

from cmalign.artifacts.checksums import file_checksum
from cmalign.artifacts.manifests import (
    field,
    is_count,
    is_dict,
    is_file_name,
    is_int,
    is_number,
    is_optional_str,
    is_positive_int,
    is_str,
    read_manifest_file,
)
from cmalign.index.errors import IndexFormatError

KIND = "cmalign-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
IDS_FILE = "ids.parquet"
MANIFEST = "manifest.json"
ID_COLUMNS = ("id", "modality", "pair_id", "part", "shard", "row", "image_path", "caption", "label", "key", "source")


def read_index_manifest(index_dir: str | Path) -> dict:
    """The manifest of an index directory; errors say when the directory is not one `cmalign index` wrote."""
    d = Path(index_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise IndexFormatError(f"index directory not found: {d}")
    manifest = read_manifest_file(path, KIND, IndexFormatError, f"is {d} a directory written by `cmalign index`?",
                                  FORMAT_VERSION)
    check_manifest(manifest, path)
    return manifest


# The search knobs a manifest may set, each a positive integer (what tuning writes), bounded: nprobe = 0 on an IVF
# index with a refine stage aborts the process from inside faiss, and a huge nprobe or k_factor_rf there allocates
# nprobe (k × k_factor_rf) entries per query (2**31: killed for memory). nprobe is checked against the index's
# lists when it is loaded (JointIndex); tuning tries efSearch up to 1024 and k_factor_rf up to 256.
SEARCH_KNOBS = ("nprobe", "efSearch", "k_factor_rf")
MAX_KNOB = {"nprobe": 2**31 - 1, "efSearch": 1 << 16, "k_factor_rf": 1 << 12}


def check_manifest(m: dict, path: Path) -> None:
    """Raise IndexFormatError naming the field of ``m`` that loading, searching or extending would trip over."""
    def check(obj, name, what, ok, where="", required=True):
        return field(obj, name, what, ok, path, IndexFormatError, required=required, where=where)

    export = check(m, "export", "an object", is_dict)
    check(export, "fingerprint", "a string", is_str, "export")
    check(export, "path", "a path or null", is_optional_str, "export")
    check(export, "variant", "a variant name or null", is_optional_str, "export", required=False)
    check(m, "factory", "a faiss factory string", is_str)
    check(m, "dim", "a positive integer", is_positive_int)
    files = check(m, "files", "an object", is_dict)
    for role in ("index", "ids"):
        check(files, role, "a file name in the index directory", is_file_name, "files")
    check(m, "on_disk", "true or false", lambda v: isinstance(v, bool), required=False)
    params = check(m, "search_params", "an object", is_dict, required=False) or {}
    for name in params:
        check(params, name, f"one of the knobs {', '.join(SEARCH_KNOBS)} with an integer from 1 to "
              f"{MAX_KNOB.get(name, 1)}",
              lambda v, name=name: name in SEARCH_KNOBS and is_positive_int(v) and v <= MAX_KNOB[name],
              "search_params")
    sums = check(m, "checksums", "an object", is_dict, required=False) or {}
    for name in sums:
        check(sums, name, "{size, sha256} of a file in the index directory",
              lambda v, name=name: is_file_name(name) and is_dict(v) and is_count(v.get("size"))
              and is_str(v.get("sha256")), "checksums")
    # What `cmalign index-add` reads besides (it requires them: :func:`require_for_add`).
    parts = check(m, "parts", "a list of parts", lambda v: isinstance(v, list) and all(is_dict(p) for p in v),
                  required=False) or []
    for i, p in enumerate(parts):
        check(p, "embeddings", "the path of an embeddings directory", is_str, f"parts[{i}]")
    check(m, "memory", "an object", is_dict, required=False)
    recall = check(m, "recall", "an object", is_dict, required=False) or {}
    check(recall, "target", "a number", is_number, "recall", required=False)
    settings = check(m, "settings", "an object", is_dict, required=False) or {}
    for name in ("k", "tune_queries"):
        check(settings, name, "a positive integer", is_positive_int, "settings", required=False)
    check(settings, "seed", "an integer", is_int, "settings", required=False)
    check(settings, "recall_target", "a number", is_number, "settings", required=False)


def require_for_add(m: dict, path: Path) -> None:
    """`cmalign index-add` also needs the fields every manifest `cmalign index` writes (checked by type on read)."""
    for name in ("parts", "memory", "recall"):
        field(m, name, "present", lambda v: True, path, IndexFormatError)


def checksums(index_dir: Path, files: dict[str, str]) -> dict[str, dict]:
    """The manifest's ``checksums`` entry for the directory's ``files`` (role → file name)."""
    return {name: file_checksum(index_dir / name) for name in files.values()}


def verify_checksums(index_dir: Path, manifest: dict) -> None:
    """Raise IndexFormatError naming the first file whose size or checksum differs (indexes written before
    checksums were recorded are not checked)."""
    for name, want in manifest.get("checksums", {}).items():
        path = index_dir / name
        if not path.is_file():
            raise IndexFormatError(f"{path}: missing (listed in {index_dir / MANIFEST})")
        got = file_checksum(path)
        if got["size"] != want["size"] or got["sha256"] != want["sha256"]:
            what = "size" if got["size"] != want["size"] else "checksum"
            raise IndexFormatError(f"{path}: {what} differs from the manifest; the file was changed or damaged after "
                                   "`cmalign index` wrote it. Rebuild the index")


def write_ids(path: Path, ids) -> None:
    """Write the id table (a pandas DataFrame with :data:`ID_COLUMNS`)."""
    ids.to_parquet(path, index=False)


def export_entry(embeddings_manifest: dict) -> dict:
    """The manifest's ``export`` entry: the export that embedded the corpus, which every query must come from."""
    m = embeddings_manifest
    return {"path": m.get("export"), "fingerprint": m.get("export_fingerprint"), "embed_dim": int(m["embed_dim"]),
            "variant": m.get("variant"), "model": m.get("model")}


def part_entry(emb_dir: Path, embeddings_manifest: dict, part: int, first_id: int, n: int) -> dict:
    """One ``parts`` entry: which embeddings directory holds the vectors of ids ``first_id`` .. ``first_id + n``."""
    return {"part": part, "embeddings": str(emb_dir.resolve()), "ids": [first_id, first_id + n],
            "rows": embeddings_manifest.get("rows"), "num_shards": embeddings_manifest.get("num_shards"),
            "added": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def counts(ids) -> dict:
    """Items per modality in an id table."""
    return {m: int((ids["modality"] == m).sum()) for m in ("image", "text")}
