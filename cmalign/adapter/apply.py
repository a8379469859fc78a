"""Stored embeddings re-mapped by an adapter into an embeddings directory of its derived export (torch-free).

The result has the layout `cmalign embed` writes (same shards, metadata, bad-sample lists) and names the derived
export, so `cmalign index` builds an aligned joint index from it and `search`/`serve` encode queries with the
adapted graphs. No image is decoded or encoded: a ``query`` adapter copies the image vectors bit for bit, a
``both`` adapter maps them from disk. Vectors of another export are refused (the fingerprints must match), so
aligned and unaligned vectors never meet in one index.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cmalign.adapter.weights import AdapterError, AdapterWeights
from cmalign.artifacts.atomic import atomic_dir, write_json
from cmalign.artifacts.outputs import check_output
from cmalign.corpus.store import KIND as EMB_KIND
from cmalign.corpus.store import iter_shards, merged_manifest, read_merged_manifest, save_array, shard_paths
from cmalign.export import manifest as mf


@dataclass
class ApplyResult:
    out: Path
    images: int
    texts: int
    seconds: float


def read_adapter_manifest(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / "manifest.json"
    if not path.is_file():
        raise AdapterError(f"{path}: missing; {adapter_dir} is not a finished `cmalign adapt` directory (an unfinished "
                           "run has no manifest: resume it with `cmalign adapt ... --resume`)")
    m = json.loads(path.read_text())
    if m.get("kind") != "cmalign-adapter":
        raise AdapterError(f"{path}: kind {m.get('kind')!r}, expected 'cmalign-adapter'")
    return m


def apply_adapter(embeddings: str | Path, adapter_dir: str | Path, out: str | Path,
                  overwrite: bool = False) -> ApplyResult:
    """Write ``out``: the embeddings of ``embeddings`` mapped by the adapter, bound to its derived export."""
    t0 = time.time()
    src, adapter_dir, out = Path(embeddings), Path(adapter_dir), Path(out)
    manifest = read_merged_manifest(src)
    am = read_adapter_manifest(adapter_dir)
    if manifest.get("export_fingerprint") != am["base_fingerprint"]:
        raise AdapterError(
            f"{src} was embedded with export {manifest.get('export')} (fingerprint "
            f"{manifest.get('export_fingerprint')}), but {adapter_dir} adapts export {am['base_export']} "
            f"({am['base_fingerprint']}); an adapter maps only the vectors of the export it was trained on")
    if int(manifest["embed_dim"]) != int(am["dim"]):
        raise AdapterError(f"{src} holds vectors of dim {manifest['embed_dim']}, {adapter_dir} maps dim {am['dim']}")
    export_dir = adapter_dir / am["export"]
    export = mf.read_manifest(export_dir)
    if export.get("fingerprint") != am.get("export_fingerprint"):
        raise AdapterError(f"{export_dir}: fingerprint {export.get('fingerprint')}, but {adapter_dir / 'manifest.json'}"
                           f" recorded {am.get('export_fingerprint')}; the derived export was changed")
    weights = AdapterWeights.load(adapter_dir)
    check_output(out, EMB_KIND, inputs=[src, adapter_dir], overwrite=overwrite)
    identity = {"export": str(export_dir.resolve()), "export_fingerprint": export["fingerprint"]}
    images = texts = 0
    shards = {}
    with atomic_dir(out) as tmp:
        for shard in iter_shards(src, manifest):
            p = shard_paths(tmp, shard.index)
            for d in ("img_emb", "text_emb", "metadata", "shards", "bad_samples"):
                (tmp / d).mkdir(exist_ok=True)
            dtype = shard.image.dtype
            if "image" in weights.towers:
                save_array(p["image"], weights.apply("image", shard.image).astype(dtype))
            else:
                shutil.copy2(shard.paths["image"], p["image"])  # a query adapter leaves image vectors as they are
            save_array(p["text"], weights.apply("text", shard.text).astype(shard.text.dtype))
            shutil.copy2(shard.paths["metadata"], p["metadata"])
            if shard.paths["bad"].is_file():
                shutil.copy2(shard.paths["bad"], p["bad"])
            own = json.loads(shard.paths["manifest"].read_text())
            own.update(identity, adapter={"path": str(adapter_dir.resolve()), "config_hash": am["config_hash"],
                                          "kind": am["adapter_kind"], "mapped_from": str(src.resolve())})
            write_json(p["manifest"], own)
            shards[shard.index] = own
            images, texts = images + len(shard.image), texts + len(shard.text)
        merged = merged_manifest(tmp, shards)
        merged["adapter"] = shards[min(shards)]["adapter"]
        write_json(tmp / "manifest.json", merged)
    return ApplyResult(out, images, texts, time.time() - t0)
