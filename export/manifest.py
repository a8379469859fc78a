"""The export directory's self-description: what is in it, where it came from, how far to trust it.

Torch-free: the runtime, `embed` and the index read it to refuse mixing artifacts of different
exports. The *fingerprint* names the export's behaviour (fp32 graphs, tokenizer, preprocessing), so
two exports of the same weights with the same settings match and anything else does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cmalign.artifacts import manifests
from cmalign.artifacts.checksums import sha256_file
from cmalign.errors import CmalignError

KIND = "cmalign-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREPROCESS = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
TOWERS = ("image", "text")
VARIANTS = ("fp32", "fp16", "int8")

# Parity bounds: the minimum cosine similarity of every row to torch eager fp32 (documented in the README).
MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.98}
# int8 may cost at most this much retrieval R@1 (absolute) against fp32 on the generated validation split.
INT8_MAX_R1_DROP = 0.01
INT8_R1_MIN_IMAGES = 500  # below this the R@1 difference is mostly sampling noise, so it is recorded, not enforced


class ExportFormatError(CmalignError, ValueError):
    """An export directory is missing, incomplete or of another kind."""


def graph_file(tower: str, variant: str) -> str:
    return f"{tower}_encoder.onnx" if variant == "fp32" else f"{tower}_encoder.{variant}.onnx"


FINGERPRINTED = (graph_file("image", "fp32"), graph_file("text", "fp32"), PREPROCESS, f"{TOKENIZER_DIR}/tokenizer.json")


def fingerprint(export_dir: str | Path, known: dict[str, str] | None = None) -> str:
    """Hash of the fp32 graphs, the preprocessing config and the tokenizer config (which holds the vocabulary's
    hash); ``known`` maps file names to sha256 values already computed."""
    d = Path(export_dir)
    h = hashlib.sha256()
    for rel in FINGERPRINTED:
        h.update(rel.encode())
        h.update(((known or {}).get(rel) or sha256_file(d / rel)).encode())
    return h.hexdigest()[:16]


def read_json_object(path: str | Path, missing_hint: str = "") -> dict:
    """A JSON object from one of the export's files; errors name the file and the problem."""
    return manifests.read_json_object(path, ExportFormatError, missing_hint)


def read_manifest(export_dir: str | Path) -> dict:
    d = Path(export_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise ExportFormatError(f"export directory not found: {d}")
    manifest = manifests.read_manifest_file(path, KIND, ExportFormatError,
                                            f"is {d} a directory written by `cmalign export`?", FORMAT_VERSION)
    def check(obj, name, what, ok, where=""):
        return manifests.field(obj, name, what, ok, path, ExportFormatError, where=where)

    graphs = check(manifest, "graphs", "an object of graph variants", manifests.is_dict)
    for variant, towers in graphs.items():
        check(graphs, variant, "an object with 'image' and 'text' graphs", manifests.is_dict, "graphs")
        for tower in TOWERS:
            entry = check(towers, tower, "an object", manifests.is_dict, f"graphs.{variant}")
            where = f"graphs.{variant}.{tower}"
            if "file" in entry:
                check(entry, "file", "a file name in the export directory", manifests.is_file_name, where)
            if "sha256" in entry:
                check(entry, "sha256", "a sha256 hex digest", manifests.is_optional_str, where)
    check(manifest, "fingerprint", "a string", manifests.is_str)
    check(manifest, "embed_dim", "a positive integer", manifests.is_positive_int)
    if "source" in manifest:  # where the export came from: embed records its open_clip_name
        check(manifest, "source", "an object", manifests.is_dict)
    return manifest
